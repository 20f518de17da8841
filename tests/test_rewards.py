"""siri.rewards and siri.verifier: answer extraction after the end of thinking, equivalence through
math-verify, reward functions, loading, scoring rollouts."""

import threading
import time

import pytest

from siri import verifier
from siri.verifier import verify_equal
from siri.rewards import (
    DEFAULT_THINK_END,
    REWARD_FNS,
    correctness_reward,
    extract_answer,
    is_correct,
    length_capped_reward,
    load_reward_fn,
    overlong_penalty,
    score_batch,
    score_rollouts,
    shutdown_verifiers,
    with_overlong_penalty,
)

# sympy tries to evaluate this power tower as a Python int (9^(9^9) alone has 370 million
# digits): it never finishes, and spends the time in C calls that hold the GIL.
POWER_TOWER = "</think>\\boxed{9^{9^{9^{9}}}}"
# The thinking of a response, closed: what comes after it is the answer part.
THOUGHT = "Let me think. 1/2 is 0.5.</think>"


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
    assert extract_answer(text, think_end=None) == answer
    assert extract_answer(THOUGHT + text) == answer


def test_answer_is_read_after_the_end_of_thinking_only():
    # DeepScaleR's rule: a box inside the thinking is a guess on the way, not the answer.
    assert extract_answer("maybe \\boxed{3}? no.</think>So \\boxed{4}.") == "4"
    assert extract_answer("maybe \\boxed{3}? no.</think>So it is four.") is None
    # Boxed a guess while thinking, then cut at the budget before </think>: no answer.
    assert extract_answer("guess \\boxed{4}, let me verify by expanding (x+1)^2 = x^2 +") is None
    # The marker is configurable, and None reads the whole text (the old rule).
    assert extract_answer("a \\boxed{3} END \\boxed{5}", think_end="END") == "5"
    assert extract_answer("guess \\boxed{4}, then cut", think_end=None) == "4"
    assert DEFAULT_THINK_END == "</think>"
    for bad in ("", 3):
        with pytest.raises(ValueError, match="think_end"):
            extract_answer("\\boxed{1}", think_end=bad)


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
    assert extract_answer(text, think_end=None) is None
    assert extract_answer(THOUGHT + text) is None


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
    assert is_correct(f"{THOUGHT}Thus \\boxed{{{answer}}}.", gold)


@pytest.mark.parametrize(
    "answer,gold",
    [("0.4", "\\frac{1}{2}"), ("\\frac{1}{3}", "0.5"), ("41", "42"), ("\\sqrt{3}", "\\sqrt{2}"), ("-42", "42")],
)
def test_wrong_answers_are_incorrect(answer, gold):
    assert not is_correct(f"{THOUGHT}\\boxed{{{answer}}}", gold)


def test_gold_may_be_a_boxed_solution():
    assert is_correct(THOUGHT + "\\boxed{0.75}", "We find that the ratio is $\\boxed{\\frac{3}{4}}$.")


def test_no_boxed_answer_is_incorrect():
    assert not is_correct(THOUGHT + "The answer is 42.", "42")
    assert not is_correct("\\boxed{42}", "42")  # no end of thinking
    assert is_correct("\\boxed{42}", "42", think_end=None)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(response_text="\\boxed{1}", gold=None), "gold"),
        (dict(response_text="\\boxed{1}", gold="   "), "gold"),
        (dict(response_text="\\boxed{1}", gold="1", timeout_s=0), "timeout_s"),
        (dict(response_text="\\boxed{1}", gold="1", timeout_s=float("nan")), "timeout_s"),
        (dict(response_text=None, gold="1"), "text"),
        (dict(response_text="\\boxed{1}", gold="1", think_end=""), "think_end"),
    ],
)
def test_is_correct_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        is_correct(**kwargs)


def test_timeout_off_the_main_thread_does_not_hang():
    is_correct(THOUGHT + "\\boxed{0.5}", "1/2")  # start a worker first, so only the check is timed
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
    assert is_correct(THOUGHT + "\\boxed{\\frac{1}{2}}", "0.5")


def test_worker_that_died_while_idle_is_replaced():
    assert verify_equal("0.5", "\\frac{2}{4}")
    for worker in list(verifier._VERIFIERS._idle):
        worker._process.kill()
        worker._process.wait()
    # The dead worker costs a retry, not a wrong verdict.
    assert verify_equal("0.5", "\\frac{2}{4}")


