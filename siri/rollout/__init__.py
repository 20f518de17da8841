"""Rollout engines: sample `n` responses per prompt under the step's length budget.

`make_engine(cfg.rollout, ...)` builds the engine `rollout.engine` names: `HFEngine`
(transformers' `generate` on the training model, any device) or `VLLMEngine` (colocated
vLLM, on a CUDA GPU or vLLM's CPU backend; vLLM is imported only when one is built). Both
return `Rollout`s with the same EOS, truncation and log-prob conventions
(`siri.rollout.base`).

The imports point one way: this package's `__init__` imports the engines, the engines
import `base`, and `base` imports neither.
"""

from __future__ import annotations

from siri.config import ENGINES, RolloutConfig
from siri.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Rollout,
    RolloutEngine,
    SamplingSettings,
    cut_at_eos,
    eos_token_ids,
    is_truncated,
)
from siri.rollout.hf_engine import HFEngine
from siri.rollout.vllm_engine import VLLMEngine, import_vllm

__all__ = [
    "FINISH_LENGTH", "FINISH_STOP", "HFEngine", "Rollout", "RolloutEngine", "SamplingSettings", "VLLMEngine",
    "cut_at_eos", "eos_token_ids", "is_truncated", "make_engine",
]


def make_engine(cfg: RolloutConfig, *, model, tokenizer, model_path: str, max_budget: int, dtype: str,
                seed: int) -> RolloutEngine:
    """The engine `cfg.engine` names.

    `max_budget` is the longest sequence the engine must hold: the longest prompt plus the
    largest response budget the schedule reaches (vLLM sizes its KV cache and rejects
    longer requests with it). `model_path` is the Hugging Face directory vLLM loads its own
    copy from; `dtype` its weight dtype ("bfloat16", ...); `seed` its engine seed. The
    transformers engine generates with `model` itself and ignores the three; vLLM needs no
    `model` (None: its EOS ids come from the checkpoint at `model_path`).
    """
    if cfg.engine == "hf":
        if model is None:
            raise ValueError("rollout.engine 'hf' generates with the training model: pass model=")
        return HFEngine(model, tokenizer, cfg.generation_batch_size, eos_token_ids(tokenizer, model))
    if cfg.engine == "vllm":
        import_vllm()  # a missing vLLM is the first thing to report
        if not model_path:
            raise ValueError("rollout.engine 'vllm' loads the model from a directory: set model.path")
        return VLLMEngine(model_path, max_model_len=max_budget, dtype=dtype,
                          gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                          seed=seed, kv_cache_gib=cfg.kv_cache_gib,
                          eos_token_ids=eos_token_ids(tokenizer, model) if model is not None else None)
    raise ValueError(f"rollout.engine must be one of {list(ENGINES)}, got {cfg.engine!r}")
