"""Tests of the demo: tokenizer, task, tiny model, SFT, measuring, the report and its criteria,
plots, and `siri demo --quick` end to end through the real trainer."""

import json
import random
import re

import pytest
import torch

from siri.demo.measure import measure
from siri.demo.model import ModelSize, build_model
from siri.demo.plot import plot_curves, plot_pareto, read_metrics
from siri.demo.report import CRITERIA, format_report, judge, summarise
from siri.demo.sft import IGNORE_INDEX, SFTConfig, collate, train_sft
from siri.demo.task import (
    LABELS,
    THINK_END,
    TaskConfig,
    check_answer,
    level_of,
    make_problems,
    make_traces,
    sample_trace,
    split_of,
)
from siri.demo.tokenizer import ALPHABET, WORDS, build_tokenizer

# Small enough that a few SFT steps take well under a second.
TINY = ModelSize(hidden_size=32, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                 intermediate_size=64, max_position_embeddings=256)

STEP = re.compile(r"(=?)([a-i])(\d)=(\d)")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_round_trip(tokenizer):
    trace = make_traces(1, seed=3)[0]
    text = trace.prompt_text + trace.response_text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) - len(THINK_END) + 1  # one token per character, the marker one token
    assert tokenizer.convert_tokens_to_ids(THINK_END) in ids
    padded = [tokenizer.pad_token_id] * 2 + ids + [tokenizer.eos_token_id]
    assert tokenizer.batch_decode([padded], skip_special_tokens=True) == [text]  # the marker survives
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.chat_template is None
    assert len(tokenizer) == 3 + len(ALPHABET) + len(WORDS)


def test_task_text_uses_only_the_alphabet():
    # A character outside the alphabet would encode as <pad> and be lost.
    text = "".join(t.prompt_text + t.response_text.replace(THINK_END, "") for t in make_traces(200, seed=0))
    assert set(text) <= set(ALPHABET)


def test_generators_are_deterministic(tokenizer):
    assert make_traces(50, seed=7) == make_traces(50, seed=7)
    assert make_traces(50, seed=7) != make_traces(50, seed=8)
    a, b = make_problems(20, seed=7, tokenizer=tokenizer), make_problems(20, seed=7, tokenizer=tokenizer)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]


def _terms(prompt_text):
    """The digits of a prompt, checking their labels run a, b, c, ..."""
    pairs = prompt_text.removeprefix("Q: ").removesuffix("=?\n").split(" ")
    assert [pair[0] for pair in pairs] == list(LABELS[: len(pairs)])
    return [int(pair[1:]) for pair in pairs]


def _check_trace(trace):
    """The running sum modulo 10 is right step by step, a check restates the step above with its
    right sum, a slip is followed by the check that repairs it, and the answer after </think> is
    the sum's last digit."""
    terms = _terms(trace.prompt_text)
    thinking, answer = trace.response_text.split(THINK_END)
    assert answer == f"\\boxed{{{sum(terms) % 10}}}" and trace.answer == str(sum(terms) % 10)
    total, next_term, checks, slips, pending_slip, last_step = 0, 0, 0, 0, False, None
    for line in thinking.splitlines():
        check, label, digit, result = STEP.fullmatch(line).groups()
        digit, result = int(digit), int(result)
        if check:
            checks += 1
            assert (label, digit, result) == last_step, line  # the step above, with its right sum
            pending_slip = False
            continue
        assert not pending_slip, "a slip must be followed by its repair"
        assert (label, digit) == (LABELS[next_term], terms[next_term])
        right = (total + digit) % 10
        last_step = (label, digit, right)
        if result != right:
            slips += 1
            pending_slip = True
            assert (result - right) % 10 in (1, 2, 8, 9)
        total, next_term = right, next_term + 1
    assert next_term == len(terms) and not pending_slip
    assert (trace.checks, trace.slips, trace.terms) == (checks, slips, len(terms))
    assert check_answer(trace.response_text, trace.answer)


