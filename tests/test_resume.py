"""Resuming and restarting a run: a saved run is never overwritten or mixed, a damaged
checkpoint is passed over (and kept), and a changed config key is refused or applied."""

import json
import logging
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from trainer_fixtures import make_model, make_tokenizer, save_model_dir, tiny_overrides

from siri import trainer as trainer_module
from siri.checkpoint import list_checkpoints
from siri.config import load_config
from siri.errors import UserError
from siri.trainer import Trainer, train


def config(tmp_path, steps, **extra):
    return load_config(None, tiny_overrides(tmp_path, total_steps=steps, **{"checkpoint.every": 1, **extra}))


def run(tmp_path, steps, resume=True, **extra):
    tokenizer = make_tokenizer()
    return train(config(tmp_path, steps, **extra), model=make_model(tokenizer), tokenizer=tokenizer, resume=resume)


def snapshot(run_dir):
    """Every file of a run directory and its bytes."""
    files = {}
    for folder, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, run_dir)] = handle.read()
    return files


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A two-step run with a checkpoint after each step: step-0000000 and step-0000001-low."""
    root = tmp_path_factory.mktemp("saved")
    results = run(root, 2)
    names = [os.path.basename(p) for p in list_checkpoints(root / "run")]
    assert names == ["step-0000000", "step-0000001-low"]
    return root, [r.metrics["loss"] for r in results]


def copy_of(saved_run, tmp_path):
    root, _ = saved_run
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run"


def resumed(saved_run, tmp_path, steps, **extra):
    """The config of the saved run (its data file) in the copy at `tmp_path`, `extra` changed."""
    root, _ = saved_run
    return config(tmp_path, steps, **{"data.train_files": f"[{root / 'train.jsonl'}]", **extra})


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model from model.path fails the test: what is checked must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(trainer_module, "load_model", refuse)
    monkeypatch.setattr(trainer_module, "load_tokenizer", refuse)


# -- --no-resume -------------------------------------------------------------------------

def test_no_resume_refuses_a_directory_that_holds_a_saved_run(saved_run, tmp_path, no_model_loading):
    run_dir = copy_of(saved_run, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(UserError, match=r"holds the checkpoints of an earlier run \(newest: step-0000001-low\)"):
        Trainer(resumed(saved_run, tmp_path, 4), resume=False)
    assert snapshot(run_dir) == before  # nothing pruned, nothing appended


def test_no_resume_into_a_fresh_directory_starts_at_step_zero(tmp_path):
    assert [r.step for r in run(tmp_path, 1, resume=False)] == [0]


def test_the_cli_says_no_resume_is_refused_in_one_line(saved_run, tmp_path, capsys):
    from siri.cli import main

    copy_of(saved_run, tmp_path)
    assert main(["train", "--no-resume", *tiny_overrides(tmp_path, total_steps=4)]) == 2
    err = capsys.readouterr().err
    assert "siri train: error: output_dir" in err and "--no-resume" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "refused when output_dir already holds checkpoints" in " ".join(capsys.readouterr().out.split())


# -- damaged checkpoints -------------------------------------------------------------------

def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


DAMAGES = {
    "weights": (lambda c: truncate(c / "policy" / "model.safetensors"), "policy/model.safetensors"),
    "optimizer": (lambda c: truncate(c / "optimizer-rank0.pt"), "optimizer-rank0.pt"),
    "rng": (lambda c: truncate(c / "rng-rank0.pt"), "rng-rank0.pt"),
    "scheduler": (lambda c: os.remove(c / "lr_scheduler.pt"), "lr_scheduler.pt is missing"),
    "trainer_state": (lambda c: open(c / "trainer_state.json", "w").close(), "trainer_state.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_falls_back_past_a_damaged_checkpoint_and_keeps_it(saved_run, tmp_path, caplog, damage):
    run_dir = copy_of(saved_run, tmp_path)
    damaged = run_dir / "checkpoints" / "step-0000001-low"
    harm, named = DAMAGES[damage]
    harm(damaged)
    damaged_files = snapshot(damaged)
    tokenizer = make_tokenizer()
    with caplog.at_level(logging.WARNING, logger="siri.trainer"):
        results = train(resumed(saved_run, tmp_path, 2), model=make_model(tokenizer), tokenizer=tokenizer)
    assert [r.step for r in results] == [1]  # from step-0000000, the newest intact one
    _, losses = saved_run
    assert results[0].metrics["loss"] == pytest.approx(losses[1], rel=1e-6, abs=1e-9)
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "step-0000001-low is damaged" in warning and named in warning and "damaged-step-0000001-low" in warning
    kept = run_dir / "checkpoints" / "damaged-step-0000001-low"
    assert snapshot(kept) == damaged_files  # renamed aside, not deleted
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["step-0000000", "step-0000001-low"]


def test_every_checkpoint_damaged_is_a_clear_error_that_changes_nothing(saved_run, tmp_path, no_model_loading):
    run_dir = copy_of(saved_run, tmp_path)
    for name in ("step-0000000", "step-0000001-low"):
        truncate(run_dir / "checkpoints" / name / "optimizer-rank0.pt")
    before = snapshot(run_dir)
    with pytest.raises(UserError, match="every one is damaged.*step-0000000: optimizer-rank0.pt is unreadable"):
        Trainer(resumed(saved_run, tmp_path, 4))
    assert snapshot(run_dir) == before


# -- config changes on resume ----------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ({"schedule.l_min": 3}, "schedule.l_min"),
    ({"data.shuffle": "false"}, "data.shuffle"),
    ({"seed": 1}, "seed"),
])
def test_a_change_that_cannot_apply_on_resume_is_refused_up_front(saved_run, tmp_path, no_model_loading, override,
                                                                  key):
    copy_of(saved_run, tmp_path)
    with pytest.raises(UserError, match=f"cannot resume .* with a changed {key} "):
        Trainer(resumed(saved_run, tmp_path, 4, **override))


def test_optimizer_settings_changed_on_resume_are_applied(saved_run, tmp_path, caplog):
    copy_of(saved_run, tmp_path)
    tokenizer = make_tokenizer()
    changed = {"optim.lr": "3e-3", "optim.weight_decay": 0.05, "optim.betas": "[0.8, 0.99]", "optim.warmup_steps": 10}
    cfg = resumed(saved_run, tmp_path, 4, **changed)
    with caplog.at_level(logging.WARNING, logger="siri.trainer"):
        trainer = Trainer(cfg, model=make_model(tokenizer), tokenizer=tokenizer)
    assert trainer.start_step == 2
    (group,) = trainer.optimizer.param_groups
    # Two optimizer steps were taken: the warm-up over 10 is at 3/10 for the next one.
    assert group["lr"] == pytest.approx(3e-3 * 3 / 10)
    assert (group["weight_decay"], group["betas"]) == (0.05, (0.8, 0.99))
    assert trainer.lr_scheduler.get_last_lr() == [group["lr"]]
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "optim.lr: 0.01 -> 0.003" in warning
    try:
        trainer.fit()
    finally:
        trainer.close()
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        rows = [json.loads(line) for line in handle]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert rows[2]["lr"] == pytest.approx(3e-3 * 3 / 10) and rows[3]["lr"] == pytest.approx(3e-3 * 4 / 10)


def test_an_unchanged_resume_restores_the_optimizer_exactly(saved_run, tmp_path):
    copy_of(saved_run, tmp_path)
    tokenizer = make_tokenizer()
    trainer = Trainer(resumed(saved_run, tmp_path, 4), model=make_model(tokenizer), tokenizer=tokenizer)
    try:
        saved = torch.load(tmp_path / "run" / "checkpoints" / "step-0000001-low" / "optimizer-rank0.pt",
                           weights_only=True)
        restored = trainer.optimizer.state_dict()["param_groups"][0]
        for key in ("lr", "betas", "weight_decay", "initial_lr"):
            assert restored[key] == saved["param_groups"][0][key], key
    finally:
        trainer.close()


# -- checked before the model loads ----------------------------------------------------------

def test_a_micro_batch_too_small_for_the_longest_prompt_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    model_dir = save_model_dir(str(tmp_path / "model"))
    # "1+2=?" prompts are 5 tokens; with the budget's 10 a sample can reach 15 tokens.
    cfg = config(tmp_path, 2, **{"model.path": model_dir, "algorithm.max_tokens_per_micro_batch": 12})

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(trainer_module, "load_model", refuse)
    with pytest.raises(UserError, match=r"algorithm.max_tokens_per_micro_batch \(12\) .* 15 tokens"):
        Trainer(cfg)


def test_the_policy_loss_settings_are_built_once_from_the_config(tmp_path):
    from siri.kernels.config import LossConfig

    tokenizer = make_tokenizer()
    cfg = config(tmp_path, 1, **{"algorithm.clip_low": 0.1, "algorithm.dual_clip": 3, "rollout.temperature": 0.7})
    trainer = Trainer(cfg, model=make_model(tokenizer), tokenizer=tokenizer)
    try:
        assert trainer.loss_settings == LossConfig(temperature=0.7, clip_low=0.1, dual_clip=3.0).__dict__
    finally:
        trainer.close()
