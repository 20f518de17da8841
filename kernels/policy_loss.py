"""`policy_loss`: clipped policy-gradient loss of packed tokens from their logits, fused."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import ops  # noqa: F401  (registers torch.ops.siri.*)
from .autograd_returns import InputGradients
from .backends import check_backend_name
from .config import CLIP_DUAL, CLIP_RATIO, LossConfig, check_loss_settings
from .validation import check_policy_structure


class PolicyLossOutput(NamedTuple):
    """What `policy_loss` and `fused_linear_policy_loss` return.

    loss: 0-dim float32, sum over rows of weights * l_t; the only differentiable output.
    logprobs: [T] float32 log-probs of the targets (0 on rows whose weight is 0).
    entropy: [T] float32 entropy of each row's distribution (0 on rows whose weight is 0).
    metrics: 0-dim float32 tensors on the device, weighted means over the rows
        (sum of w * x over sum of w): `clip_frac` (ratio clip bound), `dual_clip_frac`,
        `kl` (0 without ref_logprobs), `entropy`.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    metrics: dict[str, torch.Tensor]


def policy_metrics(weights, kl, entropy, clipped) -> dict[str, torch.Tensor]:
    """Weighted means of the per-row outputs; no host synchronisation."""
    weights = weights.to(torch.float32)
    total = weights.sum()
    safe_total = torch.where(total != 0, total, torch.ones_like(total))

    def mean(values):
        return (weights * values).sum() / safe_total

    return {
        "clip_frac": mean((clipped == CLIP_RATIO).to(torch.float32)),
        "dual_clip_frac": mean((clipped == CLIP_DUAL).to(torch.float32)),
        "kl": mean(kl),
        "entropy": mean(entropy),
    }


class _PolicyLoss(torch.autograd.Function):
    """Forward computes the loss and d loss / d logits in one launch; backward scales it."""

    @staticmethod
    def forward(ctx, logits, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap,
                compute_grad, inplace_backward, backend):
        args = (targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs, temperature,
                clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap, backend)
        if compute_grad and inplace_backward:
            logprobs, entropy, loss_rows, kl, clipped = torch.ops.siri.policy_loss_rows_inplace(logits, *args)
            grad_logits = logits
        else:
            logprobs, entropy, loss_rows, kl, clipped, grad_logits = torch.ops.siri.policy_loss_rows(
                logits, *args, compute_grad
            )
        if compute_grad:
            ctx.save_for_backward(grad_logits)
        ctx.mark_non_differentiable(logprobs, entropy, kl, clipped)
        return loss_rows.sum(), logprobs, entropy, kl, clipped

    @staticmethod
    def backward(ctx, grad_loss, *_non_differentiable):
        # The saved gradient is scaled in place (no second [T, V] buffer), so it stays d loss /
        # d logits only while every incoming gradient is exactly 1. A second backward through
        # a retained graph after a scaling one cannot be formed from it: say so, rather than
        # return a gradient scaled twice (or fail on autograd's version check).
        previous = getattr(ctx, "grad_scale", None)
        if previous is not None and bool(previous != 1):
            raise RuntimeError(
                "policy_loss: a second backward through the same loss (retain_graph=True) after one whose "
                f"incoming gradient was {previous.item()!r}, not 1: that backward scaled the fused gradient in "
                "place. Call policy_loss again for each backward, or backward once through the sum of the losses."
            )
        ctx.grad_scale = grad_loss.detach()
        (grad_logits,) = ctx.saved_tensors
        torch.ops.siri.scale_grad_(grad_logits, grad_loss)
        return _POLICY_LOSS_GRADIENTS(logits=grad_logits)


_POLICY_LOSS_GRADIENTS = InputGradients(_PolicyLoss.forward)


