"""siri.rewards: answer extraction, equivalence through math-verify, reward functions, loading."""

import threading
import time

import pytest

from siri import rewards
from siri.rewards import (
    correctness_reward,
    extract_answer,
    is_correct,
    length_capped_reward,
    load_reward_fn,
    overlong_penalty,
    score_batch,
    shutdown_verifiers,
    with_overlong_penalty,
)

# sympy tries to evaluate this power tower as a Python int (9^(9^9) alone has 370 million
# digits): it never finishes, and spends the time in C calls that hold the GIL.
POWER_TOWER = "\\boxed{9^{9^{9^{9}}}}"


def reward_for_tests(response_text, gold, *, truncated, response_len, budget):
    """A user-defined reward, loaded by dotted path below."""
    return 0.25


class Scorer:
    @staticmethod
    def score(response_text, gold, *, truncated, response_len, budget):
        return 0.75


# --- extract_answer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,answer",
    [
        ("The answer is \\boxed{42}.", "42"),
        ("so $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("nested \\boxed{\\frac{\\sqrt{2}}{2^{3}}} done", "\\frac{\\sqrt{2}}{2^{3}}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box is the final answer
        ("escaped \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # \{ \} are content, not grouping
        ("spaced \\boxed {7}", "7"),
        ("padded \\boxed{  x + 1 }", "x + 1"),
        ("text \\boxed{a}\\boxed{b}", "b"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "text",
    [
        "no box at all, the answer is 42",
        "",
        "\\boxed{}",  # an empty box is no answer
        "\\boxed{  }",
        "\\boxed{7} but then, cut at the budget: \\boxed{\\frac{1}{2",  # last box unclosed
        "\\boxed 7",  # only the braced form counts
    ],
)
def test_extract_answer_none(text):
    assert extract_answer(text) is None


def test_extract_answer_rejects_non_text():
    with pytest.raises(ValueError, match="text"):
        extract_answer(None)


# --- is_correct ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("\\frac12", "1/2"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
        ("\\{2, 1\\}", "\\{1,2\\}"),
        ("42", "42"),
        ("042", "42"),  # the integer fast path
        ("1,000", "1000"),
    ],
)
def test_equivalent_forms_are_correct(answer, gold):
    assert is_correct(f"Thus \\boxed{{{answer}}}.", gold)


@pytest.mark.parametrize(
    "answer,gold",
    [("0.4", "\\frac{1}{2}"), ("\\frac{1}{3}", "0.5"), ("41", "42"), ("\\sqrt{3}", "\\sqrt{2}"), ("-42", "42")],
)
def test_wrong_answers_are_incorrect(answer, gold):
    assert not is_correct(f"\\boxed{{{answer}}}", gold)


def test_gold_may_be_a_boxed_solution():
    assert is_correct("\\boxed{0.75}", "We find that the ratio is $\\boxed{\\frac{3}{4}}$.")


def test_no_boxed_answer_is_incorrect():
    assert not is_correct("The answer is 42.", "42")


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(response_text="\\boxed{1}", gold=None), "gold"),
        (dict(response_text="\\boxed{1}", gold="   "), "gold"),
        (dict(response_text="\\boxed{1}", gold="1", timeout_s=0), "timeout_s"),
        (dict(response_text="\\boxed{1}", gold="1", timeout_s=float("nan")), "timeout_s"),
        (dict(response_text=None, gold="1"), "text"),
    ],
)
def test_is_correct_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        is_correct(**kwargs)


def test_timeout_off_the_main_thread_does_not_hang():
    is_correct("\\boxed{0.5}", "1/2")  # start a worker first, so only the check is timed
    results = []

    def check():
        start = time.perf_counter()
        results.append((is_correct(POWER_TOWER, "1", timeout_s=0.5), time.perf_counter() - start))

    thread = threading.Thread(target=check)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "is_correct hung off the main thread"
    (verdict, elapsed), = results
    assert verdict is False
    assert 0.5 <= elapsed < 10
    # The stuck worker was killed and is replaced on demand.
    assert is_correct("\\boxed{\\frac{1}{2}}", "0.5")


def test_worker_that_died_while_idle_is_replaced():
    assert is_correct("\\boxed{\\frac{2}{4}}", "0.5")
    for verifier in list(rewards._VERIFIERS._idle):
        verifier._process.kill()
        verifier._process.wait()
    # The dead worker costs a retry, not a wrong verdict.
    assert is_correct("\\boxed{\\frac{2}{4}}", "0.5")


def test_shutdown_verifiers_then_reuse():
    shutdown_verifiers()
    assert rewards._VERIFIERS._idle == []
    assert is_correct("\\boxed{0.25}", "\\frac14")


# --- reward functions ---------------------------------------------------------------------


def test_length_capped_reward():
    kwargs = dict(truncated=False, response_len=100, budget=8192)
    assert length_capped_reward("\\boxed{\\frac{1}{2}}", "0.5", **kwargs) == 1.0
    assert length_capped_reward("\\boxed{3}", "0.5", **kwargs) == 0.0
    assert length_capped_reward("I think it is 1/2", "0.5", **kwargs) == 0.0


