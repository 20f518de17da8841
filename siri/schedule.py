"""The interleaved length budget: how many response tokens a rollout may use at each step.

SIRI (arXiv 2509.25176, §4.3) alternates the maximum rollout length between a long budget
``l_max`` (expansion) and a short one ``l_min`` (compression) with a cycle of ``period``
steps. With t the training step, T the period, r = t mod T, φ = 2π r / T,
mid = (l_max + l_min) / 2 and amp = (l_max − l_min) / 2:

- ``cosine``:       L = mid + amp · cos φ — l_max at r = 0, l_min at r = T/2.
- ``stair``:        l_max where cos φ ≥ 0 (r ≤ T/4 or r ≥ 3T/4), l_min elsewhere.
- ``stair-cosine``: l_max for φ < π/4 or φ ≥ 7π/4; mid + amp · cos(2(φ − π/4)) on
  [π/4, 3π/4); l_min on [3π/4, 5π/4); mid + amp · cos(2(φ − 3π/4)) on [5π/4, 7π/4).
- ``constant``:     one length for every step.
- ``staged``:       piecewise constant, ``stages=[(step, length), ...]`` (DeepScaleR's
  8K → 16K → 24K).

The three periodic shapes are symmetric about T/2, where the budget is l_min. The first
half of each cycle (r < T/2) is the compression phase, the second the expansion phase.

Example, the paper's main setting::

    schedule = make_schedule("cosine", l_max=16384, l_min=8192, period=640)
    schedule(0), schedule(160), schedule(320)   # 16384, 12288, 8192
    schedule.checkpoint_tag(319)                # "low": 320 steps done, compression ends
    schedule.checkpoint_tag(639)                # "high": a full cycle done
"""

from __future__ import annotations

import abc
import bisect
import math
from typing import Any, Literal, Sequence

from siri.checks import as_int

__all__ = ["LengthSchedule", "PeriodicSchedule", "StagedSchedule", "make_schedule", "SCHEDULE_KINDS"]

PERIODIC_KINDS = ("cosine", "stair", "stair-cosine")
SCHEDULE_KINDS = PERIODIC_KINDS + ("constant", "staged")

Phase = Literal["compress", "expand"]
CheckpointTag = Literal["low", "high"]


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even, so an odd l_max + l_min would give a
    # budget at mid that depends on mid's parity; half-up is the same everywhere.
    return math.floor(x + 0.5)


