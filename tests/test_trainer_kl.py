"""The trainer with a KL term to a reference model, under every KL estimator the config accepts.

Each run is what a user types: a YAML config file (`algorithm.kl_coef` > 0, an
`algorithm.kl_estimator`) and `siri train --config FILE`, on a tiny model saved to a
directory. A spy on the trainer's loss call keeps each micro-batch and copies of the policy
as it was then, at the start of the step and at the start of the run; afterwards the float64
oracle (`siri.kernels.reference`) recomputes from them the policy's, the old and the
reference log-probs, and the step's KL and loss, which the logged `kl` and `loss` must
equal: for the run's own estimator, and (at some step) for no other.
"""

import copy
import dataclasses
import json
import math
import os
import re
from typing import NamedTuple

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from trainer_fixtures import save_model_dir, tiny_overrides

import siri.trainer
from siri import cli
from siri.config import load_config, loss_config, parse_overrides
from siri.errors import UserError
from siri.kernels.config import KL_ESTIMATORS, LossConfig
from siri.kernels.reference import logprobs_and_entropy, per_token_loss
from siri.model_forward import lm_head_logits, packed_hidden_states

ESTIMATORS = sorted(KL_ESTIMATORS)
STEPS = 3
# The logged KL and loss, from float32 log-probs, against the float64 oracle's.
RTOL_METRIC, ATOL_METRIC = 1e-5, 1e-7
# Two optimizer steps per rollout batch: the second mini-batch is off-policy, so k3_ratio's
# ratio is not 1 there (on-policy it equals k3). A large rate moves the policy far enough
# from the reference within three steps that low_var_kl's clamp at 10 binds on some token.
# A reward a random model earns about half the time, so that the advantages are not all 0.
KL_SETTINGS = {"algorithm.kl_coef": 0.05, "algorithm.mini_batches": 2, "optim.lr": 0.1, "optim.grad_clip": "null",
               "reward.fn": "trainer_fixtures:stop_reward"}


