"""policy_loss forward+backward on the logits path: siri's backends against PyTorch and peers.

Setting: the paper's GRPO loss (old log-probs given, no KL, no entropy bonus, temperature 1)
with the clip `siri train` uses by default (`GRPO` below). Methods, measured in the same process:
- siri-<backend>: `policy_loss` (value checks on, as a user calls it); `-inplace` with
  `inplace_backward=True`; `-novalidate` under `SIRI_VALIDATE=0`; `-kernel` the backend's
  `policy_loss_rows` alone on prepared buffers. Their differences are host overhead;
- eager: log_softmax + gather + the same loss in PyTorch, in the logits' dtype, entropy
  under no_grad for the metrics (as verl logs it); compile: `torch.compile` of it;
- peers (benchmarks/peers.py, when installed): Liger-Kernel's Triton GRPO loss (same loss,
  [B, L + 1, V] logits, gradient written in place) and `LigerCrossEntropyLoss`
  (cross-entropy: the same traffic, not the same loss).

Floor: the fused op must read the logits once and write their gradient once, so
bytes = 2 * T * V * itemsize, and the floor time is bytes over the copy bandwidth measured
in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from siri.config import AlgorithmConfig
from siri.kernels import available_backends, get_backend, policy_loss, token_logprobs
from siri.kernels.backends import RowOutputs
from siri.kernels.config import LossConfig
from siri.kernels.reference import per_token_loss

from . import peers
from .timing import (
    child_peak_report,
    compiled_on_first_call,
    measured,
    median_ms,
    peak_cuda_extra_mb,
    peak_rss_extra_mb_in_child,
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# The loss every method here computes. The clip is the trainer's default (the paper's, DAPO's
# decoupled clip), so a change of that default changes what is measured; the rest is pinned
# to what the eager baselines and the peers implement: temperature 1, no KL, entropy, dual
# clip or truncated importance sampling.
GRPO = LossConfig(clip_low=AlgorithmConfig.clip_low, clip_high=AlgorithmConfig.clip_high)


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


@dataclass(frozen=True)
class Method:
    """make(inputs) -> (setup, run) of one timed forward+backward; setup is untimed."""

    make: Callable
    peer: str | None = None  # "<distribution> <version>" of a peer
    computes: str = "grpo"  # what the method computes, where it is not the GRPO loss
    peak_memory: bool = True  # variants with the memory of a row already measured skip it
    flops_per_thv: int = 6  # fused-linear floor: 6 T H V flops with the backward, 2 forward only

    def labels(self) -> dict:
        """What a results row says of the method beyond its name."""
        found = {} if self.peer is None else {"peer": self.peer}
        return found if self.computes == "grpo" else dict(found, computes=self.computes)


def _loss_step(loss_fn, inplace):
    """make() of a loss function of the five inputs.

    The gradient is taken with `torch.autograd.grad`, not accumulated into `.grad`: a leaf's
    accumulation would copy a gradient that aliases a saved buffer (the in-place variant),
    a cost an LM head's output, whose backward consumes the gradient, never pays.
    """

    def make(inputs):
        logits, *rest = inputs
        leaf = logits.clone().requires_grad_(True)

        def setup():
            if inplace:
                # The logits are overwritten by their gradient: a fresh copy each time, and not a
                # leaf (the in-place backward refuses one), as an LM head's output is not.
                return logits.clone().requires_grad_(True).clone()
            return leaf

        def run(x):
            loss = loss_fn(x, *rest)
            return loss.detach(), torch.autograd.grad(loss, x)[0]  # what tests compare between methods

        return setup, run

    return make


def without_validation(make):
    """make() of the same step with the value checks off (`SIRI_VALIDATE=0`) while it runs."""

    def without(inputs):
        setup, run = make(inputs)

        def run_unchecked(args):
            previous = os.environ.get("SIRI_VALIDATE")
            os.environ["SIRI_VALIDATE"] = "0"
            try:
                return run(args)
            finally:
                if previous is None:
                    del os.environ["SIRI_VALIDATE"]
                else:
                    os.environ["SIRI_VALIDATE"] = previous

        return setup, run_unchecked

    return without


def _kernel_step(name):
    """make() of the backend's row entry point alone: no checks, no autograd, buffers prepared."""

    def make(inputs):
        logits, targets, advantages, weights, old = inputs
        backend = get_backend(name)
        out = RowOutputs.empty(logits.shape[0], logits.device)
        grad = torch.empty_like(logits)

        def run(_):
            backend.policy_loss_rows(logits, targets, advantages, weights, old, None, None, GRPO, out, grad)
            return out.loss.sum(), grad

        return (lambda: None), run

    return make


