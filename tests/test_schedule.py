"""siri.schedule against the formulas of docs/design.md (paper §4.3), written out independently."""

import json
import math

import numpy as np
import pytest

from siri.schedule import SCHEDULE_KINDS, make_schedule

PERIODIC = ("cosine", "stair", "stair-cosine")


def formula(kind, t, l_max, l_min, T):
    """The unrounded budget, straight from docs/design.md, with φ in radians."""
    phi = 2 * math.pi * (t % T) / T
    mid, amp = (l_max + l_min) / 2, (l_max - l_min) / 2
    if kind == "cosine":
        return mid + amp * math.cos(2 * math.pi * t / T)
    if kind == "stair":
        # cos φ ≥ 0; the tolerance absorbs cos(3π/2) = −1.8e−16, which is exactly 0.
        return l_max if math.cos(phi) >= -1e-12 else l_min
    eps = 1e-12  # segment bounds at φ = kπ/4, where floats land a hair either side
    if phi < math.pi / 4 - eps or phi >= 7 * math.pi / 4 - eps:
        return l_max
    if phi < 3 * math.pi / 4 - eps:
        return mid + amp * math.cos(2 * (phi - math.pi / 4))
    if phi < 5 * math.pi / 4 - eps:
        return l_min
    return mid + amp * math.cos(2 * (phi - 3 * math.pi / 4))


def nearest(x):
    return math.floor(x + 0.5)


# The paper's setting, a small period that exercises every boundary step, and an odd
# l_max + l_min so that mid is a half-integer.
SETTINGS = [(16384, 8192, 640), (1000, 200, 8), (4097, 1024, 24)]


@pytest.mark.parametrize("kind", PERIODIC)
@pytest.mark.parametrize("l_max,l_min,T", SETTINGS)
def test_matches_formula_at_every_step_of_three_cycles(kind, l_max, l_min, T):
    schedule = make_schedule(kind, l_max=l_max, l_min=l_min, period=T)
    for t in range(3 * T + 1):
        # Rounded to the nearest integer: within 1/2 of the formula. (Where the formula is
        # a half-integer, floating-point noise in cos may put either neighbour nearest;
        # which one the schedule picks is pinned by the symmetry and half-up tests.)
        assert abs(schedule(t) - formula(kind, t, l_max, l_min, T)) <= 0.5 + 1e-9, t
        assert isinstance(schedule(t), int)


