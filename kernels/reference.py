"""The PyTorch reference of every formula in docs/design.md, differentiable by autograd.

This is the oracle of the tests (run in float64) and the body of the chunked "torch"
backend (run in float32, one block of rows at a time). It computes in the dtype of the
logits it is given, so the same code also measures what plain PyTorch gets at a given
precision. The oracle's gradients come from autograd; `per_token_loss` also returns the
hand-derived slope d l / d logp that the "torch" backend needs (autograd is unavailable
inside a custom op under torch.compile), and the tests check it against autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import CLIP_DUAL, CLIP_NONE, CLIP_RATIO, LOW_VAR_KL_CLAMP, RATIO_LOG_CLAMP, LossConfig

# verl's low_var_kl clamps d = ref - logp to [-20, 20] before exp(d).
_VERL_KL_LOG_CLAMP = 20.0


def log_sum_exp_parts(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, log s) of each row of u: its maximum and log sum exp(u - m), so lse = m + log s.

    m carries no gradient (d log p / d u = onehot - p whatever m is). A row of only -inf
    gives (0, -inf): lse = -inf, as torch.logsumexp has it.
    """
    m = u.amax(dim=-1).detach()
    m = torch.where(m == -math.inf, 0.0, m)
    return m, torch.log(torch.exp(u - m.unsqueeze(-1)).sum(dim=-1))


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """(logp[T], entropy[T], lse[T]) of `logits[T, V]` at `targets[T]`, in the logits' dtype.

    A -inf logit (a masked token) has p = 0 and adds nothing to the entropy: 0 log 0 = 0.
    log p is (u - m) - log sum exp(u - m) with m the row's maximum, not u - lse: u - m is
    exact near the maximum, where u - lse rounds log p to the spacing of lse (at |u| ~ 1e31
    in float64, or 1e7 in float32, all of log 2 for two tied maxima).
    """
    u = logits / temperature
    m, log_s = log_sum_exp_parts(u)
    log_p = (u - m.unsqueeze(-1)) - log_s.unsqueeze(-1)
    lse = m + log_s
    logp = log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = torch.exp(log_p)
    # H = -sum p log p. Where p = 0, log p is replaced by 0 before the product: p * (-inf)
    # would be NaN, in the value and in autograd's gradient of the discarded branch.
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    return logp, entropy, lse


def logits_gradient(logits, targets, temperature, lse, entropy, c, e):
    """d loss / d logits for a loss with c = d loss / d logp and e = d loss / d H per row.

    With u = logits / tau, p = softmax(u): d logp / d u_j = onehot_j - p_j and
    d H / d u_j = -p_j (log p_j + H), so the row gradient is
    (c onehot_j - p_j (c + e [p_j > 0] (log p_j + H))) / tau: an entry with p_j = 0 takes no
    entropy term (0 log 0 = 0), and otherwise follows IEEE arithmetic (an infinite c gives
    0 * inf = NaN there), as autograd of `logprobs_and_entropy` does. `lse` is the rows'
    log-sum-exp, or its two parts (m, log s) of `log_sum_exp_parts`, which keep log p exact
    where u - lse would round it (large |u|).

    `logits` may be some columns of the rows only (a vocabulary slice), with the whole rows'
    lse and entropy: a row whose target is negative (it lies in other columns) then takes
    no one-hot term.
    """
    hi, lo = lse if isinstance(lse, tuple) else (lse, torch.zeros_like(lse))
    log_p = (logits / temperature - hi.unsqueeze(-1)) - lo.unsqueeze(-1)
    p = torch.exp(log_p)
    entropy_term = torch.where(p > 0, log_p + entropy.unsqueeze(-1), torch.zeros_like(log_p))
    grad = -p * (c.unsqueeze(-1) + e.unsqueeze(-1) * entropy_term)
    holds = targets >= 0
    # A row without its target adds 0 to its first entry (chosen, not multiplied: c may be infinite).
    one_hot = torch.where(holds, c, torch.zeros_like(c)).to(grad.dtype)
    grad.scatter_add_(-1, torch.where(holds, targets, 0).long().unsqueeze(-1), one_hot.unsqueeze(-1))
    return grad / temperature


