"""Stage 1 of the demo: supervised warm-up of the tiny model on redundant solution traces.

This produces the "base" model that RL then compresses: it solves the task and, like a
distilled reasoning model, re-checks its work a random, long-tailed number of times.

Batches are padded, not packed: the traces are short (tens to a few hundred tokens) and
padding keeps the plain Hugging Face forward, with no varlen attention. Because trace
lengths are long-tailed, a batch padded to its longest trace would be mostly padding, so
traces are drawn a pool of batches at a time, sorted by length and cut into batches of
similar lengths (the batches are then shuffled, so the order of lengths is random). The loss is the
mean next-token cross-entropy over response tokens and the final EOS; prompt tokens and
padding are masked out, so the model learns to answer, not to write questions.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from siri.demo.model import ModelSize, build_model
from siri.demo.task import TaskConfig, Trace, sample_trace
from siri.demo.tokenizer import build_tokenizer

__all__ = ["IGNORE_INDEX", "SFTConfig", "build_base_model", "collate", "train_sft"]

# Label value the Hugging Face loss, and ours, ignore.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of the warm-up. A fresh batch of traces is drawn every step (the
    task generator is an endless corpus), so there are no epochs and no overfitting."""

    steps: int = 700
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    bucket_batches: int = 8  # batches drawn, sorted by length and split together
    seed: int = 0


def collate(traces: list[Trace], tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (prompt and padding set to -100)."""
    rows, label_rows = [], []
    for trace in traces:
        prompt = tokenizer(trace.prompt_text, add_special_tokens=False)["input_ids"]
        response = tokenizer(trace.response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + response)
        label_rows.append([IGNORE_INDEX] * len(prompt) + response)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label_row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _bucketed_batches(rng: random.Random, cfg: SFTConfig, task: TaskConfig):
    """Endless batches of traces, each cut from a length-sorted pool of `bucket_batches` batches."""
    while True:
        pool = sorted((sample_trace(rng, task) for _ in range(cfg.batch_size * cfg.bucket_batches)),
                      key=lambda t: len(t.prompt_text) + len(t.response_text))
        batches = [pool[i : i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
        rng.shuffle(batches)
        yield from batches


def _lr_factor(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train_sft(model, tokenizer, cfg: SFTConfig | None = None, task: TaskConfig | None = None, *,
              log: Callable[[int, float, float], None] | None = None, log_every: int = 50) -> list[float]:
    """Train `model` in place on freshly drawn traces; returns the loss of every step.

    `log(step, loss, elapsed_s)` is called every `log_every` steps and at the last one.
    `cfg` and `task` default to `SFTConfig()` and `TaskConfig()`.
    """
    cfg, task = cfg or SFTConfig(), task or TaskConfig()
    rng = random.Random(cfg.seed)
    model.train()
    # No weight decay on norms and biases, the usual AdamW split.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    losses = []
    batches = _bucketed_batches(rng, cfg, task)
    started = time.perf_counter()
    for step in range(cfg.steps):
        batch = collate(next(batches), tokenizer)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and (step % log_every == 0 or step == cfg.steps - 1):
            log(step, losses[-1], time.perf_counter() - started)
    model.eval()
    return losses


def build_base_model(out_dir: str | os.PathLike, *, size: ModelSize | None = None, sft: SFTConfig | None = None,
                     task: TaskConfig | None = None, log: Callable[[int, float, float], None] | None = None):
    """Stage 1 end to end: build the tokenizer and tiny model, run SFT, save both to `out_dir`.

    `out_dir` is then a Hugging Face model directory (`from_pretrained`, `siri eval
    --model`, the trainer's `model.path`). Returns `(model, tokenizer, losses)`. The
    configs default to `ModelSize()`, `SFTConfig()` and `TaskConfig()`.
    """
    size, sft = size or ModelSize(), sft or SFTConfig()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, size, seed=sft.seed)
    losses = train_sft(model, tokenizer, sft, task, log=log)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer, losses
