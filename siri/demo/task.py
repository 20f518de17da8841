"""The demo's synthetic reasoning task: add up a list of digits modulo 10, step by step, with re-checks.

A problem is a list of k digits, each with a letter label (k, the number of terms, is its
difficulty level); the answer is the last digit of their sum. Its prompt is raw text::

    Q: a3 b8 c7 d2=?

A solution trace writes one line per term, the term's label and digit and the running sum
modulo 10 after it, ends its thinking with the `THINK_END` token, then boxes the answer::

    a3=3
    b8=1
    c7=7
    =c7=8
    d2=0
    </think>\\boxed{0}

Each line depends only on the line above (the next label and the sum so far) and on one
prompt token, the digit after the label it has just written: one look-up by the token the
model wrote last, which the demo's tiny model learns in a few hundred SFT steps (the
README's design log has the formats it did not learn in that time).

Why the trade-off between length and accuracy is real here:

* the steps are the necessary reasoning: the tiny model cannot add k digits in one forward
  pass, so a response cut before its chain is done can only guess (one chance in ten), and
  a short budget hurts most at the largest k;
* the ``=`` lines are the redundancy of a reasoning model's thinking: each re-does the step
  above it. Most of them confirm a right step (pure overhead), but the traces also hold
  slips (a step with a wrong sum, at rate `TaskConfig.slip_rate`), and a slip is always
  followed by its ``=`` line with the right sum, from which the chain goes on. A check is
  only sometimes useful: it is how the base model repairs its slips;
* the problem space (10^k digit lists per level, 10^4 to 10^7) is large enough that a fixed
  hash of the prompt holds one problem in `TEST_FRACTION` out of SFT and RL for evaluation.

The answer is read after `THINK_END` only (DeepScaleR's rule, `siri.rewards`); answers are
digits, so a verdict never needs math-verify's worker. Everything is seeded.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from siri.data import Problem  # the trainer's record, re-exported for the demo's users
from siri.rewards import is_correct

__all__ = ["LABELS", "MODULUS", "SPLITS", "TEST_FRACTION", "THINK_END", "DemoDataset", "Problem", "TaskConfig", "Trace",
           "answer_of", "check_answer", "level_of", "make_problems", "make_traces", "sample_trace", "split_of"]

# One problem in TEST_FRACTION belongs to the held-out "test" split (see `split_of`).
TEST_FRACTION = 8
# The terms' labels, in order: a step names the term it adds, so the model finds it in the
# prompt by its label (one look-up of the token it just wrote).
LABELS = "abcdefghi"
# Sums are taken modulo 10 (their last digit): every number in a trace is one digit.
MODULUS = 10
SPLITS = ("train", "test")
# The end of the thinking; the demo's tokenizer holds it as one token.
THINK_END = "</think>"


@dataclass(frozen=True)
class TaskConfig:
    """How problems and traces are drawn (sized for the tiny CPU model of `siri.demo.model`)."""

    min_terms: int = 4  # the difficulty levels are min_terms..max_terms
    max_terms: int = 7
    slip_rate: float = 0.05  # chance that a step of an SFT trace has a wrong sum (then corrected)
    check_rate: float = 0.7  # mean number of confirming `=` lines after a right step (geometric)
    max_checks: int = 4  # cap per trace, confirming and correcting, so every SFT trace fits the long budget

    def __post_init__(self) -> None:
        if not 2 <= self.min_terms <= self.max_terms <= len(LABELS):
            raise ValueError(f"need 2 <= min_terms <= max_terms <= {len(LABELS)} (one label per term), got "
                             f"{self.min_terms}, {self.max_terms}")
        if not 0 <= self.slip_rate < 1 or self.check_rate < 0 or self.max_checks < 0:
            raise ValueError(f"need 0 <= slip_rate < 1, check_rate >= 0, max_checks >= 0, got "
                             f"{self.slip_rate}, {self.check_rate}, {self.max_checks}")

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(range(self.min_terms, self.max_terms + 1))


@dataclass(frozen=True)
class Trace:
    """One worked solution: SFT trains on `prompt_text` + `response_text` + EOS."""

    prompt_text: str
    response_text: str
    answer: str
    terms: int
    checks: int  # `=` lines in `response_text`, confirming and correcting
    slips: int  # steps with a wrong sum (each corrected by the `=` line after it)


class DemoDataset:
    """A list of `Problem`s with the data set interface the trainer uses: `len(ds)`, `ds[i]`."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> Problem:
        return self.problems[i]