def test_truncated_response_scores_zero_under_length_cap():
    # Cut at the budget before (or while) boxing its answer: nothing to extract.
    for cut in ("Let me compute 1/2 + 0 = ", "so the answer is \\boxed{\\frac{1}{"):
        assert length_capped_reward(cut, "0.5", truncated=True, response_len=8192, budget=8192) == 0.0
    # An answer boxed before the cut still counts: the cut, not the flag, decides.
    boxed_then_cut = "\\boxed{\\frac{1}{2}} Let me double-check this by"
    assert length_capped_reward(boxed_then_cut, "0.5", truncated=True, response_len=8192, budget=8192) == 1.0
    # Longer than the budget (generated under a larger, earlier budget): 0.
    assert length_capped_reward("\\boxed{\\frac{1}{2}}", "0.5", truncated=False, response_len=8193, budget=8192) == 0.0


def test_correctness_reward_ignores_length():
    assert correctness_reward("\\boxed{0.5}", "1/2", truncated=True, response_len=10_000, budget=8192) == 1.0
    assert correctness_reward("\\boxed{0.4}", "1/2", truncated=False, response_len=10, budget=8192) == 0.0


@pytest.mark.parametrize(
    "response_len,expected",
    [(0, 0.0), (800, 0.0), (801, -1 / 200), (850, -0.25), (900, -0.5), (999, -199 / 200), (1000, -1.0), (5000, -1.0)],
)
def test_overlong_penalty(response_len, expected):
    assert overlong_penalty(response_len, budget=1000, buffer=200) == pytest.approx(expected, abs=1e-12)


def test_overlong_penalty_dapo_setting():
    # DAPO: L_max 20480, L_cache 4096; the penalty starts past 16384 tokens.
    assert overlong_penalty(16384, 20480, 4096) == 0.0
    assert overlong_penalty(18432, 20480, 4096) == -0.5
    assert overlong_penalty(20480, 20480, 4096) == -1.0


@pytest.mark.parametrize(
    "args,name",
    [
        ((-1, 1000, 200), "response_len"),
        ((10.5, 1000, 200), "response_len"),
        ((10, 0, 200), "budget"),
        ((10, 1000, 0), "buffer"),
        ((10, 1000, 1001), "buffer"),
    ],
)
def test_overlong_penalty_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        overlong_penalty(*args)


def test_with_overlong_penalty_composes():
    reward = with_overlong_penalty(correctness_reward, 200)
    assert reward("\\boxed{7}", "7", truncated=False, response_len=900, budget=1000) == 0.5
    assert reward("\\boxed{6}", "7", truncated=False, response_len=100, budget=1000) == 0.0
    assert reward.__name__ == "correctness_reward_with_overlong_penalty"


# --- load_reward_fn -------------------------------------------------------------------------


def test_load_builtin_names():
    assert load_reward_fn("length_capped") is length_capped_reward
    assert load_reward_fn("correctness") is correctness_reward
    assert load_reward_fn(correctness_reward) is correctness_reward


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("siri.rewards:correctness_reward", correctness_reward),
        ("siri.rewards.length_capped_reward", length_capped_reward),
        (f"{__name__}:reward_for_tests", reward_for_tests),
        (f"{__name__}.reward_for_tests", reward_for_tests),
        (f"{__name__}:Scorer.score", Scorer.score),
    ],
)
def test_load_dotted_path(spec, expected):
    assert load_reward_fn(spec) is expected


def test_load_with_overlong_buffer():
    reward = load_reward_fn(f"{__name__}:reward_for_tests", overlong_buffer=100)
    assert reward("", "1", truncated=True, response_len=950, budget=1000) == pytest.approx(0.25 - 0.5)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_such_reward", "built-in"),
        ("", "spec"),
        (3, "spec"),
        ("siri_no_such_package.rewards:score", "cannot import"),
        ("siri.rewards:no_such_function", "no attribute"),
        ("siri.rewards:DEFAULT_TIMEOUT_S", "not callable"),
        (":score", "pkg.module:func"),
        ("siri.rewards:", "pkg.module:func"),
    ],
)
def test_load_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_fn(spec)


# --- score_batch ----------------------------------------------------------------------------


def test_score_batch_matches_one_by_one():
    responses = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.3}", "no answer", "\\boxed{7}", "\\boxed{\\sqrt{4}}", "\\boxed{1}"]
    golds = ["0.5", "0.5", "7", "7", "2", "2"]
    truncated = [False, False, True, False, False, True]
    lens = [10, 20, 1000, 990, 30, 1000]
    reward = load_reward_fn("length_capped", overlong_buffer=100)
    expected = [
        reward(r, g, truncated=t, response_len=n, budget=1000) for r, g, t, n in zip(responses, golds, truncated, lens)
    ]
    assert expected == [1.0, 0.0, -1.0, 1.0 - 0.9, 1.0, -1.0]
    for num_workers in (1, 2):
        scores = score_batch(
            reward, responses, golds, truncated=truncated, response_lens=lens, budget=1000, num_workers=num_workers
        )
        assert scores == expected


def test_score_batch_per_response_budget():
    scores = score_batch(
        length_capped_reward,
        ["\\boxed{5}"] * 2,
        ["5"] * 2,
        truncated=[False] * 2,
        response_lens=[600, 600],
        budget=[1000, 500],
    )
    assert scores == [1.0, 0.0]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(golds=["1"]), "golds"),
        (dict(truncated=[False]), "truncated"),
        (dict(response_lens=[1]), "response_lens"),
        (dict(budget=[10]), "budget"),
        (dict(budget=0), "budget"),
        (dict(num_workers=0), "num_workers"),
    ],
)
def test_score_batch_bad_arguments(kwargs, name):
    args = dict(golds=["1", "2"], truncated=[False, False], response_lens=[1, 2], budget=10, num_workers=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        score_batch(correctness_reward, ["\\boxed{1}", "\\boxed{2}"], **args)