def kl_penalty(logp: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate to the reference policy, with d = ref - logp, before any ratio.

    "k3_ratio" is k3 here; `per_token_loss` multiplies it by the importance ratio.
    """
    d = ref_logprobs - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "low_var_kl":
        # As verl computes it: d clamped to [-20, 20] first, which changes no value (k3 > 10 at
        # |d| >= 20) but keeps autograd finite where d is infinite; where a clamp binds the value is
        # constant, no gradient. Clamped by comparisons, so that NaN stays NaN.
        d = clamp_keep_nan(d, -_VERL_KL_LOG_CLAMP, _VERL_KL_LOG_CLAMP)
        k3 = torch.exp(d) - d - 1.0
        return torch.where(k3 > LOW_VAR_KL_CLAMP, torch.full_like(k3, LOW_VAR_KL_CLAMP), k3)
    exp_d = torch.exp(d)
    # exp(d) - d - 1 tends to +inf as d -> +inf (a target of probability 0), where the formula
    # itself evaluates inf - inf; the exp(d) branch carries that value and its slope.
    return torch.where(d == float("inf"), exp_d, exp_d - d - 1.0)


def kl_slope(logp: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """d kl_penalty / d logp (d d / d logp = -1)."""
    d = ref_logprobs - logp
    if estimator == "k1":
        return torch.ones_like(d)
    if estimator == "k2":
        return -d
    k3_slope = 1.0 - torch.exp(d)
    if estimator == "low_var_kl":
        return torch.where(kl_penalty(logp, ref_logprobs, "k3") > LOW_VAR_KL_CLAMP, torch.zeros_like(d), k3_slope)
    return k3_slope


class _ZeroWithUnitSlope(torch.autograd.Function):
    """0 with d/dx = 1: logp - stop_grad(logp), also where logp = -inf (there the difference is NaN)."""

    @staticmethod
    def forward(ctx, x):
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def clamp_keep_nan(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """clamp(x, low, high) whose gradient passes at the bounds (as torch.clamp's) and at NaN
    (torch.clamp's is 0 there): NaN in gives NaN out, value and slope."""
    low_t, high_t = torch.full_like(x, low), torch.full_like(x, high)
    return torch.where(x < low_t, low_t, torch.where(x > high_t, high_t, x))


def per_token_loss(logp, entropy, advantages, old_logprobs, ref_logprobs, rollout_logprobs, cfg: LossConfig):
    """(l_t, kl_t, clip code_t, slope_t) from per-token log-probs and entropy.

    l_t is differentiable in logp and entropy; slope_t = d l_t / d logp_t is derived by hand
    and detached (d l_t / d H_t is simply -entropy_coef). Non-finite values follow IEEE
    arithmetic, with two exceptions: on-policy (no old_logprobs) the log-ratio is exactly 0,
    even where logp = -inf; and a term whose coefficient is 0 is left out (kl_coef = 0 with
    ref_logprobs reports the KL without adding 0 * inf to the loss).
    """
    old = logp.detach() if old_logprobs is None else old_logprobs
    log_ratio = _ZeroWithUnitSlope.apply(logp) if old_logprobs is None else logp - old
    ratio = torch.exp(clamp_keep_nan(log_ratio, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(unclipped, clipped)
    ratio_clip_binds = clipped > unclipped
    clip_code = torch.where(ratio_clip_binds, CLIP_RATIO, CLIP_NONE)
    # d pg / d ratio is -A unless the clipped branch wins, where it is 0.
    dpg_dratio = torch.where(ratio_clip_binds, torch.zeros_like(advantages), -advantages)
    if cfg.dual_clip is not None:
        dual = -advantages * cfg.dual_clip
        dual_binds = (advantages < 0) & (dual < pg)
        # At an exact tie torch.minimum splits the gradient between its arguments: half.
        # Tested against pg before the swap, as the Triton and native kernels do.
        dual_ties = (advantages < 0) & (dual == pg)
        pg = torch.where(advantages < 0, torch.minimum(pg, dual), pg)
        clip_code = torch.where(dual_binds, CLIP_DUAL, clip_code)
        dpg_dratio = torch.where(dual_binds, torch.zeros_like(dpg_dratio),
                                 torch.where(dual_ties, 0.5 * dpg_dratio, dpg_dratio))
    tis = torch.ones_like(ratio)
    if rollout_logprobs is not None and cfg.tis_cap is not None:
        tis = torch.clamp(torch.exp(old - rollout_logprobs), max=cfg.tis_cap).detach()
        pg = pg * tis
    # d ratio / d logp = ratio unless the clamp binds (a NaN log-ratio does not bind: NaN slope).
    # The TIS weight is inside the clamp's mask, as autograd applies it: where the clamp binds
    # the slope is 0 even for a NaN weight (old = rollout = -inf, exp(-inf - -inf)).
    clamp_binds = (log_ratio < -RATIO_LOG_CLAMP) | (log_ratio > RATIO_LOG_CLAMP)
    slope = torch.where(clamp_binds, torch.zeros_like(ratio), dpg_dratio * ratio * tis)
    loss = pg - cfg.entropy_coef * entropy
    if ref_logprobs is not None:
        kl = kl_penalty(logp, ref_logprobs, cfg.kl_estimator)
        dkl_dlogp = kl_slope(logp, ref_logprobs, cfg.kl_estimator)
        if cfg.kl_estimator == "k3_ratio":
            # (k3 r)' = k3' r + k3 r', with r' = r unless the log-ratio clamp binds.
            dkl_dlogp = dkl_dlogp * ratio + torch.where(clamp_binds, torch.zeros_like(kl), kl * ratio)
            kl = kl * ratio
        if cfg.kl_coef != 0:
            loss = loss + cfg.kl_coef * kl
            slope = slope + cfg.kl_coef * dkl_dlogp
    else:
        kl = torch.zeros_like(logp)
    return loss, kl, clip_code.to(torch.float32), slope.detach()


class ReferenceOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, sum of weights * l_t
    loss_rows: torch.Tensor  # [T], weights * l_t
    slope: torch.Tensor  # [T], weights * d l_t / d logp_t (detached)
    logprobs: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor


def policy_loss_reference(
    logits,
    targets,
    advantages,
    weights,
    old_logprobs=None,
    ref_logprobs=None,
    rollout_logprobs=None,
    cfg: LossConfig = LossConfig(),
) -> ReferenceOutput:
    """docs/design.md's policy loss by the book. Rows with weight 0 read no target and give zeros."""
    active = weights != 0
    safe_targets = torch.where(active, targets, torch.zeros_like(targets))
    # Rows with weight 0 are scored on zero logits: whatever they hold (a row of -inf has no
    # distribution), no NaN can reach the outputs or autograd's gradient through them.
    scored_logits = torch.where(active.unsqueeze(-1), logits, torch.zeros_like(logits))
    logp, entropy, _ = logprobs_and_entropy(scored_logits, safe_targets, cfg.temperature)
    loss_t, kl, clip_code, slope = per_token_loss(
        logp, entropy, advantages, old_logprobs, ref_logprobs, rollout_logprobs, cfg
    )
    zero = torch.zeros((), dtype=loss_t.dtype, device=loss_t.device)
    loss_rows = torch.where(active, weights * loss_t, zero)
    return ReferenceOutput(
        loss=loss_rows.sum(),
        loss_rows=loss_rows,
        slope=torch.where(active, weights * slope, zero),
        logprobs=torch.where(active, logp, zero),
        entropy=torch.where(active, entropy, zero),
        kl=torch.where(active, kl, zero),
        clipped=torch.where(active, clip_code, torch.zeros_like(clip_code)),
    )
