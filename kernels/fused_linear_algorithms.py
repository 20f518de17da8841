"""The two algorithms behind `fused_linear_policy_loss`, for hidden [T, H] and a head [V, H].

Vocabulary split (the default, memory-lean; verl's structure; where row chunks fit the same
memory, `row_chunks_within_budget`, the default takes them instead). The vocabulary is cut into
slices of s columns; one [T, s] slice of logits exists at a time (one buffer, reused), about
1% of the [T, V] logits (`vocab_slice_size`), and its gradient is written over it.

    statistics pass, per slice:  logits_s = hidden @ weight_s.T (+ bias_s); the backend's
        `logprob_rows` gives each row's log-sum-exp, entropy and target log-prob within
        the slice, merged across slices into the row's (online over [T], `RowStatistics`);
    per-token loss:  `reference.per_token_loss` on [T] vectors gives c = d loss / d logp
        and e = d loss / d H;
    gradient pass, per slice:  logits_s recomputed and overwritten with d loss / d logits_s
        by the backend's `logprob_backward` (one fused pass over the slice, from the whole
        rows' entropy and lse in the backend's own two-part form; a row whose target lies in
        another slice has target -1 there, so no one-hot term), then
        grad_weight[slice] = dlogits_s.T @ hidden          written once, one GEMM over T
        grad_hidden       += dlogits_s @ weight_s          float32 accumulator
        grad_bias[slice]   = dlogits_s.sum(0)

Four GEMMs of 2 T H V flops: the recompute floor 8 T H V. The head's gradient is one GEMM
per slice (float32 accumulation inside the GEMM, one rounding); the hidden gradient adds
one half-precision product per slice into float32.

Row chunks (`chunk_size`, trades memory for speed). The rows are cut into chunks of c:

    logits_c = hidden_c @ weight.T (+ bias)   [c, V]; the backend's `policy_loss_rows`
        writes the outputs and d loss / d logits over it in place
    grad_hidden_c  = dlogits_c @ weight
    grad_weight   += dlogits_c.T @ hidden_c   float32 accumulator when weight is half precision

Three GEMMs (6 T H V flops) but the [V, H] head gradient is read and written per chunk:
chunks of >= 1,024 rows keep that traffic small against the GEMMs.
"""

from __future__ import annotations

import math

import torch

from .backends import RowOutputs, lse_buffer
from .config import LossConfig
from .reference import per_token_loss

# Memory of the vocabulary split beyond its outputs: at most this fraction of the [T, V]
# logits' bytes...
SLICE_MEMORY_FRACTION = 0.01
# ...or this many bytes where that is more, so that slices of short batches stay wide
# enough for the GEMMs to run near the matmul rate.
SLICE_MEMORY_FLOOR_BYTES = 32 << 20
# Slice widths are a multiple of this (tensor-core tiles), never fewer.
SLICE_COLUMN_MULTIPLE = 128


def slice_budget_bytes(num_rows: int, vocab: int, itemsize: int) -> float:
    """The vocabulary split's memory beyond its outputs, for T = num_rows."""
    return max(SLICE_MEMORY_FRACTION * num_rows * vocab * itemsize, SLICE_MEMORY_FLOOR_BYTES)


