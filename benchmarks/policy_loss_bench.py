"""policy_loss forward+backward on the logits path: siri's backends against PyTorch.

Setting: the paper's GRPO loss (old log-probs given, clip 0.2 / 0.28, no KL, no entropy
bonus). Baselines, measured in the same process:
- eager: log_softmax + gather + the same loss in PyTorch, in the logits' dtype, entropy
  under no_grad for the metrics (as verl logs it);
- compiled: `torch.compile` of that same function.

Floor: the fused op must read the logits once and write their gradient once, so
bytes = 2 * T * V * itemsize, and the floor time is bytes over the copy bandwidth measured
in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch

from siri.kernels import policy_loss, token_logprobs
from siri.kernels.backends import BACKEND_NAMES, _load
from siri.kernels.config import LossConfig
from siri.kernels.reference import per_token_loss

from .timing import child_peak_report, compiled_on_first_call, median_ms, peak_cuda_extra_mb, peak_rss_extra_mb_in_child

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
GRPO = LossConfig(clip_low=0.2, clip_high=0.28)


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, str]]:
    if device.type == "cuda":
        return [(4096, 151_936, "bfloat16"), (16_384, 151_936, "bfloat16")] + (
            [] if quick else [(32_768, 151_936, "bfloat16")]
        )
    sizes = [(2048, 32_000, "float32"), (2048, 32_000, "bfloat16")]
    return sizes[:1] if quick else sizes


def make_inputs(num_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Logits with a language model's spread, and old log-probs near the current ones so
    that the ratios straddle the clip bounds as they do a few steps off-policy."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen, device=device) * 3).to(dtype)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen, device=device)
    advantages = torch.randn(num_rows, generator=gen, device=device)
    weights = torch.full((num_rows,), 1.0 / num_rows, device=device)
    with torch.no_grad():
        current = token_logprobs(logits, targets, backend="torch")
    old = current + 0.3 * torch.randn(num_rows, generator=gen, device=device)
    return logits, targets, advantages, weights, old


def eager_loss(logits, targets, advantages, weights, old):
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1).float()
    loss_t, _, _, _ = per_token_loss(logp, entropy, advantages, old, None, None, GRPO)
    return (weights * loss_t).sum()


compiled_loss = compiled_on_first_call(eager_loss)


def methods(device: torch.device) -> dict:
    """name -> (loss function of the five inputs, writes the gradient into the logits?)."""
    found = {}
    for name in BACKEND_NAMES:
        backend = _load(name)
        # Triton on a CPU only runs in the interpreter: a correctness tool, not a contender.
        if backend is None or not backend.supports_device(device) or (name == "triton" and device.type != "cuda"):
            continue
        found[f"siri-{name}"] = (
            (lambda b: lambda *a: policy_loss(*a[:4], old_logprobs=a[4], backend=b).loss)(name),
            False,
        )
        if name != "torch":
            found[f"siri-{name}-inplace"] = (
                (
                    lambda b: lambda *a: policy_loss(
                        *a[:4], old_logprobs=a[4], inplace_backward=True, backend=b
                    ).loss
                )(name),
                True,
            )
    found["eager"] = eager_loss, False
    found["compile"] = compiled_loss, False
    return found


def _step(loss_fn, inplace, inputs):
    """(setup, run) of one forward+backward; setup is untimed.

    The gradient is taken with `torch.autograd.grad`, not accumulated into `.grad`: a leaf's
    accumulation would copy a gradient that aliases a saved buffer (the in-place variant),
    a cost an LM head's output, whose backward consumes the gradient, never pays.
    """
    logits, *rest = inputs
    leaf = logits.clone().requires_grad_(True)

    def setup():
        if inplace:  # the logits are overwritten by their gradient: a fresh copy each time
            return logits.clone().requires_grad_(True)
        return leaf

    def run(x):
        torch.autograd.grad(loss_fn(x, *rest), x)

    return setup, run


def measure(device: torch.device, quick: bool, copy_gbs: float) -> list[dict]:
    rows = []
    for num_rows, vocab, dtype_name in shapes(device, quick):
        dtype = DTYPES[dtype_name]
        inputs = make_inputs(num_rows, vocab, dtype, device)
        floor_bytes = 2 * num_rows * vocab * dtype.itemsize  # read logits once, write the gradient once
        floor_ms = floor_bytes / (copy_gbs * 1e9) * 1e3
        logits_mb = num_rows * vocab * dtype.itemsize / 2**20
        for name, (loss_fn, inplace) in methods(device).items():
            setup, run = _step(loss_fn, inplace, inputs)
            ms = median_ms(run, setup, device, budget_s=1.0 if quick else 3.0)
            if device.type == "cuda":
                peak_mb = peak_cuda_extra_mb(run, setup, device)
            else:
                peak_mb = peak_rss_extra_mb_in_child(
                    "benchmarks.policy_loss_bench",
                    dict(method=name, num_rows=num_rows, vocab=vocab, dtype=dtype_name),
                )
            rows.append(dict(
                section="policy_loss", method=name, T=num_rows, V=vocab, dtype=dtype_name, ms=round(ms, 3),
                gbs=round(floor_bytes / (ms * 1e-3) / 1e9, 1), floor_fraction=round(floor_ms / ms, 3),
                peak_extra_mb=round(peak_mb, 1), logits_mb=round(logits_mb, 1),
            ))
    by_key = {(r["T"], r["dtype"], r["method"]): r for r in rows}
    for row in rows:
        eager = by_key.get((row["T"], row["dtype"], "eager"))
        row["speedup_vs_eager"] = round(eager["ms"] / row["ms"], 2) if eager else None
    return rows


def _child(spec: dict) -> None:
    device = torch.device("cpu")
    loss_fn, inplace = methods(device)[spec["method"]]
    inputs = make_inputs(spec["num_rows"], spec["vocab"], DTYPES[spec["dtype"]], device)
    child_peak_report(*_step(loss_fn, inplace, inputs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, help="JSON spec of one CPU peak-memory measurement")
    _child(json.loads(parser.parse_args().child))
