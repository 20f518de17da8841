"""Triton kernels of the fused log-prob / entropy / policy-loss ops.

A program handles rows (scored tokens) of the logits, one after another:

1. statistics pass: an online base-2 log-sum-exp and entropy over the row, in float32;
2. per-token scalar math (`_token_loss`): log-prob of the target, importance ratio,
   clipped policy gradient, KL, entropy bonus and their slopes;
3. gradient pass: d loss / d logits for the whole row, written in the logits' dtype.

Traffic: each row is read from HBM once by design. A row is cut into tiles of BLOCK_V
elements; the last (ragged) tile stays in registers from pass 1 to pass 2, so a row of
up to MAX_ROW_ON_CHIP elements is one tile and is never read twice. Longer rows (a bf16
row at V = 151,936 is 304 KB, more than a CTA's shared memory) are re-read in pass 2, but
from L2: the forward kernel runs on a persistent grid whose rows in flight fit in L2
(`triton_backend.rows_in_flight`), pass 1 loads with `evict_last`, pass 2 loads and the
gradient stores with `evict_first`, and pass 2 walks the tiles last to first, so the tiles
read last by pass 1 are read first.

Work per element is kept small: the temperature is folded into a base-2 scale
(u = x log2(e) / tau, exp2 and log2 only); offsets within a row are 32-bit; full tiles
load without a mask and only the tail is masked; the statistics keep per-lane sums, so
a tile costs one block reduction (its maximum) and a row two more, at its end (the two
sums; a tuple reduction would make them one, but the interpreter runs it element by element);
the one-hot term of the target is added once per row, after the row is written, instead
of a compare per element. Temperature, lengths and coefficients are runtime arguments;
only the feature switches are `tl.constexpr`, so a new length or coefficient never
recompiles.

Gradient of one row: the formula of `reference.logits_gradient` (derived there), with
c = d loss / d logp and e = d loss / d H, in base 2: with t_j = log2 p_j (log p_j = ln2 t_j)
the non-target part is p_j (A t_j + B), A = -e ln2 / tau, B = -(c + e H) / tau, and the
target adds c / tau.
"""

import triton
import triton.language as tl

from .config import LOW_VAR_KL_CLAMP as _LOW_VAR_KL_CLAMP

# Tile of a row streamed through registers: 8192 float32 values over 16 warps is 16 per
# thread (two 16-byte bf16 loads), few loop trips at V = 151,936 (18 full tiles and a tail)
# and no spills.
MAX_BLOCK_V = 8192
# Rows up to this width are one tile, held in registers across both passes (32 float32
# values per thread at 16 warps): read from HBM once whatever L2 does.
MAX_ROW_ON_CHIP = 16384

# The bound of kl_estimator="low_var_kl" (config.LOW_VAR_KL_CLAMP).
LOW_VAR_KL_CLAMP = tl.constexpr(_LOW_VAR_KL_CLAMP)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Running maximum's starting value, the lowest float32: finite, so that an entry of -inf
# gives -inf - start = -inf (not the NaN of -inf - -inf), yet no finite u lies below it.
# The rescale's exponent is clamped at it too (`_merge_tile`).
_LOWEST = tl.constexpr(-3.4028234663852886e38)
# exp2 of anything below -150 is 0 in float32; flooring log2-probabilities here changes no
# finite result but turns -inf logits (0 * -inf = NaN in e * t) into exact zeros.
_LOG2_FLOOR = tl.constexpr(-1000.0)


