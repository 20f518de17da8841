"""Tests of the demo: tokenizer, task, tiny model, SFT, measuring, plots, and `siri demo --quick`
end to end through the real trainer (about 20 s on two CPU cores)."""

import json
import random
import re

import pytest
import torch

from siri.demo.measure import measure
from siri.demo.model import ModelSize, build_model
from siri.demo.plot import format_table, plot_curves, read_metrics
from siri.demo.sft import IGNORE_INDEX, SFTConfig, collate, train_sft
from siri.demo.task import (
    TaskConfig,
    all_problems,
    check_answer,
    make_problems,
    make_traces,
    sample_trace,
)
from siri.demo.tokenizer import ALPHABET, build_tokenizer

# Small enough that a few SFT steps take well under a second.
TINY = ModelSize(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=512)

STEP = re.compile(r"(\d+)\+(\d+)=(\d+)\n")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_round_trip(tokenizer):
    trace = make_traces(1, seed=3, cfg=TaskConfig(mean_checks=4.0))[0]
    text = trace.prompt_text + trace.response_text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    padded = [tokenizer.pad_token_id] * 2 + ids + [tokenizer.eos_token_id]
    assert tokenizer.batch_decode([padded], skip_special_tokens=True) == [text]
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.chat_template is None
    assert len(tokenizer) == 3 + len(ALPHABET)


def test_task_text_uses_only_the_alphabet():
    # A character outside the alphabet would encode as <pad> and be lost.
    text = "".join(t.prompt_text + t.response_text for t in make_traces(200, seed=0))
    assert set(text) <= set(ALPHABET)


def test_generators_are_deterministic(tokenizer):
    assert make_traces(50, seed=7) == make_traces(50, seed=7)
    assert make_traces(50, seed=7) != make_traces(50, seed=8)
    a, b = make_problems(20, seed=7, tokenizer=tokenizer), make_problems(20, seed=7, tokenizer=tokenizer)
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]


def _check_trace(trace):
    """The trace's arithmetic is right, its checks restate the step above, and it boxes the sum."""
    terms = [int(x) for x in trace.prompt_text.removeprefix("Q: ").removesuffix("=?\n").split("+")]
    *lines, last = trace.response_text.split("\n")
    assert last == f"\\boxed{{{sum(terms)}}}" and trace.answer == str(sum(terms))
    total, next_term, previous = terms[0], 1, None
    for line in lines:
        if line.startswith("check "):
            assert line.removeprefix("check ") == previous
            continue
        a, b, c = map(int, STEP.fullmatch(line + "\n").groups())
        assert (a, b, c) == (total, terms[next_term], total + terms[next_term])
        total, next_term, previous = c, next_term + 1, line
    assert next_term == len(terms)
    assert sum(line.startswith("check ") for line in lines) == trace.checks
    assert check_answer(trace.response_text, trace.answer)


def test_traces_are_correct_with_and_without_redundancy():
    traces = make_traces(300, seed=1)
    for trace in traces:
        _check_trace(trace)
    # Both kinds occur, and the lengths are long-tailed: a few traces re-check a lot.
    checks = [t.checks for t in traces]
    assert min(checks) == 0 and max(checks) >= 8
    redundant = sample_trace(random.Random(0), TaskConfig(mean_checks=50.0, max_checks=5))
    assert redundant.checks == 5
    _check_trace(redundant)


def test_problems_have_the_dataset_interface(tokenizer):
    problems = make_problems(10, seed=2, tokenizer=tokenizer, source="sum")
    assert len(problems) == 10
    for i in range(len(problems)):
        p = problems[i]
        assert p.index == i and p.source == "sum"
        assert tokenizer.decode(p.prompt_ids) == p.prompt_text
        terms = p.prompt_text.removeprefix("Q: ").removesuffix("=?\n").split("+")
        assert p.answer == str(sum(map(int, terms)))


# A problem space large enough to hold some problems out (the default two-term one is not).
HELD_OUT = TaskConfig(min_terms=3, max_terms=4, mean_checks=3.0, hold_out=True)


def test_test_split_is_held_out(tokenizer):
    taught = {t.prompt_text for t in make_traces(3000, seed=0, cfg=HELD_OUT)}
    test = make_problems(200, seed=0, tokenizer=tokenizer, cfg=HELD_OUT, split="test")
    assert not taught & {test[i].prompt_text for i in range(len(test))}
    every_test = all_problems(tokenizer, HELD_OUT, split="test")
    assert not taught & {every_test[i].prompt_text for i in range(len(every_test))}
    with pytest.raises(ValueError, match="split"):
        make_problems(1, seed=0, tokenizer=tokenizer, split="eval")


def test_all_problems_enumerates_the_task(tokenizer):
    # Default task: two distinct terms in 1..9, no held-out split, so evaluation covers the
    # whole distribution, every sum once.
    problems = all_problems(tokenizer)
    prompts = [problems[i].prompt_text for i in range(len(problems))]
    assert len(prompts) == len(set(prompts)) == 9 * 8
    assert [problems[i].index for i in range(len(problems))] == list(range(72))
    assert set(prompts) == {t.prompt_text for t in make_traces(3000, seed=0)}
    assert all(check_answer(f"\\boxed{{{problems[i].answer}}}", str(sum(map(int, prompts[i][3:-3].split("+")))))
               for i in range(len(problems)))


