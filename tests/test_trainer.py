"""The trainer end to end on a tiny random model: steps, logs, checkpoints, exact resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from trainer_fixtures import make_model, make_tokenizer, save_model_dir, tiny_overrides

from siri.config import load_config
from siri.trainer import Trainer, train

LOGGED = ("budget", "phase", "response_len_mean", "response_len_max", "truncation_rate", "accuracy", "reward",
          "loss", "clip_frac", "kl", "entropy", "tokens_per_s", "rollout_s", "update_s")


def run(tmp_path, steps, resume=True, model_seed=0, **extra):
    cfg = load_config(None, tiny_overrides(tmp_path, total_steps=steps, **extra))
    tokenizer = make_tokenizer()
    return train(cfg, model=make_model(tokenizer, model_seed), tokenizer=tokenizer, resume=resume)


def read_metrics(tmp_path):
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def test_steps_log_every_figure_and_follow_the_schedule(tmp_path):
    results = run(tmp_path, 4)
    assert [r.step for r in results] == [0, 1, 2, 3]
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    for name in LOGGED:
        assert name in rows[0], name
    # cosine between 10 and 4 over 4 steps: 10, 7, 4, 7
    assert [row["budget"] for row in rows] == [10, 7, 4, 7]
    assert [row["phase"] for row in rows] == ["compress", "compress", "expand", "expand"]
    assert all(row["response_len_max"] <= row["budget"] for row in rows)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)


def test_low_and_high_checkpoints(tmp_path):
    run(tmp_path, 4)
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    # 2 done steps end the first compression half (low), 4 end the cycle (high).
    assert "step-0000001-low" in names and "step-0000003-high" in names
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-0000001-low" / "policy")


def test_resume_continues_exactly(tmp_path):
    uninterrupted = [r.metrics["loss"] for r in run(tmp_path / "a", 4)]
    run(tmp_path / "b", 2)  # stops after the step-1 ("low") checkpoint
    resumed = run(tmp_path / "b", 4)
    assert [r.step for r in resumed] == [2, 3]
    assert [r.metrics["loss"] for r in resumed] == pytest.approx(uninterrupted[2:], rel=1e-6, abs=1e-9)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL a `siri train` process once it has saved, resume, and match an uninterrupted run."""
    model_dir = save_model_dir(str(tmp_path / "model"))
    # Enough steps after the second checkpoint that the kill lands mid-run: with 8, on an idle
    # machine, the last six steps once all ended between two polls of 0.2 s.
    total = 24
    overrides = tiny_overrides(tmp_path, total_steps=total, **{"model.path": model_dir, "checkpoint.every": 1})
    command = [sys.executable, "-m", "siri.cli", "train", *overrides]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if checkpoints.exists() and len([n for n in os.listdir(checkpoints) if n.startswith("step-")]) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = len(read_metrics(tmp_path))
    assert 0 < killed_at < total
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    resumed = {row["step"]: row["loss"] for row in read_metrics(tmp_path)}
    assert sorted(resumed) == list(range(total))

    reference = tmp_path / "reference"
    overrides_ref = tiny_overrides(reference, total_steps=total, **{"model.path": model_dir, "checkpoint.every": 1})
    subprocess.run([sys.executable, "-m", "siri.cli", "train", *overrides_ref], check=True, stdout=subprocess.DEVNULL)
    with open(reference / "run" / "metrics.jsonl") as handle:
        expected = {json.loads(line)["step"]: json.loads(line)["loss"] for line in handle}
    assert [resumed[s] for s in range(total)] == pytest.approx([expected[s] for s in range(total)], rel=1e-6, abs=1e-9)


def test_more_than_one_mini_batch_uses_old_logprobs(tmp_path):
    results = run(tmp_path, 1, **{"algorithm.mini_batches": 2, "algorithm.kl_coef": 0.1})
    assert torch.isfinite(torch.tensor(results[0].metrics["loss"]))
    assert results[0].metrics["kl"] >= 0


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="rollout.n"):
        load_config(None, tiny_overrides(tmp_path, **{"rollout.n": 0}))
    result = subprocess.run([sys.executable, "-m", "siri.cli", "train", "optim.lrr=1"], capture_output=True, text=True)
    assert result.returncode == 2 and "optim.'lrr'" in result.stderr