def answer_of(terms: list[int]) -> int:
    """The gold answer: the last digit of the sum."""
    return sum(terms) % MODULUS


def _prompt(terms: list[int]) -> str:
    return "Q: " + " ".join(f"{LABELS[i]}{term}" for i, term in enumerate(terms)) + "=?\n"


def split_of(prompt: str) -> str:
    """"test" for one prompt in `TEST_FRACTION`, "train" for the others (crc32: not salted per process)."""
    return "test" if zlib.crc32(prompt.encode()) % TEST_FRACTION == 0 else "train"


def level_of(problem: Problem) -> int:
    """The difficulty level of a problem: its number of terms, read back from its prompt."""
    return problem.prompt_text.count(" ")


def _sample_terms(rng: random.Random, cfg: TaskConfig, split: str, count: int | None = None) -> list[int]:
    while True:
        count = count if count is not None else rng.randint(cfg.min_terms, cfg.max_terms)
        terms = [rng.randrange(MODULUS) for _ in range(count)]
        if split_of(_prompt(terms)) == split:
            return terms


def _geometric(rng: random.Random, mean: float) -> int:
    """A draw of a geometric variable on {0, 1, ...} with the given mean."""
    stop = 1.0 / (1.0 + mean)  # P(K = k) = (1 - stop)^k · stop has mean (1 - stop) / stop
    k = 0
    while rng.random() >= stop:
        k += 1
    return k


def sample_trace(rng: random.Random, cfg: TaskConfig = TaskConfig()) -> Trace:
    """Draw one problem of the train split and a worked solution with slips and checks."""
    terms = _sample_terms(rng, cfg, "train")
    lines, checks, slips = [], 0, 0
    total = 0
    for label, term in zip(LABELS, terms):
        step, right = f"{label}{term}=", (total + term) % MODULUS
        if checks < cfg.max_checks and rng.random() < cfg.slip_rate:
            wrong = (right + rng.choice((-2, -1, 1, 2))) % MODULUS
            lines += [f"{step}{wrong}\n", f"={step}{right}\n"]  # the slip, then the check that repairs it
            slips += 1
            checks += 1
        else:
            repeats = min(_geometric(rng, cfg.check_rate), cfg.max_checks - checks)
            lines += [f"{step}{right}\n"] + [f"={step}{right}\n"] * repeats
            checks += repeats
        total = right
    response = "".join(lines) + f"{THINK_END}\\boxed{{{total}}}"
    return Trace(prompt_text=_prompt(terms), response_text=response, answer=str(total), terms=len(terms),
                 checks=checks, slips=slips)


def make_traces(n: int, seed: int, cfg: TaskConfig = TaskConfig()) -> list[Trace]:
    """`n` SFT traces of the train split; the same `seed` gives the same list."""
    rng = random.Random(seed)
    return [sample_trace(rng, cfg) for _ in range(n)]


def make_problems(n: int, seed: int, tokenizer, cfg: TaskConfig = TaskConfig(), *, split: str = "train",
                  per_level: bool = False, source: str = "sum") -> DemoDataset:
    """`n` problems (prompt and gold answer) of `split`; the same arguments give the same set.

    RL prompts come from "train", the split SFT traces are drawn from; evaluation uses
    "test", which no SFT trace and no RL prompt ever contains. With `per_level`, `n`
    problems of each level, in level order (the evaluation set); otherwise the level is
    drawn uniformly. Problems may repeat within a set.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    counts = [k for k in cfg.levels for _ in range(n)] if per_level else [None] * n
    problems = []
    for index, count in enumerate(counts):
        terms = _sample_terms(rng, cfg, split, count)
        prompt = _prompt(terms)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        problems.append(Problem(index=index, prompt_ids=prompt_ids, prompt_text=prompt, answer=str(answer_of(terms)),
                                source=source))
    return DemoDataset(problems)


def check_answer(response_text: str, answer: str) -> bool:
    """Whether the `\\boxed{}` after `THINK_END` holds `answer`: the trainer's verdict
    (`siri.rewards.is_correct`), so the demo scores exactly as RL rewards."""
    return is_correct(response_text, answer, think_end=THINK_END)