def row_tiling(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of `vocab` elements.

    A row of at most MAX_ROW_ON_CHIP elements is one tile (kept on chip); longer rows
    stream in MAX_BLOCK_V tiles. 512 elements per warp, 16 warps at most.
    """
    vocab = max(vocab, 1)
    block = triton.next_power_of_2(vocab) if vocab <= MAX_ROW_ON_CHIP else MAX_BLOCK_V
    return block, max(1, min(16, block // 512))


def rereads_row(vocab: int) -> bool:
    """Whether pass 2 re-reads part of a row (it does once the row is more than one tile)."""
    return vocab > row_tiling(vocab)[0]


@triton.jit
def _log2_floor(t):
    # NaN stays NaN (a NaN logit must surface in the outputs, not be floored away).
    return tl.maximum(t, _LOG2_FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_tile(tile_ptr, offs, limit, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """A tile of a row as float32; past `limit` (masked tail only) -inf, which adds nothing."""
    if MASKED:
        x = tl.load(tile_ptr + offs, mask=offs < limit, other=float("-inf"), eviction_policy=EVICT)
    else:
        x = tl.load(tile_ptr + offs, eviction_policy=EVICT)
    return x.to(tl.float32)


@triton.jit
def _merge_tile(x, scale, m, s_acc, a_acc, WITH_ENTROPY: tl.constexpr):
    """Merge one tile into the running base-2 statistics of its row.

    With u = x * scale: m is the running max of u, and per lane s_acc = sum 2^(u - m),
    a_acc = sum 2^(u - m) (u - m). A new maximum m' rescales both by r = 2^(m - m'):
    s' = r s, a' = r (a + (m - m') s). Measuring a from the running max keeps the entropy
    free of the cancellation lse - E[u] would suffer for large logits. The maximum grows
    in a few tiles of a row only, so the rescale sits behind a (uniform) branch. m - m'
    overflows to -inf from the start value (m' above about 1e31); clamped at the lowest
    float it stays finite, so r (m - m') is 0 where r is, never 0 * -inf.
    """
    m_tile = tl.max(x, axis=0) * scale
    if m_tile > m:
        shift = tl.maximum(m - m_tile, _LOWEST)
        r = tl.exp2(shift)
        if WITH_ENTROPY:
            a_acc = r * a_acc + (r * shift) * s_acc
        s_acc = s_acc * r
        m = m_tile
    t = _log2_floor(x * scale - m)
    e = tl.exp2(t)
    s_acc += e
    if WITH_ENTROPY:
        a_acc += e * t
    return m, s_acc, a_acc


@triton.jit
def _row_statistics(row_ptr, V, scale, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr, EVICT: tl.constexpr):
    """(m, log2_s, entropy, tail) of u = row * scale: log2 sum 2^u = m + log2_s with m the
    row's max, the entropy in nats, and the row's last tile (1 to BLOCK_V elements, -inf
    past V), still in registers. m and log2_s stay apart for `_log2_prob`."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), _LOWEST, tl.float32)
    s_acc = tl.zeros((BLOCK_V,), tl.float32)
    a_acc = tl.zeros((BLOCK_V,), tl.float32)
    num_full = (V - 1) // BLOCK_V
    for i in range(num_full):
        x = _load_tile(row_ptr + i * BLOCK_V, offs, BLOCK_V, False, EVICT)
        m, s_acc, a_acc = _merge_tile(x, scale, m, s_acc, a_acc, WITH_ENTROPY)
    tail = _load_tile(row_ptr + num_full * BLOCK_V, offs, V - num_full * BLOCK_V, True, EVICT)
    m, s_acc, a_acc = _merge_tile(tail, scale, m, s_acc, a_acc, WITH_ENTROPY)
    # The lanes' sums are reduced once per row. H = ln s - ln2 a / s (nats; a is in log2 units).
    s = tl.sum(s_acc, axis=0)
    log2_s = tl.log2(s)
    if WITH_ENTROPY:
        entropy = (log2_s - tl.sum(a_acc, axis=0) / s) * LN2
    else:
        entropy = tl.zeros((), tl.float32)
    return m, log2_s, entropy, tail


@triton.jit
def _log2_prob(logit, scale, m, log2_s):
    """log2 p of one logit, once per row. u = logit * scale is rounded to float32 exactly as
    the statistics pass rounded it (so the argmax gets u - m = 0 and log2 p = -log2_s <= 0;
    the exact product against the rounded m gave the argmax a positive log-prob of the order
    of ulp(m), which grows as 1 / temperature); the two subtractions run in float64, so the
    log-prob carries that one rounding rather than three at the logits' magnitude."""
    u = logit.to(tl.float32) * scale
    log2p = (tl.cast(u, tl.float64) - tl.cast(m, tl.float64)) - tl.cast(log2_s, tl.float64)
    return log2p.to(tl.float32)


@triton.jit
def _gradient_of_log2p(t, slope_a, slope_b, HAS_ENTROPY_TERM: tl.constexpr):
    """p (A t + B) with t = log2 p (module docstring); the target's extra c / tau is not here.

    log2 p <= 0 exactly; rounding can lift t above 0 (by ulps of the logits / temperature,
    which at temperatures near 1e-9 are hundreds), so it is capped there: p never exceeds 1.
    """
    t = tl.minimum(t, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if HAS_ENTROPY_TERM:
        t = _log2_floor(t)
        return tl.exp2(t) * (slope_a * t + slope_b)
    return tl.exp2(t) * slope_b


@triton.jit
def _gradient_tile(x, scale, lse2_hi, lse2_lo, slope_a, slope_b, HAS_ENTROPY_TERM: tl.constexpr):
    # log2 p = (u - hi) - lo with the row's log2-sum-exp kept as two parts (m and log2 s, or
    # a float64 value split in two): u - hi is exact where p is not negligible (Sterbenz), so
    # log2 p carries the rounding of u and not a second one of lse2 at the logits' magnitude.
    return _gradient_of_log2p((x * scale - lse2_hi) - lse2_lo, slope_a, slope_b, HAS_ENTROPY_TERM)


@triton.jit
def _write_row_gradient(
    row_ptr, grad_row_ptr, V, target, target_log2p, tail, scale, inv_temperature, lse2_hi, lse2_lo, entropy, c, e,
    HAS_ENTROPY_TERM: tl.constexpr, BLOCK_V: tl.constexpr, TARGET_MAY_BE_ABSENT: tl.constexpr,
):
    """d loss / d logits of one row: the tail tile from registers, then the full tiles last
    to first (re-read with `evict_first`), then the target's entry once, from its log2 p
    (computed before any store: with an in-place gradient the row is overwritten here).
    With TARGET_MAY_BE_ABSENT a negative `target` means the row's target lies in other
    columns (a vocabulary slice): no one-hot term, and `target_log2p` is not used.
    """
    slope_a = -e * LN2 * inv_temperature
    slope_b = -(c + e * entropy) * inv_temperature
    dtype = grad_row_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_V)
    num_full = (V - 1) // BLOCK_V
    grad = _gradient_tile(tail, scale, lse2_hi, lse2_lo, slope_a, slope_b, HAS_ENTROPY_TERM)
    tl.store(grad_row_ptr + num_full * BLOCK_V + offs, grad.to(dtype),
             mask=offs < V - num_full * BLOCK_V, eviction_policy="evict_first")
    for i in range(num_full):
        start = (num_full - 1 - i) * BLOCK_V
        x = _load_tile(row_ptr + start, offs, BLOCK_V, False, "evict_first")
        grad = _gradient_tile(x, scale, lse2_hi, lse2_lo, slope_a, slope_b, HAS_ENTROPY_TERM)
        tl.store(grad_row_ptr + start + offs, grad.to(dtype), eviction_policy="evict_first")
    # Every thread's store of the row above is visible before the target's entry is
    # rewritten with its one-hot term (the same formula, plus c / tau).
    tl.debug_barrier()
    grad_target = (_gradient_of_log2p(target_log2p, slope_a, slope_b, HAS_ENTROPY_TERM) + c * inv_temperature).to(dtype)
    if TARGET_MAY_BE_ABSENT:
        tl.store(grad_row_ptr + target, grad_target, mask=target >= 0)
    else:
        tl.store(grad_row_ptr + target, grad_target)


@triton.jit
def _zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    zeros = tl.zeros((BLOCK_V,), grad_row_ptr.dtype.element_ty)
    num_full = (V - 1) // BLOCK_V
    for i in range(num_full):
        tl.store(grad_row_ptr + i * BLOCK_V + offs, zeros)
    tl.store(grad_row_ptr + num_full * BLOCK_V + offs, zeros, mask=offs < V - num_full * BLOCK_V)


@triton.jit
def _clamp_keep_nan(x, low, high):
    # tl.minimum / tl.maximum may return the bound for a NaN: NaN in must give NaN out.
    return tl.where(x < low, low, tl.where(x > high, high, x))


@triton.jit
def _load_target(targets_ptr, row, V):
    # Validation rejects out-of-range targets before launch; the clamp only keeps a run with
    # SIRI_VALIDATE=0 from reading outside the row. 32-bit: an index within one row.
    return tl.minimum(tl.maximum(tl.load(targets_ptr + row).to(tl.int32), 0), V - 1)


@triton.jit
def _load_target_or_absent(targets_ptr, row, V):
    # As `_load_target`, but a negative target (none in these columns) stays -1.
    target = tl.load(targets_ptr + row).to(tl.int32)
    return tl.where(target < 0, -1, tl.minimum(target, V - 1))


@triton.jit
def _token_loss(
    logp, entropy, adv, old, ref, rollout,
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tis_cap, ratio_log_clamp,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr,
    HAS_TIS: tl.constexpr,
):
    """Per-token loss of `reference.per_token_loss`: (l, kl, clip code, d l / d logp).

    d l / d H is -entropy_coef. `old` is logp itself on-policy (ratio 1); `ref` and
    `rollout` are only read under their flags.
    """
    if HAS_OLD:
        log_ratio = logp - old
    else:
        # On-policy the log-ratio is exactly 0, even where logp = -inf and logp - old is NaN.
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
    tis = tl.full((), 1.0, tl.float32)
    if HAS_TIS:
        # Truncated importance weight of the trainer against the rollout engine: a
        # constant factor, no gradient through it.
        ratio_to_rollout = tl.exp(old - rollout)
        tis = tl.where(ratio_to_rollout > tis_cap, tis_cap, ratio_to_rollout)
        pg = pg * tis
    # The weight inside the clamp's mask, as in the reference: 0 where the clamp binds, even
    # for a NaN weight (old = rollout = -inf).
    dpg_dlogp = tl.where(clamp_binds, 0.0, dpg_dratio * ratio * tis)
    kl = tl.zeros((), tl.float32)
    dkl_dlogp = tl.zeros((), tl.float32)
    if HAS_REF:
        d = ref - logp
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
            if KL_ESTIMATOR == 4:
                # low_var_kl: k3 clamped above, no gradient where the clamp binds; NaN stays NaN.
                kl_clamp_binds = kl > LOW_VAR_KL_CLAMP
                kl = tl.where(kl_clamp_binds, LOW_VAR_KL_CLAMP, kl)
                dkl_dlogp = tl.where(kl_clamp_binds, 0.0, dkl_dlogp)
            if KL_ESTIMATOR == 5:
                # k3_ratio: (k3 r)' = k3' r + k3 r', with r' = r unless the log-ratio clamp binds.
                dkl_dlogp = dkl_dlogp * ratio + tl.where(clamp_binds, 0.0, kl * ratio)
                kl = kl * ratio
    # A zero kl_coef leaves the KL (reported, possibly infinite) out of the loss.
    kl_term = tl.where(kl_coef != 0, kl_coef * kl, 0.0)
    dkl_term = tl.where(kl_coef != 0, kl_coef * dkl_dlogp, 0.0)
    loss = pg - entropy_coef * entropy + kl_term
    return loss, kl, clip_code, dpg_dlogp + dkl_term


@triton.jit
def policy_loss_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride,
    targets_ptr, advantages_ptr, weights_ptr, old_ptr, ref_ptr, rollout_ptr,
    logprobs_ptr, entropy_ptr, loss_ptr, kl_ptr, clipped_ptr,
    num_rows, V, scale, inv_temperature, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tis_cap,
    ratio_log_clamp,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, KL_ESTIMATOR: tl.constexpr,
    HAS_DUAL_CLIP: tl.constexpr, HAS_TIS: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Rows program_id, program_id + num_programs, ...: outputs, and the gradient row when
    COMPUTE_GRAD. `scale` = log2(e) / temperature."""
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        row_ptr = logits_ptr + tl.cast(row, tl.int64) * logits_row_stride
        grad_row_ptr = grad_ptr + tl.cast(row, tl.int64) * grad_row_stride
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
            if COMPUTE_GRAD:
                # Kept in L2 for pass 2's re-read.
                m, log2_s, entropy, tail = _row_statistics(row_ptr, V, scale, BLOCK_V, True, "evict_last")
            else:
                m, log2_s, entropy, tail = _row_statistics(row_ptr, V, scale, BLOCK_V, True, "evict_first")
            target_log2p = _log2_prob(tl.load(row_ptr + target), scale, m, log2_s)
            logp = target_log2p * LN2
            if HAS_OLD:
                old = tl.load(old_ptr + row)
            else:
                old = logp  # on-policy: old = stop_grad(logp), so the ratio is 1
            ref = tl.zeros((), tl.float32)
            if HAS_REF:
                ref = tl.load(ref_ptr + row)
            rollout = tl.zeros((), tl.float32)
            if HAS_TIS:
                rollout = tl.load(rollout_ptr + row)
            loss, kl, clip_code, dloss_dlogp = _token_loss(
                logp, entropy, tl.load(advantages_ptr + row), old, ref, rollout,
                clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tis_cap, ratio_log_clamp,
                HAS_OLD, HAS_REF, KL_ESTIMATOR, HAS_DUAL_CLIP, HAS_TIS,
            )
            tl.store(logprobs_ptr + row, logp)
            tl.store(entropy_ptr + row, entropy)
            tl.store(loss_ptr + row, weight * loss)
            tl.store(kl_ptr + row, kl)
            tl.store(clipped_ptr + row, clip_code)
            if COMPUTE_GRAD:
                _write_row_gradient(
                    row_ptr, grad_row_ptr, V, target, target_log2p, tail, scale, inv_temperature, m, log2_s, entropy,
                    weight * dloss_dlogp, -weight * entropy_coef, HAS_ENTROPY_GRAD, BLOCK_V, False,
                )


@triton.jit
def logprob_kernel(
    logits_ptr, logits_row_stride, targets_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
    num_rows, V, scale, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """logprobs, lse (base 2: the pair m, log2 sum 2^(u - m)) and optionally entropy of rows
    program_id, + num_programs, ..."""
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        row_ptr = logits_ptr + tl.cast(row, tl.int64) * logits_row_stride
        m, log2_s, entropy, _ = _row_statistics(row_ptr, V, scale, BLOCK_V, WITH_ENTROPY, "evict_first")
        target_log2p = _log2_prob(tl.load(row_ptr + _load_target(targets_ptr, row, V)), scale, m, log2_s)
        tl.store(logprobs_ptr + row, target_log2p * LN2)
        # Base 2, in two parts, as the backward uses it (Backend.lse_base explains why).
        tl.store(lse_ptr + 2 * row, m)
        tl.store(lse_ptr + 2 * row + 1, log2_s)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, entropy)


@triton.jit
def logprob_backward_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, targets_ptr, lse_ptr, logprobs_ptr, entropy_ptr,
    grad_logprobs_ptr, grad_entropy_ptr, num_rows, V, scale, inv_temperature,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """d (sum g logp + h H) / d logits from the forward's lse and entropy: one read per row. A
    row with a negative target has no one-hot term and its log-prob is not read (backends.py)."""
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        row_ptr = logits_ptr + tl.cast(row, tl.int64) * logits_row_stride
        if HAS_GRAD_ENTROPY:
            entropy = tl.load(entropy_ptr + row)
            grad_entropy = tl.load(grad_entropy_ptr + row)
        else:
            entropy = tl.zeros((), tl.float32)
            grad_entropy = tl.zeros((), tl.float32)
        target = _load_target_or_absent(targets_ptr, row, V)
        num_full = (V - 1) // BLOCK_V
        tail = _load_tile(row_ptr + num_full * BLOCK_V, tl.arange(0, BLOCK_V), V - num_full * BLOCK_V, True,
                          "evict_first")
        _write_row_gradient(
            row_ptr, grad_ptr + tl.cast(row, tl.int64) * grad_row_stride, V, target,
            tl.load(logprobs_ptr + row, mask=target >= 0, other=0.0) * LOG2E, tail, scale, inv_temperature,
            tl.load(lse_ptr + 2 * row), tl.load(lse_ptr + 2 * row + 1), entropy, tl.load(grad_logprobs_ptr + row),
            grad_entropy, HAS_GRAD_ENTROPY, BLOCK_V, True,
        )


@triton.jit
def scale_unless_one_kernel(grad_ptr, grad_row_stride, scale_ptr, num_rows, V, BLOCK_V: tl.constexpr):
    """grad *= scale, skipped on the device when scale == 1; a short persistent grid.

    The fused forward already wrote d loss / d logits; the backward only scales it by the
    incoming gradient, which is exactly 1 for a plain `loss.backward()`. Reading the scale
    on the device skips the pass over T x V values without a host synchronisation, and a
    grid of a few programs per SM (not one per tile) makes that skip cost one launch.
    """
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offs = tl.arange(0, BLOCK_V)
        for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
            row_ptr = grad_ptr + tl.cast(row, tl.int64) * grad_row_stride
            for start in range(0, V, BLOCK_V):
                mask = start + offs < V
                grad = tl.load(row_ptr + start + offs, mask=mask).to(tl.float32) * scale
                tl.store(row_ptr + start + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
