"""Mathematical equivalence of two answers, judged by math-verify in worker processes.

`verify_equal(gold, answer, timeout_s)` is the one entry point: integers are compared in
process; anything else goes to math-verify (``pip install math-verify``), so ``1/2``,
``0.5`` and ``\\frac{1}{2}`` all match a gold ``\\frac12``. math-verify's own timeout uses
``signal.alarm``, which only works on the main thread; we disable it and run the checks in
worker processes instead, killed past their deadline, so answers can be verified from any
thread, e.g. overlapped with generation. The workers need a POSIX system (Linux, macOS).
Extracting the answer from a response, and rewards, are `siri.rewards`'.
"""

from __future__ import annotations

import atexit
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
from multiprocessing.connection import Connection

__all__ = ["DEFAULT_TIMEOUT_S", "check_timeout", "shutdown_verifiers", "verify_equal"]

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

# Up to 18 digits: fits an int64, and stays clear of the 4300-digit cap of int(str).
_INTEGER = re.compile(r"[+-]?\d{1,18}")

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
    "from siri.verifier import _verifier_main; _verifier_main(int(sys.argv[1]))"
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
            raise ImportError("checking a non-integer answer needs math-verify: pip install math-verify")
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


def check_timeout(timeout_s) -> float:
    """`timeout_s` as a float, or ValueError unless it is a positive finite number of seconds."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def verify_equal(gold: str, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the bare answers `gold` and `answer` are mathematically equal.

    Integers are compared directly (most answers of competition math are; math-verify would
    reach the same verdict, and this keeps them off the worker pipe). Anything else goes to
    math-verify (gold parsed first, as its graders do), in a worker process killed after
    `timeout_s` seconds, in which case the answer counts as not equal. Safe to call from
    any thread, and from several at once.
    """
    timeout_s = check_timeout(timeout_s)
    if _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold):
        return int(answer) == int(gold)
    return _VERIFIERS.check(gold, answer, timeout_s)
