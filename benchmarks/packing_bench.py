"""One policy-update step (forward, loss, backward) on packed micro-batches vs padded ones.

Setting: one mini-batch of rollouts with long-tailed lengths (log-normal responses, a few
truncated at the length budget), the paper's GRPO loss (old log-probs, token-mean, the clip
`siri train` uses by default: `LOSS_KWARGS`), one process, the same model and the same
samples for every method:

- packed-<attention>: `siri.packing.pack` into micro-batches of at most `max_tokens`
  tokens, the body run once per micro-batch, the LM head and loss on the response
  positions only (`siri.model_forward.packed_policy_loss`), once per attention
  implementation: "packed_sdpa" (per-sample SDPA, `siri.attention`), "flash_attention_2"
  (flash-attn's varlen kernel, where flash-attn is installed on CUDA), "flex_attention"
  (on CUDA only: PyTorch has no flex-attention backward on a CPU) and "sdpa", which gives a
  packed micro-batch a dense block-diagonal [N, N] mask and attends over all N² pairs;
- padded (the baseline), what a padded trainer runs (verl's and TRL's layout): prompts
  left-padded to the longest prompt, responses right-padded to the longest response, an
  attention mask ("sdpa"), the LM head and loss over the whole [B, R] response window
  (TRL's `logits_to_keep`; verl's head covers the prompts too), padding weighted 0;
- padded-scored-rows, the least a padded step can cost: every row right-padded to the
  longest sample, the LM head and loss on the real response rows only, as packing does.
  Speedups are given over both (`speedup`, `speedup_vs_scored_rows`).

The default packed implementation (`siri.attention.resolve_attn_implementation("auto")`)
carries `default: true`; its goal is twice the padded tokens/s. tokens_per_s counts real
tokens (prompt + response of every sample, no padding) over the median wall time of the
whole step; on a CPU the median process CPU time (`cpu_ms`, `cpu_speedup`) is reported
too, as a shared machine's load stretches wall times but not the work done. On a CPU the
model is a toy Qwen2 in float32 (the section runs in about a minute on an idle machine); on
CUDA a Qwen2-1.5B-like body (28 layers, H 1536, V 151,936) with random weights in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from siri.attention import PACKED_SDPA, flash_attention_available, register_packed_sdpa, resolve_attn_implementation
from siri.config import AlgorithmConfig
from siri.kernels import policy_loss
from siri.model_forward import packed_policy_loss
from siri.models import random_model
from siri.packing import Sample, pack, unpack

# The trainer's default clip (the paper's), so that a change of that default is measured too.
LOSS_KWARGS = dict(clip_low=AlgorithmConfig.clip_low, clip_high=AlgorithmConfig.clip_high)
PADDED_ATTENTION = "sdpa"
# The baseline ("padded") first: the speedups are over it, and over the second too.
PADDED_METHODS = ("padded", "padded-scored-rows")


def config(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        model = dict(vocab_size=151_936, hidden_size=1536, num_hidden_layers=8 if quick else 28,
                     num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960)
        return dict(model=model, dtype="bfloat16", num_samples=32 if quick else 64, budget=4096,
                    prompt_range=(64, 512), max_tokens=16_384, reps=3 if quick else 5)
    model = dict(vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=352)
    return dict(model=model, dtype="float32", num_samples=8 if quick else 16, budget=512,
                prompt_range=(16, 64), max_tokens=2048, reps=1 if quick else 9)


def packed_attentions(device: torch.device) -> list[str]:
    """The attention implementations the packed step is measured with on `device`, the default first."""
    found = [PACKED_SDPA, "sdpa"]
    if device.type == "cuda":
        found.insert(1, "flex_attention")
        if flash_attention_available(device):
            found.insert(0, "flash_attention_2")
    default = resolve_attn_implementation("auto", device)
    return [default] + [name for name in found if name != default]


def make_model(cfg: dict, device: torch.device):
    """The benchmark's random Qwen2; each method sets its attention implementation on it."""
    import transformers

    register_packed_sdpa()
    model_config = transformers.Qwen2Config(**cfg["model"], attn_implementation=PADDED_ATTENTION)
    return random_model(model_config, seed=0).to(device=device, dtype=getattr(torch, cfg["dtype"])).train()


