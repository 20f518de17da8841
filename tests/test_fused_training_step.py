"""The training helper's fused path (hidden states + LM head -> loss, no [T, V] logits)
gives the loss and parameter gradients of the logits path on a real (tiny) model."""

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import tiny_model

from siri.model_forward import packed_logprobs, packed_policy_loss
from siri.packing import Sample, pack


def make_model(tie_word_embeddings):
    return tiny_model(97, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                      tie_word_embeddings=tie_word_embeddings).eval()


def make_samples():
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i, (prompt, response) in enumerate([(5, 9), (3, 1), (4, 12), (6, 7), (2, 5)]):
        ids = torch.randint(0, 97, (prompt + response,), generator=gen).tolist()
        samples.append(Sample(prompt_ids=ids[:prompt], response_ids=ids[prompt:], advantage=float(i % 3 - 1),
                              old_logprobs=(-4.6 + 0.3 * torch.randn(response, generator=gen)).tolist(),
                              group_id=i // 2))
    return samples


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_fused_matches_logits_path(tie_word_embeddings, loss_agg):
    batches = pack(make_samples(), max_tokens=24, loss_agg=loss_agg)
    assert len(batches) > 1
    results = []
    for fused in (False, True):
        model = make_model(tie_word_embeddings)
        total = 0.0
        for batch in batches:
            out = packed_policy_loss(model, batch, fused_linear=fused, chunk_size=5, kl_coef=0.0, entropy_coef=0.01)
            out.loss.backward()
            total += out.loss.item()
        results.append((total, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_logprobs_match():
    model = make_model(False)
    (batch, *_) = pack(make_samples(), max_tokens=64)
    with torch.no_grad():
        fused = packed_logprobs(model, batch, return_entropy=True)
        plain = packed_logprobs(model, batch, return_entropy=True, fused_linear=False)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
