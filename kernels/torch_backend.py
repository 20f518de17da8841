"""The "torch" backend: the reference formulas applied to blocks of rows.

Each block is upcast to float32 and differentiated by autograd on its own, so memory stays
at a few float32 copies of one block whatever T is. It runs on any device and is the
default on a CPU when the native extension is absent.
"""

from __future__ import annotations

import torch

from .backends import Backend, RowOutputs
from .config import LossConfig
from .reference import logprobs_and_entropy, policy_loss_reference

# A block holds about this many float32 logits. The reference keeps ~5 block-sized float32
# temporaries alive (upcast, scaled, softmax, product, gradient): 2^24 elements is ~64 MiB
# each, a few hundred MiB in all, whatever the vocabulary.
BLOCK_ELEMENTS = 1 << 24


def _row_blocks(num_rows: int, vocab: int):
    rows = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


def _pick(tensor, rows):
    return None if tensor is None else tensor[rows]


def policy_loss_rows(logits, targets, advantages, weights, old, ref, rollout, cfg: LossConfig, out: RowOutputs, grad_logits):
    for rows in _row_blocks(logits.shape[0], logits.shape[1]):
        block = logits[rows].float()
        with torch.enable_grad():
            block.requires_grad_(grad_logits is not None)
            result = policy_loss_reference(
                block, targets[rows], advantages[rows], weights[rows],
                _pick(old, rows), _pick(ref, rows), _pick(rollout, rows), cfg,
            )
            if grad_logits is not None:
                (grad,) = torch.autograd.grad(result.loss, block)
                grad_logits[rows] = grad
        out.logprobs[rows] = result.logprobs.detach()
        out.entropy[rows] = result.entropy.detach()
        out.loss[rows] = result.loss_rows.detach()
        out.kl[rows] = result.kl.detach()
        out.clipped[rows] = result.clipped


def logprob_rows(logits, targets, temperature, logprobs, entropy, lse):
    for rows in _row_blocks(logits.shape[0], logits.shape[1]):
        logp, ent, block_lse = logprobs_and_entropy(logits[rows].float(), targets[rows], temperature)
        logprobs[rows] = logp
        lse[rows] = block_lse
        if entropy is not None:
            entropy[rows] = ent


def logprob_backward(logits, targets, temperature, lse, logprobs, entropy, grad_logprobs, grad_entropy, grad_logits):
    for rows in _row_blocks(logits.shape[0], logits.shape[1]):
        block = logits[rows].float()
        with torch.enable_grad():
            block.requires_grad_(True)
            logp, ent, _ = logprobs_and_entropy(block, targets[rows], temperature)
            total = (logp * grad_logprobs[rows]).sum()
            if grad_entropy is not None:
                total = total + (ent * grad_entropy[rows]).sum()
            (grad,) = torch.autograd.grad(total, block)
        grad_logits[rows] = grad


def make_backend(name: str) -> Backend:
    return Backend(
        name="torch",
        supports_device=lambda device: True,
        policy_loss_rows=policy_loss_rows,
        logprob_rows=logprob_rows,
        logprob_backward=logprob_backward,
    )
