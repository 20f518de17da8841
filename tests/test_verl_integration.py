"""siri.integrations.verl against the installed verl: same loss, same gradients, real engine steps."""

from __future__ import annotations

import functools
import math
import os
import re

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("tensordict")

import verl_cpu_platform  # noqa: E402,F401  (before verl picks its platform)
from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo.core_algos import agg_loss  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from siri.integrations.verl import LOSS_AGG_MODES, unsupported_settings, verl_loss_weights  # noqa: E402
from readme_snippet import run_snippet  # noqa: E402
from trainer_fixtures import save_model_dir  # noqa: E402

TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


def actor_config(**overrides):
    settings = dict(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2,
                    clip_ratio_high=0.28, use_torch_compile=False)
    settings.update(overrides)
    return ActorConfig(**settings)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("global_info", [{}, dict(dp_size=2, batch_num_tokens=17, global_batch_size=6)])
def test_weights_equal_verl_agg_loss(mode, global_info):
    generator = torch.Generator().manual_seed(3)
    mask = (torch.rand(4, 9, generator=generator) > 0.3).float()
    mask[2] = 0  # a fully masked sequence
    loss_mat = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    for scale in (None, 5):
        expected = agg_loss(loss_mat, mask, mode, loss_scale_factor=scale, **global_info)
        weights = verl_loss_weights(mask, mode, loss_scale_factor=scale, **global_info)
        torch.testing.assert_close((weights.double() * loss_mat).sum(), expected, rtol=1e-6, atol=1e-7)


def test_low_var_kl_is_verls_kl_penalty():
    """The oracle's low_var_kl is verl's kl_penalty "low_var_kl" (and "k3"), value and gradient, in
    float64, on both sides of both clamps, at the clamps' edges and at infinite d."""
    from verl.trainer.ppo.core_algos import kl_penalty

    from siri.kernels.reference import kl_penalty as oracle_kl, kl_slope

    d = torch.cat([torch.linspace(-30, 30, 601, dtype=torch.float64),
                   torch.tensor([-20.0, 20.0, -11.0, 2.5, float("inf"), -float("inf")], dtype=torch.float64)])
    ref = torch.full_like(d, -2.0)
    logp = (ref - d).requires_grad_(True)
    ours = oracle_kl(logp, ref, "low_var_kl")
    (our_grad,) = torch.autograd.grad(ours.sum(), [logp])
    assert ((ours == 10) & (d.abs() < 20)).any() and (ours < 10).any()
    for name in ("low_var_kl", "k3"):
        theirs = kl_penalty(logp, ref, name)
        (their_grad,) = torch.autograd.grad(theirs.sum(), [logp])
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(our_grad, their_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl_slope(logp.detach(), ref, "low_var_kl"), their_grad, rtol=1e-12, atol=1e-12)


def test_seq_mean_token_sum_norm_divides_by_sequences_and_length():
    mask = torch.ones(3, 4)
    weights = verl_loss_weights(mask, "seq-mean-token-sum-norm", global_batch_size=3, loss_scale_factor=8)
    assert weights.max().item() == pytest.approx(1 / (3 * 8))


@pytest.mark.parametrize("setting, message", [
    (dict(policy_loss={"loss_mode": "gspo"}), "loss_mode"),
    (dict(use_kl_loss=True, kl_loss_type="k3+"), "kl_loss_type='k3\\+'"),
    (dict(use_kl_loss=True, kl_loss_type="abs"), "kl_loss_type='abs'"),
])
def test_refuses_what_it_cannot_reproduce(setting, message):
    assert any(re.search(message, problem) for problem in unsupported_settings(actor_config(**setting)))


def test_engine_refuses_an_unsupported_loss(engine_pair):
    _, ours = engine_pair
    data = make_batch(ours.module.config.vocab_size, seed=0)
    config = actor_config(use_kl_loss=True, kl_loss_type="abs")
    with ours.train_mode(), pytest.raises(ValueError, match="kl_loss_type='abs'"):
        ours.forward_backward_batch(data, functools.partial(ppo_loss, config=config), forward_only=False)


def make_batch(vocab, seed, *, batch=4, prompt=3, response=6, far_ref=False):
    """A left/right padded rollout batch as verl's trainer hands it to the actor, in its no-padding form.

    far_ref: every other response token's reference log-prob 12 below the untrained model's
    (about -log V), where verl's clamp of k3 at 10 binds; the others stay near the old log-probs.
    """
    generator = torch.Generator().manual_seed(seed)
    prompt_lens, response_lens = [3, 2, 3, 1][:batch], [6, 4, 1, 3][:batch]
    input_ids = torch.zeros(batch, prompt + response, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        attention_mask[row, prompt - p: prompt + r] = 1
    input_ids[attention_mask.bool()] = torch.randint(3, vocab, (int(attention_mask.sum()),), generator=generator)
    response_mask = attention_mask[:, prompt:].clone()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    old = -torch.rand(batch, response, generator=generator) * 3
    ref = old + 0.3 * torch.randn(batch, response, generator=generator)
    if far_ref:
        ref[:, ::2] = -math.log(vocab) - 12.0
    fields = dict(
        input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask, position_ids=position_ids,
        prompts=input_ids[:, :prompt], responses=input_ids[:, prompt:], old_log_probs=old,
        advantages=torch.randn(batch, 1, generator=generator).expand(batch, response).contiguous(),
        ref_log_prob=ref,
        rollout_is_weights=0.5 + torch.rand(batch, response, generator=generator),
    )
    data = left_right_2_no_padding(TensorDict(fields, batch_size=[batch]))
    tu.assign_non_tensor(data, temperature=TEMPERATURE, use_remove_padding=True, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=2, global_batch_size=batch, use_fused_kernels=False)
    return data


def build_engine(engine_cls, model_dir):
    import verl.models.transformers.monkey_patch as monkey_patch
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    # verl 0.9 imports TRL's value-head model when TRL is installed, which TRL 1.16 no longer has.
    monkey_patch.is_trl_available = lambda: False
    engine = engine_cls(
        model_config=HFModelConfig(path=model_dir, override_config={"attn_implementation": "sdpa"},
                                   enable_gradient_checkpointing=False),
        engine_config=FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, model_dtype="fp32",
                                       mixed_precision={"param_dtype": "fp32"}),  # float32 parity
        optimizer_config=FSDPOptimizerConfig(lr=1e-3, total_training_steps=10, clip_grad=1e9),
        checkpoint_config=CheckpointConfig(),
    )
    engine.initialize()
    return engine


