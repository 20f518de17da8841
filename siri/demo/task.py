"""The demo's synthetic reasoning task: add up a list of numbers, with redundant re-checking.

A problem is a sum to compute; its prompt is raw text::

    Q: 3+8+7+2=?

A solution trace writes the running sums one step per line, then the boxed answer::

    3+8=11
    check 3+8=11
    11+7=18
    18+2=20
    \\boxed{20}

The `check` lines are the redundancy: each restates the step right above it, like a
reasoning model re-verifying work it already did. They never change the result, so a trace
with none is as correct as one with ten, and short and long correct solutions coexist —
what interleaved compression needs in order to cut length without cutting accuracy. The
number of checks in a trace is geometric (long-tailed lengths): most traces re-check a
little, a few re-check a lot. A check restates the latest step rather than an arbitrary
earlier one so that the next step always continues from the last result written; the task
stays easy for a tiny model while the redundancy is still pure overhead.

The demo's default (`TaskConfig()`) is the easiest case, two distinct one-digit terms::

    Q: 7+5=?
    7+5=12
    check 7+5=12
    \\boxed{12}

which the tiny model learns to about 98% in a few minutes of SFT; sums of three or four
terms remain available (`TaskConfig(min_terms=3, max_terms=4)`) but it reached only ~53% on
them. The two-term space has 72 problems, too few to hold some out, so by default
evaluation covers the whole task distribution (`TaskConfig.hold_out`).

The answer is always the last `\\boxed{N}`, which is what `siri.rewards` extracts.
Everything here is seeded and deterministic: the same seed gives the same corpus.
"""

from __future__ import annotations

import itertools
import random
import zlib
from dataclasses import dataclass

from siri.data import Problem  # the trainer's record, re-exported for the demo's users
from siri.rewards import is_correct

__all__ = ["SPLITS", "TEST_FRACTION", "DemoDataset", "Problem", "TaskConfig", "Trace", "all_problems", "check_answer",
           "make_problems", "make_traces", "sample_trace"]

# One problem in TEST_FRACTION belongs to the held-out "test" split (see `_split_of`).
TEST_FRACTION = 8
SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskConfig:
    """How problems and traces are drawn.

    The defaults are sized for the tiny CPU model of `siri.demo.model`: operands small
    enough that its additions are reliable, and traces of a few dozen to a few hundred
    characters.
    """

    # Two terms: with three or four, the ~1M-parameter model reached only ~53% after minutes of
    # SFT (it lost track of which term comes next); a two-term sum it learns to about 98%.
    min_terms: int = 2
    max_terms: int = 2
    max_value: int = 9  # operands are distinct numbers drawn from 1..max_value
    mean_checks: float = 5.0  # mean of the geometric number of check lines per trace
    max_checks: int = 16  # cap, so that every SFT trace fits the long budget
    # Whether one problem in TEST_FRACTION is kept out of SFT and RL for evaluation. The
    # two-term space holds only 72 sums, too few to split (about 9 held out, and a model of
    # this size does not generalise addition facts it never saw), so the demo evaluates on
    # the whole task distribution instead, and says so.
    hold_out: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        if self.max_value < self.max_terms:
            raise ValueError(f"max_value must be >= max_terms (terms are distinct), got {self.max_value}")
        if self.mean_checks < 0 or self.max_checks < 0:
            raise ValueError(f"mean_checks and max_checks must be >= 0, got {self.mean_checks}, {self.max_checks}")


@dataclass(frozen=True)
class Trace:
    """One worked solution: SFT trains on `prompt_text` + `response_text` + EOS."""

    prompt_text: str
    response_text: str
    answer: str
    checks: int  # redundant lines in `response_text`


