"""The "triton" backend: launchers of the kernels in `triton_kernels.py`.

Every launch goes through `triton_launches.py`, which declares each kernel's arguments and
switches for the offline compile check.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter
(`TRITON_INTERPRET=1`), which is how the CPU-only test suite exercises every kernel.
"""

from __future__ import annotations

import os

import torch

from .backends import Backend, RowOutputs
from .config import RATIO_LOG_CLAMP, LossConfig

try:
    import triton

    from .triton_kernels import block_size_and_warps
    from .triton_launches import LOGPROB, LOGPROB_BACKWARD, POLICY_LOSS, SCALE_UNLESS_ONE
except ImportError:  # triton is optional: the backend reports itself unavailable
    triton = None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _supports_device(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def _or(tensor, fallback):
    # Triton needs a pointer for every argument; absent optional inputs are never read
    # (their constexpr flag is off), so any float32 tensor stands in.
    return fallback if tensor is None else tensor


def policy_loss_rows(
    logits, targets, advantages, weights, old, ref, rollout, cfg: LossConfig, out: RowOutputs, grad_logits
):
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return
    has_tis = rollout is not None and cfg.tis_cap is not None
    grad = logits if grad_logits is None else grad_logits
    POLICY_LOSS(
        (num_rows,), vocab, logits, logits.stride(0), grad, grad.stride(0),
        targets, advantages, weights, _or(old, weights), _or(ref, weights), _or(rollout, weights),
        out.logprobs, out.entropy, out.loss, out.kl, out.clipped,
        vocab, 1.0 / cfg.temperature, cfg.clip_low, cfg.clip_high,
        cfg.dual_clip if cfg.has_dual_clip else 0.0, cfg.kl_coef, cfg.entropy_coef,
        cfg.tis_cap if has_tis else 0.0, RATIO_LOG_CLAMP,
        HAS_OLD=old is not None, HAS_REF=ref is not None, KL_ESTIMATOR=cfg.kl_estimator_id,
        HAS_DUAL_CLIP=cfg.has_dual_clip, HAS_TIS=has_tis, HAS_ENTROPY_GRAD=cfg.has_entropy_grad,
        COMPUTE_GRAD=grad_logits is not None,
    )


def logprob_rows(logits, targets, temperature, logprobs, entropy, lse):
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return
    LOGPROB(
        (num_rows,), vocab, logits, logits.stride(0), targets, logprobs, _or(entropy, lse), lse,
        vocab, 1.0 / temperature, WITH_ENTROPY=entropy is not None,
    )


def logprob_backward(logits, targets, temperature, lse, logprobs, entropy, grad_logprobs, grad_entropy, grad_logits):
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return
    has_grad_entropy = grad_entropy is not None
    LOGPROB_BACKWARD(
        (num_rows,), vocab, logits, logits.stride(0), grad_logits, grad_logits.stride(0), targets, lse,
        _or(entropy, lse), grad_logprobs, _or(grad_entropy, lse), vocab, 1.0 / temperature,
        HAS_GRAD_ENTROPY=has_grad_entropy,
    )


def scale_unless_one_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale on a CUDA tensor, with no pass over grad when scale == 1 (see kernel)."""
    num_rows, vocab = grad.shape
    if num_rows == 0 or vocab == 0:
        return
    block, _ = block_size_and_warps(vocab)
    SCALE_UNLESS_ONE((num_rows, triton.cdiv(vocab, block)), vocab, grad, grad.stride(0), scale, vocab)


def make_backend(name: str) -> Backend | None:
    if triton is None:
        return None
    return Backend(
        name="triton",
        supports_device=_supports_device,
        policy_loss_rows=policy_loss_rows,
        logprob_rows=logprob_rows,
        logprob_backward=logprob_backward,
    )