def write_config(tmp_path, model_dir: str, estimator) -> str:
    """A config file holding what `tiny_overrides` sets, the KL settings and `estimator`."""
    overrides = tiny_overrides(tmp_path, total_steps=STEPS, **{"model.path": model_dir, **KL_SETTINGS})
    values = parse_overrides(overrides + [f"algorithm.kl_estimator={estimator}"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


class LogProbs(NamedTuple):
    """One kind of log-probs of a micro-batch (the policy's, the old or the reference ones)."""

    trainer: torch.Tensor  # what the trainer computed (float32)
    oracle: torch.Tensor  # `siri.kernels.reference` on a float64 copy of the model
    float32: torch.Tensor  # the oracle's formulas on the float32 model: plain PyTorch's error there


def scored(model, batch, trainer_values: torch.Tensor, temperature: float) -> tuple[LogProbs, torch.Tensor]:
    """The batch's log-probs under a copy of `model`, and the oracle's entropy."""
    model = copy.deepcopy(model)
    found = {}
    for dtype in (torch.float32, torch.float64):
        model = model.to(dtype)
        with torch.no_grad():
            logits = lm_head_logits(packed_hidden_states(model, batch), model)
        found[dtype] = logprobs_and_entropy(logits, batch.targets, temperature)
    logprobs = LogProbs(trainer_values.detach().double(), found[torch.float64][0], found[torch.float32][0].double())
    return logprobs, found[torch.float64][1]


def oracle(calls: list[dict], settings: LossConfig, optimizer_steps: int) -> tuple[float, float]:
    """The step's KL (weighted mean over its micro-batches) and loss (the mean over its
    optimizer steps of the mini-batch losses), by the float64 oracle."""
    kl_sum = loss_sum = weight = 0.0
    for call in calls:
        loss, kl, _, _ = per_token_loss(call["policy"].oracle, call["entropy"], call["advantages"], call["old"].oracle,
                                        call["ref"].oracle, None, settings)
        kl_sum += float((call["weights"] * kl).sum())
        loss_sum += float((call["weights"] * loss).sum())
        weight += float(call["weights"].sum())
    return kl_sum / weight, loss_sum / optimizer_steps


def train_with_spy(monkeypatch, config_path: str) -> tuple[list[dict], dict[int, list[dict]]]:
    """Run `siri train --config config_path` in this process; the logged rows, and per step
    each micro-batch's loss inputs with the log-probs (`LogProbs`) of the policy, the old
    policy (its state at the start of the step) and the reference (at the start of the run)."""
    recorded: dict[int, list[dict]] = {}
    models: dict = {}
    real_step, real_loss = siri.trainer.Trainer.train_step, siri.trainer.packed_policy_loss

    def train_step(trainer, step):
        models["old"] = copy.deepcopy(trainer.model)
        models.setdefault("ref", models["old"])
        models["step"] = step
        return real_step(trainer, step)

    def packed_policy_loss(model, batch, **loss_kwargs):
        before = copy.deepcopy(model)  # the policy this loss is computed with
        out = real_loss(model, batch, **loss_kwargs)
        temperature = loss_kwargs["temperature"]
        policy, entropy = scored(before, batch, out.logprobs, temperature)
        recorded.setdefault(models["step"], []).append({
            "weights": batch.weights.double(), "advantages": batch.advantages.double(), "entropy": entropy,
            "policy": policy, "old": scored(models["old"], batch, batch.old_logprobs, temperature)[0],
            "ref": scored(models["ref"], batch, batch.ref_logprobs, temperature)[0],
        })
        return out

    monkeypatch.setattr(siri.trainer.Trainer, "train_step", train_step)
    monkeypatch.setattr(siri.trainer, "packed_policy_loss", packed_policy_loss)
    assert cli.main(["train", "--config", config_path]) == 0
    with open(os.path.join(load_config(config_path).output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle], recorded


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(str(tmp_path_factory.mktemp("model")))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_logged_kl_and_loss_are_the_oracles(tmp_path, monkeypatch, model_dir, estimator):
    config_path = write_config(tmp_path, model_dir, estimator)
    cfg = load_config(config_path)
    assert cfg.algorithm.kl_estimator == estimator
    rows, recorded = train_with_spy(monkeypatch, config_path)
    assert [row["step"] for row in rows] == list(range(STEPS))
    told_apart = set()
    for row in rows:
        calls = recorded[row["step"]]
        for call in calls:
            # The reference model is the policy at the start of the run, the old log-probs its
            # state at the start of the step; the trainer's float32 log-probs are as close to
            # the oracle's as plain PyTorch's in float32 (plus 1e-6, two float32 ulps at the
            # largest |logp| here, about 7.7).
            for name in ("policy", "old", "ref"):
                trainer_error = float((call[name].trainer - call[name].oracle).abs().max())
                float32_error = float((call[name].float32 - call[name].oracle).abs().max())
                assert trainer_error <= 2 * float32_error + 1e-6, (name, trainer_error, float32_error)
        expected = {name: oracle(calls, dataclasses.replace(loss_config(cfg), kl_estimator=name),
                                 cfg.algorithm.mini_batches) for name in ESTIMATORS}
        assert math.isfinite(row["kl"]) and math.isfinite(row["loss"])
        assert (row["kl"], row["loss"]) == pytest.approx(expected[estimator], rel=RTOL_METRIC, abs=ATOL_METRIC)
        told_apart |= {name for name, values in expected.items()
                       if (row["kl"], row["loss"]) != pytest.approx(values, rel=RTOL_METRIC, abs=ATOL_METRIC)}
    # The figures match this estimator's oracle and, at some step, differ from every other's:
    # the run really took the estimator it was given.
    assert told_apart == set(ESTIMATORS) - {estimator}


def _kl_config(tmp_path, estimator: str) -> str:
    """A config file that sets only the KL term (and an output_dir of its own)."""
    path = tmp_path / "config.yaml"
    path.write_text(f"algorithm:\n  kl_coef: 0.1\n  kl_estimator: {estimator}\noutput_dir: {tmp_path / 'run'}\n")
    return str(path)


@pytest.mark.parametrize("value, message", [
    ("k4", "algorithm.kl_estimator must be one of " + re.escape(str(ESTIMATORS)) + ", got 'k4'"),
    ("K3", "algorithm.kl_estimator must be one of .*, got 'K3'"),  # the names are case-sensitive
    ("3", "algorithm.kl_estimator must be a string, got 3"),
    ("null", "algorithm.kl_estimator must be a string, got None"),
])
def test_the_config_file_refuses_an_unknown_estimator_naming_the_key(tmp_path, capsys, value, message):
    path = _kl_config(tmp_path, value)
    with pytest.raises(UserError, match=message):
        load_config(path)
    assert cli.main(["train", "--config", path]) == 2
    assert re.search(f"^siri train: error: {message}$", capsys.readouterr().err.strip())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_config_file_takes_every_estimator(tmp_path, estimator):
    path = _kl_config(tmp_path, estimator)
    assert loss_config(load_config(path)).kl_estimator == estimator
