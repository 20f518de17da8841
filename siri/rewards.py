"""Rewards for math answers: the answer of a response, and the reward functions.

Every reward function has one signature (`RewardFn`)::

    reward(response_text, gold, *, truncated: bool, response_len: int, budget: int) -> float

where `response_text` is the decoded response as the rollout engine returned it (already
cut at the length budget), `truncated` says the engine stopped it at the budget,
`response_len` is its length in tokens and `budget` the length budget of the step that
generated it. `load_reward_fn` turns a config string into such a function; `score_rollouts`
decodes a batch of rollouts and scores it, for the trainer and `siri eval` alike.

The answer is DeepScaleR's, which SIRI's length-capping reward uses: the last ``\\boxed{}``
after the end of the thinking (`DEFAULT_THINK_END`, ``</think>``). A response with no such
marker, because it was cut at the budget while still thinking, has no answer, however many
guesses it boxed inside its thinking: that is the pressure compression relies on. The
marker is an argument everywhere (``think_end``); None reads the whole response, the
behaviour for models that do not think in tags. Equivalence is `siri.verifier`'s.
"""

from __future__ import annotations

import importlib
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

from siri.checks import as_int
from siri.verifier import DEFAULT_TIMEOUT_S, check_timeout, shutdown_verifiers, verify_equal

__all__ = [
    "DEFAULT_THINK_END",
    "DEFAULT_TIMEOUT_S",
    "REWARD_FNS",
    "RewardFn",
    "correctness_reward",
    "extract_answer",
    "is_correct",
    "length_capped_reward",
    "load_reward_fn",
    "overlong_penalty",
    "score_batch",
    "score_rollouts",
    "shutdown_verifiers",
    "with_overlong_penalty",
]

# The end-of-thinking marker of DeepSeek-R1 and its distilled models (DeepScaleR's rule).
DEFAULT_THINK_END = "</think>"


class RewardFn(Protocol):
    """The signature every reward function has."""

    def __call__(self, response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int) -> float:
        """The reward of one response."""


# ---------------------------------------------------------------------------------------
# Answer extraction

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")


def _check_marker(think_end) -> str | None:
    if think_end is not None and (not isinstance(think_end, str) or not think_end):
        raise ValueError(f"think_end must be a non-empty str or None, got {think_end!r}")
    return think_end


def extract_answer(text: str, think_end: str | None = DEFAULT_THINK_END) -> str | None:
    """The content of the last ``\\boxed{...}`` in `text` after the end of its thinking, or None.

    With `think_end` (a marker such as ``</think>``), only the text after its first
    occurrence is read, and a text without it has no answer: DeepScaleR's rule, under which
    a response cut while thinking scores nothing even if it boxed a guess on the way. With
    `think_end=None` the whole text is read.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``) and escaped braces do not
    count (``\\boxed{\\{1, 2\\}}`` gives ``\\{1, 2\\}``). None when there is no box, when the
    box is empty, or when the last box is never closed: a response cut at the budget in
    the middle of its final answer has no answer, even if it boxed an earlier one.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if _check_marker(think_end) is not None:
        _, found, text = text.partition(think_end)
        if not found:
            return None
    last = None
    for last in _BOXED_OPEN.finditer(text):
        pass
    if last is None:
        return None
    depth = 1
    i = start = last.end()
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, \{ and \} included, is content
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                answer = text[start:i].strip()
                return answer or None
        i += 1
    return None


def _gold_answer(gold: str) -> str:
    if not isinstance(gold, str):
        raise ValueError(f"gold must be a str, got {type(gold).__name__}")
    # Datasets store either the bare answer ("\\frac{1}{2}") or a worked solution with
    # the answer boxed (MATH); both reduce to the bare answer.
    answer = extract_answer(gold, think_end=None) if "\\boxed" in gold else gold.strip()
    if not answer:
        raise ValueError(f"gold has no answer: {gold!r}")
    return answer


def is_correct(response_text: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S, *,
               think_end: str | None = DEFAULT_THINK_END) -> bool:
    """Whether the final answer of `response_text` is mathematically equal to `gold`.

    The final answer is the last ``\\boxed{...}`` after `think_end` (`extract_answer`); a
    response without one is not correct. `gold` is the bare answer or a text with it boxed.
    The verdict is `siri.verifier.verify_equal`'s: math-verify in a worker process killed
    after `timeout_s` seconds, in which case the answer counts as incorrect. Safe to call
    from any thread, and from several at once.
    """
    gold_answer = _gold_answer(gold)
    check_timeout(timeout_s)
    answer = extract_answer(response_text, think_end)
    if answer is None:
        return False
    return verify_equal(gold_answer, answer, timeout_s)


# ---------------------------------------------------------------------------------------
# Reward functions


def _check_lengths(response_len: int, budget: int) -> tuple[int, int]:
    return as_int("response_len", response_len, minimum=0), as_int("budget", budget, minimum=1)


def length_capped_reward(response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int,
                         think_end: str | None = DEFAULT_THINK_END, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """SIRI's reward: 1.0 if an answer is extracted from the response and is correct, else 0.0.

    The response is the one cut at `budget`, and its answer is read after the end of its
    thinking (`think_end`; `extract_answer`), so a response that ran out of budget while
    still thinking, or before boxing its answer, scores 0: the pressure that pushes the
    policy to be concise during compression. `truncated` itself does not zero the reward:
    an answer given before the cut counts. A response longer than `budget` tokens
    (generated under an earlier, larger budget, as with asynchronous rollouts across a
    budget drop) scores 0. `timeout_s` bounds one math-verify check (`is_correct`).
    """
    response_len, budget = _check_lengths(response_len, budget)
    if response_len > budget:
        return 0.0
    return 1.0 if is_correct(response_text, gold, timeout_s, think_end=think_end) else 0.0


def correctness_reward(response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int,
                       think_end: str | None = DEFAULT_THINK_END, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the response's answer (after `think_end`) is correct, else 0.0, whatever its length or truncation."""
    _check_lengths(response_len, budget)
    return 1.0 if is_correct(response_text, gold, timeout_s, think_end=think_end) else 0.0