class LengthSchedule(abc.ABC):
    """Base of all schedules: ``schedule(step)`` is the response-length budget in tokens.

    Subclasses give the unrounded formula (`_raw_length`), `phase`, `checkpoint_tag`,
    `max_budget`, `state_dict` and `describe`. The schedule holds no mutable state: the step
    comes from the trainer, so resuming a run needs only the same configuration, which
    `load_state_dict` checks.
    """

    kind: str

    def __init__(self, round_to: int) -> None:
        self.round_to = as_int("round_to", round_to, minimum=1)

    @abc.abstractmethod
    def _raw_length(self, step: int) -> float:
        """The budget formula at `step`, before rounding."""

    def _round(self, length: float) -> int:
        # Nearest integer first, then down to a multiple of round_to: flooring the float
        # directly would turn a formula value of 12287.999999 (exactly 12288) into 11264
        # with round_to=1024.
        nearest = _round_half_up(length)
        return max(self.round_to, nearest // self.round_to * self.round_to)

    def __call__(self, step: int) -> int:
        """The budget in tokens at training step `step` (counted from 0)."""
        step = as_int("step", step, minimum=0)
        return self._round(self._raw_length(step))

    @abc.abstractmethod
    def phase(self, step: int) -> Phase:
        """``"compress"`` or ``"expand"``: the phase training step `step` belongs to."""

    @abc.abstractmethod
    def checkpoint_tag(self, step: int) -> CheckpointTag | None:
        """Tag of the checkpoint to save after step `step` (0-based) has just finished.

        After step s finishes, d = s + 1 steps are done. ``"low"`` when d ≡ T/2 (mod T):
        a compression half has just ended, the model was last trained at budgets heading
        to l_min (SIRI-low is the third such checkpoint). ``"high"`` when d ≡ 0 (mod T): a
        full cycle, ending in an expansion half, has just ended (SIRI-high). ``None``
        otherwise, and always for schedules that do not oscillate.
        """

    @abc.abstractmethod
    def max_budget(self) -> int:
        """The largest value this schedule ever returns, e.g. to size vLLM's ``max_model_len``."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The configuration, in plain Python types (safe for JSON, YAML and ``torch.save``)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that a checkpoint's schedule is this one; ValueError naming what differs.

        A schedule has no state of its own, so there is nothing to restore: a resumed run
        must be configured with the same schedule, and this is where that is enforced.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        mine = self.state_dict()
        theirs = {key: _plain(value) for key, value in state_dict.items()}
        differing = sorted(
            key for key in mine.keys() | theirs.keys() if mine.get(key, "<missing>") != theirs.get(key, "<missing>")
        )
        if differing:
            details = ", ".join(
                f"{key}: checkpoint {theirs.get(key, '<missing>')!r} vs configured {mine.get(key, '<missing>')!r}"
                for key in differing
            )
            raise ValueError(f"state_dict does not match this schedule ({details})")

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs, e.g. ``cosine schedule: 16384 -> 8192 -> 16384 tokens every 640 steps``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.state_dict().items() if key != "kind")
        return f"{type(self).__name__}(kind={self.kind!r}, {args})"


def _plain(value: Any) -> Any:
    # A state dict read back from YAML or JSON has lists where we wrote tuples.
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class PeriodicSchedule(LengthSchedule):
    """``cosine``, ``stair`` or ``stair-cosine`` between `l_max` and `l_min` every `period` steps."""

    def __init__(self, kind: str, *, l_max: int, l_min: int, period: int, round_to: int = 1) -> None:
        if kind not in PERIODIC_KINDS:
            raise ValueError(f"kind must be one of {PERIODIC_KINDS}, got {kind!r}")
        super().__init__(round_to)
        self.kind = kind
        self.l_max = as_int("l_max", l_max, minimum=1)
        self.l_min = as_int("l_min", l_min, minimum=1)
        if self.l_min > self.l_max:
            raise ValueError(f"l_min must be <= l_max, got l_min={self.l_min} > l_max={self.l_max}")
        self.period = as_int("period", period, minimum=2)
        # An odd period has no step at T/2: no step where the budget is l_min, and no end
        # of a compression half to checkpoint.
        if self.period % 2:
            raise ValueError(f"period must be a positive even integer, got {self.period}")

    def _raw_length(self, step: int) -> float:
        T = self.period
        # Fold r onto the first half, r ≤ T/2: every shape is symmetric about T/2, and
        # folding keeps it so in floating point too. Unfolded, cos(3π/2) = −1.8e−16 and
        # cos(π/2) = +6.1e−17 would round a half-integer mid to different budgets at T/4
        # and 3T/4. Working from r, not t, also keeps φ exact far into training.
        r = step % T
        r = min(r, T - r)
        phi = 2.0 * math.pi * r / T
        mid = (self.l_max + self.l_min) / 2.0
        amp = (self.l_max - self.l_min) / 2.0
        if self.kind == "cosine":
            return mid + amp * math.cos(phi)
        # Segment bounds compared in integers (φ = kπ/4 ⇔ 8r = kT), not in radians,
        # where the step exactly on a bound could land on either side.
        if self.kind == "stair":
            # cos φ ≥ 0 ⇔ φ ≤ π/2 on the folded half.
            return float(self.l_max if 4 * r <= T else self.l_min)
        # stair-cosine: on the folded half, [0, π/4) is l_max, [π/4, 3π/4) the cosine
        # ramp and [3π/4, π] l_min; the second half's ramp cos(2(φ − 3π/4)) at 2π − φ is
        # the first's cos(2(φ − π/4)) at φ, so folding reproduces it.
        if 8 * r < T:
            return float(self.l_max)
        if 8 * r < 3 * T:
            return mid + amp * math.cos(2.0 * (phi - math.pi / 4.0))
        return float(self.l_min)

    def phase(self, step: int) -> Phase:
        step = as_int("step", step, minimum=0)
        return "compress" if 2 * (step % self.period) < self.period else "expand"

    def checkpoint_tag(self, step: int) -> CheckpointTag | None:
        done = as_int("step", step, minimum=0) + 1
        position = done % self.period
        if position == 0:
            return "high"
        if 2 * position == self.period:
            return "low"
        return None

    def max_budget(self) -> int:
        # Every shape reaches l_max at r = 0 and never exceeds it; rounding is monotone.
        return self._round(self.l_max)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "l_max": self.l_max,
            "l_min": self.l_min,
            "period": self.period,
            "round_to": self.round_to,
        }

    def describe(self) -> str:
        half = self.period // 2
        rounding = f", rounded down to multiples of {self.round_to}" if self.round_to > 1 else ""
        return (
            f"{self.kind} schedule: {self.l_max} -> {self.l_min} -> {self.l_max} tokens every "
            f"{self.period} steps (compress {half}, expand {half}){rounding}"
        )


class StagedSchedule(LengthSchedule):
    """Piecewise-constant budget: ``stages[i][1]`` tokens from step ``stages[i][0]`` on.

    ``constant`` is the one-stage case. Neither oscillates: every step is in the
    ``"expand"`` phase and no step gets a ``"low"``/``"high"`` checkpoint tag.
    """

    def __init__(self, stages: Sequence[tuple[int, int]], *, round_to: int = 1, kind: str = "staged") -> None:
        if kind not in ("constant", "staged"):
            raise ValueError(f"kind must be 'constant' or 'staged', got {kind!r}")
        super().__init__(round_to)
        self.kind = kind
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) == 0:
            raise ValueError(f"stages must be a non-empty list of (step, length) pairs, got {stages!r}")
        steps: list[int] = []
        lengths: list[int] = []
        for i, stage in enumerate(stages):
            if not isinstance(stage, Sequence) or isinstance(stage, (str, bytes)) or len(stage) != 2:
                raise ValueError(f"stages[{i}] must be a (step, length) pair, got {stage!r}")
            steps.append(as_int(f"stages[{i}] step", stage[0], minimum=0))
            lengths.append(as_int(f"stages[{i}] length", stage[1], minimum=1))
        if steps[0] != 0:
            raise ValueError(f"stages must start at step 0, got first step {steps[0]}")
        for i in range(1, len(steps)):
            if steps[i] <= steps[i - 1]:
                raise ValueError(
                    f"stages must be sorted by strictly increasing step, got {steps[i - 1]} then {steps[i]}"
                )
        self.stage_steps = steps
        self.stage_lengths = lengths

    def _raw_length(self, step: int) -> float:
        return float(self.stage_lengths[bisect.bisect_right(self.stage_steps, step) - 1])

    def phase(self, step: int) -> Phase:
        as_int("step", step, minimum=0)
        return "expand"

    def checkpoint_tag(self, step: int) -> CheckpointTag | None:
        as_int("step", step, minimum=0)
        return None

    def max_budget(self) -> int:
        return max(self._round(length) for length in self.stage_lengths)

    def state_dict(self) -> dict[str, Any]:
        if self.kind == "constant":
            return {"kind": "constant", "length": self.stage_lengths[0], "round_to": self.round_to}
        return {
            "kind": "staged",
            "stages": [[step, length] for step, length in zip(self.stage_steps, self.stage_lengths)],
            "round_to": self.round_to,
        }

    def describe(self) -> str:
        rounding = f", rounded down to multiples of {self.round_to}" if self.round_to > 1 else ""
        if self.kind == "constant":
            return f"constant schedule: {self.stage_lengths[0]} tokens{rounding}"
        stages = ", ".join(f"{length} from step {step}" for step, length in zip(self.stage_steps, self.stage_lengths))
        return f"staged schedule: {stages}{rounding}"


def make_schedule(
    kind: str,
    *,
    l_max: int | None = None,
    l_min: int | None = None,
    period: int | None = None,
    stages: Sequence[tuple[int, int]] | None = None,
    round_to: int = 1,
    length: int | None = None,
) -> LengthSchedule:
    """Build the length-budget schedule `kind`.

    Args:
        kind: ``"cosine"``, ``"stair"``, ``"stair-cosine"`` (these need `l_max`, `l_min`
            and `period`), ``"constant"`` (needs `length`, or `l_max` as its synonym) or
            ``"staged"`` (needs `stages`). Arguments a kind does not use must be left None.
        l_max, l_min: the long and short budgets in tokens, ``1 <= l_min <= l_max``.
        period: cycle length T in steps, a positive even integer.
        stages: ``[(step, length), ...]`` sorted by strictly increasing step, the first at
            step 0; the budget is the length of the last stage that has started.
        round_to: budgets are the formula rounded to the nearest integer, then rounded down
            to a multiple of `round_to` and never below `round_to` (e.g. 64 to keep
            budgets aligned to the KV-cache block size).
        length: the budget of a ``"constant"`` schedule.

    Returns:
        A `LengthSchedule`: ``schedule(step) -> int``, ``.phase(step)``,
        ``.checkpoint_tag(step)``, ``.max_budget()``, ``.state_dict()``,
        ``.load_state_dict(sd)`` and ``.describe()``.

    Raises:
        ValueError: naming the argument, for an unknown kind, a missing or superfluous
            argument, or an invalid value.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
    given = {"l_max": l_max, "l_min": l_min, "period": period, "stages": stages, "length": length}

    def reject_unused(*used: str) -> None:
        # A value the schedule would silently ignore is a configuration mistake
        # (e.g. l_min on a constant schedule); say so instead of training on it.
        for name, value in given.items():
            if name not in used and value is not None:
                raise ValueError(f"{name} is not used by kind {kind!r}; leave it None")

    if kind in PERIODIC_KINDS:
        reject_unused("l_max", "l_min", "period")
        for name in ("l_max", "l_min", "period"):
            if given[name] is None:
                raise ValueError(f"{name} is required for kind {kind!r}")
        return PeriodicSchedule(kind, l_max=l_max, l_min=l_min, period=period, round_to=round_to)
    if kind == "constant":
        reject_unused("length", "l_max")
        if length is None and l_max is None:
            raise ValueError("length is required for kind 'constant' (l_max is accepted as its synonym)")
        if length is not None and l_max is not None and length != l_max:
            raise ValueError(f"length and l_max disagree for kind 'constant': {length} vs {l_max}")
        value = length if length is not None else l_max
        return StagedSchedule([(0, as_int("length", value, minimum=1))], round_to=round_to, kind="constant")
    reject_unused("stages")
    if stages is None:
        raise ValueError("stages is required for kind 'staged'")
    return StagedSchedule(stages, round_to=round_to, kind="staged")