def test_traces_are_correct_and_checks_only_sometimes_repair():
    traces = make_traces(400, seed=1)
    for trace in traces:
        _check_trace(trace)
    slips = sum(t.slips for t in traces)
    checks = sum(t.checks for t in traces)
    # Checks are mostly confirmations, but some repair a slip; lengths are long-tailed.
    assert 0 < slips < 0.3 * checks
    assert min(t.checks for t in traces) == 0 and max(t.checks for t in traces) == TaskConfig().max_checks
    assert {t.terms for t in traces} == set(TaskConfig().levels)
    many = sample_trace(random.Random(0), TaskConfig(check_rate=50.0, max_checks=3, slip_rate=0.0))
    assert many.checks == 3
    _check_trace(many)


def test_problems_have_the_dataset_interface_and_levels(tokenizer):
    problems = make_problems(4, seed=2, tokenizer=tokenizer, split="test", per_level=True)
    assert len(problems) == 4 * len(TaskConfig().levels)
    assert [level_of(problems[i]) for i in range(len(problems))] == [k for k in TaskConfig().levels for _ in range(4)]
    for i in range(len(problems)):
        p = problems[i]
        assert p.index == i and p.source == "sum"
        assert tokenizer.decode(p.prompt_ids) == p.prompt_text
        assert p.answer == str(sum(_terms(p.prompt_text)) % 10)


def test_test_split_is_held_out(tokenizer):
    taught = {t.prompt_text for t in make_traces(3000, seed=0)}
    rl = make_problems(500, seed=0, tokenizer=tokenizer, split="train")
    test = make_problems(64, seed=12345, tokenizer=tokenizer, split="test", per_level=True)
    test_prompts = {test[i].prompt_text for i in range(len(test))}
    assert all(split_of(p) == "test" for p in test_prompts) and all(split_of(p) == "train" for p in taught)
    assert not taught & test_prompts
    assert not {rl[i].prompt_text for i in range(len(rl))} & test_prompts
    with pytest.raises(ValueError, match="split"):
        make_problems(1, seed=0, tokenizer=tokenizer, split="eval")


def test_check_answer_reads_after_the_end_of_thinking():
    assert check_answer("3+4\n7\n</think>\\boxed{7}", "7")
    assert not check_answer("3+4\n7\n\\boxed{7}", "7")  # no end of thinking: no answer
    assert not check_answer("\\boxed{7} 3+4\n", "7")  # a guess boxed while thinking, then cut
    assert not check_answer("3+4\n7\n</think>\\boxed{8}", "7")
    assert not check_answer("3+4\n7\n</think>\\boxed{7", "7")  # cut inside the box