def make_samples(cfg: dict, seed: int = 0) -> list[Sample]:
    """Long-tailed rollouts: log-normal response lengths (median budget / 6, sigma 1), those
    reaching the budget cut there and marked truncated (about 4% of them)."""
    rng = np.random.default_rng(seed)
    vocab, budget = cfg["model"]["vocab_size"], cfg["budget"]
    samples = []
    for _ in range(cfg["num_samples"]):
        prompt_len = int(rng.integers(*cfg["prompt_range"]))
        response_len = int(min(budget, max(1, round(rng.lognormal(np.log(budget / 6), 1.0)))))
        samples.append(Sample(
            prompt_ids=rng.integers(0, vocab, prompt_len), response_ids=rng.integers(0, vocab, response_len),
            advantage=float(rng.standard_normal()),
            old_logprobs=np.log(1 / vocab) + 0.1 * rng.standard_normal(response_len),
            truncated=response_len == budget,
        ))
    return samples


def packed_step(model, batches):
    for batch in batches:
        packed_policy_loss(model, batch, **LOSS_KWARGS).loss.backward()


def _per_sample(samples: list[Sample]) -> dict[str, list[torch.Tensor]]:
    """Each sample's per-token targets, advantages, weights and old log-probs as the packed
    path has them (one pack call with room for everything gives the mini-batch weights)."""
    (whole,) = pack(samples, max_tokens=sum(len(s.prompt_ids) + len(s.response_ids) for s in samples))
    return {name: unpack(getattr(whole, name), whole) for name in ("targets", "advantages", "weights", "old_logprobs")}


def padded_batches(samples: list[Sample], max_tokens: int, device: torch.device, scored_rows_only: bool) -> list[dict]:
    """Padded micro-batches of `max_tokens // row length` rows with the packed path's targets,
    advantages, weights and old log-probs.

    `scored_rows_only` False ("padded", a padded trainer's layout: verl's and TRL's): prompts
    left-padded to the longest prompt, responses right-padded to the longest response,
    positions counted over the real tokens; the head and loss run on the whole [B, R]
    response window (TRL's `logits_to_keep`), padding with weight 0.
    True ("padded-scored-rows", the least padding a padded layout can have): every row
    right-padded to the longest sample, the head and loss on the real response rows only.
    """
    per_sample = _per_sample(samples)
    prompt_room = max(len(s.prompt_ids) for s in samples)
    response_room = max(len(s.response_ids) for s in samples)
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    width = longest if scored_rows_only else prompt_room + response_room
    rows = max(1, max_tokens // width)
    batches = []
    for first in range(0, len(samples), rows):
        chunk = range(first, min(first + rows, len(samples)))
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        flat_index, fields = [], {name: [] for name in per_sample}
        for row, i in enumerate(chunk):
            prompt, response = samples[i].prompt_ids, samples[i].response_ids
            start = 0 if scored_rows_only else prompt_room - len(prompt)
            end = start + len(prompt) + len(response)
            input_ids[row, start:end] = torch.from_numpy(np.concatenate([prompt, response]))
            attention_mask[row, start:end] = 1
            # The positions whose hidden states predict the response tokens (the window's, or the real ones).
            first_scored = row * width + start + len(prompt) - 1
            flat_index.append(torch.arange(first_scored, first_scored + len(response)) if scored_rows_only
                              else torch.arange(row * width + prompt_room - 1, row * width + width - 1))
            for name, values in per_sample.items():
                fields[name].append(values[i] if scored_rows_only
                                    else torch.nn.functional.pad(values[i], (0, response_room - len(response))))
        batch = {name: torch.cat(values) for name, values in fields.items()}
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        batch.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     flat_index=torch.cat(flat_index))
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def padded_step(model, batches):
    body, head = model.get_decoder(), model.get_output_embeddings()
    for b in batches:
        hidden = body(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                      use_cache=False).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, b["flat_index"])
        policy_loss(head(rows), b["targets"], b["advantages"], b["weights"], old_logprobs=b["old_logprobs"],
                    **LOSS_KWARGS).loss.backward()


