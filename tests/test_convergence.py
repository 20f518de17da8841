"""A tiny model trained 12 optimizer steps through packing and the fused kernels follows the
same loss and log-prob trajectory as the same training written in plain PyTorch."""

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import tiny_model

from siri.kernels.config import LossConfig
from siri.kernels.reference import policy_loss_reference
from siri.model_forward import packed_policy_loss
from siri.packing import Sample, pack

LOSS = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, entropy_coef=0.01)
STEPS = 12


def make_model():
    return tiny_model(61)


def make_samples():
    gen = torch.Generator().manual_seed(3)
    samples = []
    for i in range(12):
        prompt, response = 2 + i % 4, 1 + (5 * i) % 9
        ids = torch.randint(0, 61, (prompt + response,), generator=gen).tolist()
        samples.append(Sample(prompt_ids=ids[:prompt], response_ids=ids[prompt:],
                              advantage=float(torch.randn((), generator=gen)), group_id=i // 3))
    return samples


def siri_step(model, samples):
    """Packed micro-batches, fused LM head + loss (the default backend)."""
    total = 0.0
    for batch in pack(samples, max_tokens=20, loss_agg="token-mean"):
        out = packed_policy_loss(model, batch, **LOSS)
        out.loss.backward()
        total += out.loss.item()
    return total


def plain_step(model, samples):
    """One sample at a time, full logits, the reference formulas, autograd for gradients."""
    num_tokens = sum(len(s.response_ids) for s in samples)
    total = 0.0
    for s in samples:
        ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
        logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1]
        n = len(s.response_ids)
        out = policy_loss_reference(logits, torch.tensor(s.response_ids), torch.full((n,), s.advantage),
                                    torch.full((n,), 1.0 / num_tokens), cfg=LossConfig(**LOSS))
        out.loss.backward()
        total += out.loss.item()
    return total


def train(step_fn):
    model, samples = make_model(), make_samples()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(STEPS):
        losses.append(step_fn(model, samples))
        optimizer.step()
        optimizer.zero_grad()
    return losses, model


def test_same_trajectory_with_and_without_the_fused_kernels():
    fused_losses, fused_model = train(siri_step)
    plain_losses, plain_model = train(plain_step)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-3, abs=1e-5)
    ids = torch.tensor([[5, 9, 13, 2, 44, 7]])
    with torch.no_grad():
        start = torch.log_softmax(make_model()(input_ids=ids).logits, -1)
        a = torch.log_softmax(fused_model(input_ids=ids).logits, -1)
        b = torch.log_softmax(plain_model(input_ids=ids).logits, -1)
    assert (a - start).abs().max() > 1e-2, "training should have moved the model"
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
