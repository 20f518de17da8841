"""siri.advantages against hand computations and, by property tests, against the definitions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from siri.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, dynamic_sampling_mask

# Two groups, interleaved on purpose (a batch is not sorted by prompt), plus a lone sample.
REWARDS = [1.0, 0.0, 1.0, 1.0, 0.5, 0.3]
GROUPS = ["a", "a", "b", "b", "c", "a"]


def test_grpo_by_hand():
    # Group a = [1, 0, 0.3]: mean 13/30, unbiased variance 0.79/3 (n − 1 = 2), as torch.std.
    mean = 1.3 / 3
    std = math.sqrt(((1 - mean) ** 2 + mean**2 + (0.3 - mean) ** 2) / 2)
    expected = [(1 - mean) / (std + 1e-6), (0 - mean) / (std + 1e-6), 0.0, 0.0, 0.0, (0.3 - mean) / (std + 1e-6)]
    got = compute_advantages(REWARDS, GROUPS, "grpo")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_grpo_matches_verl_formula_on_equal_groups():
    # verl: (score − mean) / (std + eps) with torch.mean / torch.std per group.
    torch.manual_seed(0)
    rewards = torch.rand(4, 8, dtype=torch.float64)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    group_ids = torch.arange(4).repeat_interleave(8)
    got = compute_advantages(rewards.flatten(), group_ids)
    torch.testing.assert_close(got, expected.flatten().float())


def test_drgrpo_by_hand():
    mean = 1.3 / 3
    expected = [1 - mean, -mean, 0.0, 0.0, 0.0, 0.3 - mean]
    torch.testing.assert_close(compute_advantages(REWARDS, GROUPS, "drgrpo"), torch.tensor(expected))


def test_rloo_by_hand():
    # r_i minus the mean of the other two of group a.
    expected = [1 - (0 + 0.3) / 2, 0 - (1 + 0.3) / 2, 0.0, 0.0, 0.0, 0.3 - (1 + 0) / 2]
    torch.testing.assert_close(compute_advantages(REWARDS, GROUPS, "rloo"), torch.tensor(expected))


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_group_of_one_gets_zero(estimator):
    got = compute_advantages([0.7, 1.0, 0.0], [5, 6, 6], estimator)
    assert got[0] == 0.0 and got[1] > 0 > got[2]


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_equal_rewards_give_zero(estimator):
    got = compute_advantages([1.0] * 4 + [0.1] * 3, [0] * 4 + [1] * 3, estimator)
    torch.testing.assert_close(got, torch.zeros(7), atol=1e-9, rtol=0)


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_input_forms_agree(estimator):
    expected = compute_advantages(REWARDS, GROUPS, estimator)
    as_ints = [ord(g) for g in GROUPS]
    forms = [
        (torch.tensor(REWARDS), torch.tensor(as_ints)),
        (torch.tensor(REWARDS, dtype=torch.float64), torch.tensor(as_ints, dtype=torch.int32)),
        (np.array(REWARDS), np.array(as_ints)),
        (REWARDS, as_ints),
        ([1, 0, 1, 1, 0.5, 0.3], GROUPS),
    ]
    for rewards, group_ids in forms:
        torch.testing.assert_close(compute_advantages(rewards, group_ids, estimator), expected)


def test_empty_batch():
    assert compute_advantages([], []).shape == (0,)
    assert dynamic_sampling_mask(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_dynamic_sampling_mask():
    mask = dynamic_sampling_mask([1, 1, 0, 1, 0.5, 0, 0], [0, 0, 1, 1, 2, 3, 3])
    # group 0 all correct, group 2 alone, group 3 all wrong: dropped; group 1 is mixed.
    assert mask.tolist() == [False, False, True, True, False, False, False]
    assert mask.dtype == torch.bool


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(rewards=[1.0, 0.0], group_ids=[0]), "group_ids"),
        (dict(rewards=[1.0, float("nan")], group_ids=[0, 0]), "rewards"),
        (dict(rewards=[1.0, float("inf")], group_ids=[0, 0]), "rewards"),
        (dict(rewards=torch.ones(2, 2), group_ids=[0, 0]), "rewards"),
        (dict(rewards=["a", "b"], group_ids=[0, 0]), "rewards"),
        (dict(rewards=[1.0, 0.0], group_ids=torch.tensor([0.0, 1.0])), "group_ids"),
        (dict(rewards=[1.0, 0.0], group_ids=[[0], [1]]), "group_ids"),
        (dict(rewards=[1.0, 0.0], group_ids=[0, 0], estimator="ppo"), "estimator"),
        (dict(rewards=[1.0, 0.0], group_ids=[0, 0], eps=-1.0), "eps"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        compute_advantages(**kwargs)


def test_deterministic_and_order_independent():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.rand(257, generator=generator, dtype=torch.float64) * 1e3
    group_ids = torch.randint(0, 19, (257,), generator=generator)
    first = compute_advantages(rewards, group_ids)
    assert torch.equal(first, compute_advantages(rewards, group_ids))
    # Permuting the batch permutes the advantages.
    perm = torch.randperm(257, generator=generator)
    torch.testing.assert_close(compute_advantages(rewards[perm], group_ids[perm]), first[perm])


# --- property tests -------------------------------------------------------------------------

batches = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=n, max_size=n),
        st.lists(st.integers(0, 5), min_size=n, max_size=n),
    )
)


def _groups(rewards, group_ids):
    members = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    return members


@settings(max_examples=150, deadline=None)
@given(batches)
def test_property_zero_mean_per_group(batch):
    rewards, group_ids = batch
    for estimator in ("grpo", "drgrpo", "rloo"):
        advantages = compute_advantages(rewards, group_ids, estimator).double()
        for members in _groups(rewards, group_ids).values():
            group = advantages[members]
            # Mean-centered (and, for grpo, divided by one positive number per group).
            scale = 1.0 + max(abs(rewards[i]) for i in members)
            assert abs(float(group.mean())) <= 1e-5 * scale


@settings(max_examples=150, deadline=None)
@given(batches)
def test_property_rloo_is_leave_one_out(batch):
    rewards, group_ids = batch
    advantages = compute_advantages(rewards, group_ids, "rloo")
    for members in _groups(rewards, group_ids).values():
        for i in members:
            others = [rewards[j] for j in members if j != i]
            expected = rewards[i] - sum(others) / len(others) if others else 0.0
            assert float(advantages[i]) == pytest.approx(expected, rel=1e-5, abs=1e-4)


@settings(max_examples=150, deadline=None)
@given(batches)
def test_property_grpo_is_drgrpo_over_std(batch):
    rewards, group_ids = batch
    grpo = compute_advantages(rewards, group_ids, "grpo", eps=1e-6)
    drgrpo = compute_advantages(rewards, group_ids, "drgrpo")
    for members in _groups(rewards, group_ids).values():
        if len(members) == 1:
            continue
        std = float(torch.tensor([rewards[i] for i in members], dtype=torch.float64).std())
        for i in members:
            assert float(grpo[i]) == pytest.approx(float(drgrpo[i]) / (std + 1e-6), rel=1e-4, abs=1e-4)


@settings(max_examples=150, deadline=None)
@given(batches)
def test_property_dynamic_sampling_keeps_exactly_mixed_groups(batch):
    rewards, group_ids = batch
    mask = dynamic_sampling_mask(rewards, group_ids)
    for members in _groups(rewards, group_ids).values():
        mixed = len({rewards[i] for i in members}) > 1
        assert all(bool(mask[i]) == mixed for i in members)