def prepare(method: str, cfg: dict, samples: list[Sample], device: torch.device):
    """(batches, step, computed tokens, attention implementation) of `method`: one of
    `PADDED_METHODS` or "packed-<attention>"."""
    if method in PADDED_METHODS:
        batches = padded_batches(samples, cfg["max_tokens"], device, scored_rows_only=method == "padded-scored-rows")
        return batches, padded_step, sum(b["input_ids"].numel() for b in batches), PADDED_ATTENTION
    batches = [b.to(device) for b in pack(samples, cfg["max_tokens"])]
    return batches, packed_step, sum(b.num_tokens for b in batches), method.removeprefix("packed-")


def run(device: torch.device, quick: bool) -> list[dict]:
    """Rows of the packed-vs-padded policy-update comparison on `device`."""
    from benchmarks.timing import peak_cuda_extra_mb, peak_rss_extra_mb_in_child, synchronize

    cfg = config(device, quick)
    model = make_model(cfg, device)
    samples = make_samples(cfg)
    real_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    names = [f"packed-{attn}" for attn in packed_attentions(device)] + list(PADDED_METHODS)
    methods = {name: prepare(name, cfg, samples, device) for name in names}

    def setup(name):
        model.set_attn_implementation(methods[name][3])
        model.zero_grad(set_to_none=True)

    def timed(name):
        """(wall, process CPU) milliseconds of one step."""
        batches, step, _, _ = methods[name]
        setup(name)
        synchronize(device)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        step(model, batches)
        synchronize(device)
        return (time.perf_counter() - begin) * 1e3, (time.process_time() - begin_cpu) * 1e3

    for name in methods:  # warm-up (allocator, kernel selection, flex attention's compile)
        timed(name)
    # Interleaved repetitions: a load that comes and goes (a shared machine) hits all alike.
    times = {name: [] for name in methods}
    for _ in range(cfg["reps"]):
        for name in methods:
            times[name].append(timed(name))

    rows = []
    for name, (batches, step, computed_tokens, attn) in methods.items():
        ms = statistics.median(wall for wall, _ in times[name])
        if device.type == "cuda":
            peak_mb = peak_cuda_extra_mb(lambda _: step(model, batches), lambda: setup(name), device)
        else:  # the RSS high-water mark never falls: measure in a fresh process
            peak_mb = peak_rss_extra_mb_in_child("benchmarks.packing_bench", dict(method=name, quick=quick))
        rows.append(dict(
            section="packing", method=name, attn=attn, dtype=cfg["dtype"], samples=len(samples),
            micro_batches=len(batches), real_tokens=real_tokens, computed_tokens=computed_tokens,
            ms=round(ms, 1), tokens_per_s=round(real_tokens / (ms * 1e-3)), peak_extra_mb=round(peak_mb, 1),
        ))
        if device.type == "cpu":  # CPU time is what a loaded machine's other processes do not inflate
            rows[-1]["cpu_ms"] = round(statistics.median(cpu for _, cpu in times[name]), 1)
    padded, scored_rows = (next(row for row in rows if row["method"] == name) for name in PADDED_METHODS)
    for row in rows:
        for suffix, baseline in (("", padded), ("_vs_scored_rows", scored_rows)):
            row["speedup" + suffix] = round(baseline["ms"] / row["ms"], 2)
            if "cpu_ms" in row:
                row["cpu_speedup" + suffix] = round(baseline["cpu_ms"] / row["cpu_ms"], 2)
    rows[0]["default"] = True
    return rows


def measure(device: torch.device, quick: bool, copy_gbs: float | None = None) -> list[dict]:
    """`benchmarks/run.py`'s section entry point; the copy bandwidth does not apply here."""
    return run(device, quick)


def _child(spec: dict) -> None:
    from benchmarks.timing import child_peak_report

    device = torch.device("cpu")
    cfg = config(device, spec["quick"])
    model = make_model(cfg, device)
    batches, step, _, attn = prepare(spec["method"], cfg, make_samples(cfg), device)
    model.set_attn_implementation(attn)
    child_peak_report(lambda: None, lambda _: step(model, batches))


if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # `python benchmarks/packing_bench.py` from a checkout
        sys.path.append(root)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help="JSON spec of one CPU peak-memory measurement (internal)")
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for row in run(device, args.quick):
            print(row)
