"""Triton kernels of the fused log-prob / entropy / policy-loss ops.

One program handles one row (one scored token) of the logits:

1. statistics pass: an online log-sum-exp and entropy over the row, in float32;
2. per-token scalar math: log-prob of the target, importance ratio, clipped policy
   gradient, KL, entropy bonus, and d loss / d logp;
3. gradient pass: d loss / d logits for the whole row, written in the logits' dtype.

Pass 2 re-reads the row in reverse block order: the tail of the row, read last by pass 1,
is the likeliest part to still sit in L2, so the re-read costs less than a second trip to
HBM. Temperature, clip bounds and coefficients are runtime arguments; only the feature
switches are `tl.constexpr`, so a new length or coefficient never recompiles.

Gradient of one row (u = z / tau, p = softmax(u), H = -sum p log p):
    d logp / d u_j = onehot_j - p_j,     d H / d u_j = -p_j (log p_j + H),
so for a loss with c = d loss / d logp and e = d loss / d H,
    d loss / d z_j = (c onehot_j - p_j (c + e (log p_j + H))) / tau.
"""

import triton
import triton.language as tl

# Widest tile of a row loaded at once. 8192 float32 values over 16 warps is 16 registers
# per thread, wide enough for 16-byte vector loads of bf16 and few loop trips at
# V = 151,936 (19 tiles), small enough not to spill.
MAX_BLOCK_V = 8192

# Running maximum's starting value: finite, so that exp(start - m) is exactly 0 and
# (start - m) * 0 is 0 rather than the NaN that -inf would give on the first merge.
# A global read inside @triton.jit must be a tl.constexpr: the compiler rejects any other
# (the interpreter does not), and the disk cache's key would not cover its value.
_NEG_START = tl.constexpr(-1e30)


