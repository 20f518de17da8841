"""siri.integrations.trl against the installed TRL: same loss, same gradients, real training steps."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from siri.integrations.trl import SiriGRPOTrainer, trl_loss_weights  # noqa: E402
from readme_snippet import run_snippet  # noqa: E402
from trainer_fixtures import save_model_dir  # noqa: E402

TEMPERATURE = 0.7
MAX_COMPLETION = 7


def length_reward(completions, **_):
    return [len(completion) / 10 for completion in completions]


def config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE, report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, learning_rate=1e-3, bf16=False, use_bias_correction_kl=False,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def prompts():
    return Dataset.from_dict({"prompt": ["1+2=?", "3+4=?", "2+2=?", "5+1=?"]})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(str(tmp_path_factory.mktemp("trl_model")))


@pytest.fixture(scope="module")
def trainer_pair(model_dir, tmp_path_factory):
    """TRL's GRPOTrainer and SiriGRPOTrainer on two copies of one model."""
    tmp = tmp_path_factory.mktemp("trl_pair")
    theirs = GRPOTrainer(model=model_dir, reward_funcs=length_reward, args=config(tmp / "a"), train_dataset=prompts())
    ours = SiriGRPOTrainer(model=model_dir, reward_funcs=length_reward, args=config(tmp / "b"), train_dataset=prompts())
    return theirs, ours


def make_inputs(vocab, seed, *, batch=5, prompt=3, length=MAX_COMPLETION):
    generator = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(batch, length, dtype=torch.long)
    lengths = [length, 3, 0, 5, 1][:batch]  # a full row, short rows, and a fully masked one
    for row, n in enumerate(lengths):
        completion_mask[row, :n] = 1
    prompt_mask = torch.ones(batch, prompt, dtype=torch.long)
    prompt_mask[1, 0] = 0  # left padding
    logps = -torch.rand(batch, length, generator=generator) * 3
    return {
        "prompt_ids": torch.randint(3, vocab, (batch, prompt), generator=generator),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(0, vocab, (batch, length), generator=generator),
        "completion_mask": completion_mask,
        "advantages": torch.randn(batch, generator=generator),
        "old_per_token_logps": logps,
        "ref_per_token_logps": logps + 0.3 * torch.randn(batch, length, generator=generator),
        "importance_sampling_ratio": 0.5 + torch.rand(batch, length, generator=generator),
        "num_items_in_batch": completion_mask.sum() * 3,
    }


def configure(trainer, *, loss_type, beta=0.0, entropy_coef=0.0, delta=None, accumulation=1, vllm_is=False,
              epsilon_high=0.28, bias_correction=False):
    trainer.loss_type = trainer.args.loss_type = loss_type
    trainer.beta = beta
    trainer.args.use_bias_correction_kl = bias_correction
    trainer.entropy_coef = entropy_coef
    trainer._entropy_bonus_enabled = entropy_coef != 0.0
    trainer.args.delta = delta
    trainer.epsilon_high = epsilon_high
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.steps_per_generation = 2
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = vllm_is
    trainer._metrics["train"].clear()