@pytest.fixture(scope="module")
def engine_pair(process_group, tmp_path_factory):
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from siri.integrations.verl import SiriFSDPEngineWithLMHead

    model_dir = save_model_dir(str(tmp_path_factory.mktemp("verl_model")))
    return build_engine(FSDPEngineWithLMHead, model_dir), build_engine(SiriFSDPEngineWithLMHead, model_dir)


def grads(engine):
    return {name: p.grad.full_tensor().clone() for name, p in engine.module.named_parameters() if p.grad is not None}


CASES = [
    dict(loss_agg_mode="token-mean"),
    dict(loss_agg_mode="token-sum", entropy_coeff=0.01),
    dict(loss_agg_mode="seq-mean-token-sum", use_kl_loss=True, kl_loss_type="k1", kl_loss_coef=0.1),
    dict(loss_agg_mode="seq-mean-token-mean", use_kl_loss=True, kl_loss_type="mse", kl_loss_coef=0.05,
         entropy_coeff=0.02),
    dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=4, clip_ratio_c=2.0),
    # verl's k3 clamped to [-10, 10] (the kernel's low_var_kl), with the clamp binding on half the tokens.
    dict(loss_agg_mode="token-mean", use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.1, far_ref=True),
    dict(loss_agg_mode="seq-mean-token-mean", use_kl_loss=True, kl_loss_type="k3", kl_loss_coef=0.05,
         entropy_coeff=0.01, far_ref=True),
    dict(loss_agg_mode="seq-mean-token-sum", use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()))
@pytest.mark.parametrize("rollout_is", [False, True], ids=["no_is", "rollout_is"])
def test_engine_step_matches_verl(engine_pair, case, rollout_is):
    theirs, ours = engine_pair
    case = dict(case)
    far_ref = case.pop("far_ref", False)
    config = actor_config(**case)
    loss_function = functools.partial(ppo_loss, config=config)
    results = []
    for engine in (theirs, ours):
        data = make_batch(engine.module.config.vocab_size, seed=7, far_ref=far_ref)
        if not rollout_is:
            data.pop("rollout_is_weights")
        tu.assign_non_tensor(data, calculate_entropy=case.get("entropy_coeff", 0) != 0)
        with engine.train_mode():
            engine.optimizer_zero_grad()
            output = engine.forward_backward_batch(data, loss_function, forward_only=False)
            results.append((output, grads(engine)))
    (out_theirs, grads_theirs), (out_ours, grads_ours) = results
    torch.testing.assert_close(torch.tensor(out_ours["loss"]), torch.tensor(out_theirs["loss"]), rtol=2e-5, atol=2e-6)
    assert grads_ours.keys() == grads_theirs.keys() and grads_theirs
    for name in grads_theirs:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], rtol=1e-4, atol=2e-6, msg=name)


def test_training_steps_follow_verl(process_group, tmp_path):
    """Three optimizer steps of verl's engine and of siri's from one model end at the same parameters."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    from siri.integrations.verl import SiriFSDPEngineWithLMHead

    model_dir = save_model_dir(str(tmp_path / "model"))
    config = actor_config(loss_agg_mode="seq-mean-token-mean", use_kl_loss=True, kl_loss_type="k2",
                          kl_loss_coef=0.05, entropy_coeff=0.01)
    loss_function = functools.partial(ppo_loss, config=config)
    finals, losses = [], []
    for engine_cls in (FSDPEngineWithLMHead, SiriFSDPEngineWithLMHead):
        engine = build_engine(engine_cls, model_dir)
        before = {name: p.full_tensor().clone() for name, p in engine.module.named_parameters()}
        step_losses = []
        for step in range(3):
            data = make_batch(engine.module.config.vocab_size, seed=step)
            tu.assign_non_tensor(data, calculate_entropy=True)
            with engine.train_mode():
                output = engine.train_batch(data, loss_function)
            step_losses.append(sum(output["loss"]))
        after = {name: p.full_tensor().clone() for name, p in engine.module.named_parameters()}
        assert all(not torch.equal(after[name], before[name]) for name in before)
        finals.append(after)
        losses.append(step_losses)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_register_engine_makes_verl_build_siri_engine():
    from verl.workers.engine.base import EngineRegistry

    from siri.integrations.verl import SiriFSDPEngineWithLMHead, register_engine

    engines = EngineRegistry._engines["language_model"]
    saved = {backend: dict(entries) for backend, entries in engines.items()}
    try:
        register_engine(devices=("cpu",))
        assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is SiriFSDPEngineWithLMHead
    finally:
        for backend, entries in saved.items():
            engines[backend] = entries


def test_readme_snippet_runs(tmp_path):
    result = run_snippet("### From verl", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensor(" in result.stdout
