"""Hidden states + LM head to the policy loss, forward+backward: fused against naive and peers.

Methods, all measured in the same process:
- siri-fused: `fused_linear_policy_loss`, its default vocabulary split (the [T, V] logits
  never built, about 1% of them at a time, recomputed for the gradient; `-novalidate`: the
  same under `SIRI_VALIDATE=0`);
- siri-fused-chunks: the same with `chunk_size=1024` (row chunks with their full logits);
- siri-logits: logits = hidden @ weight.T materialised, then siri's fused `policy_loss` with
  its default out-of-place gradient (`inplace_backward=True` would reuse the logits'
  buffer, about one [T, V] less: not measured here);
- naive: the same in plain PyTorch (matmul, log_softmax, gather, loss, autograd);
- compile: `torch.compile` of naive;
- peers (benchmarks/peers.py, when installed): Liger-Kernel's `LigerFusedLinearGRPOLoss`
  (the same loss, chunked over sequences, torch.compile'd) and Cut Cross-Entropy's
  `linear_cross_entropy` (cross-entropy, not the same loss: the same GEMMs).
- trl-chunked: TRL 1.16's chunked log-prob head (`trl.kernels.ChunkedLogProbFunction`, what
  its GRPOTrainer scores with), then the same loss from its log-probs, as TRL builds it;
- verl-fused-torch: verl 0.9's fused head (`FusedLinearForPPO`, its torch implementation:
  verl's Triton one needs a GPU), then the same loss.
- siri-token-logprobs: `fused_linear_token_logprobs` with entropy, the same head call as the
  two peers' (its backward forms the logits again), then the same loss.
Forward only (`-fwd`, scoring old or reference log-probs under no_grad, one GEMM of
2 * T * H * V flops as the floor): the three heads. A peer's rows appear when its package
is installed.

Floor: three GEMMs (logits, grad of hidden, grad of weight), 6 * T * H * V flops over the
bf16 (GPU) or float32 (CPU) matmul rate measured in this run (the vocabulary split's own
floor, with the logits recomputed, is 8 * T * H * V: 4/3 of it). Memory: `peak_extra_mb` is
the peak beyond the inputs, `overhead_mb` that less the gradients of hidden and weight
(outputs every method must hold), also as a fraction of the [T, V] logits.
"""

from __future__ import annotations

import argparse
import json

import torch

from siri.kernels import fused_linear_policy_loss, fused_linear_token_logprobs, policy_loss
from siri.kernels.reference import per_token_loss

from . import peers
from .policy_loss_bench import GRPO, Method, eager_loss, without_validation
from .timing import (
    child_peak_report,
    compiled_on_first_call,
    measured,
    median_ms,
    peak_cuda_extra_mb,
    peak_rss_extra_mb_in_child,
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int, str]]:
    if device.type == "cuda":
        return [(16_384, 1536, 151_936, "bfloat16")] + ([] if quick else [(16_384, 3584, 151_936, "bfloat16")])
    return [(2048 if quick else 8192, 256, 32_000, "float32")]


def make_inputs(num_rows, hidden_size, vocab, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=device) / hidden_size**0.5 * 3).to(dtype)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen, device=device)
    advantages = torch.randn(num_rows, generator=gen, device=device)
    weights = torch.full((num_rows,), 1.0 / num_rows, device=device)
    old = -torch.log(torch.tensor(float(vocab), device=device)) + 0.3 * torch.randn(
        num_rows, generator=gen, device=device
    )
    return hidden, weight, targets, advantages, weights, old


def naive_loss(hidden, weight, targets, advantages, weights, old):
    return eager_loss(hidden @ weight.t(), targets, advantages, weights, old)


compiled_naive_loss = compiled_on_first_call(naive_loss)


def logprob_loss(logp, entropy, advantages, weights, old):
    """The loss a trainer builds from a head's per-token log-probs (entropy for logging only)."""
    loss_t, _, _, _ = per_token_loss(logp, entropy.detach(), advantages, old, None, None, GRPO)
    return (weights * loss_t).sum()


