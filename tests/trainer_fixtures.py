"""A tiny model, tokenizer and arithmetic data set that the trainer tests build themselves."""

from __future__ import annotations

import json
import os

from tiny_models import char_tokenizer, tiny_model

CHARS = list("0123456789+=?\\{}boxed ")


def make_tokenizer():
    return char_tokenizer("".join(CHARS))


def make_model(tokenizer, seed: int = 0, hidden_size: int = 32):
    """Two attention heads of `hidden_size // 2` each: vLLM's CPU attention takes 64 (hidden 128), not 16."""
    return tiny_model(len(tokenizer), seed=seed, hidden_size=hidden_size, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.eos_token_id)


def write_problems(path: str, count: int = 12) -> str:
    with open(path, "w") as handle:
        for i in range(count):
            a, b = i % 7 + 1, (3 * i) % 5 + 2
            handle.write(json.dumps({"problem": f"{a}+{b}=?", "answer": str(a + b)}) + "\n")
    return path


def save_model_dir(path: str, seed: int = 0, hidden_size: int = 32) -> str:
    tokenizer = make_tokenizer()
    make_model(tokenizer, seed, hidden_size).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_overrides(tmp_path, **extra) -> list[str]:
    """Overrides for a run of a few seconds per step on a CPU."""
    os.makedirs(tmp_path, exist_ok=True)
    data = write_problems(os.path.join(tmp_path, "train.jsonl"))
    values = {
        "data.train_files": f"[{data}]", "data.use_chat_template": "false", "data.instruction": "''",
        "schedule.kind": "cosine", "schedule.l_max": 10, "schedule.l_min": 4, "schedule.period": 4,
        "rollout.engine": "hf", "rollout.n": 3, "prompts_per_step": 2, "total_steps": 4,
        "algorithm.max_tokens_per_micro_batch": 24, "optim.lr": "1e-2", "model.dtype": "float32",
        "checkpoint.every": 100, "logging.progress": "false", "device": "cpu", "output_dir": str(tmp_path / "run"),
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def stop_reward(response_text: str, gold: str, *, truncated: bool, response_len: int, budget: int) -> float:
    """1 for a response that stopped within the budget, 0 for a truncated one: a random model
    earns it about half the time, so its updates move the weights (`reward.fn` by path)."""
    return 0.0 if truncated else 1.0
