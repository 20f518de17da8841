"""siri.packing: layout, loss-aggregation weights, bin packing, unpack and bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siri.packing import LOSS_AGGS, PackedBatch, Sample, loss_normaliser, pack, unpack


def make_samples(specs, seed=0, logprobs=False):
    """specs: (prompt_len, response_len, truncated) triples; random ids and advantages."""
    rng = np.random.default_rng(seed)
    samples = []
    for prompt_len, response_len, truncated in specs:
        extra = {}
        if logprobs:
            extra = {f: -rng.random(response_len) for f in ("old_logprobs", "ref_logprobs", "rollout_logprobs")}
        samples.append(Sample(
            prompt_ids=rng.integers(0, 1000, prompt_len), response_ids=rng.integers(0, 1000, response_len),
            advantage=rng.standard_normal(response_len) if response_len % 2 else float(rng.standard_normal()),
            truncated=truncated, group_id=len(samples) // 2, **extra,
        ))
    return samples


def test_layout_of_a_small_batch():
    samples = [
        Sample([1, 2, 3], [4, 5], advantage=0.5),
        Sample([6], [7, 8, 9], advantage=[1.0, 2.0, 3.0]),
    ]
    (batch,) = pack(samples, max_tokens=100)
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 5, 9]
    assert batch.max_seqlen == 5 and isinstance(batch.max_seqlen, int)
    # Position p predicts token p + 1: sample 0's response (4, 5) from positions 2, 3;
    # sample 1 starts at 5 with a one-token prompt, its response from positions 5, 6, 7.
    assert batch.logit_index.tolist() == [2, 3, 5, 6, 7]
    assert batch.targets.tolist() == [4, 5, 7, 8, 9]
    assert torch.equal(batch.input_ids[batch.logit_index + 1], batch.targets)
    assert batch.advantages.tolist() == [0.5, 0.5, 1.0, 2.0, 3.0]
    assert batch.sample_index.tolist() == [0, 0, 1, 1, 1]
    assert batch.sample_ids == (0, 1) and batch.response_lengths == (2, 3) and batch.num_samples == 2
    assert batch.num_tokens == 9 and batch.num_scored == 5
    assert batch.old_logprobs is None and batch.ref_logprobs is None and batch.rollout_logprobs is None
    for name in ("input_ids", "position_ids", "logit_index", "targets", "sample_index"):
        assert getattr(batch, name).dtype == torch.int64, name
    for name in ("advantages", "weights"):
        assert getattr(batch, name).dtype == torch.float32, name


def test_model_inputs_are_what_transformers_takes():
    (batch,) = pack(make_samples([(3, 4, False), (2, 2, False)]), max_tokens=64)
    inputs = batch.model_inputs()
    assert set(inputs) == {"input_ids", "position_ids", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k",
                           "max_length_q", "max_length_k"}
    assert inputs["input_ids"].shape == (1, batch.num_tokens) and inputs["position_ids"].shape == (1, batch.num_tokens)
    assert inputs["use_cache"] is False
    assert inputs["cu_seq_lens_q"].dtype == torch.int32 and torch.equal(inputs["cu_seq_lens_k"], batch.cu_seqlens)
    assert inputs["max_length_q"] == inputs["max_length_k"] == 7


def test_to_moves_every_tensor_and_leaves_the_original():
    (batch,) = pack(make_samples([(3, 4, False), (2, 3, False)], logprobs=True), max_tokens=64)
    moved = batch.to("meta")  # a device every machine has; tensors keep their shape and dtype
    for name in ("input_ids", "position_ids", "cu_seqlens", "logit_index", "targets", "advantages", "weights",
                 "old_logprobs", "ref_logprobs", "rollout_logprobs", "sample_index"):
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(batch, name).device.type == "cpu", name
        assert getattr(moved, name).dtype == getattr(batch, name).dtype, name
    assert moved.max_seqlen == batch.max_seqlen and moved.sample_ids == batch.sample_ids


# Lengths 2, 4, 1 and an empty response, which counts in no normaliser.
WEIGHT_SPECS = [(2, 2, False), (1, 4, False), (3, 1, True), (2, 0, False)]


@pytest.mark.parametrize("loss_agg, expected", [
    ("token-mean", [1 / 7] * 7),
    ("seq-mean-token-mean", [1 / 6] * 2 + [1 / 12] * 4 + [1 / 3]),
    ("seq-mean-token-sum", [1 / 3] * 7),
    ("seq-mean-token-sum-norm", [1 / (3 * 8)] * 7),
])
def test_weights_follow_the_table(loss_agg, expected):
    batches = pack(make_samples(WEIGHT_SPECS), max_tokens=100, loss_agg=loss_agg, loss_norm_length=8)
    weights = torch.cat(unpack([b.weights for b in batches], batches))
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("loss_agg, expected", [
    # Sample 2 is truncated: weight 0 and out of the normaliser (2 samples, 6 tokens left).
    ("token-mean", [1 / 6] * 6 + [0.0]),
    ("seq-mean-token-mean", [1 / 4] * 2 + [1 / 8] * 4 + [0.0]),
    ("seq-mean-token-sum", [1 / 2] * 6 + [0.0]),
    ("seq-mean-token-sum-norm", [1 / (2 * 8)] * 6 + [0.0]),
])
def test_mask_truncated_drops_them_from_the_normaliser(loss_agg, expected):
    batches = pack(make_samples(WEIGHT_SPECS), max_tokens=100, loss_agg=loss_agg, loss_norm_length=8,
                   mask_truncated=True)
    weights = torch.cat(unpack([b.weights for b in batches], batches))
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))
    # Still packed: its log-probs are computed like any other sample's.
    assert any(2 in b.sample_ids for b in batches)


def test_everything_masked_gives_zero_weights_not_nan():
    batches = pack(make_samples([(2, 3, True), (1, 2, True)]), 100, mask_truncated=True)
    assert all(torch.equal(b.weights, torch.zeros_like(b.weights)) for b in batches)


def test_empty_responses_are_left_out_and_unpack_to_empty():
    samples = make_samples([(3, 0, False), (2, 3, False), (4, 0, True)])
    batches = pack(samples, 100)
    assert [b.sample_ids for b in batches] == [(1,)]
    pieces = unpack([b.targets for b in batches], batches)
    assert [p.numel() for p in pieces] == [0, 3, 0]
    assert pieces[0].dtype == torch.int64
    assert pack(make_samples([(3, 0, False)]), 100) == []
    assert pack([], 100) == []


def test_empty_response_may_omit_logprobs():
    samples = make_samples([(2, 3, False), (2, 2, False)], logprobs=True) + [Sample([1], [])]
    (batch,) = pack(samples, 100)
    assert batch.old_logprobs.shape == (5,)


def test_logprobs_are_carried_in_order():
    samples = make_samples([(2, 3, False), (1, 5, False), (3, 2, False)], logprobs=True)
    batches = pack(samples, 8)
    for field in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
        pieces = unpack([getattr(b, field) for b in batches], batches)
        for sample, piece in zip(samples, pieces):
            torch.testing.assert_close(piece, torch.as_tensor(getattr(sample, field), dtype=torch.float32))


def test_tensor_inputs_and_zero_dim_advantage():
    sample = Sample(torch.tensor([1, 2]), torch.tensor([3, 4], dtype=torch.int32), advantage=torch.tensor(2.0),
                    old_logprobs=torch.tensor([-0.5, -1.0]))
    (batch,) = pack([sample], 4)
    assert batch.advantages.tolist() == [2.0, 2.0] and batch.targets.tolist() == [3, 4]


def test_fewest_bins_that_fit_and_balanced():
    # 8 samples of 25 tokens: 200 tokens fit exactly in 2 bins of 100, 4 samples each.
    batches = pack(make_samples([(5, 20, False)] * 8), max_tokens=100)
    assert [b.num_tokens for b in batches] == [100, 100]
    # One sample of 90 and ten of 10: 190 tokens, but the long one fills its bin, so 2 bins:
    # 90 + 10 and 9 x 10. Longest-first puts the 90 alone first (it is the most costly).
    batches = pack(make_samples([(40, 50, False)] + [(5, 5, False)] * 10), max_tokens=100)
    assert sorted(b.num_tokens for b in batches) == [90, 100]
    assert all(b.num_tokens <= 100 for b in batches)


def test_min_micro_batches():
    batches = pack(make_samples([(2, 2, False)] * 6), max_tokens=100, min_micro_batches=3)
    assert len(batches) == 3 and all(b.num_tokens == 8 for b in batches)
    # Fewer samples than the minimum: one bin per sample, no empty bins.
    assert len(pack(make_samples([(2, 2, False)] * 2), 100, min_micro_batches=3)) == 2


def test_deterministic_with_ties_broken_by_index():
    samples = make_samples([(2, 2, False)] * 6)  # all the same cost
    first, second = pack(samples, 8), pack(samples, 8)
    # Equal costs: longest-first deals them round-robin onto the lowest-numbered least
    # loaded bin, and equal bins come out in order of their first sample.
    assert [b.sample_ids for b in first] == [(0, 3), (1, 4), (2, 5)]
    assert [b.sample_ids for b in second] == [b.sample_ids for b in first]


def test_unpack_one_batch():
    samples = make_samples([(2, 3, False), (1, 1, False), (2, 0, False), (1, 4, False)])
    (batch,) = pack(samples, 100)
    pieces = unpack(batch.targets, batch)
    assert batch.sample_ids == (0, 1, 3)
    assert [p.tolist() for p in pieces] == [list(samples[i].response_ids) for i in (0, 1, 3)]


# --------------------------------------------------------------------------- bad input


def bad_pack(**changes):
    kwargs = dict(samples=make_samples([(2, 3, False), (3, 4, False)], logprobs=True), max_tokens=100,
                  loss_agg="token-mean")
    kwargs.update(changes)
    return pack(**kwargs)


def replace(index, **fields):
    samples = make_samples([(2, 3, False), (3, 4, False)], logprobs=True)
    for name, value in fields.items():
        setattr(samples[index], name, value)
    return samples


@pytest.mark.parametrize("changes, named", [
    (dict(max_tokens=6), "samples[1]"),          # 7 tokens > 6: names the sample
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=10.0), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(loss_agg="mean"), "loss_agg"),
    (dict(loss_agg="seq-mean-token-sum-norm"), "loss_norm_length"),  # required there
    (dict(loss_agg="seq-mean-token-sum-norm", loss_norm_length=0), "loss_norm_length"),
    (dict(mask_truncated=1), "mask_truncated"),
    (dict(min_micro_batches=0), "min_micro_batches"),
    (dict(attention_crossover=float("nan")), "attention_crossover"),
    (dict(vocab_size=500), "vocab_size"),        # ids go up to 999
    (dict(samples="abc"), "samples"),
    (dict(samples=[(1, 2)]), "samples[0]"),
    (dict(samples=replace(0, prompt_ids=[1, -2])), "samples[0].prompt_ids"),
    (dict(samples=replace(1, response_ids=[3, 4, -1, 5])), "samples[1].response_ids"),
    (dict(samples=replace(1, response_ids=[3.0, 4.0, 1.0, 5.0])), "samples[1].response_ids"),
    (dict(samples=replace(0, response_ids=[[1, 2, 3]])), "samples[0].response_ids"),
    (dict(samples=replace(0, prompt_ids=[])), "samples[0].prompt_ids"),
    (dict(samples=replace(0, advantage=[1.0, 2.0])), "samples[0].advantage"),
    (dict(samples=replace(0, advantage=float("nan"))), "samples[0].advantage"),
    (dict(samples=replace(1, advantage=[0.0, 1.0, float("inf"), 0.0])), "samples[1].advantage"),
    (dict(samples=replace(1, old_logprobs=[-1.0] * 3)), "samples[1].old_logprobs"),
    (dict(samples=replace(0, ref_logprobs=[-1.0] * 4)), "samples[0].ref_logprobs"),
    (dict(samples=replace(0, rollout_logprobs=[-1.0, float("nan"), -1.0])), "samples[0].rollout_logprobs"),
    (dict(samples=replace(1, old_logprobs=None)), "old_logprobs"),     # given for only some
    (dict(samples=replace(0, truncated="yes")), "samples[0].truncated"),
])
def test_bad_input_raises_naming_the_argument(changes, named):
    with pytest.raises(ValueError, match=_escape(named)):
        bad_pack(**changes)


def _escape(text):
    import re

    return re.escape(text)


def test_unpack_bad_input():
    batches = pack(make_samples([(2, 3, False), (3, 4, False)]), 7)
    assert len(batches) == 2
    with pytest.raises(ValueError, match="values"):
        unpack(torch.zeros(2), batches[0])
    with pytest.raises(ValueError, match="values"):
        unpack([torch.zeros(b.num_scored) for b in batches[:1]], batches)
    with pytest.raises(ValueError, match="batches"):
        unpack([torch.zeros(1)], ["not a batch"])
    other = pack(make_samples([(2, 3, False)]), 7)
    with pytest.raises(ValueError, match="batches"):
        unpack([torch.zeros(b.num_scored) for b in batches + other], batches + other)


# --------------------------------------------------------------------------- properties

sample_specs = st.lists(
    st.tuples(st.integers(1, 24), st.integers(0, 40), st.booleans()),  # prompt, response, truncated
    min_size=0, max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=sample_specs, slack=st.floats(1.0, 4.0), loss_agg=st.sampled_from(LOSS_AGGS),
       mask_truncated=st.booleans(), seed=st.integers(0, 2**16))
def test_packing_properties(specs, slack, loss_agg, mask_truncated, seed):
    samples = make_samples(specs, seed=seed)
    longest = max((p + r for p, r, _ in specs), default=1)
    max_tokens = max(1, int(longest * slack))
    batches = pack(samples, max_tokens, loss_agg, loss_norm_length=64, mask_truncated=mask_truncated)

    # Bins never exceed max_tokens, and there are at least as few as the token bound allows.
    total = sum(p + r for p, r, _ in specs if r > 0)
    assert all(b.num_tokens <= max_tokens for b in batches)
    assert len(batches) >= math.ceil(total / max_tokens)
    assert sum(b.num_tokens for b in batches) == total

    for b in batches:
        assert isinstance(b, PackedBatch)
        lengths = torch.diff(b.cu_seqlens).tolist()
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.num_tokens and b.max_seqlen == max(lengths)
        assert torch.equal(b.position_ids, torch.cat([torch.arange(n) for n in lengths]))
        assert torch.equal(b.input_ids[b.logit_index + 1], b.targets)
        assert list(b.sample_ids) == sorted(b.sample_ids)

    # Every response token appears exactly once, in order, with its sample's advantage.
    targets = unpack([b.targets for b in batches], batches)
    advantages = unpack([b.advantages for b in batches], batches)
    for sample, got, adv in zip(samples, targets, advantages):
        assert got.tolist() == list(sample.response_ids)
        expected = np.broadcast_to(np.asarray(sample.advantage, dtype=np.float32), (len(sample.response_ids),))
        assert np.array_equal(adv.numpy(), expected)
    assert sorted(i for b in batches for i in b.sample_ids) == [i for i, (_, r, _) in enumerate(specs) if r > 0]

    # Weights sum as the table says: per counted sample s, len_s · w_s.
    weights = unpack([b.weights for b in batches], batches)
    counted = [r > 0 and not (mask_truncated and t) for _, r, t in specs]
    num_counted, num_tokens = sum(counted), sum(r for (_, r, _), c in zip(specs, counted) if c)
    per_sample = {
        "token-mean": lambda r: r / num_tokens,
        "seq-mean-token-mean": lambda r: 1 / num_counted,
        "seq-mean-token-sum": lambda r: r / num_counted,
        "seq-mean-token-sum-norm": lambda r: r / (num_counted * 64),
    }[loss_agg]
    for (_, r, _), c, w in zip(specs, counted, weights):
        assert w.sum().item() == pytest.approx(per_sample(r) if c else 0.0, rel=1e-5, abs=1e-7)
    if loss_agg in ("token-mean", "seq-mean-token-mean") and num_counted:
        assert sum(w.double().sum().item() for w in weights) == pytest.approx(1.0, rel=1e-5)

    # Deterministic: the same input gives the same batches.
    again = pack(samples, max_tokens, loss_agg, loss_norm_length=64, mask_truncated=mask_truncated)
    assert [b.sample_ids for b in again] == [b.sample_ids for b in batches]
    for x, y in zip(again, batches):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.weights, y.weights)


@pytest.mark.parametrize("ids", [np.array([2**63, 1], dtype=np.uint64), [1, 2**63 + 5],
                                 np.array([2**64 - 1], dtype=np.uint64)])
def test_token_ids_beyond_int64_are_refused_not_wrapped_negative(ids):
    for field in ("prompt_ids", "response_ids"):
        sample = Sample(prompt_ids=[1], response_ids=[2], advantage=1.0)
        setattr(sample, field, ids)
        with pytest.raises(ValueError, match=f"samples\\[0\\].{field} holds token ids >= 2\\*\\*63"):
            pack([sample], max_tokens=64)


def test_large_uint64_ids_below_the_limit_are_kept_exactly():
    (batch,) = pack([Sample(prompt_ids=np.array([2**62], dtype=np.uint64), response_ids=[2], advantage=1.0)], 8)
    assert batch.input_ids.tolist() == [2**62, 2]


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("mask_truncated", [False, True])
def test_loss_normaliser_is_what_the_weights_divide_by(loss_agg, mask_truncated):
    samples = [Sample(prompt_ids=[1], response_ids=[2] * n, advantage=1.0, truncated=t)
               for n, t in ((3, False), (0, False), (5, True), (2, False))]
    normaliser = loss_normaliser(samples, loss_agg, mask_truncated)
    assert normaliser == {("token-mean", False): 10, ("token-mean", True): 5}.get(
        (loss_agg, mask_truncated), 2 if mask_truncated else 3)
    weights = torch.cat([b.weights for b in pack(samples, 64, loss_agg, loss_norm_length=4.0,
                                                  mask_truncated=mask_truncated)])
    if loss_agg in ("token-mean", "seq-mean-token-sum"):
        nonzero = weights[weights > 0]
        assert torch.allclose(nonzero, torch.full_like(nonzero, 1 / normaliser))
