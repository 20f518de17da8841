"""Rollout engines: sample `n` responses per prompt under the step's length budget.

`make_engine(cfg.rollout, ...)` builds the engine `rollout.engine` names: `HFEngine`
(transformers' `generate` on the training model, any device) or `VLLMEngine` (colocated
vLLM, CUDA; vLLM is imported only when one is built). Both return `Rollout`s with the same
EOS, truncation and log-prob conventions (`siri.rollout.base`).
"""

from siri.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Rollout,
    RolloutEngine,
    SamplingSettings,
    cut_at_eos,
    eos_token_ids,
    is_truncated,
    make_engine,
)
from siri.rollout.hf_engine import HFEngine
from siri.rollout.vllm_engine import VLLMEngine

__all__ = [
    "FINISH_LENGTH", "FINISH_STOP", "HFEngine", "Rollout", "RolloutEngine", "SamplingSettings", "VLLMEngine",
    "cut_at_eos", "eos_token_ids", "is_truncated", "make_engine",
]
