"""Mixed precision: float32 master weights with a bfloat16 forward (siri.precision)."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from trainer_fixtures import make_model, make_tokenizer, tiny_overrides

from siri.config import load_config
from siri.model_forward import packed_logprobs, packed_policy_loss
from siri.packing import Sample, pack
from siri.precision import compute_context, parameter_dtype
from siri.trainer import Trainer


def changed_fraction(model, before) -> float:
    changed = sum((p.detach() != before[n]).sum().item() for n, p in model.named_parameters())
    return changed / sum(p.numel() for p in model.parameters())


def one_step_at_paper_lr(tmp_path, model):
    """One trainer step at lr 1e-6 with a bfloat16 forward; an entropy bonus gives every
    step a gradient whatever the rewards. Returns (trainer, fraction of elements moved,
    dtypes of a decoder layer's output during the update)."""
    cfg = load_config(None, tiny_overrides(tmp_path, total_steps=1, **{
        "model.dtype": "bfloat16", "optim.lr": "1e-6", "algorithm.entropy_coef": 0.01}))
    trainer = Trainer(cfg, model=model, tokenizer=make_tokenizer(), resume=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    seen = set()
    hook = trainer.model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    try:
        trainer.train_step(0)
    finally:
        hook.remove()
        trainer.close()
    return trainer, changed_fraction(trainer.model, before), seen


def test_float32_master_weights_keep_updates_that_bfloat16_weights_lose(tmp_path):
    tokenizer = make_tokenizer()
    trainer, moved, seen = one_step_at_paper_lr(tmp_path / "mixed", make_model(tokenizer))
    assert parameter_dtype(trainer.model) == torch.float32
    assert seen == {torch.bfloat16}  # the forward ran in the compute dtype
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32
    assert moved > 0.5, moved

    # The same step on bfloat16 parameters: AdamW's ~1e-6 moves round back to the old weights.
    _, moved_bf16, _ = one_step_at_paper_lr(tmp_path / "bf16", make_model(tokenizer).to(torch.bfloat16))
    assert moved_bf16 < 0.1, moved_bf16


def test_fused_head_follows_autocast():
    # Under autocast the fused LM head + loss runs in bfloat16 like the unfused head(hidden),
    # and the float32 head weight gets a float32 gradient.
    tokenizer = make_tokenizer()
    model = make_model(tokenizer).eval()
    rng = np.random.default_rng(0)
    vocab = len(tokenizer)
    samples = [Sample(prompt_ids=rng.integers(2, vocab, 4), response_ids=rng.integers(2, vocab, n),
                      advantage=float(rng.standard_normal())) for n in (5, 3, 7)]
    (batch,) = pack(samples, 64)
    outputs, grads = {}, {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = packed_policy_loss(model, batch, fused_linear=fused, entropy_coef=0.01)
            with torch.no_grad():
                logprobs = packed_logprobs(model, batch, fused_linear=fused)
        out.loss.backward()
        outputs[fused], grads[fused] = (out.loss.detach(), logprobs), model.lm_head.weight.grad
        assert grads[fused].dtype == torch.float32
    torch.testing.assert_close(outputs[True][0], outputs[False][0], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(outputs[True][1], outputs[False][1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[True], grads[False], rtol=2e-2, atol=2e-3)
    with torch.no_grad():  # and both are bfloat16 results, not float32 ones
        full = packed_logprobs(model, batch, fused_linear=True)
    assert not torch.equal(full, outputs[True][1])


def test_compute_context_engages_autocast_only_when_the_dtypes_differ():
    device = torch.device("cpu")
    with compute_context(device, torch.float32, torch.float32)():
        assert not torch.is_autocast_enabled("cpu")
    with compute_context(device, torch.bfloat16, torch.float32)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.warns(UserWarning, match="underflow"):
        compute_context(device, torch.float16, torch.float32)


def test_mixed_parameter_dtypes_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(ValueError, match="model: expected one floating-point parameter dtype"):
        parameter_dtype(model)
