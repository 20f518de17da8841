"""A CPU platform for verl's FSDP engine, for the tests (verl 0.9 ships CUDA, ROCm and NPU ones only).

Importing this module installs it; verl then runs its engine with gloo on the CPU.
"""
import contextlib
import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import set_platform


class _CPUModule:
    """The bits of torch.cuda's interface verl calls, as no-ops on a CPU."""
    @staticmethod
    def is_available(): return True
    @staticmethod
    def current_device(): return 0
    @staticmethod
    def device_count(): return 1
    @staticmethod
    def set_device(index): pass
    @staticmethod
    def synchronize(*a, **k): pass
    @staticmethod
    def empty_cache(): pass
    @staticmethod
    def manual_seed(seed): torch.manual_seed(seed)
    @staticmethod
    def manual_seed_all(seed): torch.manual_seed(seed)
    @staticmethod
    def memory_allocated(*a, **k): return 0
    @staticmethod
    def memory_reserved(*a, **k): return 0
    @staticmethod
    def max_memory_allocated(*a, **k): return 0
    @staticmethod
    def max_memory_reserved(*a, **k): return 0
    @staticmethod
    def mem_get_info(*a, **k): return (0, 0)
    @staticmethod
    def reset_peak_memory_stats(*a, **k): pass
    @staticmethod
    def get_rng_state(*a, **k): return torch.get_rng_state()
    @staticmethod
    def set_rng_state(state, *a, **k): torch.set_rng_state(state)


class CPUPlatform(PlatformBase):
    device_name = "cpu"
    vendor_name = "cpu"
    device_module = _CPUModule

    def is_available(self): return True
    def current_device(self): return "cpu"
    def device_count(self): return 1
    def set_device(self, device_index): pass
    def synchronize(self, device_index=None): pass
    def manual_seed(self, seed): torch.manual_seed(seed)
    def manual_seed_all(self, seed): torch.manual_seed(seed)
    def set_allocator_settings(self, settings): pass
    def empty_cache(self): pass
    def get_device_capability(self, device_index=0): return (None, None)
    def communication_backend_name(self): return "gloo"
    def visible_devices_envvar(self): return "CUDA_VISIBLE_DEVICES"
    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self): pass
    def profiler_stop(self): pass
    def ray_resource_name(self): return "CPU"
    def ray_noset_envvars(self): return []
    def is_ipc_supported(self): return False
    def cudart(self): return None


set_platform(CPUPlatform())