def test_shutdown_verifiers_then_reuse():
    shutdown_verifiers()
    assert verifier._VERIFIERS._idle == []
    assert verify_equal("\\frac14", "0.25")


# --- reward functions ---------------------------------------------------------------------


def test_length_capped_reward():
    kwargs = dict(truncated=False, response_len=100, budget=8192)
    assert length_capped_reward(THOUGHT + "\\boxed{\\frac{1}{2}}", "0.5", **kwargs) == 1.0
    assert length_capped_reward(THOUGHT + "\\boxed{3}", "0.5", **kwargs) == 0.0
    assert length_capped_reward(THOUGHT + "I think it is 1/2", "0.5", **kwargs) == 0.0


def test_truncated_response_scores_zero_under_length_cap():
    # Cut at the budget before (or while) boxing its answer: nothing to extract.
    for cut in (THOUGHT + "so 1/2 + 0 = ", THOUGHT + "so the answer is \\boxed{\\frac{1}{"):
        assert length_capped_reward(cut, "0.5", truncated=True, response_len=8192, budget=8192) == 0.0
    # An answer given after the thinking and before the cut still counts: the cut, not the flag, decides.
    answered_then_cut = THOUGHT + "\\boxed{\\frac{1}{2}} Let me double-check this by"
    assert length_capped_reward(answered_then_cut, "0.5", truncated=True, response_len=8192, budget=8192) == 1.0
    # Longer than the budget (generated under a larger, earlier budget): 0.
    assert length_capped_reward(THOUGHT + "\\boxed{\\frac{1}{2}}", "0.5", truncated=False, response_len=8193,
                                budget=8192) == 0.0


# A response that boxes the right answer as a guess inside its thinking and is then cut at
# the budget: under the old rule (the last box anywhere) it earned 1, which let compression
# reward unfinished thinking.
BOXED_IN_THINKING_THEN_CUT = "Try 1/2: is it \\boxed{\\frac{1}{2}}? Check: 2 * 1/2 = 1, and the other root"


@pytest.mark.parametrize("name", ["length_capped", "correctness"])
def test_a_guess_boxed_while_thinking_then_cut_scores_zero(name):
    kwargs = dict(truncated=True, response_len=8192, budget=8192)
    assert load_reward_fn(name)(BOXED_IN_THINKING_THEN_CUT, "0.5", **kwargs) == 0.0
    assert REWARD_FNS[name](BOXED_IN_THINKING_THEN_CUT, "0.5", **kwargs) == 0.0
    # The same guess after </think> counts; the old rule only by explicit choice.
    assert load_reward_fn(name)(THOUGHT + "\\boxed{\\frac{1}{2}}", "0.5", **kwargs) == 1.0
    assert load_reward_fn(name, think_end=None)(BOXED_IN_THINKING_THEN_CUT, "0.5", **kwargs) == 1.0
    # The marker itself may be cut off: the guess before a partial marker does not count.
    assert load_reward_fn(name)(BOXED_IN_THINKING_THEN_CUT + "</thi", "0.5", **kwargs) == 0.0


def test_correctness_reward_ignores_length():
    assert correctness_reward(THOUGHT + "\\boxed{0.5}", "1/2", truncated=True, response_len=10_000,
                              budget=8192) == 1.0
    assert correctness_reward(THOUGHT + "\\boxed{0.4}", "1/2", truncated=False, response_len=10, budget=8192) == 0.0


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
    assert reward(THOUGHT + "\\boxed{7}", "7", truncated=False, response_len=900, budget=1000) == 0.5
    assert reward(THOUGHT + "\\boxed{6}", "7", truncated=False, response_len=100, budget=1000) == 0.0
    assert reward.__name__ == "correctness_reward_with_overlong_penalty"


# --- load_reward_fn -------------------------------------------------------------------------


def test_load_builtin_names():
    for name, fn in (("length_capped", length_capped_reward), ("correctness", correctness_reward)):
        loaded = load_reward_fn(name, think_end="END", timeout_s=2.5)
        assert loaded.__name__ == fn.__name__ and (loaded.think_end, loaded.timeout_s) == ("END", 2.5)
        assert loaded("x END \\boxed{7}", "7", truncated=False, response_len=5, budget=10) == 1.0
    assert load_reward_fn(correctness_reward) is correctness_reward
    for kwargs, name in ((dict(think_end=""), "think_end"), (dict(timeout_s=0), "timeout_s")):
        with pytest.raises(ValueError, match=name):
            load_reward_fn("length_capped", **kwargs)


