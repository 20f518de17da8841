"""Error of the LM head's gradient from `fused_linear_policy_loss` against float64, on a CPU.

    python benchmarks/head_gradient_error.py                  # the default (lean) mode
    python benchmarks/head_gradient_error.py --chunk-size 64  # row chunks: 64 of them at T = 4096

bf16 hidden states and head; the same inputs through the float64 logits path (autograd)
are the oracle, and plain PyTorch autograd in bf16 the baseline every method is judged
against. Printed per method: the largest absolute error of grad(weight) relative to the
largest |grad(weight)|, and the relative Frobenius error.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from siri.kernels import fused_linear_policy_loss  # noqa: E402
from siri.kernels.config import LossConfig  # noqa: E402
from siri.kernels.reference import policy_loss_reference  # noqa: E402


def make_inputs(num_rows: int, hidden_size: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 2 / hidden_size**0.5
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    advantages = torch.randn(num_rows, generator=gen)
    weights = torch.full((num_rows,), 1.0 / num_rows)
    old = torch.log_softmax((hidden.double() @ weight.double().t()), -1).gather(-1, targets[:, None])[:, 0]
    old = (old + 0.3 * torch.randn(num_rows, generator=gen, dtype=torch.float64)).float()
    return hidden.bfloat16(), weight.bfloat16(), targets, advantages, weights, old


def autograd_weight_grad(hidden, weight, targets, advantages, weights, old, dtype):
    h = hidden.to(dtype)
    w = weight.to(dtype).requires_grad_(True)
    token = torch.float64 if dtype == torch.float64 else torch.float32
    out = policy_loss_reference(h @ w.t(), targets, advantages.to(token), weights.to(token), old.to(token),
                                cfg=LossConfig())
    out.loss.backward()
    return w.grad.double()


def errors(actual: torch.Tensor, oracle: torch.Tensor) -> tuple[float, float]:
    diff = (actual.double() - oracle).abs()
    return (diff.max() / oracle.abs().max()).item(), (diff.norm() / oracle.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the lean mode)")
    args = parser.parse_args()
    inputs = make_inputs(args.rows, args.hidden_size, args.vocab)
    oracle = autograd_weight_grad(*inputs, torch.float64)
    hidden, weight, targets, advantages, weights, old = inputs
    w = weight.clone().requires_grad_(True)
    fused_linear_policy_loss(hidden, w, targets, advantages, weights, old_logprobs=old,
                             chunk_size=args.chunk_size).loss.backward()
    print(f"T={args.rows} H={args.hidden_size} V={args.vocab} bf16, chunk_size={args.chunk_size}")
    for name, grad in (("siri fused_linear", w.grad),
                       ("PyTorch autograd bf16", autograd_weight_grad(*inputs, torch.bfloat16))):
        peak, frobenius = errors(grad, oracle)
        print(f"{name:>24}: max |error| / max |grad| = {peak:.2e}, relative Frobenius error = {frobenius:.2e}")


if __name__ == "__main__":
    main()
