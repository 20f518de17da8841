"""siri.attention: per-sample SDPA against a float64 block-diagonal reference, the choice of
implementation (flash-attn where usable, a warning where asked for but missing), and that
no configuration siri ships gives a packed micro-batch a dense [N, N] mask."""

import glob
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import tiny_models  # noqa: E402

import siri.attention as attention  # noqa: E402
from siri.attention import PACKED_SDPA, packed_sdpa_attention, resolve_attn_implementation, use_packed_attention  # noqa: E402,E501
from siri.config import TrainConfig, load_config  # noqa: E402
from siri.model_forward import packed_policy_loss  # noqa: E402
from siri.packing import Sample, pack  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


class Module(torch.nn.Module):
    """What transformers' attention functions read from the attention layer."""
    is_causal = True
    num_key_value_groups = HEADS // KV_HEADS


def reference(query, key, value, segment_ids, scale=HEAD_DIM ** -0.5):
    """float64 attention over one row with a block-diagonal causal mask: [N, Hq, D]."""
    q, k, v = (t.double()[0] for t in (query, key, value))
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=0) for t in (k, v))
    n = q.shape[1]
    allowed = (segment_ids[:, None] == segment_ids[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * scale
    return (scores.masked_fill(~allowed, -math.inf).softmax(-1) @ v).transpose(0, 1)


def qkv(n, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, HEADS, n, HEAD_DIM), (batch, KV_HEADS, n, HEAD_DIM), (batch, KV_HEADS, n, HEAD_DIM)]
    return [torch.randn(s, generator=generator, requires_grad=True) for s in shapes]


def segment_ids(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


@pytest.mark.parametrize("lengths", [[1, 5, 1, 3], [7], [2, 1, 1, 9, 1]])
def test_each_sample_attends_alone_from_cu_seq_lens(lengths):
    query, key, value = qkv(sum(lengths))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    out, weights = packed_sdpa_attention(Module(), query, key, value, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                         scaling=HEAD_DIM ** -0.5, dropout=0.0)
    assert weights is None and out.shape == (1, sum(lengths), HEADS, HEAD_DIM)
    expected = reference(query, key, value, segment_ids(lengths))
    torch.testing.assert_close(out[0].double(), expected, rtol=2e-6, atol=2e-6)
    # The gradients too: every query, key and value gets its own sample's.
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (query, key, value), grad)
    want = torch.autograd.grad(expected, (query, key, value), grad[0].double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_layers_scaling_is_used():
    lengths = [3, 4]
    query, key, value = qkv(sum(lengths), seed=2)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out, _ = packed_sdpa_attention(Module(), query, key, value, None, cu_seq_lens_q=cu, scaling=0.3)
    torch.testing.assert_close(out[0].double(), reference(query, key, value, segment_ids(lengths), scale=0.3),
                               rtol=2e-6, atol=2e-6)


def test_samples_come_from_position_ids_without_cu_seq_lens():
    # Two rows packed differently; positions restarting at 0 start a sample, as in transformers.
    rows = [[3, 1, 4], [1, 6, 1]]
    query, key, value = qkv(8, batch=2, seed=1)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])
    out, _ = packed_sdpa_attention(Module(), query, key, value, None, position_ids=position_ids,
                                   scaling=HEAD_DIM ** -0.5)
    for row, lengths in enumerate(rows):
        expected = reference(query[row:row + 1], key[row:row + 1], value[row:row + 1], segment_ids(lengths))
        torch.testing.assert_close(out[row].double(), expected, rtol=2e-6, atol=2e-6)


def test_bad_boundaries_sliding_windows_and_soft_caps_are_refused():
    query, key, value = qkv(6)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        packed_sdpa_attention(Module(), query, key, value, None, cu_seq_lens_q=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cu_seq_lens_k"):
        packed_sdpa_attention(Module(), query, key, value, None, cu_seq_lens_q=torch.tensor([0, 2, 6]),
                              cu_seq_lens_k=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="sliding-window"):
        packed_sdpa_attention(Module(), query, key, value, None, sliding_window=4)
    # Calling PyTorch's SDPA directly must not drop a soft-cap silently (Gemma 2's layers pass one).
    with pytest.raises(ValueError, match="soft-capping"):
        packed_sdpa_attention(Module(), query, key, value, None, softcap=50.0)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())


