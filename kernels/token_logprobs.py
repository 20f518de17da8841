"""`token_logprobs`: per-token log-probs (and entropy) of targets from logits, fused."""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers torch.ops.siri.*)
from .autograd_returns import InputGradients
from .backends import check_backend_name
from .config import check_temperature
from .validation import check_logits, check_targets


class _TokenLogprobs(torch.autograd.Function):
    """Forward keeps lse (and entropy); backward re-reads the logits once to form the gradient."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, return_entropy, backend):
        logprobs, entropy, lse = torch.ops.siri.token_logprobs(logits, targets, temperature, return_entropy, backend)
        ctx.save_for_backward(logits, targets, lse, logprobs, entropy if return_entropy else None)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, lse, logprobs, entropy = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(logprobs)
        if entropy is None:
            grad_entropy = None
        grad_logits = torch.ops.siri.token_logprobs_backward(
            logits, targets, lse, logprobs, entropy, grad_logprobs, grad_entropy, ctx.temperature, ctx.backend
        )
        return _TOKEN_LOGPROBS_GRADIENTS(logits=grad_logits)


_TOKEN_LOGPROBS_GRADIENTS = InputGradients(_TokenLogprobs.forward)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
):
    """Log-probabilities of `targets` under softmax(logits / temperature), row by row.

    Args:
        logits: [T, V] float16, bfloat16 or float32.
        targets: [T] int32 or int64, each in [0, V).
        temperature: divides the logits before the softmax (the rollout temperature).
        return_entropy: also return the entropy of each row's distribution.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (`SIRI_BACKEND` overrides "auto").

    Returns:
        logprobs [T] float32, or (logprobs [T], entropy [T]) with `return_entropy`;
        differentiable with respect to `logits` (both outputs). Nothing of size [T, V] is
        allocated in the forward.
    """
    check_logits("logits", logits)
    check_targets(targets, logits.device, logits.shape[0])
    check_temperature(temperature)
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")
    check_backend_name(backend)
    logprobs, entropy = _TokenLogprobs.apply(logits, targets, float(temperature), return_entropy, backend)
    return (logprobs, entropy) if return_entropy else logprobs