def test_timeout_reaches_the_verifier(monkeypatch):
    # reward.timeout_s is what one math-verify check may take: the loaded reward passes it on.
    seen = []
    monkeypatch.setattr("siri.rewards.verify_equal", lambda gold, answer, timeout_s: seen.append(timeout_s) or True)
    load_reward_fn("length_capped", timeout_s=0.75)(THOUGHT + "\\boxed{x}", "y", truncated=False, response_len=1,
                                                     budget=9)
    assert seen == [0.75]


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
    answers = ("\\boxed{\\frac{1}{2}}", "\\boxed{0.3}", "no answer", "\\boxed{7}", "\\boxed{\\sqrt{4}}", "\\boxed{1}")
    responses = [THOUGHT + a for a in answers]
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
        [THOUGHT + "\\boxed{5}"] * 2,
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


def test_score_rollouts_decodes_and_scores_by_prompt():
    from types import SimpleNamespace

    class Tokenizer:  # ids are characters' code points
        @staticmethod
        def batch_decode(ids, skip_special_tokens):
            assert skip_special_tokens
            return ["".join(map(chr, row)) for row in ids]

    texts = [THOUGHT + "\\boxed{3}", "\\boxed{3}", THOUGHT + "\\boxed{4}"]
    rollouts = [SimpleNamespace(response_ids=[ord(c) for c in t], prompt_index=i % 2, truncated=False)
                for i, t in enumerate(texts)]
    scores = score_rollouts(load_reward_fn("length_capped"), rollouts, ["3", "4"], Tokenizer(), budget=1000)
    assert scores == [1.0, 0.0, 0.0]  # the second has no </think>; the third answers prompt 0's "3" with 4


# --- the reward keys of a config, as the trainer and `siri eval` read them ------------------


def test_config_reward_keys(tmp_path):
    from siri.config import config_from_dict, load_config

    assert config_from_dict({}).reward.think_end == "</think>"
    assert config_from_dict({"reward": {"think_end": None}}).reward.think_end is None
    for values, key in (({"think_end": ""}, "reward.think_end"), ({"timeout_s": 0}, "reward.timeout_s"),
                        ({"timeout_s": -1.0}, "reward.timeout_s")):
        with pytest.raises(ValueError, match=key):
            config_from_dict({"reward": values})
    shipped = load_config("configs/siri-1.5b.yaml")
    assert shipped.reward.think_end == "</think>" and shipped.reward.fn == "length_capped"


def test_trainer_reads_the_answer_rule_from_the_config(tmp_path):
    from trainer_fixtures import make_model, make_tokenizer, tiny_overrides

    from siri.config import load_config
    from siri.trainer import Trainer

    tokenizer = make_tokenizer()
    for extra, reward_is_accuracy in (({"reward.think_end": "END", "reward.timeout_s": 1.5}, True),
                                      ({"reward.fn": "correctness", "reward.think_end": "null"}, False)):
        cfg = load_config(None, tiny_overrides(tmp_path / str(reward_is_accuracy), **extra))
        trainer = Trainer(cfg, model=make_model(tokenizer), tokenizer=tokenizer, resume=False)
        try:
            assert trainer.reward_is_accuracy is reward_is_accuracy
            for fn in (trainer.reward_fn, trainer.accuracy_fn):
                assert (fn.think_end, fn.timeout_s) == (cfg.reward.think_end, cfg.reward.timeout_s)
            assert trainer.accuracy_fn.__name__ == "length_capped_reward"
        finally:
            trainer.close()


@pytest.mark.parametrize("preset,given,expected", [
    ("paper", {}, {"budget": 16384, "temperature": 0.6, "k": 64}),
    ("paper", {"k": 16}, {"budget": 16384, "temperature": 0.6, "k": 16}),  # a flag overrides the preset
    (None, {"budget": 100}, {"budget": 100, "temperature": 0.6, "k": 4}),
])
def test_eval_presets(preset, given, expected):
    from siri.evaluate import resolve_protocol

    assert resolve_protocol(preset, **{"budget": None, "temperature": None, "k": None, **given}) == expected


def test_eval_protocol_errors():
    from siri.evaluate import resolve_protocol

    with pytest.raises(ValueError, match="budget"):
        resolve_protocol(None, budget=None, temperature=None, k=None)
    with pytest.raises(ValueError, match="preset"):
        resolve_protocol("table-1", budget=None, temperature=None, k=None)
