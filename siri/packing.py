"""From rollouts to packed, variable-length micro-batches (docs/design.md, "siri.packing").

A mini-batch (all the rollouts of one optimizer step) is cut into micro-batches of at most
``max_tokens`` tokens each. Inside a micro-batch the samples are concatenated into one
sequence without padding; ``position_ids`` restart at 0 for every sample and
``cu_seqlens`` marks the boundaries, so attention never crosses from one sample into the
next (flash-attn's varlen layout, which Hugging Face models also take). Only the T
positions whose next token is a response token are scored: ``logit_index`` picks their
hidden states, so the LM head runs on T rows instead of all N.

The per-token ``weights`` carry the loss aggregation (``loss_agg``), normalised over the
whole mini-batch, so that the sum of the micro-batch losses is exactly the mini-batch
loss whatever the split:

=============================  ==============================================
``loss_agg``                   weight of a response token of sample s
=============================  ==============================================
``token-mean``                 1 / (response tokens in the mini-batch)
``seq-mean-token-mean``        1 / (samples · len_s)
``seq-mean-token-sum``         1 / samples
``seq-mean-token-sum-norm``    1 / (samples · loss_norm_length)   (Dr. GRPO)
=============================  ==============================================

"samples" counts the samples that score at least one token (verl's sequence mask: a
sequence whose response mask is all zero does not count), "response tokens" the tokens
they score.

Example::

    batches = pack(samples, max_tokens=16384, loss_agg="token-mean")
    for batch in batches:
        out = packed_policy_loss(model, batch.to("cuda"))   # siri.model_forward
        out.loss.backward()                                  # gradients accumulate
    optimizer.step()
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import numbers
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch

from siri.checks import as_int

__all__ = ["LOSS_AGGS", "PackedBatch", "Sample", "loss_normaliser", "pack", "unpack"]

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LOGPROB_FIELDS = ("old_logprobs", "ref_logprobs", "rollout_logprobs")


@dataclass
class Sample:
    """One rollout.

    Args:
        prompt_ids: the prompt's token ids (at least one: the first response token is
            predicted from the last prompt position).
        response_ids: the generated token ids; may be empty (the sample then scores nothing).
        advantage: a scalar, or one value per response token.
        old_logprobs, ref_logprobs, rollout_logprobs: optional, one per response token (the
            behaviour policy in the trainer, the reference policy, the rollout engine).
        truncated: the engine stopped the rollout at the length budget.
        group_id: the prompt group (GRPO), carried along untouched.

    Token ids and per-token values may be Python sequences, numpy arrays or CPU tensors.
    """

    prompt_ids: Sequence[int] | np.ndarray | torch.Tensor
    response_ids: Sequence[int] | np.ndarray | torch.Tensor
    advantage: float | Sequence[float] | np.ndarray | torch.Tensor = 0.0
    old_logprobs: Sequence[float] | np.ndarray | torch.Tensor | None = None
    ref_logprobs: Sequence[float] | np.ndarray | torch.Tensor | None = None
    rollout_logprobs: Sequence[float] | np.ndarray | torch.Tensor | None = None
    truncated: bool = False
    group_id: Hashable | None = None


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch of packed samples. N packed tokens, n samples, T scored tokens.

    Attributes:
        input_ids: [N] int64, the samples' prompt + response tokens, back to back.
        position_ids: [N] int64, restarting at 0 for each sample.
        cu_seqlens: [n + 1] int32, cumulative sample lengths (flash-attn varlen).
        max_seqlen: the longest sample, a Python int (no device sync to read it).
        logit_index: [T] int64, the positions whose next token is a response token.
        targets: [T] int64, that next token.
        advantages, weights: [T] float32; ``weights`` carry ``loss_agg`` (module docstring).
        old_logprobs, ref_logprobs, rollout_logprobs: [T] float32, or None when the samples
            had none.
        sample_index: [T] int64, index into the ``samples`` list given to `pack`.
        sample_ids: the indices of the n samples held, ascending (the packing order).
        response_lengths: the response length of each of those n samples (T in all).
        num_samples: the length of the ``samples`` list given to `pack`.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    logit_index: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    rollout_logprobs: torch.Tensor | None
    sample_index: torch.Tensor
    sample_ids: tuple[int, ...]
    response_lengths: tuple[int, ...]
    num_samples: int

    @property
    def num_tokens(self) -> int:
        """N, the packed tokens (prompt and response) this micro-batch runs through the model."""
        return self.input_ids.shape[0]

    @property
    def num_scored(self) -> int:
        """T, the response tokens this micro-batch scores."""
        return self.logit_index.shape[0]

    def model_inputs(self) -> dict:
        """Keyword arguments for a Hugging Face causal LM (or its body) on this micro-batch.

        Every attention implementation of transformers keeps the samples apart with them:

        - ``position_ids`` [1, N]: positions restarting at 0 per sample. They give each
          sample its own rotary positions, and with no ``attention_mask`` and no cache
          transformers' masking utils detect the packed layout from them (a position that
          does not follow its predecessor by 1 starts a new sample) and build a
          block-diagonal causal mask for "sdpa", "eager" and "flex_attention".
        - ``use_cache=False``: with a cache (HF's default ``use_cache=True`` creates one)
          the packed layout is not detected and attention would cross samples.
        - ``cu_seq_lens_q`` / ``cu_seq_lens_k``: the sample boundaries of queries and keys
          (int32, flash-attn's ``cu_seqlens_q`` / ``cu_seqlens_k``). With them the flash
          attention implementations call the varlen kernel directly, instead of
          re-deriving the boundaries from ``position_ids`` on every layer, and
          "packed_sdpa" (``siri.attention``) attends within each sample, with no mask;
          "sdpa" and "eager" ignore them.
        - ``max_length_q`` / ``max_length_k``: the longest sample (flash-attn's
          ``max_seqlen_q`` / ``max_seqlen_k``) as a Python int, so no layer reads it back
          from the device.
        """
        return {
            "input_ids": self.input_ids.unsqueeze(0),
            "position_ids": self.position_ids.unsqueeze(0),
            "use_cache": False,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor on `device` (the batch itself is left as it is)."""
        moved = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                moved[field.name] = value.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, **moved)


# ---------------------------------------------------------------------------------------
# Input checks: every failure is a ValueError naming the argument.


_INT64_MAX = int(np.iinfo(np.int64).max)


def _first_beyond_int64(value, array: np.ndarray) -> int | None:
    """The index of the first id above int64's range, or None. numpy holds such ids as
    uint64 (the int64 cast would wrap them to negative ids) or, from a list of Python ints,
    as float64 or object."""
    if array.dtype.kind == "u":
        beyond = array > _INT64_MAX
        return int(np.argmax(beyond)) if beyond.any() else None
    if array.dtype.kind in "fO" and not isinstance(value, np.ndarray):
        return next((i for i, v in enumerate(value) if isinstance(v, numbers.Integral) and v > _INT64_MAX), None)
    return None


def _as_array(name: str, value, *, integer: bool) -> np.ndarray:
    """`value` as a 1-D numpy array (int64 or float64), or ValueError naming `name`."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(array.shape)}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64 if integer else np.float64)
    if integer:
        too_large = _first_beyond_int64(value, array)
        if too_large is not None:
            raise ValueError(f"{name} holds token ids >= 2**63 (first at {too_large})")
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integer token ids, got dtype {array.dtype}")
        if (array < 0).any():
            raise ValueError(f"{name} holds negative token ids (first at {int(np.argmax(array < 0))})")
        return array.astype(np.int64, copy=False)
    numeric = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if array.dtype == np.bool_ or not numeric:
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return array


@dataclass
class _Checked:
    """A validated sample as numpy arrays."""

    prompt: np.ndarray
    response: np.ndarray
    advantages: np.ndarray
    logprobs: dict[str, np.ndarray | None]
    truncated: bool

    @property
    def length(self) -> int:
        return self.prompt.shape[0] + self.response.shape[0]


def _check_sample(index: int, sample, vocab_size: int | None) -> _Checked:
    where = f"samples[{index}]"
    if not isinstance(sample, Sample):
        raise ValueError(f"{where} must be a siri.packing.Sample, got {type(sample).__name__}")
    prompt = _as_array(f"{where}.prompt_ids", sample.prompt_ids, integer=True)
    response = _as_array(f"{where}.response_ids", sample.response_ids, integer=True)
    if prompt.shape[0] == 0:
        raise ValueError(f"{where}.prompt_ids must hold at least one token (the first response token "
                         "is predicted from the last prompt position)")
    if vocab_size is not None:
        for name, ids in (("prompt_ids", prompt), ("response_ids", response)):
            if ids.size and ids.max() >= vocab_size:
                raise ValueError(f"{where}.{name} holds token ids >= vocab_size ({vocab_size})")
    num_response = response.shape[0]
    advantage = sample.advantage
    if isinstance(advantage, (torch.Tensor, np.ndarray)) and advantage.ndim == 0:
        advantage = advantage.item()
    if isinstance(advantage, numbers.Real) and not isinstance(advantage, (bool, np.bool_)):
        if not math.isfinite(advantage):
            raise ValueError(f"{where}.advantage must be finite, got {advantage}")
        advantages = np.full(num_response, float(advantage))
    elif np.ndim(advantage) == 0:  # a string, a bool, None: no number and no sequence of them
        raise ValueError(f"{where}.advantage must be a real number or hold one per response token, "
                         f"got {type(advantage).__name__} {advantage!r}")
    else:
        advantages = _as_array(f"{where}.advantage", advantage, integer=False)
        if advantages.shape[0] != num_response:
            raise ValueError(f"{where}.advantage must be a scalar or hold one value per response token "
                             f"({num_response}), got {advantages.shape[0]}")
    logprobs = {}
    for field in LOGPROB_FIELDS:
        value = getattr(sample, field)
        if value is None:
            logprobs[field] = None
            continue
        array = _as_array(f"{where}.{field}", value, integer=False)
        if array.shape[0] != num_response:
            raise ValueError(f"{where}.{field} must hold one value per response token ({num_response}), "
                             f"got {array.shape[0]}")
        logprobs[field] = array
    if not isinstance(sample.truncated, (bool, np.bool_)):
        raise ValueError(f"{where}.truncated must be a bool, got {type(sample.truncated).__name__}")
    return _Checked(prompt, response, advantages, logprobs, bool(sample.truncated))


def _check_logprobs_all_or_none(checked: list[_Checked]) -> dict[str, bool]:
    """Which log-prob fields the batch carries. A sample with an empty response is exempt:
    it scores nothing, and engines often leave its fields unset."""
    present = {}
    for field in LOGPROB_FIELDS:
        scored = [i for i, c in enumerate(checked) if c.response.shape[0] > 0]
        missing = [i for i in scored if checked[i].logprobs[field] is None]
        if missing and len(missing) != len(scored):
            raise ValueError(f"{field}: samples {missing[:8]}{'...' if len(missing) > 8 else ''} have none while "
                             "other samples have them; give them for every sample or for none")
        present[field] = bool(scored) and not missing
    return present


# ---------------------------------------------------------------------------------------
# Loss aggregation weights.


def _counted(lengths: np.ndarray, truncated: np.ndarray, mask_truncated: bool) -> np.ndarray:
    """Which samples count in the loss normaliser: those that score at least one token, a
    non-empty response and, under ``mask_truncated``, not truncated."""
    counted = lengths > 0
    if mask_truncated:
        counted &= ~truncated
    return counted


def _normaliser(lengths: np.ndarray, counted: np.ndarray, loss_agg: str) -> float:
    """What the weights divide by: the counted tokens (token-mean) or the counted samples."""
    return float(lengths[counted].sum()) if loss_agg == "token-mean" else float(counted.sum())


def loss_normaliser(samples: Sequence[Sample], loss_agg: str, mask_truncated: bool) -> int:
    """The normaliser `pack` divides the loss weights of `samples` by: the scored response
    tokens for token-mean, the scored samples otherwise (module docstring). Data-parallel
    ranks sum it over their shares to normalise by the global figure (siri.distributed)."""
    lengths = np.array([len(s.response_ids) for s in samples], dtype=np.float64)
    truncated = np.array([bool(s.truncated) for s in samples], dtype=bool)
    return int(_normaliser(lengths, _counted(lengths, truncated, mask_truncated), loss_agg))


def _sample_weights(checked: list[_Checked], loss_agg: str, mask_truncated: bool,
                    loss_norm_length: float | None) -> np.ndarray:
    """Per-sample weight of each of its response tokens, float64 [num_samples].

    A sample counts in the normaliser when it scores at least one token (`_counted`).
    Masked samples are excluded from both the token count and the sample count, as DAPO's
    overlong filtering does in verl (it zeroes their response mask before the aggregation):
    the loss is then the mean over the rollouts that are kept, and its scale does not shrink
    as more rollouts hit the budget. When nothing counts, every weight is 0 (a zero loss,
    not a NaN).
    """
    lengths = np.array([c.response.shape[0] for c in checked], dtype=np.float64)
    counted = _counted(lengths, np.array([c.truncated for c in checked], dtype=bool), mask_truncated)
    num_counted = int(counted.sum())
    weights = np.zeros(len(checked), dtype=np.float64)
    if num_counted == 0:
        return weights
    normaliser = _normaliser(lengths, counted, loss_agg)
    if loss_agg in ("token-mean", "seq-mean-token-sum"):
        weights[counted] = 1.0 / normaliser
    elif loss_agg == "seq-mean-token-mean":
        weights[counted] = 1.0 / (normaliser * lengths[counted])
    else:  # seq-mean-token-sum-norm: a constant length, so short answers are not up-weighted (Dr. GRPO)
        weights[counted] = 1.0 / (normaliser * loss_norm_length)
    return weights


# ---------------------------------------------------------------------------------------
# Bin packing.


def sample_cost(length: int, attention_crossover: float) -> float:
    """Relative compute of one sample of `length` tokens in a forward/backward pass.

    Per layer and token the GEMMs cost about 2·(4H² + 3H·I) flops (attention projections,
    SwiGLU MLP), and causal attention costs about 2·H·length per token (QKᵀ and PV over
    half the keys on average). Divided by 2H: cost ∝ length · (crossover + length), with
    crossover = (4H² + 3H·I) / H ≈ 30k for Qwen2-1.5B and ≈ 42k for a 7B model (GQA).
    """
    return float(length) * (attention_crossover + float(length))


def _assign_bins(lengths: list[int], costs: list[float], order: list[int], num_bins: int,
                 max_tokens: int) -> list[list[int]] | None:
    """Longest-first greedy with a capacity: each sample, most costly first, goes to the
    least loaded bin (by cost) among those it still fits in. None if one does not fit."""
    # A heap of (cost, bin) finds the least loaded bin; bins a sample does not fit in are
    # popped aside and pushed back, so ties always resolve to the lowest bin number.
    heap = [(0.0, b) for b in range(num_bins)]
    tokens = [0] * num_bins
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for i in order:
        skipped = []
        while heap and tokens[heap[0][1]] + lengths[i] > max_tokens:
            skipped.append(heapq.heappop(heap))
        if not heap:
            return None
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        tokens[b] += lengths[i]
        heapq.heappush(heap, (load + costs[i], b))
        for entry in skipped:
            heapq.heappush(heap, entry)
    return bins


def _partition(lengths: list[int], max_tokens: int, min_micro_batches: int,
               attention_crossover: float) -> list[list[int]]:
    """Split samples (by position in `lengths`) into the fewest bins of <= max_tokens tokens
    (at least `min_micro_batches`), balanced by `sample_cost`.

    Why the fewest bins: each micro-batch pays a fixed price (one pass over the weights in
    forward and backward, kernel launches, the LM head's weight read), and fuller bins
    keep the GPU's matmuls large, so throughput is best with as few as fit. Why balance
    then: the bins of one step run in data-parallel ranks or one after another with the
    same memory budget; even costs keep ranks in lockstep and peak memory flat.

    The count starts at the bound ceil(total tokens / max_tokens) and grows by one until
    the greedy fits (it always does by one bin per sample). Longest-first greedy (LPT) is
    within 4/3 of the optimal makespan, O(n log n), deterministic (ties broken by sample
    index) and, unlike Karmarkar-Karp, keeps the token capacity while it places.
    """
    if not lengths:
        return []
    costs = [sample_cost(length, attention_crossover) for length in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-costs[i], i))
    num_bins = max(min_micro_batches, -(-sum(lengths) // max_tokens))
    while True:
        bins = _assign_bins(lengths, costs, order, num_bins, max_tokens)
        if bins is not None:
            break
        num_bins += 1
    bins = [sorted(b) for b in bins if b]
    # Most costly bin first: a memory peak shows on the first micro-batch, not the last.
    bins.sort(key=lambda b: (-sum(costs[i] for i in b), b[0]))
    return bins


# ---------------------------------------------------------------------------------------
# Public API.


def pack(
    samples: Sequence[Sample],
    max_tokens: int,
    loss_agg: str = "token-mean",
    *,
    loss_norm_length: float | None = None,
    mask_truncated: bool = False,
    min_micro_batches: int = 1,
    attention_crossover: float = 32768.0,
    vocab_size: int | None = None,
) -> list[PackedBatch]:
    """Pack one mini-batch of rollouts into micro-batches of at most `max_tokens` tokens.

    Args:
        samples: the rollouts of one optimizer step; the loss weights are normalised over
            all of them, so summing the losses of the returned micro-batches gives the
            mini-batch loss.
        max_tokens: the most tokens (prompt + response) of one micro-batch.
        loss_agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm" (module docstring).
        loss_norm_length: L_norm of "seq-mean-token-sum-norm", required for it. Keep it a
            constant of the run (e.g. the largest budget), not the current length budget:
            a normaliser that follows the oscillating budget would rescale the gradient.
        mask_truncated: give truncated samples weight 0 and leave them out of the
            normaliser (DAPO's overlong filtering). They stay in the micro-batches, so
            their log-probs are still computed.
        min_micro_batches: at least this many micro-batches (e.g. the data-parallel size),
            when there are at least this many samples to pack.
        attention_crossover: the sample length at which attention costs as much as the
            rest of a layer; shapes the balancing cost (see `sample_cost`).
        vocab_size: when given, token ids >= vocab_size raise.

    Returns:
        The micro-batches, deterministic for a given input (ties broken by sample index),
        most costly first. Samples with an empty response score nothing and are left out
        of every micro-batch (`unpack` gives them an empty tensor); an input where every
        response is empty gives an empty list.

    Raises:
        ValueError naming the argument: a sample longer than `max_tokens` (with its index),
        per-token fields whose length is not the response's, negative ids, log-probs given
        for only some samples, an unknown `loss_agg`, `max_tokens` <= 0.
    """
    max_tokens = as_int("max_tokens", max_tokens, minimum=1)
    min_micro_batches = as_int("min_micro_batches", min_micro_batches, minimum=1)
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {list(LOSS_AGGS)}, got {loss_agg!r}")
    if loss_agg == "seq-mean-token-sum-norm":
        if loss_norm_length is None:
            raise ValueError("loss_norm_length is required for loss_agg='seq-mean-token-sum-norm' "
                             "(a constant of the run, e.g. the largest length budget)")
    if loss_norm_length is not None:
        if isinstance(loss_norm_length, bool) or not isinstance(loss_norm_length, numbers.Real) \
                or not math.isfinite(loss_norm_length) or loss_norm_length <= 0:
            raise ValueError(f"loss_norm_length must be a positive number, got {loss_norm_length!r}")
    if not isinstance(mask_truncated, bool):
        raise ValueError(f"mask_truncated must be a bool, got {mask_truncated!r}")
    if isinstance(attention_crossover, bool) or not isinstance(attention_crossover, numbers.Real) \
            or not math.isfinite(attention_crossover) or attention_crossover < 0:
        raise ValueError(f"attention_crossover must be a finite number >= 0, got {attention_crossover!r}")
    if vocab_size is not None:
        vocab_size = as_int("vocab_size", vocab_size, minimum=1)
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise ValueError(f"samples must be a sequence of Sample, got {type(samples).__name__}")

    checked = [_check_sample(i, s, vocab_size) for i, s in enumerate(samples)]
    for i, c in enumerate(checked):
        if c.length > max_tokens:
            raise ValueError(f"samples[{i}] has {c.length} tokens (prompt {c.prompt.shape[0]} + response "
                             f"{c.response.shape[0]}), more than max_tokens={max_tokens}")
    present = _check_logprobs_all_or_none(checked)
    weights = _sample_weights(checked, loss_agg, mask_truncated, loss_norm_length)

    scored = [i for i, c in enumerate(checked) if c.response.shape[0] > 0]
    bins = _partition([checked[i].length for i in scored], max_tokens, min_micro_batches, attention_crossover)
    return [_build(checked, [scored[j] for j in b], weights, present) for b in bins]


def _build(checked: list[_Checked], ids: list[int], weights: np.ndarray, present: dict[str, bool]) -> PackedBatch:
    parts = [checked[i] for i in ids]
    lengths = np.array([c.length for c in parts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    response_lengths = [c.response.shape[0] for c in parts]
    # Position p predicts token p + 1: the response of a sample starting at `start` with
    # P prompt tokens is predicted by positions start + P - 1 ... start + P + R - 2.
    logit_index = np.concatenate([
        np.arange(start + c.prompt.shape[0] - 1, start + c.length - 1) for start, c in zip(starts, parts)
    ])

    def cat(arrays, dtype):
        return torch.from_numpy(np.concatenate(arrays).astype(dtype, copy=False))

    logprobs = {
        field: cat([c.logprobs[field] for c in parts], np.float32) if present[field] else None
        for field in LOGPROB_FIELDS
    }
    return PackedBatch(
        input_ids=cat([np.concatenate([c.prompt, c.response]) for c in parts], np.int64),
        position_ids=cat([np.arange(length) for length in lengths], np.int64),
        cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
        max_seqlen=int(lengths.max()),
        logit_index=torch.from_numpy(logit_index.astype(np.int64)),
        targets=cat([c.response for c in parts], np.int64),
        advantages=cat([c.advantages for c in parts], np.float32),
        weights=cat([np.full(n, weights[i]) for i, n in zip(ids, response_lengths)], np.float32),
        sample_index=cat([np.full(n, i) for i, n in zip(ids, response_lengths)], np.int64),
        sample_ids=tuple(ids),
        response_lengths=tuple(response_lengths),
        num_samples=len(checked),
        **logprobs,
    )


def unpack(values, batches) -> list[torch.Tensor]:
    """Split per-token values back into one 1-D tensor per sample.

    Args:
        values: a [T] tensor aligned with one batch's `logit_index` (e.g. the log-probs of
            `siri.model_forward.packed_logprobs`), or a sequence of them, one per batch.
        batches: the `PackedBatch`, or the list of them `pack` returned.

    Returns:
        For one batch: the values of each sample it holds, in `batch.sample_ids` order.
        For a list: `num_samples` tensors in the order of the original `samples`; a sample
        no batch holds (an empty response) gets an empty tensor of the values' dtype.
    """
    if isinstance(batches, PackedBatch):
        _check_values("values", values, batches)
        return list(torch.split(values, list(batches.response_lengths)))
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) \
            or not all(isinstance(b, PackedBatch) for b in batches):
        raise ValueError("batches must be a PackedBatch or a sequence of PackedBatch")
    if isinstance(values, torch.Tensor) or not isinstance(values, Sequence) or len(values) != len(batches):
        raise ValueError(f"values must be a sequence of {len(batches)} tensors, one per batch")
    if not batches:
        return []
    num_samples = batches[0].num_samples
    if any(b.num_samples != num_samples for b in batches):
        raise ValueError("batches come from different pack calls (their num_samples differ)")
    out: list[torch.Tensor | None] = [None] * num_samples
    for k, (value, batch) in enumerate(zip(values, batches)):
        _check_values(f"values[{k}]", value, batch)
        for i, piece in zip(batch.sample_ids, torch.split(value, list(batch.response_lengths))):
            if out[i] is not None:
                raise ValueError(f"batches: sample {i} appears in more than one batch")
            out[i] = piece
    template = values[0]
    return [piece if piece is not None else template.new_empty(0) for piece in out]


def _check_values(name: str, values, batch: PackedBatch) -> None:
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1 or values.shape[0] != batch.num_scored:
        raise ValueError(f"{name} must have shape [{batch.num_scored}] (one value per scored token), "
                         f"got {list(values.shape)}")