def overlong_penalty(response_len: int, budget: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to ``budget - buffer`` tokens, then linear to -1.

    ``(budget - buffer - response_len) / buffer`` on (budget - buffer, budget], and -1 past
    `budget`. `buffer` is DAPO's L_cache (4096 of 20480 in the paper), ``1 <= buffer <= budget``.
    """
    response_len, budget = _check_lengths(response_len, budget)
    buffer = as_int("buffer", buffer, minimum=1)
    if buffer > budget:
        raise ValueError(f"buffer must be <= budget, got buffer={buffer} > budget={budget}")
    start = budget - buffer
    if response_len <= start:
        return 0.0
    if response_len <= budget:
        return (start - response_len) / buffer
    return -1.0


def with_overlong_penalty(reward_fn: RewardFn, buffer: int) -> RewardFn:
    """`reward_fn` plus ``overlong_penalty(response_len, budget, buffer)``, with the same signature.

    `buffer` must not exceed the smallest budget the run will see (``l_min`` of a SIRI
    schedule): the penalty raises ValueError at a step whose budget is below it.
    """
    if not callable(reward_fn):
        raise ValueError(f"reward_fn must be callable, got {reward_fn!r}")
    buffer = as_int("buffer", buffer, minimum=1)

    def penalized(response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int) -> float:
        reward = reward_fn(response_text, gold, truncated=truncated, response_len=response_len, budget=budget)
        return reward + overlong_penalty(response_len, budget, buffer)

    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    penalized.__name__ = penalized.__qualname__ = f"{name}_with_overlong_penalty"
    penalized.__doc__ = f"{name} plus the overlong penalty with a buffer of {buffer} tokens."
    return penalized


# The built-in rewards: they take `think_end` and `timeout_s`, which `load_reward_fn` binds.
REWARD_FNS: dict[str, RewardFn] = {
    "length_capped": length_capped_reward,
    "correctness": correctness_reward,
}


def _bind_answer_rule(reward_fn, think_end: str | None, timeout_s: float) -> RewardFn:
    def bound(response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int) -> float:
        return reward_fn(response_text, gold, truncated=truncated, response_len=response_len, budget=budget,
                         think_end=think_end, timeout_s=timeout_s)

    bound.__name__ = bound.__qualname__ = reward_fn.__name__
    bound.__doc__ = reward_fn.__doc__
    bound.think_end, bound.timeout_s = think_end, timeout_s
    return bound


def load_reward_fn(spec: str | RewardFn, *, overlong_buffer: int | None = None,
                   think_end: str | None = DEFAULT_THINK_END, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardFn:
    """Resolve a reward function from a config value.

    Args:
        spec: a built-in name (``"length_capped"``, ``"correctness"``), a dotted path to a
            callable (``"my_pkg.rewards:score"`` or ``"my_pkg.rewards.score"``; after the
            colon, attributes may be dotted too: ``"my_pkg.rewards:Scorer.score"``), or a
            callable, returned as is.
        overlong_buffer: if given, add `overlong_penalty` with this buffer (DAPO).
        think_end, timeout_s: the end-of-thinking marker after which a built-in reward reads
            the answer (None: the whole response) and the seconds one math-verify check may
            take (`reward.think_end`, `reward.timeout_s`). A function of your own reads
            answers its own way and is given neither.

    Raises:
        ValueError: naming `spec`, when it is malformed, cannot be imported, does not
            exist, or is not callable.
    """
    if callable(spec):
        reward_fn = spec
    elif not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec must be a reward function name, a dotted path or a callable, got {spec!r}")
    elif spec in REWARD_FNS:
        reward_fn = _bind_answer_rule(REWARD_FNS[spec], _check_marker(think_end), check_timeout(timeout_s))
    else:
        if ":" in spec:
            module_name, _, attr_path = spec.partition(":")
        elif "." in spec:
            module_name, _, attr_path = spec.rpartition(".")
        else:
            raise ValueError(
                f"spec {spec!r} is neither a built-in reward ({', '.join(REWARD_FNS)}) "
                "nor a dotted path like 'pkg.module:func'"
            )
        if not module_name or not attr_path:
            raise ValueError(f"spec {spec!r} must look like 'pkg.module:func' or 'pkg.module.func'")
        try:
            target = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"spec {spec!r}: cannot import module {module_name!r}: {error}") from error
        for attr in attr_path.split("."):
            try:
                target = getattr(target, attr)
            except AttributeError:
                raise ValueError(f"spec {spec!r}: {module_name!r} has no attribute {attr_path!r}") from None
        if not callable(target):
            raise ValueError(f"spec {spec!r} resolves to a {type(target).__name__}, which is not callable")
        reward_fn = target
    if overlong_buffer is not None:
        reward_fn = with_overlong_penalty(reward_fn, overlong_buffer)
    return reward_fn


def score_batch(
    reward_fn: RewardFn,
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    truncated: Sequence[bool],
    response_lens: Sequence[int],
    budget: int | Sequence[int],
    num_workers: int = 1,
) -> list[float]:
    """Rewards of many responses, in order.

    Args:
        reward_fn: a `RewardFn`.
        responses, golds, truncated, response_lens: one entry per response.
        budget: the length budget, one for all or one per response (rollouts of a batch
            may come from steps with different budgets).
        num_workers: how many responses are scored at once. Each concurrent check runs
            in its own math-verify worker process (started on first use, then kept), so
            up to `num_workers` cores are used; 1 scores sequentially.
    """
    n = len(responses)
    for name, values in (("golds", golds), ("truncated", truncated), ("response_lens", response_lens)):
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries, responses has {n}")
    if hasattr(budget, "__len__") and getattr(budget, "ndim", 1) > 0:  # not a 0-dim tensor
        budgets = [as_int("budget", value, minimum=1) for value in budget]
        if len(budgets) != n:
            raise ValueError(f"budget has {len(budgets)} entries, responses has {n}")
    else:
        budgets = [as_int("budget", budget, minimum=1)] * n
    num_workers = as_int("num_workers", num_workers, minimum=1)

    def score(i: int) -> float:
        return float(
            reward_fn(
                responses[i],
                golds[i],
                truncated=bool(truncated[i]),
                response_len=as_int("response_lens", response_lens[i], minimum=0),
                budget=budgets[i],
            )
        )

    if num_workers == 1 or n <= 1:
        return [score(i) for i in range(n)]
    # Threads suffice: the heavy work happens in the math-verify worker processes, and a
    # thread blocked on a worker's pipe releases the GIL.
    with ThreadPoolExecutor(max_workers=min(num_workers, n), thread_name_prefix="siri-reward") as executor:
        return list(executor.map(score, range(n)))


def score_rollouts(reward_fn: RewardFn, rollouts: Sequence, golds: Sequence[str], tokenizer, *,
                   budget: int | Sequence[int], num_workers: int = 1) -> list[float]:
    """Rewards of rollouts (`siri.rollout.Rollout`s), in order: the trainer's and `siri eval`'s one way to score.

    Each response is decoded with `tokenizer` (special tokens dropped: a tokenizer whose
    end-of-thinking marker is a *special* token would lose it; the R1 tokenizers' is not),
    and scored by `score_batch` against ``golds[rollout.prompt_index]``.
    """
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    return score_batch(reward_fn, texts, [golds[r.prompt_index] for r in rollouts],
                       truncated=[r.truncated for r in rollouts], response_lens=[len(r.response_ids) for r in rollouts],
                       budget=budget, num_workers=num_workers)