def block_size_and_warps(vocab: int) -> tuple[int, int]:
    """Tile width along V and the warps that load it (one program per row)."""
    block = min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK_V)
    return block, max(1, min(16, block // 512))


@triton.jit
def _row_statistics(row_ptr, V, inv_temperature, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """(lse, entropy) of u = row * inv_temperature, by one online pass.

    Keeps m (running max), s = sum exp(u - m) and a = sum exp(u - m) (u - m); when m grows
    to m', s' = s exp(m - m') and a' = exp(m - m') (a + (m - m') s). Then
    lse = m + log s and H = lse - sum p u = log s - a / s. Measuring a from the running max
    keeps H free of the cancellation lse - E[u] would suffer for large logits.
    """
    m = tl.full((), _NEG_START, tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        u = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(u, axis=0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(u - m_new)
        if WITH_ENTROPY:
            # e == 0 covers masked lanes and -inf logits, where (u - m_new) is -inf.
            a = rescale * (a + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, u - m_new, 0.0), axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    if WITH_ENTROPY:
        entropy = log_s - a / s
    else:
        entropy = tl.zeros((), tl.float32)
    return m + log_s, entropy


@triton.jit
def _write_row_gradient(
    row_ptr, grad_row_ptr, target, V, inv_temperature, lse, entropy, c, e,
    HAS_ENTROPY_TERM: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """grad_j = (c onehot_j - p_j (c + e (log p_j + H))) / tau over one row, tiles last to first."""
    num_blocks = tl.cdiv(V, BLOCK_V)
    for i in range(0, num_blocks):
        offs = (num_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = offs < V
        log_p = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature - lse
        p = tl.exp(log_p)
        if HAS_ENTROPY_TERM:
            grad = -p * (c + e * tl.where(p > 0, log_p + entropy, 0.0))
        else:
            grad = -p * c
        grad = tl.where(offs == target, grad + c, grad) * inv_temperature
        tl.store(grad_row_ptr + offs, grad.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(grad_row_ptr + offs, tl.zeros((BLOCK_V,), grad_row_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _clamp_keep_nan(x, low, high):
    # tl.minimum / tl.maximum may return the bound for a NaN: NaN in must give NaN out.
    return tl.where(x < low, low, tl.where(x > high, high, x))


@triton.jit
def _load_target(targets_ptr, row, V):
    # Validation rejects out-of-range targets before launch; the clamp only keeps a run with
    # SIRI_VALIDATE=0 from reading outside the row.
    return tl.minimum(tl.maximum(tl.load(targets_ptr + row).to(tl.int64), 0), V - 1)


@triton.jit
def policy_loss_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride,
    targets_ptr, advantages_ptr, weights_ptr, old_ptr, ref_ptr, rollout_ptr,
    logprobs_ptr, entropy_ptr, loss_ptr, kl_ptr, clipped_ptr,
    V, inv_temperature, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tis_cap, ratio_log_clamp,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr, HAS_TIS: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    weight = tl.load(weights_ptr + row)
    if weight == 0:
        # Contributes nothing: zeros out, a zero gradient row, and the target is never read.
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(loss_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        tl.store(clipped_ptr + row, 0.0)
        if COMPUTE_GRAD:
            _zero_row(grad_row_ptr, V, BLOCK_V)
    else:
        target = _load_target(targets_ptr, row, V)
        lse, entropy = _row_statistics(row_ptr, V, inv_temperature, BLOCK_V, True)
        logp = tl.load(row_ptr + target).to(tl.float32) * inv_temperature - lse
        adv = tl.load(advantages_ptr + row)
        if HAS_OLD:
            old = tl.load(old_ptr + row)
            log_ratio = logp - old
        else:
            # On-policy: old = stop_grad(logp), so the log-ratio is exactly 0 (even where
            # logp = -inf and logp - old would be NaN).
            old = logp
            log_ratio = tl.zeros((), tl.float32)
        # d ratio / d logp = ratio unless the clamp binds (bounds excluded; NaN does not bind).
        clamp_binds = (log_ratio < -ratio_log_clamp) | (log_ratio > ratio_log_clamp)
        ratio = tl.exp(_clamp_keep_nan(log_ratio, -ratio_log_clamp, ratio_log_clamp))
        unclipped = -adv * ratio
        clipped = -adv * _clamp_keep_nan(ratio, 1.0 - clip_low, 1.0 + clip_high)
        ratio_clip_binds = clipped > unclipped
        pg = tl.maximum(unclipped, clipped)
        dpg_dratio = tl.where(ratio_clip_binds, 0.0, -adv)
        clip_code = tl.where(ratio_clip_binds, 1.0, 0.0)
        if HAS_DUAL_CLIP:
            dual = -adv * dual_clip
            dual_binds = (adv < 0) & (dual < pg)
            # An exact tie splits the gradient in half, as torch.minimum does in the reference.
            dual_ties = (adv < 0) & (dual == pg)
            pg = tl.where(dual_binds, dual, pg)
            dpg_dratio = tl.where(dual_binds, 0.0, tl.where(dual_ties, 0.5 * dpg_dratio, dpg_dratio))
            clip_code = tl.where(dual_binds, 2.0, clip_code)
        dpg_dlogp = tl.where(clamp_binds, 0.0, dpg_dratio * ratio)
        if HAS_TIS:
            # Truncated importance weight of the trainer against the rollout engine: a
            # constant factor, no gradient through it.
            ratio_to_rollout = tl.exp(old - tl.load(rollout_ptr + row))
            tis = tl.where(ratio_to_rollout > tis_cap, tis_cap, ratio_to_rollout)
            pg = pg * tis
            dpg_dlogp = dpg_dlogp * tis
        kl = tl.zeros((), tl.float32)
        dkl_dlogp = tl.zeros((), tl.float32)
        if HAS_REF:
            d = tl.load(ref_ptr + row) - logp
            if KL_ESTIMATOR == 1:
                kl = -d
                dkl_dlogp = tl.full((), 1.0, tl.float32)
            elif KL_ESTIMATOR == 2:
                kl = 0.5 * d * d
                dkl_dlogp = -d
            else:
                exp_d = tl.exp(d)
                # exp(d) - d - 1 tends to +inf as d -> +inf (a target of probability 0); the
                # formula itself would evaluate inf - inf.
                kl = tl.where(d == float("inf"), exp_d, exp_d - d - 1.0)
                dkl_dlogp = 1.0 - exp_d
        # A zero kl_coef leaves the KL (reported, possibly infinite) out of the loss.
        kl_term = tl.where(kl_coef != 0, kl_coef * kl, 0.0)
        dkl_term = tl.where(kl_coef != 0, kl_coef * dkl_dlogp, 0.0)
        loss = pg - entropy_coef * entropy + kl_term
        tl.store(logprobs_ptr + row, logp)
        tl.store(entropy_ptr + row, entropy)
        tl.store(loss_ptr + row, weight * loss)
        tl.store(kl_ptr + row, kl)
        tl.store(clipped_ptr + row, clip_code)
        if COMPUTE_GRAD:
            _write_row_gradient(
                row_ptr, grad_row_ptr, target, V, inv_temperature, lse, entropy,
                weight * (dpg_dlogp + dkl_term), -weight * entropy_coef,
                HAS_ENTROPY_GRAD, BLOCK_V,
            )


@triton.jit
def logprob_kernel(
    logits_ptr, logits_row_stride, targets_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
    V, inv_temperature, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    lse, entropy = _row_statistics(row_ptr, V, inv_temperature, BLOCK_V, WITH_ENTROPY)
    target = _load_target(targets_ptr, row, V)
    tl.store(logprobs_ptr + row, tl.load(row_ptr + target).to(tl.float32) * inv_temperature - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def logprob_backward_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, targets_ptr, lse_ptr, entropy_ptr,
    grad_logprobs_ptr, grad_entropy_ptr, V, inv_temperature,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        grad_entropy = tl.load(grad_entropy_ptr + row)
    else:
        entropy = tl.zeros((), tl.float32)
        grad_entropy = tl.zeros((), tl.float32)
    _write_row_gradient(
        logits_ptr + row * logits_row_stride, grad_ptr + row * grad_row_stride,
        _load_target(targets_ptr, row, V), V, inv_temperature, tl.load(lse_ptr + row), entropy,
        tl.load(grad_logprobs_ptr + row), grad_entropy, HAS_GRAD_ENTROPY, BLOCK_V,
    )


@triton.jit
def scale_unless_one_kernel(grad_ptr, grad_row_stride, scale_ptr, V, BLOCK_V: tl.constexpr):
    """grad *= scale, skipped on the device when scale == 1.

    The fused forward already wrote d loss / d logits; the backward only scales it by the
    incoming gradient, which is exactly 1 for a plain `loss.backward()`. Reading the scale
    on the device skips the pass over T x V values without a host synchronisation.
    """
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = offs < V
        ptrs = grad_ptr + row * grad_row_stride + offs
        grad = tl.load(ptrs, mask=mask).to(tl.float32) * scale
        tl.store(ptrs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