def loss_and_grads(trainer, inputs):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo", beta=0.04),
    dict(loss_type="dr_grpo", accumulation=3),
    dict(loss_type="dapo", beta=0.1, vllm_is=True),
    dict(loss_type="luspo", delta=1.6),
    dict(loss_type="grpo", entropy_coef=0.05, accumulation=2),
    dict(loss_type="bnpo", beta=0.04, entropy_coef=0.02),
    dict(loss_type="dapo", beta=0.04, entropy_coef=0.03, epsilon_high=0.2),
    # TRL's default use_bias_correction_kl=True: k3 times the importance ratio (kl_estimator="k3_ratio").
    dict(loss_type="grpo", beta=0.04, bias_correction=True),
    dict(loss_type="dapo", beta=0.1, vllm_is=True, delta=1.6, bias_correction=True),
    dict(loss_type="bnpo", beta=0.04, entropy_coef=0.02, bias_correction=True),
    dict(loss_type="dr_grpo", beta=0.2, entropy_coef=0.03, accumulation=2, bias_correction=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
def test_loss_and_gradients_match_trl(trainer_pair, case, on_policy):
    theirs, ours = trainer_pair
    vocab = ours.model.config.vocab_size
    for seed in (0, 1):
        inputs = make_inputs(vocab, seed)
        if on_policy:
            del inputs["old_per_token_logps"]
        results = []
        for trainer in (theirs, ours):
            configure(trainer, **case)
            results.append(loss_and_grads(trainer, inputs))
        (loss_theirs, grads_theirs), (loss_ours, grads_ours) = results
        torch.testing.assert_close(loss_ours, loss_theirs, rtol=2e-5, atol=2e-6)
        assert grads_ours.keys() == grads_theirs.keys()
        for name in grads_theirs:
            torch.testing.assert_close(grads_ours[name], grads_theirs[name], rtol=1e-4, atol=2e-6, msg=name)
        for key in ("entropy", "kl", "clip_ratio/region_mean", "policy_loss"):
            theirs_metric, ours_metric = theirs._metrics["train"].get(key), ours._metrics["train"].get(key)
            assert (theirs_metric is None) == (ours_metric is None), key
            if theirs_metric:
                assert ours_metric == pytest.approx(theirs_metric, rel=1e-4, abs=1e-6), key


def test_weights_sum_to_trl_normalisation():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    ones = mask.float()
    assert (trl_loss_weights("grpo", mask, accumulation_steps=1) * ones).sum(-1).tolist() == pytest.approx(
        [1 / 3, 1 / 3, 0]
    )
    assert trl_loss_weights("bnpo", mask, accumulation_steps=2).sum().item() == pytest.approx(0.5)
    dr_grpo = trl_loss_weights("dr_grpo", mask, accumulation_steps=1, max_completion_length=4)
    assert dr_grpo.max().item() == pytest.approx(1 / 12)
    dapo = trl_loss_weights("dapo", mask, accumulation_steps=4, num_items_in_batch=torch.tensor(8), num_processes=2,
                            steps_per_generation=2)
    assert dapo.max().item() == pytest.approx(1 / 8)  # 8 tokens over 2 processes, 4 / 2 of the window
    with pytest.raises(ValueError, match="loss_type"):
        trl_loss_weights("cispo", mask, accumulation_steps=1)


@pytest.mark.parametrize("setting, message", [
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(loss_type="vespo"), "loss_type='vespo'"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(delta=1.1), "delta"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
])
def test_refuses_what_it_cannot_reproduce(model_dir, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        SiriGRPOTrainer(model=model_dir, reward_funcs=length_reward, args=config(tmp_path, **setting),
                        train_dataset=prompts())


@pytest.mark.parametrize("loss_type, beta, entropy_coef, bias_correction",
                         [("dapo", 0.0, 0.0, False), ("grpo", 0.04, 0.01, False), ("bnpo", 0.04, 0.0, True)])
def test_training_steps_change_the_model(model_dir, tmp_path, loss_type, beta, entropy_coef, bias_correction):
    args = config(tmp_path, loss_type=loss_type, beta=beta, entropy_coef=entropy_coef, max_steps=3,
                  gradient_accumulation_steps=2, per_device_train_batch_size=2, num_iterations=2,
                  use_bias_correction_kl=bias_correction)
    trainer = SiriGRPOTrainer(model=model_dir, reward_funcs=length_reward, args=args, train_dataset=prompts())
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert "lm_head.weight" in moved and len(moved) == len(before)
    assert all(key in logged[-1] for key in ("entropy", "clip_ratio/region_mean"))
    if beta:
        assert "kl" in logged[-1]


def test_readme_snippet_runs(tmp_path):
    result = run_snippet("### From TRL", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