@pytest.mark.parametrize("kind", PERIODIC)
def test_landmarks_in_the_papers_setting(kind):
    schedule = make_schedule(kind, l_max=16384, l_min=8192, period=640)
    T = 640
    landmarks = {0: 16384, T // 2: 8192, T: 16384, 5 * T // 2: 8192, 3 * T: 16384}
    for t, expected in landmarks.items():
        assert schedule(t) == expected, t
    quarter = {"cosine": 12288, "stair": 16384, "stair-cosine": 12288}[kind]
    assert schedule(T // 4) == schedule(3 * T // 4) == quarter
    assert schedule.max_budget() == 16384
    assert all(8192 <= schedule(t) <= 16384 for t in range(T))


def test_cosine_values_in_the_papers_setting():
    schedule = make_schedule("cosine", l_max=16384, l_min=8192, period=640)
    # 12288 + 4096 cos(2π t / 640) at t = 80 (π/4) and t = 213 (a step with no special angle).
    assert schedule(80) == nearest(12288 + 4096 * math.sqrt(0.5)) == 15184
    assert schedule(213) == nearest(12288 + 4096 * math.cos(2 * math.pi * 213 / 640))


@pytest.mark.parametrize("kind", PERIODIC)
@pytest.mark.parametrize("l_max,l_min,T", SETTINGS)
def test_symmetric_about_half_period(kind, l_max, l_min, T):
    schedule = make_schedule(kind, l_max=l_max, l_min=l_min, period=T)
    for r in range(T // 2 + 1):
        assert schedule(r) == schedule(T - r), r
        assert schedule(T // 2 - r) == schedule(T // 2 + r), r
    assert schedule(T // 2) == l_min


@pytest.mark.parametrize("kind", PERIODIC)
def test_periodic_far_into_training(kind):
    # φ is computed from t mod T: a step a million cycles in gives the same budget.
    schedule = make_schedule(kind, l_max=16384, l_min=8192, period=640)
    for t in (0, 1, 159, 160, 320, 479, 639):
        assert schedule(t + 640 * 10**6) == schedule(t)


@pytest.mark.parametrize("kind", PERIODIC)
def test_round_to(kind):
    m = 1000
    plain = make_schedule(kind, l_max=16384, l_min=8192, period=640)
    rounded = make_schedule(kind, l_max=16384, l_min=8192, period=640, round_to=m)
    for t in range(0, 641, 7):
        assert rounded(t) == plain(t) // m * m
        assert rounded(t) % m == 0 and plain(t) - m < rounded(t) <= plain(t)
    assert rounded.max_budget() == 16000


def test_round_to_rounds_to_nearest_first():
    # cos(π/2) in floats is 6e-17: 12288 − 4096·6e-17 must not floor to the multiple below.
    schedule = make_schedule("cosine", l_max=16384, l_min=8192, period=640, round_to=1024)
    assert schedule(160) == 12288


def test_round_to_never_below_round_to():
    schedule = make_schedule("cosine", l_max=300, l_min=10, period=4, round_to=256)
    assert [schedule(t) for t in range(4)] == [256, 256, 256, 256]
    assert make_schedule("constant", length=5, round_to=8)(0) == 8


def test_half_integer_mid_rounds_half_up():
    # mid = 4096.5 at T/4 and 3T/4 of the cosine (cos φ = 0). Half-up gives 4097 on both
    # sides; Python's round() would give 4096 (half to even).
    schedule = make_schedule("cosine", l_max=8000, l_min=193, period=4)
    assert schedule(1) == schedule(3) == 4097
    stair_cosine = make_schedule("stair-cosine", l_max=8000, l_min=193, period=8)
    assert stair_cosine(2) == stair_cosine(6) == 4097


@pytest.mark.parametrize("kind", PERIODIC)
def test_phase(kind):
    T = 640
    schedule = make_schedule(kind, l_max=16384, l_min=8192, period=T)
    for t in range(3 * T):
        assert schedule.phase(t) == ("compress" if t % T < T // 2 else "expand")
    assert schedule.phase(319) == "compress" and schedule.phase(320) == "expand"
    assert schedule.phase(639) == "expand" and schedule.phase(640) == "compress"


@pytest.mark.parametrize("kind", PERIODIC)
def test_checkpoint_tags_in_the_papers_setting(kind):
    schedule = make_schedule(kind, l_max=16384, l_min=8192, period=640)
    tags = {step: schedule.checkpoint_tag(step) for step in range(3 * 640)}
    tagged = {step: tag for step, tag in tags.items() if tag is not None}
    # After step s, s + 1 steps are done: 320, 960, 1600 done end a compression half.
    assert tagged == {319: "low", 639: "high", 959: "low", 1279: "high", 1599: "low", 1919: "high"}
    # SIRI-low is the third "low" checkpoint, at the end of the third compression.
    lows = [step for step, tag in tagged.items() if tag == "low"]
    assert lows[2] == 1599 and schedule.phase(1599) == "compress" and schedule(1600) == 8192


def test_checkpoint_tags_small_period():
    schedule = make_schedule("stair", l_max=4, l_min=2, period=2)
    assert [schedule.checkpoint_tag(s) for s in range(4)] == ["low", "high", "low", "high"]


def test_constant():
    schedule = make_schedule("constant", length=8192)
    assert [schedule(t) for t in (0, 1, 10**9)] == [8192] * 3
    assert schedule.phase(5) == "expand" and schedule.checkpoint_tag(5) is None
    assert schedule.max_budget() == 8192
    assert make_schedule("constant", l_max=8192).state_dict() == schedule.state_dict()
    assert make_schedule("constant", length=8192, l_max=8192)(3) == 8192


def test_staged_deepscaler():
    schedule = make_schedule("staged", stages=[(0, 8192), (500, 16384), (1000, 24576)])
    expected = {0: 8192, 499: 8192, 500: 16384, 999: 16384, 1000: 24576, 10**7: 24576}
    assert {t: schedule(t) for t in expected} == expected
    assert schedule.max_budget() == 24576
    assert all(schedule.phase(t) == "expand" and schedule.checkpoint_tag(t) is None for t in range(0, 1200, 50))


def test_staged_max_budget_need_not_be_last():
    schedule = make_schedule("staged", stages=[[0, 4000], [10, 9000], [20, 2000]], round_to=1024)
    assert schedule.max_budget() == 8192
    assert [schedule(0), schedule(10), schedule(20)] == [3072, 8192, 1024]


def test_numpy_integers_are_accepted():
    schedule = make_schedule("cosine", l_max=np.int64(16384), l_min=np.int32(8192), period=np.int64(640))
    assert schedule(np.int64(320)) == 8192


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="cosine", l_max=16384, l_min=8192, period=640),
        dict(kind="stair-cosine", l_max=16384, l_min=8192, period=640, round_to=64),
        dict(kind="constant", length=8192),
        dict(kind="staged", stages=[(0, 8192), (500, 16384)]),
    ],
)
def test_state_dict_round_trip(kwargs):
    schedule = make_schedule(**kwargs)
    state = schedule.state_dict()
    # A checkpoint may have gone through JSON or YAML, turning tuples into lists.
    reloaded = json.loads(json.dumps(state))
    make_schedule(**kwargs).load_state_dict(reloaded)
    assert make_schedule(**state).state_dict() == state
    assert schedule.describe().startswith(kwargs["kind"])


def test_load_state_dict_mismatch_names_the_difference():
    schedule = make_schedule("cosine", l_max=16384, l_min=8192, period=640)
    other = make_schedule("cosine", l_max=16384, l_min=8192, period=320).state_dict()
    with pytest.raises(ValueError, match="period"):
        schedule.load_state_dict(other)
    with pytest.raises(ValueError, match="kind"):
        schedule.load_state_dict(make_schedule("stair", l_max=16384, l_min=8192, period=640).state_dict())
    with pytest.raises(ValueError, match="stages"):
        staged = make_schedule("staged", stages=[(0, 1), (5, 2)])
        staged.load_state_dict({"kind": "staged", "stages": [[0, 1], [6, 2]], "round_to": 1})
    with pytest.raises(ValueError, match="round_to"):
        schedule.load_state_dict({k: v for k, v in schedule.state_dict().items() if k != "round_to"})
    with pytest.raises(ValueError, match="state_dict"):
        schedule.load_state_dict([("kind", "cosine")])


def test_describe_paper_setting():
    text = make_schedule("cosine", l_max=16384, l_min=8192, period=640).describe()
    assert "16384" in text and "8192" in text and "640" in text


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(kind="sine", l_max=2, l_min=1, period=2), "kind"),
        (dict(kind="cosine", l_min=1, period=2), "l_max"),
        (dict(kind="cosine", l_max=2, period=2), "l_min"),
        (dict(kind="cosine", l_max=2, l_min=1), "period"),
        (dict(kind="cosine", l_max=1, l_min=2, period=2), "l_min"),
        (dict(kind="cosine", l_max=2, l_min=0, period=2), "l_min"),
        (dict(kind="cosine", l_max=2.5, l_min=1, period=2), "l_max"),
        (dict(kind="stair", l_max=2, l_min=1, period=3), "period"),
        (dict(kind="stair", l_max=2, l_min=1, period=0), "period"),
        (dict(kind="stair", l_max=2, l_min=1, period=-4), "period"),
        (dict(kind="stair", l_max=2, l_min=1, period=True), "period"),
        (dict(kind="stair", l_max=2, l_min=1, period=4, round_to=0), "round_to"),
        (dict(kind="cosine", l_max=2, l_min=1, period=4, stages=[(0, 1)]), "stages"),
        (dict(kind="constant"), "length"),
        (dict(kind="constant", length=0), "length"),
        (dict(kind="constant", length=4, l_max=5), "l_max"),
        (dict(kind="constant", length=4, period=8), "period"),
        (dict(kind="staged"), "stages"),
        (dict(kind="staged", stages=[]), "stages"),
        (dict(kind="staged", stages=[(1, 8192)]), "stages"),
        (dict(kind="staged", stages=[(0, 8192), (0, 16384)]), "stages"),
        (dict(kind="staged", stages=[(0, 8192), (10, 16384), (5, 1)]), "stages"),
        (dict(kind="staged", stages=[(0, 8192, 3)]), r"stages\[0\]"),
        (dict(kind="staged", stages=[(0, -1)]), r"stages\[0\] length"),
        (dict(kind="staged", stages=[(0, 1)], length=3), "length"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_schedule(**kwargs)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_bad_step_raises(kind):
    extra = {"constant": dict(length=4), "staged": dict(stages=[(0, 4)])}
    schedule = make_schedule(kind, **extra.get(kind, dict(l_max=4, l_min=2, period=4)))
    for method in (schedule, schedule.phase, schedule.checkpoint_tag):
        with pytest.raises(ValueError, match="step"):
            method(-1)
        with pytest.raises(ValueError, match="step"):
            method(1.5)
