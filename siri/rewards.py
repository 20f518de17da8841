"""Rewards for math answers: extraction, equivalence checking, and the reward functions.

Every reward function has one signature (`RewardFn`)::

    reward(response_text, gold, *, truncated: bool, response_len: int, budget: int) -> float

where `response_text` is the decoded response as the rollout engine returned it (already
cut at the length budget), `truncated` says the engine stopped it at the budget,
`response_len` is its length in tokens and `budget` the length budget of the step that
generated it. `load_reward_fn` turns a config string into such a function.

Equivalence is judged by math-verify (``pip install math-verify``), so ``1/2``,
``0.5`` and ``\\frac{1}{2}`` all match a gold ``\\frac12``. math-verify's own timeout uses
``signal.alarm``, which only works on the main thread; we disable it and run the checks
in worker processes instead (see `is_correct`), so rewards can be computed from any
thread, e.g. overlapped with generation. The workers need a POSIX system (Linux, macOS).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Protocol, Sequence

from siri.checks import as_int

__all__ = [
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
    "shutdown_verifiers",
    "with_overlong_penalty",
]

logger = logging.getLogger(__name__)

# Seconds one equivalence check may take. A correct answer takes milliseconds; the ones
# that take longer are pathological (a power tower sympy tries to evaluate) and are wrong
# in practice.
DEFAULT_TIMEOUT_S = 5.0

# Generous: a spawned worker imports sympy and math-verify (about a second) before it
# serves; this only guards against a worker that can never start.
_STARTUP_TIMEOUT_S = 120.0

# How long after its deadline a stuck worker ends itself if the trainer has not killed it.
_BACKSTOP_GRACE_S = 2.0


class RewardFn(Protocol):
    """The signature every reward function has."""

    def __call__(self, response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int) -> float:
        """The reward of one response."""


# ---------------------------------------------------------------------------------------
# Answer extraction

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
# Up to 18 digits: fits an int64, and stays clear of the 4300-digit cap of int(str).
_INTEGER = re.compile(r"[+-]?\d{1,18}")


def extract_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in `text`, or None.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``) and escaped braces do not
    count (``\\boxed{\\{1, 2\\}}`` gives ``\\{1, 2\\}``). None when there is no box, when the
    box is empty, or when the last box is never closed: a response cut at the budget in
    the middle of its final answer has no answer, even if it boxed an earlier one.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
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
    answer = extract_answer(gold) if "\\boxed" in gold else gold.strip()
    if not answer:
        raise ValueError(f"gold has no answer: {gold!r}")
    return answer


# ---------------------------------------------------------------------------------------
# Equivalence checking in worker processes
#
# Why processes: with math-verify's signal-based timeout disabled, a check has to be
# interrupted some other way, and a thread cannot be. Worse, the checks that hang are
# usually sympy evaluating a power tower (9^{9^{9^9}}) as a Python int, a single C call
# that holds the GIL: in a thread it would freeze the whole trainer, not just one core. A
# process can be killed. Workers are started once and kept, so a check costs one socket
# round trip (~0.1 ms) next to math-verify's milliseconds; only a timed-out worker is
# killed and replaced.
#
# Why not multiprocessing: its "spawn" start method re-imports the parent's __main__ in
# the child, which fails for scripts fed on stdin and re-runs unguarded training scripts,
# and "fork" is unsafe in a trainer that holds CUDA contexts and thread pools. A plain
# `python -c` child that gets the parent's sys.path imports only this module.

_WORKER_BOOTSTRAP = (
    "import sys; sys.path[:] = sys.argv[2:]; "
    "from siri.rewards import _verifier_main; _verifier_main(int(sys.argv[1]))"
)


def _verifier_main(fd: int) -> None:
    """Worker loop on the socket `fd`: receive (gold, answer, timeout_s), send whether they are equal."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # Silence math-verify's warning that its timeout is off: we enforce it from outside.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Our own backstop, for when the trainer dies while we are stuck and nobody is left to
    # kill us: SIGALRM's default action ends the process in the kernel, which works even
    # inside a C call that holds the GIL, where a Python handler or watchdog thread would
    # never run. Set a little after the trainer's deadline so its kill normally comes first.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    extraction_config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    conn = Connection(fd)
    conn.send("ready")
    while True:
        try:
            gold, answer, timeout_s = conn.recv()
        except EOFError:  # the trainer closed the socket or exited
            return
        signal.setitimer(signal.ITIMER_REAL, timeout_s + _BACKSTOP_GRACE_S)
        try:
            # Gold first: math-verify's comparison is not symmetric, and its docs and
            # graders parse the reference before the prediction.
            gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=extraction_config, parsing_timeout=None)
            answer_parsed = parse(f"\\boxed{{{answer}}}", extraction_config=extraction_config, parsing_timeout=None)
            equal = bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))
        except Exception:  # math-verify catches its own errors; anything left is "not equal"
            equal = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send(equal)