def trl_head(hidden, weight, targets):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    logp, entropy, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy")
    )
    return logp, entropy


def verl_head(hidden, weight, targets):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO

    return FusedLinearForPPO()(hidden, weight, targets)


def siri_head(hidden, weight, targets):
    return fused_linear_token_logprobs(hidden, weight, targets, return_entropy=True)


# name -> (head, the distribution it needs)
HEADS = {
    "trl-chunked": (trl_head, peers.TRL),
    "verl-fused-torch": (verl_head, peers.VERL),
    "siri-token-logprobs": (siri_head, None),
}


def _head_forward(head):
    """make() of a head scoring log-probs under no_grad (old or reference log-probs)."""

    def make(inputs):
        hidden, weight, targets, *_ = inputs

        def run(_):
            with torch.no_grad():
                head(hidden, weight, targets)

        return (lambda: None), run

    return make


def siri_fused_loss(h, w, *a):
    return fused_linear_policy_loss(h, w, *a[:3], old_logprobs=a[3], clip_low=GRPO.clip_low,
                                    clip_high=GRPO.clip_high).loss


def siri_fused_chunks_loss(h, w, *a):
    return fused_linear_policy_loss(h, w, *a[:3], old_logprobs=a[3], clip_low=GRPO.clip_low,
                                    clip_high=GRPO.clip_high, chunk_size=1024).loss


def siri_logits_loss(h, w, *a):
    return policy_loss(h @ w.t(), *a[:3], old_logprobs=a[3], clip_low=GRPO.clip_low, clip_high=GRPO.clip_high).loss


def liger_fused_linear_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=GRPO.clip_low,
                                      epsilon_high=GRPO.clip_high, loss_type="dapo", temperature=1.0)

    def loss(h, w, targets, advantages, weights, old):
        num_sequences, length = peers.sequences(h.shape[0])
        shaped = lambda t: t.view(num_sequences, length, *t.shape[1:])  # noqa: E731
        mask = torch.ones(num_sequences, length, device=h.device)
        return module(shaped(h), w, shaped(targets), mask, shaped(advantages)[:, 0].contiguous(),
                      old_per_token_logps=shaped(old))[0]

    return loss


def cce_linear_cross_entropy(h, w, targets, *_):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, targets, reduction="sum")


def _loss_step(loss_fn):
    return lambda inputs: _step(loss_fn, inputs)


def methods() -> dict[str, Method]:
    """Every method measured, the naive baseline first (speedups refer to it)."""
    found = {
        "naive": Method(_loss_step(naive_loss)),
        "compile": Method(_loss_step(compiled_naive_loss)),
        "siri-fused": Method(_loss_step(siri_fused_loss)),
        "siri-fused-novalidate": Method(without_validation(_loss_step(siri_fused_loss)), peak_memory=False),
        "siri-fused-chunks": Method(_loss_step(siri_fused_chunks_loss)),
        "siri-logits": Method(_loss_step(siri_logits_loss)),
    }
    liger, cce = peers.version(peers.LIGER), peers.version(peers.CCE)
    if liger is not None:
        # Built when measured, so that a failing import becomes that row's error.
        found["liger-fused-linear-grpo"] = Method(lambda inputs: _step(liger_fused_linear_grpo(), inputs), peer=liger)
    if cce is not None:
        found["cce-linear-cross-entropy"] = Method(_loss_step(cce_linear_cross_entropy), peer=cce,
                                                   computes="cross-entropy")
    for name, (head, distribution) in HEADS.items():
        peer = None if distribution is None else peers.version(distribution)
        if distribution is not None and peer is None:
            continue
        found[name] = Method(_loss_step((lambda f: lambda h, w, t, *a: logprob_loss(*f(h, w, t), *a))(head)),
                             peer=peer)
        found[f"{name}-fwd"] = Method(_head_forward(head), peer=peer, computes="log-probs, forward only",
                                      flops_per_thv=2)
    return found