def test_auto_is_flash_attention_where_usable_and_packed_sdpa_elsewhere(monkeypatch, fresh_warnings):
    assert resolve_attn_implementation("auto", torch.device("cpu")) == PACKED_SDPA
    assert resolve_attn_implementation(None, torch.device("cpu")) == PACKED_SDPA
    assert not attention.flash_attention_available(torch.device("cpu"))
    monkeypatch.setattr(attention, "flash_attention_available", lambda device: True)
    assert resolve_attn_implementation("auto", torch.device("cuda")) == "flash_attention_2"
    assert resolve_attn_implementation("flash_attention_2", torch.device("cuda")) == "flash_attention_2"
    for kept in ("sdpa", "eager", "flex_attention", PACKED_SDPA):
        assert resolve_attn_implementation(kept, torch.device("cpu")) == kept


def test_missing_flash_attention_falls_back_with_one_warning(fresh_warnings):
    with pytest.warns(UserWarning, match="flash_attention_2 asked for.*packed_sdpa") as record:
        for _ in range(3):
            assert resolve_attn_implementation("flash_attention_2", torch.device("cpu")) == PACKED_SDPA
    assert len(record) == 1


class AttentionSpy:
    """Records every SDPA call's mask and key length while a packed step runs."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, **kwargs):
            self.calls.append((None if attn_mask is None else tuple(attn_mask.shape), key.shape[-2]))
            return original(query, key, value, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def dense_masks(self):
        return [mask for mask, _ in self.calls if mask is not None]


def packed_step(model):
    rng = np.random.default_rng(0)
    samples = [Sample(prompt_ids=rng.integers(0, 50, p), response_ids=rng.integers(0, 50, r), advantage=1.0)
               for p, r in ((3, 6), (2, 1), (5, 9))]
    (batch,) = pack(samples, 100)
    packed_policy_loss(model, batch).loss.backward()
    return batch


def tiny_model(attn_implementation="sdpa"):
    return tiny_models.tiny_model(50, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                  attn_implementation=attn_implementation)


def test_the_spy_sees_the_dense_mask_of_sdpa(monkeypatch, fresh_warnings):
    # The check below can fail: transformers' sdpa masks a packed micro-batch as a whole.
    spy = AttentionSpy(monkeypatch)
    with pytest.warns(UserWarning, match="dense"):
        batch = packed_step(tiny_model("sdpa"))
    assert spy.dense_masks() and all(mask[-2:] == (batch.num_tokens, batch.num_tokens) for mask in spy.dense_masks())


def shipped_configs():
    """The default config and every file in configs/ with a model section."""
    configs = {"default": TrainConfig()}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        configs[os.path.basename(path)] = load_config(path)
    return configs


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_no_shipped_config_gives_a_packed_micro_batch_a_dense_mask(name, monkeypatch):
    cfg = shipped_configs()[name]
    model = tiny_model("sdpa")  # as a given model (the demo's, the tests') may be built
    chosen = use_packed_attention(model, cfg.model.attn_implementation, torch.device("cpu"))
    assert chosen == PACKED_SDPA == model.config._attn_implementation
    spy = AttentionSpy(monkeypatch)
    batch = packed_step(model)
    assert spy.calls and spy.dense_masks() == []
    assert max(length for _, length in spy.calls) <= batch.max_seqlen  # one sample at a time
    # On a GPU with flash-attn the same config gets the varlen kernel, which takes no mask.
    monkeypatch.setattr(attention, "flash_attention_available", lambda device: True)
    assert resolve_attn_implementation(cfg.model.attn_implementation, torch.device("cuda")) == "flash_attention_2"


def test_the_trainer_switches_a_given_model_to_packed_attention(tmp_path):
    from siri.config import load_config as load
    from siri.trainer import Trainer
    from trainer_fixtures import make_model, make_tokenizer, tiny_overrides

    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    assert model.config._attn_implementation == "sdpa"
    trainer = Trainer(load(None, tiny_overrides(tmp_path)), model=model, tokenizer=tokenizer)
    assert trainer.model.config._attn_implementation == PACKED_SDPA