class _Verifier:
    """One worker process running `_verifier_main`, and our end of its socket."""

    def __init__(self) -> None:
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("is_correct needs math-verify: pip install math-verify")
        parent_socket, child_socket = socket.socketpair()
        with child_socket:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOTSTRAP, str(child_socket.fileno()), *sys.path],
                pass_fds=(child_socket.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self._conn = Connection(parent_socket.detach())
        try:
            ready = self._conn.poll(_STARTUP_TIMEOUT_S) and self._conn.recv() == "ready"
        except EOFError:  # it died while importing
            ready = False
        if not ready:
            self.close()
            raise RuntimeError(
                f"the math-verify worker did not start within {_STARTUP_TIMEOUT_S:.0f} s "
                f"(exit code {self._process.returncode})"
            )

    @property
    def alive(self) -> bool:
        return not self._conn.closed

    def check(self, gold: str, answer: str, timeout_s: float) -> bool | None:
        """The verdict; False if it took over `timeout_s`; None if the worker had died."""
        try:
            self._conn.send((gold, answer, timeout_s))
            if self._conn.poll(timeout_s):
                return self._conn.recv()
        except (EOFError, OSError):  # it died, e.g. killed for memory, maybe while idle
            self.close()
            return None
        logger.warning("math-verify took over %.3g s on answer %.200r; counted as incorrect", timeout_s, answer)
        self.close()
        return False

    def close(self) -> None:
        if not self._conn.closed:
            self._conn.close()
        self._process.kill()  # a no-op once it has exited
        self._process.wait()


class _VerifierPool:
    """Idle workers shared by all threads; a caller takes one or starts a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Verifier] = []
        self._all: set[_Verifier] = set()

    def check(self, gold: str, answer: str, timeout_s: float) -> bool:
        # A worker that died, perhaps while idle and for reasons unrelated to this answer,
        # gets one replacement; a second death is blamed on the answer.
        for _ in range(2):
            verifier = self._acquire()
            equal = verifier.check(gold, answer, timeout_s)
            self._release(verifier)
            if equal is not None:
                return equal
        logger.warning("math-verify workers died twice on answer %.200r; counted as incorrect", answer)
        return False

    def _acquire(self) -> _Verifier:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        verifier = _Verifier()
        with self._lock:
            self._all.add(verifier)
        return verifier

    def _release(self, verifier: _Verifier) -> None:
        with self._lock:
            if verifier.alive:
                self._idle.append(verifier)
            else:
                self._all.discard(verifier)

    def shutdown(self, *, busy_too: bool = False) -> None:
        with self._lock:
            stopping = list(self._all) if busy_too else self._idle
            self._all.difference_update(stopping)
            self._idle = []
        for verifier in stopping:
            verifier.close()

    def forget_after_fork(self) -> None:
        # A forked child (e.g. a DataLoader worker) inherits the parent's sockets; talking
        # to the parent's workers would interleave messages, so the child starts its own.
        self._lock = threading.Lock()
        self._idle = []
        self._all = set()


_VERIFIERS = _VerifierPool()
atexit.register(_VERIFIERS.shutdown, busy_too=True)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_VERIFIERS.forget_after_fork)


def shutdown_verifiers() -> None:
    """Stop the idle math-verify worker processes, e.g. to free host memory.

    They restart on demand; workers in use by another thread finish their check first.
    """
    _VERIFIERS.shutdown()


def is_correct(response_text: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the final answer of `response_text` is mathematically equal to `gold`.

    The final answer is the last ``\\boxed{...}`` (`extract_answer`); a response without one
    is not correct. `gold` is the bare answer or a text with it boxed. Integers are
    compared directly; anything else goes to math-verify (gold parsed first), in a worker
    process killed after `timeout_s` seconds, in which case the answer counts as
    incorrect. Safe to call from any thread, and from several at once.
    """
    gold_answer = _gold_answer(gold)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    answer = extract_answer(response_text)
    if answer is None:
        return False
    # Most answers of competition math are integers; comparing them here keeps them off
    # the worker pipe. math-verify would reach the same verdict.
    if _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold_answer):
        return int(answer) == int(gold_answer)
    return _VERIFIERS.check(gold_answer, answer, float(timeout_s))


# ---------------------------------------------------------------------------------------
# Reward functions


def _check_lengths(response_len: int, budget: int) -> tuple[int, int]:
    return as_int("response_len", response_len, minimum=0), as_int("budget", budget, minimum=1)


def length_capped_reward(response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int) -> float:
    """SIRI's reward: 1.0 if an answer is extracted from the response and is correct, else 0.0.

    The response is the one cut at `budget`, so a response that ran out of budget before
    boxing its answer scores 0, which is what pushes the policy to be concise during
    compression. `truncated` itself does not zero the reward: an answer boxed before the
    cut counts. A response longer than `budget` tokens (generated under an earlier,
    larger budget, as with asynchronous rollouts across a budget drop) scores 0.
    """
    response_len, budget = _check_lengths(response_len, budget)
    if response_len > budget:
        return 0.0
    return 1.0 if is_correct(response_text, gold) else 0.0


def correctness_reward(response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int) -> float:
    """1.0 if the response's boxed answer is correct, else 0.0, whatever its length or truncation."""
    _check_lengths(response_len, budget)
    return 1.0 if is_correct(response_text, gold) else 0.0


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


REWARD_FNS: dict[str, RewardFn] = {
    "length_capped": length_capped_reward,
    "correctness": correctness_reward,
}


def load_reward_fn(spec: str | RewardFn, *, overlong_buffer: int | None = None) -> RewardFn:
    """Resolve a reward function from a config value.

    Args:
        spec: a built-in name (``"length_capped"``, ``"correctness"``), a dotted path to a
            callable (``"my_pkg.rewards:score"`` or ``"my_pkg.rewards.score"``; after the
            colon, attributes may be dotted too: ``"my_pkg.rewards:Scorer.score"``), or a
            callable, returned as is.
        overlong_buffer: if given, add `overlong_penalty` with this buffer (DAPO).

    Raises:
        ValueError: naming `spec`, when it is malformed, cannot be imported, does not
            exist, or is not callable.
    """
    if callable(spec):
        reward_fn = spec
    elif not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec must be a reward function name, a dotted path or a callable, got {spec!r}")
    elif spec in REWARD_FNS:
        reward_fn = REWARD_FNS[spec]
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
