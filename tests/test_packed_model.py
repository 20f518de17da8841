"""A packed forward/backward through a real (tiny, random) Hugging Face model equals running
each sample alone: same log-probs, and for every loss_agg the same mini-batch loss and
parameter gradients as a plain per-sample reference written here.

The models are Qwen2 and Llama at toy size in float32 and eval mode (no dropout), under
each attention implementation present: "packed_sdpa" (siri.attention: per-sample SDPA from
the batch's cu_seq_lens, no mask), "sdpa" and "eager" (transformers' packed-sequence
detection from position_ids restarting at 0, with a dense block-diagonal mask),
"flash_attention_2" where flash-attn and a GPU are, and "flex_attention" for the forward
(PyTorch has no flex-attention backward on a CPU).
"""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import ARCHITECTURES, tiny_model

from siri.attention import PACKED_SDPA, flash_attention_available
from siri.distributed import _decoder_layers
from siri.model_forward import (
    decoder_body,
    enable_activation_checkpointing,
    packed_hidden_states,
    packed_logprobs,
    packed_policy_loss,
)
from siri.packing import LOSS_AGGS, Sample, pack, unpack

VOCAB = 131  # odd on purpose: no power-of-two block sizes line up with it
ATTN_IMPLEMENTATIONS = [PACKED_SDPA, "sdpa", "eager"]
LOSS_KWARGS = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3")
L_NORM = 32

# (prompt, response, truncated). A one-token response, a one-token prompt, an empty
# response (scores nothing), a truncated one, and lengths that force several micro-batches.
SPECS = [(5, 9, False), (3, 1, False), (1, 6, False), (4, 0, False), (6, 14, True), (2, 3, False),
         (7, 11, False), (3, 5, False), (1, 1, False)]
MAX_TOKENS = 24


def make_model(attn_implementation, architecture="qwen2"):
    model = tiny_model(VOCAB, architecture=architecture, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, attn_implementation=attn_implementation).eval()
    assert model.config._attn_implementation == attn_implementation
    return model


@pytest.fixture(scope="module", params=[(arch, attn) for arch in ARCHITECTURES for attn in ATTN_IMPLEMENTATIONS],
                ids=lambda p: "-".join(p))
def model(request):
    architecture, attn = request.param
    return make_model(attn, architecture)


@pytest.fixture(scope="module")
def qwen2():
    return make_model(PACKED_SDPA)


def make_samples(seed=0):
    """Random rollouts with old / ref log-probs near the model's, so ratios clip sometimes."""
    rng = np.random.default_rng(seed)
    samples = []
    for prompt_len, response_len, truncated in SPECS:
        samples.append(Sample(
            prompt_ids=rng.integers(0, VOCAB, prompt_len), response_ids=rng.integers(0, VOCAB, response_len),
            advantage=float(rng.standard_normal()) if response_len % 2 else rng.standard_normal(response_len),
            old_logprobs=np.log(1 / VOCAB) + 0.3 * rng.standard_normal(response_len),
            ref_logprobs=np.log(1 / VOCAB) + 0.3 * rng.standard_normal(response_len),
            truncated=truncated,
        ))
    return samples


def alone_logprobs(model, sample):
    """The reference: one sample, a plain full forward, log_softmax over all its positions."""
    ids = torch.cat([torch.as_tensor(sample.prompt_ids), torch.as_tensor(sample.response_ids)]).long()
    logits = model(input_ids=ids[None], use_cache=False).logits[0]
    prompt_len = len(sample.prompt_ids)
    return torch.log_softmax(logits[prompt_len - 1:-1].float(), dim=-1).gather(-1, ids[prompt_len:, None])[:, 0]


def reference_loss(model, samples, loss_agg, mask_truncated=False):
    """The mini-batch loss written out per sample: clipped PPO + k3 KL, aggregated by loss_agg."""
    per_sample = []
    for sample in samples:
        if len(sample.response_ids) == 0 or (mask_truncated and sample.truncated):
            continue
        logp = alone_logprobs(model, sample)
        advantage = torch.as_tensor(np.broadcast_to(sample.advantage, logp.shape).copy(), dtype=torch.float32)
        old = torch.as_tensor(sample.old_logprobs, dtype=torch.float32)
        ref = torch.as_tensor(sample.ref_logprobs, dtype=torch.float32)
        ratio = torch.exp(torch.clamp(logp - old, -20, 20))
        clip_low, clip_high = LOSS_KWARGS["clip_low"], LOSS_KWARGS["clip_high"]
        pg = torch.maximum(-advantage * ratio, -advantage * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
        d = ref - logp
        per_sample.append(pg + LOSS_KWARGS["kl_coef"] * (torch.exp(d) - d - 1))
    if loss_agg == "token-mean":
        return torch.cat(per_sample).sum() / sum(x.numel() for x in per_sample)
    if loss_agg == "seq-mean-token-mean":
        return torch.stack([x.mean() for x in per_sample]).mean()
    if loss_agg == "seq-mean-token-sum":
        return torch.stack([x.sum() for x in per_sample]).mean()
    return torch.stack([x.sum() for x in per_sample]).mean() / L_NORM


def gradients(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_logprobs_equal_each_sample_alone(model):
    samples = make_samples()
    batches = pack(samples, MAX_TOKENS)
    assert len(batches) > 1 and any(len(b.sample_ids) > 1 for b in batches)  # really packed, several bins
    with torch.no_grad():
        packed = unpack([packed_logprobs(model, b) for b in batches], batches)
        for sample, got in zip(samples, packed):
            assert got.dtype == torch.float32 and got.numel() == len(sample.response_ids)
            torch.testing.assert_close(got, alone_logprobs(model, sample), rtol=1e-5, atol=1e-5)


def test_flex_attention_logprobs_equal_each_sample_alone():
    # Forward only, in one micro-batch (each new length compiles flex attention for about
    # 20 s on a CPU); PyTorch has no flex-attention backward on a CPU, so no training there.
    # Each sample alone goes through eager attention with the same weights: transformers' flex
    # attention on one unpacked sequence is not an oracle on every CPU (on a 2-core AMD EPYC,
    # AVX2, an 8-token sample came out 0.26 and then 0.013 off eager, run to run, while the
    # packed forward matched eager to 5e-7).
    model = make_model("flex_attention")
    eager = make_model("eager")
    eager.load_state_dict(model.state_dict())
    samples = make_samples()
    (batch,) = pack(samples, 1000)
    with torch.no_grad():
        packed = unpack([packed_logprobs(model, batch)], [batch])
        for sample, got in zip(samples, packed):
            torch.testing.assert_close(got, alone_logprobs(eager, sample), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attention_available(torch.device("cuda")), reason="needs flash-attn")
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_flash_attention_varlen_equals_packed_sdpa(architecture):
    # flash-attn runs in bfloat16 only: its packed loss and gradients against packed_sdpa's
    # on the same model and batches, at bfloat16's tolerance.
    samples = make_samples(seed=3)
    batches = [b.to("cuda") for b in pack(samples, MAX_TOKENS)]
    results = []
    for attn in ("flash_attention_2", PACKED_SDPA):
        model = make_model(attn, architecture).to(device="cuda", dtype=torch.bfloat16)
        total = sum(packed_policy_loss(model, batch, **LOSS_KWARGS).loss for batch in batches)
        total.backward()
        results.append((total.detach().float(), gradients(model)))
    (loss, grads), (expected, expected_grads) = results
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-3)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name].float(), grad.float(), rtol=5e-2, atol=5e-3, msg=name)


