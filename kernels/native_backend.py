"""The "cpu" and "cuda" backends: the native extension `siri._C` built from csrc/.

Importing siri never requires the extension: `make_backend` returns None when it was not
built (`SIRI_SKIP_EXT=1`, or a source checkout), when this build lacks the asked half
(a CPU-only build has no "cuda"), or when it fails to load (built against another torch;
a warning says why).
"""

from __future__ import annotations

import warnings

import torch

from .backends import Backend, RowOutputs
from .config import RATIO_LOG_CLAMP, LossConfig


def _load_extension():
    try:
        from siri import _C
    except ModuleNotFoundError as error:
        if error.name not in ("siri", "siri._C"):
            raise
        return None
    except ImportError as error:  # present but unloadable, e.g. an ABI mismatch with torch
        warnings.warn(f"siri._C is installed but failed to load ({error}); the native backends are off", RuntimeWarning)
        return None
    return _C


_C = _load_extension()


def policy_loss_rows(
    logits, targets, advantages, weights, old, ref, rollout, cfg: LossConfig, out: RowOutputs, grad_logits
):
    _C.policy_loss_rows(
        logits, targets, advantages, weights, old, ref, rollout,
        cfg.temperature, cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.kl_coef, cfg.kl_estimator_id,
        cfg.entropy_coef, cfg.tis_cap, RATIO_LOG_CLAMP,
        out.logprobs, out.entropy, out.loss, out.kl, out.clipped, grad_logits,
    )


def logprob_rows(logits, targets, temperature, logprobs, entropy, lse):
    _C.logprob_rows(logits, targets, temperature, logprobs, entropy, lse)


def logprob_backward(logits, targets, temperature, lse, logprobs, entropy, grad_logprobs, grad_entropy, grad_logits):
    # The kernel needs lse (and entropy for its term); logp itself is not re-read.
    _C.logprob_backward(logits, targets, temperature, lse, entropy, grad_logprobs, grad_entropy, grad_logits)


def make_backend(name: str) -> Backend | None:
    if _C is None or (name == "cuda" and not _C.has_cuda):
        return None
    device_type = "cuda" if name == "cuda" else "cpu"
    return Backend(
        name=name,
        supports_device=lambda device: torch.device(device).type == device_type,
        policy_loss_rows=policy_loss_rows,
        logprob_rows=logprob_rows,
        logprob_backward=logprob_backward,
    )