def _liger_grpo_step(inputs):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    logits, targets, advantages, _, old = inputs
    num_sequences, length = peers.sequences(logits.shape[0])
    # Liger scores token l of a sequence from logits row l of [B, L + 1, V]: one spare row each.
    padded = torch.cat([logits.view(num_sequences, length, -1), logits.new_zeros(num_sequences, 1, logits.shape[1])], 1)
    ids, old_seq = targets.view(num_sequences, length), old.view(num_sequences, length)
    sequence_advantages = advantages.view(num_sequences, length)[:, 0].contiguous()

    def run(x):
        loss, _ = triton_grpo_loss(
            x, old_seq, None, ids, sequence_advantages, temperature=1.0, beta=0.0, eps_low=GRPO.clip_low,
            eps_high=GRPO.clip_high, inplace=True, loss_type="dapo", reduce=True,
        )
        torch.autograd.grad(loss, x)

    # inplace=True writes the gradient over the logits: a fresh copy each time, as siri's in-place.
    return (lambda: padded.clone().requires_grad_(True)), run


def _liger_cross_entropy_step(inputs):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    logits, targets = inputs[:2]
    loss_fn = LigerCrossEntropyLoss(reduction="sum")

    def run(x):
        torch.autograd.grad(loss_fn(x, targets), x)

    # It writes the gradient into its input during the forward: a fresh copy each time.
    return (lambda: logits.clone().requires_grad_(True)), run


def methods(device: torch.device) -> dict[str, Method]:
    """Every method measured on `device`, the eager baseline first (speedups refer to it)."""
    found = {"eager": Method(_loss_step(eager_loss, False)), "compile": Method(_loss_step(compiled_loss, False))}
    for name in available_backends():
        backend = get_backend(name)
        # Triton on a CPU only runs in the interpreter: a correctness tool, not a contender.
        if not backend.supports_device(device) or (name == "triton" and device.type != "cuda"):
            continue

        def api(b=name, inplace=False):
            return lambda *a: policy_loss(*a[:4], old_logprobs=a[4], clip_low=GRPO.clip_low, clip_high=GRPO.clip_high,
                                          inplace_backward=inplace, backend=b).loss

        found[f"siri-{name}"] = Method(_loss_step(api(), False))
        if name == "torch":  # the reference: a correctness tool, measured once
            continue
        found[f"siri-{name}-inplace"] = Method(_loss_step(api(inplace=True), True))
        found[f"siri-{name}-novalidate"] = Method(without_validation(_loss_step(api(), False)), peak_memory=False)
        found[f"siri-{name}-kernel"] = Method(_kernel_step(name), peak_memory=False)
    liger = peers.version(peers.LIGER)
    if liger is not None:
        found["liger-grpo-triton"] = Method(_liger_grpo_step, peer=liger)
        found["liger-cross-entropy"] = Method(_liger_cross_entropy_step, peer=liger, computes="cross-entropy")
    return found


def measure(device: torch.device, quick: bool, copy_gbs: float):
    """Yields one row per (shape, method), as soon as it is measured."""
    for num_rows, vocab, dtype_name in shapes(device, quick):
        dtype = DTYPES[dtype_name]
        inputs = make_inputs(num_rows, vocab, dtype, device)
        floor_bytes = 2 * num_rows * vocab * dtype.itemsize  # read logits once, write the gradient once
        floor_ms = floor_bytes / (copy_gbs * 1e9) * 1e3
        eager_ms = None
        for name, method in methods(device).items():
            row = dict(section="policy_loss", method=name, T=num_rows, V=vocab, dtype=dtype_name,
                       logits_mb=round(num_rows * vocab * dtype.itemsize / 2**20, 1))
            row.update(method.labels())

            def figures(name=name, method=method):
                setup, run = method.make(inputs)
                ms = median_ms(run, setup, device, budget_s=1.0 if quick else 3.0)
                found = dict(ms=round(ms, 3), gbs=round(floor_bytes / (ms * 1e-3) / 1e9, 1),
                             floor_fraction=round(floor_ms / ms, 3),
                             speedup_vs_eager=round(eager_ms / ms, 2) if eager_ms else None)
                if method.peak_memory:
                    found["peak_extra_mb"] = round(_peak_mb(name, run, setup, device, num_rows, vocab, dtype_name), 1)
                return found

            row = measured(row, figures, device)
            if name == "eager":
                eager_ms = row.get("ms")
            yield row


def _peak_mb(name, run, setup, device, num_rows, vocab, dtype_name) -> float:
    if device.type == "cuda":
        return peak_cuda_extra_mb(run, setup, device)
    spec = dict(method=name, num_rows=num_rows, vocab=vocab, dtype=dtype_name)
    return peak_rss_extra_mb_in_child("benchmarks.policy_loss_bench", spec)


def _child(spec: dict) -> None:
    device = torch.device("cpu")
    inputs = make_inputs(spec["num_rows"], spec["vocab"], DTYPES[spec["dtype"]], device)
    child_peak_report(*methods(device)[spec["method"]].make(inputs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, help="JSON spec of one CPU peak-memory measurement")
    _child(json.loads(parser.parse_args().child))
