"""Backend contract, registry and the choice behind `backend="auto"`.

A backend fills preallocated outputs; the op layer (`ops.py`) allocates them, validates the
inputs and hands every backend the same normalised tensors:

- `logits[T, V]`: float16, bfloat16 or float32, unit stride along V (rows may be strided);
- `targets[T]`: int32 or int64, contiguous; a row whose weight is 0 may hold any value;
- `advantages`, `weights`, `old_logprobs`, `ref_logprobs`, `rollout_logprobs`: float32 [T],
  contiguous, or None where the caller gave none;
- every output: float32 [T] contiguous (`grad_logits`: the dtype and shape of `logits`,
  possibly `logits` itself for `inplace_backward`).

The three entry points, with u = logits / temperature and p = softmax(u):

policy_loss_rows(logits, targets, advantages, weights, old, ref, rollout, cfg, out, grad_logits)
    Per row t: `out.logprobs[t]`, `out.entropy[t]` (H_t), `out.loss[t] = weights[t] * l_t`,
    `out.kl[t]` (0 when ref is None), `out.clipped[t]` (a CLIP_* code of config.py). When
    `grad_logits` is not None, writes d(weights[t] * l_t)/d logits[t] into it. A row with
    weight 0 gets zeros everywhere (and a zero gradient row) and its target is not read.
    TIS applies when `rollout` is not None and `cfg.tis_cap` is not None.

logprob_rows(logits, targets, temperature, logprobs, entropy, lse)
    logprobs[t] = u[t, y_t] - logsumexp(u[t]); entropy[t] = H_t when `entropy` is not None.
    `lse` is float32 [T, 2]: lse[t] = (m, log s), the row's maximum and log sum exp(u - m),
    whose sum is the log-sum-exp of u[t]. Kept apart because one float32 lse rounds log s
    to its spacing: at |u| ~ 1e6 (a temperature of 1e-5 on logits of order 10) the
    backward's p was off by 5e-5 relative, at 1e9 by all of it for tied maxima. Both parts
    are to the base `Backend.lse_base`, the unit the backend's own logprob_backward reads:
    e, except in the Triton backend, whose kernels work in base 2 (the row's maximum of
    u log2(e) as they rounded it).

logprob_backward(logits, targets, temperature, lse, logprobs, entropy, grad_logprobs,
                 grad_entropy, grad_logits)
    grad_logits = reference.logits_gradient(logits, targets, temperature, (m, log s), entropy,
    c=grad_logprobs, e=grad_entropy) with `lse` [T, 2] as logprob_rows writes it (its two
    columns may be any split of the log-sum-exp, e.g. the merged rows of the vocabulary split):
    d(g logp + h H) / d logits (the entropy term only when grad_entropy is not None). A row
    whose target is negative has no one-hot term: its target lies outside these columns (the
    vocabulary split of `fused_linear_algorithms.py` passes one slice of a row at a time, with
    the whole row's lse and entropy), and its `logprobs` entry is not read. `grad_logits` may
    be `logits` itself.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKEND_NAMES = ("triton", "cuda", "cpu", "torch")
AUTO = "auto"
BACKEND_CHOICES = (AUTO, *BACKEND_NAMES)  # what a public `backend=` and SIRI_BACKEND take


@dataclass
class RowOutputs:
    """Per-row float32 outputs of `policy_loss_rows`."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    loss: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor

    @classmethod
    def empty(cls, num_rows: int, device: torch.device) -> "RowOutputs":
        make = lambda: torch.empty(num_rows, dtype=torch.float32, device=device)  # noqa: E731
        return cls(make(), make(), make(), make(), make())


def lse_buffer(num_rows: int, device: torch.device) -> torch.Tensor:
    """Where logprob_rows writes each row's log-sum-exp as (m, log s): float32 [T, 2]."""
    return torch.empty(num_rows, 2, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class Backend:
    """One implementation of the three entry points documented above."""

    name: str
    supports_device: Callable[[torch.device], bool]
    policy_loss_rows: Callable[..., None]
    logprob_rows: Callable[..., None]
    logprob_backward: Callable[..., None]
    lse_base: float = math.e  # of the `lse` [T, 2] that logprob_rows writes and logprob_backward reads


# name -> module whose `make_backend()` returns a Backend, or None when unavailable here.
_BACKEND_MODULES = {
    "torch": "siri.kernels.torch_backend",
    "triton": "siri.kernels.triton_backend",
    "cpu": "siri.kernels.native_backend",
    "cuda": "siri.kernels.native_backend",
}
_loaded: dict[str, Backend | None] = {}


def _load(name: str) -> Backend | None:
    if name not in _loaded:
        try:
            module = importlib.import_module(_BACKEND_MODULES[name])
        except ModuleNotFoundError as error:
            if error.name != _BACKEND_MODULES[name]:
                raise
            _loaded[name] = None  # a source checkout without that module's file
        else:
            _loaded[name] = module.make_backend(name)
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends usable in this process (whatever the device)."""
    return [name for name in BACKEND_NAMES if _load(name) is not None]


def get_backend(name: str) -> Backend:
    """The Backend called `name` (one of `available_backends()`), for benchmarks and tests that
    call its entry points directly; `backend.supports_device(device)` says where it runs."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)}, got {name!r}")
    found = _load(name)
    if found is None:
        raise ValueError(f"backend={name!r} is not available here; available: {available_backends()}")
    return found


def _auto_order(device: torch.device) -> tuple[str, ...]:
    # On a GPU the Triton kernel comes first: no GPU measurement of the native CUDA kernel
    # exists yet to rank it higher. On a CPU the native C++ backend beats the chunked
    # PyTorch reference; Triton on a CPU only runs in the (slow) interpreter, never by auto.
    if device.type == "cuda":
        return ("triton", "cuda", "torch")
    return ("cpu", "torch")


def check_backend_name(backend, name: str = "backend") -> None:
    """ValueError naming `name` unless `backend` is one of BACKEND_CHOICES."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"{name} must be 'auto' or one of {list(BACKEND_NAMES)}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The Backend for a public `backend=` argument and the device of the logits."""
    check_backend_name(backend)
    if backend == AUTO:
        backend = os.environ.get("SIRI_BACKEND", AUTO) or AUTO
        check_backend_name(backend, "SIRI_BACKEND")
    if backend == AUTO:
        for name in _auto_order(device):
            found = _load(name)
            if found is not None and found.supports_device(device):
                return found
        raise ValueError(f"backend: no backend supports device {device}")
    found = _load(backend)
    if found is None:
        raise ValueError(f"backend={backend!r} is not available here; available: {available_backends()}")
    if not found.supports_device(device):
        raise ValueError(f"backend={backend!r} does not run on {device} tensors{_device_hint(backend, device)}")
    return found


def _device_hint(backend: str, device: torch.device) -> str:
    if backend == "triton" and device.type == "cpu":
        return " (Triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1)"
    return ""