def test_missing_vllm_says_how_to_install(tmp_path, monkeypatch):
    # What an environment without vLLM gives, whether or not this one has it: find_spec
    # returns None and the import fails.
    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = load_config(None, tiny_overrides(tmp_path, **{"rollout.engine": "vllm"}))
    tokenizer = make_tokenizer()
    with pytest.raises(ImportError, match="siri\\[vllm\\]"):
        Trainer(cfg, model=make_model(tokenizer), tokenizer=tokenizer)


def test_eval_prints_a_table_and_draws_the_plot(tmp_path, capsys):
    from trainer_fixtures import write_problems

    from siri.cli import main

    first, second = save_model_dir(str(tmp_path / "m1"), 0), save_model_dir(str(tmp_path / "m2"), 1)
    data = write_problems(str(tmp_path / "arith.jsonl"), 4)
    code = main(["eval", "--model", first, "--model", second, "--data", data, "--budget", "6", "--k", "2",
                 "--device", "cpu", "--dtype", "float32", "--no-chat-template", "--out", str(tmp_path / "eval")])
    assert code == 0
    table = capsys.readouterr().out
    assert "arith acc" in table and "m1" in table and "m2" in table
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert {r["model"] for r in saved} == {"m1", "m2"} and 0 <= saved[0]["datasets"]["arith"]["acc"] <= 1
    assert (tmp_path / "eval" / "accuracy_vs_length.png").stat().st_size > 0


@pytest.mark.parametrize("data_names,match", [
    (["a/test.jsonl", "b/test.jsonl"], "share a name"),  # one column would silently replace the other
    (["a/test.jsonl", "missing.jsonl"], "is not a file"),
])
def test_eval_checks_every_argument_before_loading_a_model(tmp_path, capsys, data_names, match):
    from trainer_fixtures import write_problems

    from siri.cli import main

    not_a_model = tmp_path / "empty"  # a directory, but loading it would fail: the checks come first
    not_a_model.mkdir()
    data = []
    for name in data_names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        data += ["--data", write_problems(str(tmp_path / name), 2) if "missing" not in name else str(tmp_path / name)]
    assert main(["eval", "--model", str(not_a_model), *data, "--budget", "6", "--device", "cpu"]) == 2
    assert match in capsys.readouterr().err


def test_a_mini_batch_with_nothing_scored_takes_no_optimizer_step(tmp_path):
    """Every sample masked out (truncated, `reward.mask_truncated`): AdamW on the zero
    gradients would still move the weights by weight decay, so no step may be taken."""
    from siri.packing import Sample

    cfg = load_config(None, tiny_overrides(tmp_path, **{"reward.mask_truncated": "true",
                                                          "optim.weight_decay": 0.1}))
    tokenizer = make_tokenizer()
    trainer = Trainer(cfg, model=make_model(tokenizer), tokenizer=tokenizer, resume=False)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    masked = [Sample(prompt_ids=[3, 4], response_ids=[5, 6, 7], advantage=1.0, truncated=True, group_id=g)
              for g in (0, 0, 1)]
    metrics = trainer._update(masked)
    assert metrics["loss"] == 0.0
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert trainer.optimizer.state_dict()["state"] == {}
    assert trainer.lr_scheduler.last_epoch == 0

    scored = [dataclasses.replace(s, truncated=False) for s in masked]
    trainer._update(scored)
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())


def test_the_logged_lr_is_the_one_the_step_used(tmp_path):
    # Linear warm-up over 2 optimizer steps from lr 1e-2: step 0 updates at 5e-3, step 1 at 1e-2.
    run(tmp_path, 3, **{"optim.warmup_steps": 2, "optim.lr": "1e-2"})
    assert [row["lr"] for row in read_metrics(tmp_path)] == pytest.approx([5e-3, 1e-2, 1e-2])
