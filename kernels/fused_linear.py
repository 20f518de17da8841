"""Hidden states and LM head to the policy loss and its gradients, never building [T, V].

Two algorithms (`fused_linear_algorithms.py`, registered as ops in `ops.py`):

- the default, memory-lean: a vocabulary split. One [T, s] slice of logits at a time
  (its working set at most 1% of the [T, V] logits, or 32 MiB), recomputed for the
  gradient, so four GEMMs: the recompute floor 8 * T * H * V flops. The head's gradient
  is written once per slice.
- `chunk_size=c`: chunks of c rows with their full [c, V] logits, three GEMMs (6 T H V)
  but the [V, H] head gradient is accumulated (in float32) once per chunk. Chunks of
  >= 1,024 rows are the faster choice where their logits fit in memory. The default
  takes them, with gradients, where they fit the split's own budget (small vocabularies
  or short batches: `fused_linear_algorithms.row_chunks_within_budget`).

Either way the gradients are complete when the forward returns; the backward only scales
them by the incoming gradient (and skips that when it is 1).
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers torch.ops.siri.*)
from .autograd_returns import InputGradients
from .backends import check_backend_name
from .config import LossConfig, check_loss_settings, check_temperature
from .fused_linear_logprobs import FusedLinearTokenLogprobs
from .policy_loss import PolicyLossOutput, policy_metrics
from .validation import check_per_token, check_policy_structure, check_targets


class _FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap, backend,
                chunk_size, grad_hidden, grad_weight):
        logprobs, entropy, loss_rows, kl, clipped, hidden_grad, weight_grad, bias_grad = (
            torch.ops.siri.fused_linear_policy_loss(
                hidden, weight, bias, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap, backend,
                chunk_size, grad_hidden, grad_weight,
            )
        )
        ctx.grad_flags = (grad_hidden, grad_weight, grad_weight and bias is not None)
        ctx.save_for_backward(hidden_grad, weight_grad, bias_grad)
        ctx.mark_non_differentiable(logprobs, entropy, kl, clipped)
        return loss_rows.sum(), logprobs, entropy, kl, clipped

    @staticmethod
    def backward(ctx, grad_loss, *_non_differentiable):
        grads = []
        for needed, grad in zip(ctx.grad_flags, ctx.saved_tensors):
            if needed:
                torch.ops.siri.scale_grad_(grad.view(-1, grad.shape[-1]), grad_loss)  # 2-D rows, as the op takes
            grads.append(grad if needed else None)
        hidden, weight, bias = grads
        return _FUSED_LINEAR_GRADIENTS(hidden=hidden, weight=weight, bias=bias)


_FUSED_LINEAR_GRADIENTS = InputGradients(_FusedLinearPolicyLoss.forward)


def _check_linear(hidden, weight, bias) -> None:
    for name, value, rank in (("hidden", hidden, 2), ("weight", weight, 2)):
        if not isinstance(value, torch.Tensor) or value.dim() != rank:
            raise ValueError(f"{name} must be a {rank}-D tensor, got {getattr(value, 'shape', type(value).__name__)}")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"hidden must be float16, bfloat16 or float32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = {hidden.shape[1]} (hidden's last dimension), got {list(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None:
        check_per_token("bias", bias, hidden.device, weight.shape[0])
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    temperature: float = LossConfig.temperature,
    clip_low: float = LossConfig.clip_low,
    clip_high: float = LossConfig.clip_high,
    dual_clip: float | None = LossConfig.dual_clip,
    kl_coef: float = LossConfig.kl_coef,
    kl_estimator: str = LossConfig.kl_estimator,
    entropy_coef: float = LossConfig.entropy_coef,
    tis_cap: float | None = LossConfig.tis_cap,
    inplace_backward: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> PolicyLossOutput:
    """`policy_loss` of logits = hidden @ weight.T (+ bias), without building them.

    Args:
        hidden: [T, H] float16, bfloat16 or float32: the hidden states of the scored rows
            (e.g. the model body's output at `PackedBatch.logit_index`).
        weight: [V, H], the LM head, same dtype; bias: optional [V].
        targets, advantages, weights and every keyword of `policy_loss`, same meaning.
            `inplace_backward` changes nothing here: each chunk's logits always take their
            own gradient in place.
        chunk_size: None (default) for the memory-lean vocabulary split, or row chunks
            where they fit its memory budget (module docstring);
            an int for chunks of that many rows with their full logits (faster where
            chunk_size * V logits fit: >= 1,024 rows recommended).

    Returns:
        PolicyLossOutput, as `policy_loss`; `loss` is differentiable in hidden, weight and
        bias. Their gradients are formed during the forward, summed in float32 whatever
        the dtype (the head's once per vocabulary slice, or across row chunks) and rounded
        to it once, and only scaled in the backward.
    """
    _check_linear(hidden, weight, bias)
    check_loss_settings(temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap)
    check_policy_structure(hidden, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                           tis_cap, kl_coef, False, logits_name="hidden")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    check_backend_name(backend)
    _check_chunk_size(chunk_size)
    grad_enabled = torch.is_grad_enabled()
    grad_hidden = grad_enabled and hidden.requires_grad
    grad_weight = grad_enabled and (weight.requires_grad or (bias is not None and bias.requires_grad))
    loss, logprobs, entropy, kl, clipped = _FusedLinearPolicyLoss.apply(
        hidden, weight, bias, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
        float(temperature), float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
        float(kl_coef), kl_estimator, float(entropy_coef), None if tis_cap is None else float(tis_cap), backend,
        chunk_size, grad_hidden, grad_weight,
    )
    return PolicyLossOutput(loss, logprobs, entropy, policy_metrics(weights, kl, entropy, clipped))


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
):
    """Log-probs (and entropy) of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    Under no_grad (scoring old and reference log-probs) the memory beyond the outputs is one
    vocabulary slice of logits (`chunk_size` None) or one chunk of rows. Both outputs are
    differentiable in hidden, weight and bias; the backward forms each row chunk's logits
    again (kernels/fused_linear_logprobs.py).

    Returns logprobs [T] float32, or (logprobs, entropy) with `return_entropy`.
    """
    _check_linear(hidden, weight, bias)
    check_targets(targets, hidden.device, hidden.shape[0])
    check_temperature(temperature)
    check_backend_name(backend)
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")
    _check_chunk_size(chunk_size)
    logprobs, entropy = FusedLinearTokenLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), return_entropy, backend, chunk_size
    )
    return (logprobs, entropy) if return_entropy else logprobs