def test_attention_does_not_cross_samples(model):
    # Changing every token of sample 0 leaves the hidden states of the others bit for bit.
    samples = make_samples()[:3]
    changed = make_samples()[:3]
    changed[0].prompt_ids = (np.asarray(changed[0].prompt_ids) + 1) % VOCAB
    changed[0].response_ids = (np.asarray(changed[0].response_ids) + 1) % VOCAB
    with torch.no_grad():
        (a,), (b,) = pack(samples, 100), pack(changed, 100)
        ha, hb = packed_hidden_states(model, a), packed_hidden_states(model, b)
    others = a.sample_index != 0
    assert not torch.equal(ha[~others], hb[~others])
    torch.testing.assert_close(ha[others], hb[others], rtol=0, atol=1e-6)


def test_keywords_accepted_by_the_full_model(model):
    # The same kwargs drive the full causal LM: the logits at logit_index agree.
    (batch,) = pack(make_samples()[:4], 100)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[0, batch.logit_index]
        expected = torch.log_softmax(logits, -1).gather(-1, batch.targets[:, None])[:, 0]
        torch.testing.assert_close(packed_logprobs(model, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_loss_and_gradients_equal_the_unpacked_mini_batch(model, loss_agg, mask_truncated):
    samples = make_samples(seed=1)
    batches = pack(samples, MAX_TOKENS, loss_agg, loss_norm_length=L_NORM, mask_truncated=mask_truncated)
    assert len(batches) > 1

    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for batch in batches:  # gradient accumulation over the micro-batches of one step
        out = packed_policy_loss(model, batch, **LOSS_KWARGS)
        out.loss.backward()
        total += out.loss.detach()
        assert out.logprobs.shape == (batch.num_scored,)
    packed_grads = gradients(model)

    model.zero_grad(set_to_none=True)
    expected = reference_loss(model, samples, loss_agg, mask_truncated)
    expected.backward()
    reference_grads = gradients(model)

    torch.testing.assert_close(total, expected.detach(), rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)


def test_loss_keywords_from_the_batch_are_refused(qwen2):
    model = qwen2
    (batch,) = pack(make_samples()[:2], 100)
    with pytest.raises(ValueError, match="loss_kwargs"):
        packed_policy_loss(model, batch, weights=torch.ones(batch.num_scored))
    with pytest.raises(ValueError, match="batch"):
        packed_policy_loss(model, {"input_ids": batch.input_ids})


def test_the_body_is_found_where_get_decoder_gives_none(qwen2, monkeypatch):
    model = qwen2
    # transformers 4.x's generic get_decoder() returns None for Qwen2 and Llama (the
    # versions vLLM 0.10 and 0.11 pin); the body then comes from base_model.
    (batch,) = pack(make_samples()[:3], 100)
    with torch.no_grad():
        expected = packed_hidden_states(model, batch)
        monkeypatch.setattr(model, "get_decoder", lambda: None)
        assert decoder_body(model) is model.model
        torch.testing.assert_close(packed_hidden_states(model, batch), expected, rtol=0, atol=0)
    assert [type(layer).__name__ for layer in _decoder_layers(model)] == ["Qwen2DecoderLayer"] * 2


def test_a_model_without_a_body_or_layers_is_refused():
    with pytest.raises(ValueError, match="get_decoder"):
        decoder_body(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="_no_split_modules"):
        _decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    # model.gradient_checkpointing (on in configs/siri-1.5b.yaml) recomputes each layer in
    # the backward; the hook that takes the body's output must still see the right tensor.
    samples = make_samples(seed=2)
    batches = pack(samples, MAX_TOKENS)
    results = []
    for checkpointing in (False, True):
        model = make_model(PACKED_SDPA).train()  # train mode: transformers checkpoints only then
        if checkpointing:
            enable_activation_checkpointing(model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        total = sum(packed_policy_loss(model, batch, **LOSS_KWARGS).loss for batch in batches)
        total.backward()
        results.append((total.detach(), gradients(model)))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