class DemoDataset:
    """A list of `Problem`s with the data set interface the trainer uses: `len(ds)`, `ds[i]`."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> Problem:
        return self.problems[i]


def _prompt(terms: list[int]) -> str:
    return "Q: " + "+".join(map(str, terms)) + "=?\n"


def _split_of(prompt: str) -> str:
    """"test" for one problem in `TEST_FRACTION`, "train" for the others.

    The problem space is small (72 sums with the default config), so seeds alone
    would not keep evaluation problems out of the SFT corpus; a fixed hash of the prompt
    does. crc32, not `hash`, which Python salts per process.
    """
    return "test" if zlib.crc32(prompt.encode()) % TEST_FRACTION == 0 else "train"


def _sample_terms(rng: random.Random, cfg: TaskConfig, split: str) -> list[int]:
    while True:
        # Distinct terms: the model finds the next term by looking up the one it added last
        # in the prompt, which a repeated term would make ambiguous.
        terms = rng.sample(range(1, cfg.max_value + 1), rng.randint(cfg.min_terms, cfg.max_terms))
        if not cfg.hold_out or _split_of(_prompt(terms)) == split:
            return terms


def _geometric(rng: random.Random, mean: float, cap: int) -> int:
    """A draw of a geometric variable on {0, 1, ...} with the given mean, capped."""
    if mean == 0:
        return 0
    stop = 1.0 / (1.0 + mean)  # P(K = k) = (1 - stop)^k · stop has mean (1 - stop) / stop
    k = 0
    while k < cap and rng.random() >= stop:
        k += 1
    return k


def sample_trace(rng: random.Random, cfg: TaskConfig = TaskConfig()) -> Trace:
    """Draw one problem of the train split and a worked solution with a random number of check lines."""
    terms = _sample_terms(rng, cfg, "train")
    steps = []
    total = terms[0]
    for term in terms[1:]:
        steps.append(f"{total}+{term}={total + term}\n")
        total += term
    checks = _geometric(rng, cfg.mean_checks, cfg.max_checks)
    # Each check goes after a step chosen uniformly, so a trace's checks cluster or spread
    # at random and the model cannot tell from the position alone whether more will come.
    per_step = [0] * len(steps)
    for _ in range(checks):
        per_step[rng.randrange(len(steps))] += 1
    lines = []
    for step, repeats in zip(steps, per_step):
        lines.append(step)
        lines.extend(["check " + step] * repeats)
    response = "".join(lines) + f"\\boxed{{{total}}}"
    return Trace(prompt_text=_prompt(terms), response_text=response, answer=str(total), checks=checks)


def make_traces(n: int, seed: int, cfg: TaskConfig = TaskConfig()) -> list[Trace]:
    """`n` SFT traces; the same `seed` gives the same list."""
    rng = random.Random(seed)
    return [sample_trace(rng, cfg) for _ in range(n)]


def make_problems(n: int, seed: int, tokenizer, cfg: TaskConfig = TaskConfig(), *, split: str = "train",
                  source: str = "sum") -> DemoDataset:
    """`n` problems (prompt and gold answer) of `split`; the same arguments give the same set.

    RL prompts come from "train", the split SFT traces are drawn from (RL practises on the
    problems the model was taught); evaluation uses "test", which no SFT trace and no RL
    prompt ever contains. Without `cfg.hold_out` (the default) both splits are the whole
    task distribution. Problems may repeat within a set.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    problems = []
    for index in range(n):
        terms = _sample_terms(rng, cfg, split)
        prompt = _prompt(terms)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        problems.append(Problem(index=index, prompt_ids=prompt_ids, prompt_text=prompt, answer=str(sum(terms)),
                                source=source))
    return DemoDataset(problems)


def all_problems(tokenizer, cfg: TaskConfig = TaskConfig(), *, split: str = "test",
                 source: str = "sum") -> DemoDataset:
    """Every problem of `split`, each once, in a fixed order: the evaluation set.

    Enumerating instead of sampling gives every sum the same weight and the same set on
    every run. Without `cfg.hold_out` the split is the whole task distribution.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    problems = []
    for count in range(cfg.min_terms, cfg.max_terms + 1):
        for terms in itertools.permutations(range(1, cfg.max_value + 1), count):
            prompt = _prompt(list(terms))
            if cfg.hold_out and _split_of(prompt) != split:
                continue
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            problems.append(Problem(index=len(problems), prompt_ids=prompt_ids, prompt_text=prompt,
                                    answer=str(sum(terms)), source=source))
    return DemoDataset(problems)


def check_answer(response_text: str, answer: str) -> bool:
    """Whether the last `\\boxed{}` of `response_text` holds `answer`: the trainer's
    verdict (`siri.rewards.is_correct`), so the demo scores exactly as RL rewards."""
    return is_correct(response_text, answer)