def vocab_slice_size(num_rows: int, vocab: int, itemsize: int) -> int:
    """Columns per vocabulary slice for T = num_rows: the [T, s] slice of logits fills the
    memory budget (the backend writes its gradient over it, with no temporaries)."""
    budget = slice_budget_bytes(num_rows, vocab, itemsize)
    columns = int(budget // (max(num_rows, 1) * itemsize)) // SLICE_COLUMN_MULTIPLE * SLICE_COLUMN_MULTIPLE
    return min(vocab, max(SLICE_COLUMN_MULTIPLE, columns))


# Row chunks this long keep the per-chunk traffic of the [V, H] head gradient small
# against the GEMMs (module docstring).
ROW_CHUNK_MIN_ROWS = 1024


def row_chunks_within_budget(num_rows: int, vocab: int, hidden_size: int, itemsize: int) -> int | None:
    """Rows per chunk when row chunks fit the vocabulary split's own memory budget, else None.

    With gradients the split does four GEMMs, row chunks three. Where a chunk of
    min(T, `ROW_CHUNK_MIN_ROWS`) rows with its full [c, V] logits (plus, for half-precision
    heads, the float32 accumulator of the head gradient) fits the budget the split would
    use anyway (`vocab_slice_size`: small vocabularies, short batches), the default takes
    the row chunks: the same memory, a quarter fewer flops. Large vocabularies (Qwen2's
    151,936) stay on the split.
    """
    budget = slice_budget_bytes(num_rows, vocab, itemsize)
    if itemsize < 4:
        budget -= vocab * hidden_size * 4
    rows = int(budget // (vocab * itemsize))
    return min(rows, num_rows) if num_rows > 0 and rows >= min(num_rows, ROW_CHUNK_MIN_ROWS) else None


def _spans(length: int, size: int):
    for start in range(0, length, size):
        yield slice(start, min(start + size, length))


def _linear(hidden, weight, bias):
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


class LogitsBuffer:
    """Storage of the logits of one vocabulary slice or row chunk, reused by the next one: a
    fresh tensor per GEMM would keep two alive at once (the loop's last one and its next)."""

    def __init__(self, like: torch.Tensor, numel: int):
        self._storage = like.new_empty(numel)

    def linear(self, hidden, weight, bias):
        """hidden @ weight.T (+ bias), [rows, columns] contiguous, over the previous logits."""
        out = self._storage[: hidden.shape[0] * weight.shape[0]].view(hidden.shape[0], weight.shape[0])
        return torch.mm(hidden, weight.t(), out=out) if bias is None else torch.addmm(bias, hidden, weight.t(), out=out)


def _slice_buffer(hidden, weight, slice_size: int) -> LogitsBuffer:
    return LogitsBuffer(hidden, hidden.shape[0] * min(slice_size, weight.shape[0]))


def _pick(tensor, index):
    return None if tensor is None else tensor[index]


def _add_product_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator += a @ b, summed in the accumulator's dtype (float32 for half inputs)."""
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
    else:  # each product rounded once to a's dtype, the running sum never
        accumulator += torch.mm(a, b).to(accumulator.dtype)


def _half_grad_buffer(like: torch.Tensor, zero: bool) -> torch.Tensor:
    """Where a gradient of `like`'s shape accumulates: float32 for half precision."""
    if like.dtype == torch.float32:
        return torch.zeros_like(like) if zero else torch.empty_like(like)
    return torch.zeros(like.shape, dtype=torch.float32, device=like.device)


class RowStatistics:
    """Log-sum-exp, entropy and target log-prob of every row, merged slice by slice.

    A slice s gives, from the backend's `logprob_rows` (its unit `lse_base`, its rounding of
    u = logits / temperature), lse_s as (m_s, l_s) with lse_s = m_s + l_s, its own entropy
    H_s and (where the target falls in it) the target's log-prob within the slice, q_s.
    The row's lse is kept in the same two-part form: M, the largest m_s of a slice with mass
    (a float32 value the kernels themselves rounded), and R = log sum_s exp(lse_s - M) in
    float64. Everything below is a difference from M, in the kernels' own rounding of u, so
    its error is relative to O(log V) numbers, never to |u|. (A float64 lse against the
    target's u re-read from the logits mixed two roundings of u: log-probs above 0 from a
    temperature of 1e-3 on, 4.7 nats off at 1e-7.)

        log w_s = lse_s - lse = (m_s - M) + l_s - R         (in nats)
        log p_y = q_s + log w_s                              (s the slice holding y)
        H       = sum_s w_s (H_s - log w_s)

    H is kept as the running sums of w_s H_s and -w_s log w_s relative to the running total.
    """

    def __init__(self, num_rows: int, device: torch.device, lse_base: float):
        make = lambda value: torch.full((num_rows,), value, dtype=torch.float64, device=device)  # noqa: E731
        self._to_nats = math.log(lse_base)
        # A row with no mass in any slice ends as (0, -inf), the reference's lse of such a row.
        self.max, self.log_sum = make(0.0), make(-math.inf)
        self.mass_entropy, self.slice_entropy = make(0.0), make(0.0)
        self.target_logprob, self.target_max, self.target_log_sum = make(math.nan), make(0.0), make(-math.inf)

    def merge(self, lse_s, entropy_s, logprobs_s, holds_target) -> None:
        """Fold in one slice: `lse_s` [T, 2] and `entropy_s`, `logprobs_s` [T] float32 as
        `logprob_rows` wrote them; `holds_target` [T] bool."""
        m_s, l_s = lse_s[:, 0].double(), lse_s[:, 1].double()
        has_mass, had_mass = l_s > -math.inf, self.log_sum > -math.inf
        new_max = torch.where(has_mass, torch.where(had_mass, torch.maximum(self.max, m_s), m_s), self.max)
        # The running total and the slice's, relative to the new M, in nats.
        old = torch.where(had_mass, (self.max - new_max) * self._to_nats + self.log_sum, -math.inf)
        new = torch.where(has_mass, ((m_s - new_max) + l_s) * self._to_nats, -math.inf)
        total = torch.logaddexp(old, new)
        log_w_old = torch.where(had_mass, old - total, -math.inf)  # log of the old slices' share
        log_w_new = torch.where(has_mass, new - total, -math.inf)
        w_old, w_new = torch.exp(log_w_old), torch.exp(log_w_new)
        # -sum w log w over the slices so far, re-based onto the new total. A slice with no
        # mass (all its logits -inf: lse_s's l_s = -inf, H_s NaN) adds nothing.
        self.mass_entropy = w_old * (self.mass_entropy - torch.where(w_old > 0, log_w_old, 0.0)) \
            - torch.where(w_new > 0, w_new * log_w_new, 0.0)
        self.slice_entropy = w_old * self.slice_entropy + torch.where(w_new > 0, w_new * entropy_s.double(), 0.0)
        self.max, self.log_sum = new_max, total
        self.target_logprob = torch.where(holds_target, logprobs_s.double(), self.target_logprob)
        self.target_max = torch.where(holds_target, m_s, self.target_max)
        self.target_log_sum = torch.where(holds_target, l_s, self.target_log_sum)

    def logprobs(self) -> torch.Tensor:
        log_w = ((self.target_max - self.max) + self.target_log_sum) * self._to_nats - self.log_sum
        # A target in a slice with no mass (all -inf there, the slice's q_s NaN) has p = 0.
        return torch.where(self.target_log_sum > -math.inf, self.target_logprob + log_w, -math.inf).float()

    def entropy(self) -> torch.Tensor:
        return (self.slice_entropy + self.mass_entropy).float()

    def lse_parts(self) -> torch.Tensor:
        """The rows' lse as `logprob_backward` reads it: float32 [T, 2] (M, R) in the backend's
        unit; M is exact in float32, R is O(log V)."""
        return torch.stack((self.max.float(), (self.log_sum / self._to_nats).float()), dim=-1)


def _slice_targets(targets, active, columns: slice):
    """The targets as indices into the slice; -1 where the slice does not hold the row's
    target (or the row has weight 0): `logprob_backward`'s rows without a one-hot term."""
    local = targets.long() - columns.start
    holds = active & (local >= 0) & (local < columns.stop - columns.start)
    return torch.where(holds, local, -1)


def _vocab_statistics(hidden, weight, bias, targets, active, temperature, impl, slice_size,
                      buffer: LogitsBuffer) -> RowStatistics:
    num_rows = hidden.shape[0]
    stats = RowStatistics(num_rows, hidden.device, impl.lse_base)
    make = lambda: hidden.new_empty(num_rows, dtype=torch.float32)  # noqa: E731
    logp_s, entropy_s, lse_s = make(), make(), lse_buffer(num_rows, hidden.device)
    for columns in _spans(weight.shape[0], slice_size):
        logits = buffer.linear(hidden, weight[columns], _pick(bias, columns))
        local = _slice_targets(targets, active, columns)
        # A row whose target is elsewhere reads some entry here: its log-prob is not kept.
        impl.logprob_rows(logits, local.clamp(min=0), temperature, logp_s, entropy_s, lse_s)
        stats.merge(lse_s, entropy_s, logp_s, local >= 0)
    return stats


def vocab_split_policy_loss(hidden, weight, bias, targets, advantages, weights, old, ref, rollout, cfg: LossConfig,
                            impl, slice_size: int, grad_hidden: bool, grad_weight: bool):
    """(RowOutputs, grad of hidden, grad of weight, grad of bias (float32)); a gradient not
    asked for is None. Per-token inputs float32 [T]; `slice_size` is `vocab_slice_size`'s
    columns; see the module docstring."""
    active = weights != 0
    buffer = _slice_buffer(hidden, weight, slice_size)
    stats = _vocab_statistics(hidden, weight, bias, targets, active, cfg.temperature, impl, slice_size, buffer)
    zero = torch.zeros((), device=hidden.device)
    logprobs = torch.where(active, stats.logprobs(), zero)
    entropy = torch.where(active, stats.entropy(), zero)
    loss, kl, clipped, slope = per_token_loss(logprobs, entropy, advantages, old, ref, rollout, cfg)
    out = RowOutputs(logprobs, entropy, torch.where(active, weights * loss, zero), torch.where(active, kl, zero),
                     torch.where(active, clipped, zero))
    if not (grad_hidden or grad_weight):
        return out, None, None, None
    # A row of weight 0 has c = e = 0 and no target in any slice: -p_j (0 + 0) = 0 everywhere.
    c = torch.where(active, weights * slope, zero)
    e = torch.where(active, -cfg.entropy_coef * weights, zero) if cfg.has_entropy_grad else None
    lse = stats.lse_parts()  # the whole rows'
    hidden_grad = _half_grad_buffer(hidden, zero=True) if grad_hidden else None
    weight_grad = torch.empty_like(weight) if grad_weight else None
    bias_grad = torch.empty(weight.shape[0], dtype=torch.float32, device=hidden.device) \
        if grad_weight and bias is not None else None
    for columns in _spans(weight.shape[0], slice_size):
        dlogits = buffer.linear(hidden, weight[columns], _pick(bias, columns))
        impl.logprob_backward(dlogits, _slice_targets(targets, active, columns), cfg.temperature, lse, logprobs,
                              entropy, c, e, dlogits)
        if grad_weight:
            torch.mm(dlogits.t(), hidden, out=weight_grad[columns])
            if bias_grad is not None:
                bias_grad[columns] = dlogits.sum(0, dtype=torch.float32)
        if grad_hidden:
            _add_product_(hidden_grad, dlogits, weight[columns])
    return out, hidden_grad, weight_grad, bias_grad


def vocab_split_token_logprobs(hidden, weight, bias, targets, temperature, impl, slice_size):
    """(logprobs, entropy) float32 [T] of every row, one vocabulary slice of logits at a time."""
    active = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    stats = _vocab_statistics(hidden, weight, bias, targets, active, temperature, impl, slice_size,
                              _slice_buffer(hidden, weight, slice_size))
    return stats.logprobs(), stats.entropy()


def row_chunked_policy_loss(hidden, weight, bias, targets, advantages, weights, old, ref, rollout, cfg: LossConfig,
                            impl, chunk_size: int, grad_hidden: bool, grad_weight: bool):
    """As `vocab_split_policy_loss`, by chunks of `chunk_size` rows (module docstring)."""
    num_rows = hidden.shape[0]
    out = RowOutputs.empty(num_rows, hidden.device)
    hidden_grad = torch.empty_like(hidden) if grad_hidden else None
    weight_grad = _half_grad_buffer(weight, zero=True) if grad_weight else None
    bias_grad = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) \
        if grad_weight and bias is not None else None
    buffer = LogitsBuffer(hidden, min(chunk_size, num_rows) * weight.shape[0])
    for rows in _spans(num_rows, chunk_size):
        hidden_chunk = hidden[rows]
        logits = buffer.linear(hidden_chunk, weight, bias)
        chunk_out = RowOutputs(out.logprobs[rows], out.entropy[rows], out.loss[rows], out.kl[rows], out.clipped[rows])
        impl.policy_loss_rows(
            logits, targets[rows], advantages[rows], weights[rows], _pick(old, rows), _pick(ref, rows),
            _pick(rollout, rows), cfg, chunk_out, logits if grad_hidden or grad_weight else None,
        )
        if grad_hidden:
            torch.mm(logits, weight, out=hidden_grad[rows])
        if grad_weight:
            _add_product_(weight_grad, logits.t(), hidden_chunk)
            if bias_grad is not None:
                bias_grad += logits.sum(0, dtype=torch.float32)
    return out, hidden_grad, weight_grad, bias_grad


def row_chunked_token_logprobs(hidden, weight, bias, targets, temperature, with_entropy, impl, chunk_size):
    num_rows = hidden.shape[0]
    logprobs = hidden.new_empty(num_rows, dtype=torch.float32)
    entropy = hidden.new_empty(num_rows, dtype=torch.float32)
    lse = lse_buffer(num_rows, hidden.device)
    for rows in _spans(num_rows, chunk_size):
        impl.logprob_rows(_linear(hidden[rows], weight, bias), targets[rows], temperature, logprobs[rows],
                          entropy[rows] if with_entropy else None, lse[rows])
    return logprobs, entropy
