"""The "torch" backend: the reference formulas applied to blocks of rows.

Each block is upcast to float32, so memory stays at a few float32 copies of one block
whatever T is. The gradient uses the hand-derived formulas of `reference.py`
(`logits_gradient`, the slope of `per_token_loss`), not autograd: this code runs inside a
custom op, where torch.compile's runtime records no autograd graph. It runs on any device
and is the default on a CPU when the native extension is absent.
"""

from __future__ import annotations

import torch

from .backends import Backend, RowOutputs
from .config import LossConfig
from .reference import log_sum_exp_parts, logits_gradient, logprobs_and_entropy, policy_loss_reference

# A block holds about this many float32 logits. The reference keeps ~6 block-sized float32
# temporaries alive (upcast, masked, scaled, softmax, product, gradient): 2^24 elements is ~64 MiB
# each, a few hundred MiB in all, whatever the vocabulary.
BLOCK_ELEMENTS = 1 << 24


def _row_blocks(num_rows: int, vocab: int):
    rows = max(1, BLOCK_ELEMENTS // max(vocab, 1))
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


def _pick(tensor, rows):
    return None if tensor is None else tensor[rows]


def _clamped(targets, vocab: int):
    # Validation rejects out-of-range targets; with SIRI_VALIDATE=0 they are clamped into the
    # row, as the native and Triton kernels do, rather than failing inside gather.
    return targets.clamp(0, vocab - 1)


def policy_loss_rows(
    logits, targets, advantages, weights, old, ref, rollout, cfg: LossConfig, out: RowOutputs, grad_logits
):
    targets = _clamped(targets, logits.shape[1])
    for rows in _row_blocks(logits.shape[0], logits.shape[1]):
        active = weights[rows] != 0
        # Rows with weight 0 on zero logits, as in the reference: their gradient row is 0
        # whatever they hold.
        block = logits[rows].float().masked_fill(~active.unsqueeze(-1), 0.0)
        result = policy_loss_reference(
            block, targets[rows], advantages[rows], weights[rows],
            _pick(old, rows), _pick(ref, rows), _pick(rollout, rows), cfg,
        )
        if grad_logits is not None:
            safe_targets = torch.where(active, targets[rows], torch.zeros_like(targets[rows]))
            lse_parts = log_sum_exp_parts(block / cfg.temperature)
            entropy_slope = torch.where(active, -cfg.entropy_coef * weights[rows], torch.zeros_like(result.slope))
            grad_logits[rows] = logits_gradient(
                block, safe_targets, cfg.temperature, lse_parts, result.entropy, result.slope, entropy_slope
            )
        out.logprobs[rows] = result.logprobs
        out.entropy[rows] = result.entropy
        out.loss[rows] = result.loss_rows
        out.kl[rows] = result.kl
        out.clipped[rows] = result.clipped


def logprob_rows(logits, targets, temperature, logprobs, entropy, lse):
    targets = _clamped(targets, logits.shape[1])
    for rows in _row_blocks(logits.shape[0], logits.shape[1]):
        block = logits[rows].float()
        logp, ent, _ = logprobs_and_entropy(block, targets[rows], temperature)
        logprobs[rows] = logp
        lse[rows] = torch.stack(log_sum_exp_parts(block / temperature), dim=-1)
        if entropy is not None:
            entropy[rows] = ent


def logprob_backward(logits, targets, temperature, lse, logprobs, entropy, grad_logprobs, grad_entropy, grad_logits):
    # A negative target means none in these columns (backends.py): only the upper end is clamped.
    targets = targets.clamp(max=logits.shape[1] - 1)
    for rows in _row_blocks(logits.shape[0], logits.shape[1]):
        c = grad_logprobs[rows]
        if grad_entropy is None:
            e, ent = torch.zeros_like(c), torch.zeros_like(c)
        else:
            e, ent = grad_entropy[rows], entropy[rows]
        lse_parts = (lse[rows, 0], lse[rows, 1])
        grad_logits[rows] = logits_gradient(logits[rows].float(), targets[rows], temperature, lse_parts, ent, c, e)


def make_backend(name: str) -> Backend:
    return Backend(
        name="torch",
        supports_device=lambda device: True,
        policy_loss_rows=policy_loss_rows,
        logprob_rows=logprob_rows,
        logprob_backward=logprob_backward,
    )