def test_collate_masks_prompt_and_padding(tokenizer):
    traces = make_traces(3, seed=4)
    batch = collate(traces, tokenizer)
    for row, trace in enumerate(traces):
        prompt_len = len(tokenizer(trace.prompt_text, add_special_tokens=False)["input_ids"])
        response_len = len(tokenizer(trace.response_text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        labels = batch["labels"][row]
        assert (labels[:prompt_len] == IGNORE_INDEX).all()
        assert labels[prompt_len + response_len - 1] == tokenizer.eos_token_id
        assert (labels[prompt_len + response_len:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == prompt_len + response_len


def test_model_builds(tokenizer):
    model = build_model(tokenizer, TINY)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    # The seed alone decides the initialisation.
    again = build_model(tokenizer, TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_demo_shapes_have_a_head_size_vllm_cpu_accepts():
    from siri.demo.run import DEFAULT, QUICK

    for size in (DEFAULT.size, QUICK.size):
        assert size.hidden_size % size.num_attention_heads == 0
        assert size.hidden_size // size.num_attention_heads in (32, 64, 80, 96, 112, 128)


def test_sft_reduces_the_loss(tokenizer):
    model = build_model(tokenizer, TINY)
    losses = train_sft(model, tokenizer, SFTConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=3,
                                                   bucket_batches=2))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_measure_respects_the_budget(tokenizer):
    model = build_model(tokenizer, TINY)
    problems = make_problems(6, seed=5, tokenizer=tokenizer)
    result = measure(model, tokenizer, problems, budget=12, batch_size=4)
    assert len(result.lengths) == 6
    assert all(1 <= n <= 12 for n in result.lengths)
    # A response shorter than the budget ended with EOS, so it is not truncated.
    assert not any(t for t, n in zip(result.truncated, result.lengths) if n < 12)
    assert measure(model, tokenizer, problems, budget=12, batch_size=4) == result  # seeded


class _Demo:
    """The parts of a `DemoConfig` that `summarise` and `judge` read."""

    task = TaskConfig(min_terms=2, max_terms=4)  # three levels, as the figures below give
    rl_steps, cycles = 30, 3


def _measurement(acc_by_level, length, seed_offset=0.0):
    correct, lengths, levels = [], [], []
    for level, acc in acc_by_level.items():
        hits = round(40 * (acc + seed_offset))
        correct += [True] * hits + [False] * (40 - hits)
        lengths += [length] * 40
        levels += [level] * 40
    return {"correct": correct, "lengths": lengths, "levels": levels, "tokens": 1000.0, "step": 30}


def _measured(long_acc, short_acc, low1, low3, high3, lengths):
    even = {2: 0.5, 3: 0.5, 4: 0.5}

    def arm(by_level, length):
        return {0: _measurement(by_level, length), 1: _measurement(by_level, length, 0.05)}

    return {
        "base": {"base": {"shared": _measurement(even, lengths["base"])}},
        "constant_long": {"step30": arm(long_acc, lengths["long"])},
        "constant_short": {"step30": arm(short_acc, lengths["short"])},
        "siri": {"low1": arm(low1, lengths["low1"]), "low3": arm(low3, lengths["low3"]),
                 "high3": arm(high3, lengths["high3"])},
    }


def test_criteria_hold_and_fail_where_they_should():
    lengths = {"base": 40, "long": 38, "short": 20, "low1": 26, "low3": 24, "high3": 25}
    good = _measured(long_acc={2: 0.9, 3: 0.8, 4: 0.7}, short_acc={2: 0.8, 3: 0.5, 4: 0.3},
                     low1={2: 0.8, 3: 0.6, 4: 0.5}, low3={2: 0.85, 3: 0.7, 4: 0.6}, high3={2: 0.9, 3: 0.8, 4: 0.7},
                     lengths=lengths)
    summary = summarise(good, _Demo)
    assert summary["base"]["acc"] == pytest.approx(0.5)
    assert summary["siri/low3"]["per_seed"]["1"]["acc"] > summary["siri/low3"]["per_seed"]["0"]["acc"]
    low, high = summary["siri/low3"]["acc_ci"]
    assert low <= summary["siri/low3"]["acc"] <= high
    verdicts = judge(summary, _Demo)
    assert set(verdicts) == set(CRITERIA) and all(v["holds"] for v in verdicts.values()), verdicts
    # SIRI-high as long as constant-long (C1 fails), SIRI-low no better than short (C2), no progress (C3).
    bad = _measured(long_acc={2: 0.9, 3: 0.8, 4: 0.7}, short_acc={2: 0.9, 3: 0.75, 4: 0.6},
                    low1={2: 0.8, 3: 0.6, 4: 0.5}, low3={2: 0.8, 3: 0.6, 4: 0.5}, high3={2: 0.9, 3: 0.8, 4: 0.7},
                    lengths={**lengths, "high3": 38})
    verdicts = judge(summarise(bad, _Demo), _Demo)
    assert [key for key, v in verdicts.items() if not v["holds"]] == ["P2", "C1", "C2", "C3"]
    report = format_report(summarise(bad, _Demo), verdicts)
    assert "C1 FAILS" in report and "P1 HOLDS" in report and "siri/high3" in report


def test_plots(tmp_path):
    lengths = {"base": 40, "long": 38, "short": 20, "low1": 26, "low3": 24, "high3": 25}
    even = {2: 0.5, 3: 0.5, 4: 0.5}
    summary = summarise(_measured(even, even, even, even, even, lengths), _Demo)
    plot_pareto(summary, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0
    for name, budgets in (("constant_long", [64] * 6), ("siri", [64, 48, 32, 32, 48, 64])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"step": step, "budget": budget, "response_len_mean": budget / 2,
                                    "accuracy": 0.9}) + "\n" for step, budget in enumerate(budgets))
    assert read_metrics(tmp_path / "siri.jsonl")[2]["budget"] == 32
    plot_curves({"constant_long": tmp_path / "constant_long.jsonl", "siri": tmp_path / "siri.jsonl"},
                tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_rl_configs_differ_only_in_the_schedule(tmp_path):
    from siri.demo.run import ARMS, DEFAULT, rl_config

    configs = {arm: rl_config(DEFAULT, arm, str(tmp_path / arm), seed=1) for arm in ARMS}
    assert configs["constant_long"].schedule.length == DEFAULT.l_max
    assert configs["constant_short"].schedule.length == DEFAULT.l_min
    assert configs["staged"].schedule.stages == [[0, DEFAULT.l_min], [DEFAULT.rl_steps // 2, DEFAULT.l_max]]
    siri = configs["siri"]
    assert (siri.schedule.kind, siri.schedule.l_max, siri.schedule.l_min) == ("cosine", DEFAULT.l_max, DEFAULT.l_min)
    assert siri.total_steps == 3 * siri.schedule.period and siri.seed == 1
    assert siri.reward.fn == "length_capped" and siri.reward.think_end == THINK_END
    assert siri.algorithm.mini_batches > 1  # the clip acts
    assert (siri.device, siri.model.dtype, siri.rollout.engine) == ("cpu", "float32", "hf")
    for cfg in configs.values():
        cfg.schedule = cfg.output_dir = None
    assert all(cfg == siri for cfg in configs.values())
    with pytest.raises(ValueError, match="arm"):
        rl_config(DEFAULT, "stair", str(tmp_path))


def test_quick_demo_end_to_end(tmp_path, capsys):
    from siri.cli import main
    from siri.demo.run import ARMS, QUICK

    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["summary"]
    # Every low and high checkpoint of SIRI, and every arm's checkpoint at the end of each cycle.
    expected = {"base"} | {f"siri/{tag}{i}" for tag in ("low", "high") for i in (1, 2, 3)}
    expected |= {f"{arm}/step{QUICK.period * c}" for arm in ARMS if arm != "siri" for c in (1, 2, 3)}
    assert set(summary) == expected
    for entry in summary.values():
        assert 0.0 <= entry["acc_ci"][0] <= entry["acc"] <= entry["acc_ci"][1] <= 1.0
        assert 1.0 <= entry["len"] <= QUICK.l_max
        assert set(entry["levels"]) == {str(k) for k in QUICK.task.levels}
    assert summary["siri/low3"]["step"] == 2 * QUICK.period + QUICK.period // 2
    assert summary["siri/high3"]["tokens"] > summary["siri/high1"]["tokens"] > 0
    assert set(results["criteria"]) == set(CRITERIA)
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0
    for arm in ARMS:
        records = read_metrics(tmp_path / results["metrics"][arm]["0"])
        assert [r["step"] for r in records] == list(range(QUICK.rl_steps))
    budgets = [r["budget"] for r in read_metrics(tmp_path / results["metrics"]["siri"]["0"])]
    assert max(budgets) == QUICK.l_max and min(budgets) == QUICK.l_min
    out = capsys.readouterr().out
    assert "siri/low3" in out and "C3 " in out