def policy_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
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
) -> PolicyLossOutput:
    """Clipped policy-gradient loss of T scored tokens, fused over their logits.

    Per row t, with u = logits / temperature and logp_t = log softmax(u)[y_t]:
    r_t = exp(clamp(logp_t - old_t, -20, 20)) (old_t = stop_grad(logp_t) when
    `old_logprobs` is None), pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)),
    capped at -A_t * dual_clip for A_t < 0 when `dual_clip` is set, times
    min(exp(old_t - rollout_t), tis_cap) when `rollout_logprobs` and `tis_cap` are given;
    l_t = pg_t + kl_coef * KL_t(ref) - entropy_coef * H_t; loss = sum_t weights_t * l_t.

    Args:
        logits: [T, V] float16, bfloat16 or float32, the rows to score (already gathered at
            the response positions, e.g. `PackedBatch.logit_index`).
        targets: [T] int32 or int64 token ids; not read on rows whose weight is 0.
        advantages, weights: [T] floating. `weights` carry the loss aggregation
            (`siri.packing` computes them); a row with weight 0 contributes nothing.
        old_logprobs, ref_logprobs, rollout_logprobs: optional [T] floating. `kl_coef` != 0
            needs `ref_logprobs`, `tis_cap` needs `rollout_logprobs`.
        inplace_backward: write d loss / d logits into `logits` itself during the forward
            (saves a [T, V] buffer; `logits` hold the gradient afterwards). `logits` must not
            be a leaf that requires grad, and no earlier op may have saved them for its own
            backward (`tanh`, `exp`, `log_softmax` save their output): their version counter
            is bumped, so autograd then raises at backward, as for any in-place op.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (`SIRI_BACKEND` overrides "auto").

    Returns:
        PolicyLossOutput(loss, logprobs, entropy, metrics); see its docstring.

    The gradient is computed in the same pass as the loss; backward only scales it by the
    incoming gradient, in place, and skips even that when the incoming gradient is exactly 1.
    A second backward through a retained graph (`retain_graph=True`) is supported only while
    every incoming gradient is 1; otherwise it raises.

    Non-finite values, the same on every backend:
        - A -inf logit (a masked token) has probability 0: it adds nothing to the entropy
          (0 log 0 = 0) and its entry of the gradient is 0 (but at the target).
        - A target whose logit is -inf has logp = -inf. On-policy (`old_logprobs` None)
          the ratio is still exactly 1 (logp - stop_grad(logp) is 0), so the row's loss and
          gradient, -w A (onehot - p) / temperature, are finite, as `F.cross_entropy`'s
          gradient is where its loss is inf. Off-policy the log-ratio is -inf, clamped at
          -20 (no gradient through the clamp). Its KL to finite `ref_logprobs` is infinite
          (k1 -inf, k2 and k3 +inf), and with `kl_coef` != 0 so are its loss and gradient
          (NaN where 0 * inf arises); with `kl_coef` = 0 the KL is reported and left out.
        - NaN in `old_logprobs`, `ref_logprobs` or `rollout_logprobs` (like NaN or inf in
          `advantages` and `weights`) raises ValueError naming the argument; -inf there is
          a log-prob and follows the formulas. With `SIRI_VALIDATE=0` nothing is checked and
          NaN in gives NaN out: the row's loss and every entry of its gradient row; an
          out-of-range target on a scored row is clamped into [0, V).
        - A row of only -inf logits has no distribution: NaN for every result of the row.
        - NaN and +inf logits are not supported: the row's entropy is NaN on every backend,
          its other results may differ between backends.
    """
    check_loss_settings(temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap)
    check_policy_structure(logits, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                           tis_cap, kl_coef, inplace_backward)
    check_backend_name(backend)
    loss, logprobs, entropy, kl, clipped = _PolicyLoss.apply(
        logits, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
        float(temperature), float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
        float(kl_coef), kl_estimator, float(entropy_coef), None if tis_cap is None else float(tis_cap),
        # needs_input_grad ignores no_grad mode, so decide here whether to form the gradient.
        torch.is_grad_enabled() and logits.requires_grad, inplace_backward, backend,
    )
    return PolicyLossOutput(loss, logprobs, entropy, policy_metrics(weights, kl, entropy, clipped))