def test_check_answer():
    assert check_answer("1+2=3\n\\boxed{3}", "3")
    assert check_answer("\\boxed{4}\n\\boxed{3}", "3")  # the last box counts
    assert not check_answer("1+2=3\n\\boxed{4}", "3")
    assert not check_answer("1+2=3\n\\boxed{3", "3")  # cut at the budget inside the box
    assert not check_answer("1+2=3\n", "3")
    assert not check_answer("\\boxed{x}", "3")


def test_collate_masks_prompt_and_padding(tokenizer):
    traces = make_traces(3, seed=4)
    batch = collate(traces, tokenizer)
    for row, trace in enumerate(traces):
        prompt_len, response_len = len(trace.prompt_text), len(trace.response_text) + 1  # + EOS
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


def test_sft_reduces_the_loss(tokenizer):
    model = build_model(tokenizer, TINY)
    losses = train_sft(model, tokenizer, SFTConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=3,
                                                   bucket_batches=2))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_measure_respects_the_budget(tokenizer):
    model = build_model(tokenizer, TINY)
    problems = make_problems(6, seed=5, tokenizer=tokenizer)
    result = measure(model, tokenizer, problems, budget=12, batch_size=4)
    assert len(result.lengths) == 6
    assert all(1 <= n <= 12 for n in result.lengths)
    # A response shorter than the budget ended with EOS, so it is not truncated.
    assert not any(t for t, n in zip(result.truncated, result.lengths) if n < 12)
    assert measure(model, tokenizer, problems, budget=12, batch_size=4) == result  # seeded
    summary = result.summary()
    assert set(summary) >= {"acc", "len", "len_median", "len_p90", "truncation_rate"}


def test_curves_and_table(tmp_path):
    for name, budgets in (("constant", [64] * 6), ("siri", [64, 48, 32, 32, 48, 64])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"step": step, "budget": budget, "response_len_mean": budget / 2,
                                    "accuracy": 0.9}) + "\n" for step, budget in enumerate(budgets))
    assert read_metrics(tmp_path / "siri.jsonl")[2]["budget"] == 32
    plot_curves({"constant": tmp_path / "constant.jsonl", "SIRI": tmp_path / "siri.jsonl"}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    table = format_table({"siri_low": {"acc": 0.9, "len": 40.0}, "base": {"acc": 0.88, "len": 80.0},
                          "constant": {"acc": 0.9, "len": 70.0}, "siri_high": {"acc": 0.91, "len": 50.0}})
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["base", "constant", "siri_low", "siri_high"]
    assert "-50%" in lines[4] and "88.0" in lines[2]


def test_rl_config_differs_only_in_the_schedule(tmp_path):
    from siri.demo.run import FULL, rl_config

    constant = rl_config(FULL, "constant", str(tmp_path / "c"))
    siri = rl_config(FULL, "siri", str(tmp_path / "s"))
    assert constant.schedule.kind == "constant" and constant.schedule.length == FULL.l_max
    assert (siri.schedule.kind, siri.schedule.l_max, siri.schedule.l_min) == ("cosine", FULL.l_max, FULL.l_min)
    assert siri.total_steps == constant.total_steps == 3 * siri.schedule.period
    assert siri.reward.fn == "length_capped" and siri.rollout.engine == "hf"
    assert (siri.device, siri.model.dtype) == ("cpu", "float32")
    assert siri.checkpoint.every > siri.total_steps  # only low / high / final checkpoints
    for cfg in (constant, siri):
        cfg.schedule = cfg.output_dir = None
    assert constant == siri
    with pytest.raises(ValueError, match="run"):
        rl_config(FULL, "stair", str(tmp_path))


def test_quick_demo_end_to_end(tmp_path, capsys):
    from siri.cli import main
    from siri.demo.run import QUICK

    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("base", "constant", "siri_low", "siri_high"):
        assert 0.0 <= results[name]["acc"] <= 1.0
        assert 1.0 <= results[name]["len"] <= QUICK.l_max
    # SIRI-low and -high are the trainer's third "low" and "high" checkpoints.
    period = QUICK.period
    assert f"step-{2 * period + period // 2 - 1:07d}-low" in results["siri_low"]["path"]
    assert f"step-{3 * period - 1:07d}-high" in results["siri_high"]["path"]
    assert (tmp_path / "curves.png").stat().st_size > 0
    for run in ("constant", "siri"):
        records = read_metrics(tmp_path / results["metrics"][run])
        assert [r["step"] for r in records] == list(range(3 * period))
    budgets = [r["budget"] for r in read_metrics(tmp_path / "siri" / "metrics.jsonl")]
    assert max(budgets) == QUICK.l_max and min(budgets) == QUICK.l_min
    out = capsys.readouterr().out
    assert "siri_low" in out and "len vs base" in out