def matmul_tflops(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    ms = median_ms(lambda _: a @ b, lambda: None, device, min_reps=5, budget_s=2.0)
    return 2 * m * k * n / (ms * 1e-3) / 1e12


def _step(loss_fn, inputs):
    hidden, weight, *rest = inputs
    leaves = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True))

    def setup():
        for leaf in leaves:
            leaf.grad = None
        return leaves

    def run(prepared):
        loss_fn(*prepared, *rest).backward()

    return setup, run


def measure(device: torch.device, quick: bool, copy_gbs: float):
    """Yields one row per (shape, method), as soon as it is measured."""
    for num_rows, hidden_size, vocab, dtype_name in shapes(device, quick):
        dtype = DTYPES[dtype_name]
        # Peak matmul rate from a square GEMM; the floor assumes the three GEMMs reach it.
        side = 8192 if device.type == "cuda" else 1024
        rate = matmul_tflops(device, dtype, side, side, side)
        flops = 6 * num_rows * hidden_size * vocab  # logits, grad of hidden, grad of weight
        floor_ms = flops / (rate * 1e12) * 1e3
        logits_mb = num_rows * vocab * dtype.itemsize / 2**20
        # Gradients of hidden and weight are outputs, not overhead: subtract their size.
        grads_mb = (num_rows + vocab) * hidden_size * dtype.itemsize / 2**20
        inputs = make_inputs(num_rows, hidden_size, vocab, dtype, device)
        naive = {}
        for name, method in methods().items():
            row = dict(section="fused_linear", method=name, T=num_rows, H=hidden_size, V=vocab, dtype=dtype_name,
                       matmul_tflops=round(rate, 2), logits_mb=round(logits_mb, 1), **method.labels())

            def figures(name=name, method=method):
                setup, run = method.make(inputs)
                ms = median_ms(run, setup, device, min_reps=3, budget_s=1.0 if quick else 3.0)
                # Forward only: one GEMM (2 * T * H * V); with the backward, three.
                share = method.flops_per_thv / 6
                found = dict(ms=round(ms, 2), tflops=round(share * flops / (ms * 1e-3) / 1e12, 2),
                             floor_fraction=round(share * floor_ms / ms, 3),
                             speedup_vs_eager=round(naive["ms"] / ms, 2) if naive.get("ms") else None)
                if method.peak_memory:
                    if device.type == "cuda":
                        peak_mb = peak_cuda_extra_mb(run, setup, device)
                    else:
                        spec = dict(method=name, num_rows=num_rows, hidden_size=hidden_size, vocab=vocab,
                                    dtype=dtype_name)
                        peak_mb = peak_rss_extra_mb_in_child("benchmarks.fused_linear_bench", spec)
                    # Only a method with a backward must hold the gradients.
                    overhead_mb = max(0.0, peak_mb - (grads_mb if method.flops_per_thv == 6 else 0.0))
                    found.update(peak_extra_mb=round(peak_mb, 1), overhead_mb=round(overhead_mb, 1),
                                 overhead_vs_logits=round(overhead_mb / logits_mb, 4))
                    if naive.get("peak_extra_mb"):
                        found["extra_vs_naive"] = round(peak_mb / naive["peak_extra_mb"], 4)
                return found

            row = measured(row, figures, device)
            if name == "naive":
                naive = row
            yield row


def _child(spec: dict) -> None:
    device = torch.device("cpu")
    inputs = make_inputs(spec["num_rows"], spec["hidden_size"], spec["vocab"], DTYPES[spec["dtype"]], device)
    child_peak_report(*methods()[spec["method"]].make(inputs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, help="JSON spec of one CPU peak-memory measurement")
    _child(json.loads(parser.parse_args().child))
