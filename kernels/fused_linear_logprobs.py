"""The gradient of `fused_linear_token_logprobs`: log-probs and entropy of hidden @ weight.T
(+ bias), differentiable in hidden, weight and bias, never building the [T, V] logits.

The forward is the forward-only op (`siri::fused_linear_token_logprobs`, one chunk of
logits at a time). The backward forms each chunk's logits again (one GEMM), their
log-sum-exp, and overwrites them with their gradient by the backend's token_logprobs
backward (`logprob_backward`, which every backend has, in place), then two GEMMs give the
chunk's share of the hidden, weight and bias gradients: one chunk of logits lives at a time.
"""

from __future__ import annotations

import torch

from .autograd_returns import InputGradients
from .backends import lse_buffer, resolve_backend
from .fused_linear_algorithms import LogitsBuffer, slice_budget_bytes

torch.library.define(
    "siri::fused_linear_token_logprobs_backward",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor logprobs, Tensor? entropy, "
    "Tensor grad_logprobs, Tensor? grad_entropy, float temperature, str backend, int chunk_size, bool grad_hidden, "
    "bool grad_weight) -> (Tensor, Tensor, Tensor)",
)


def backward_rows(num_rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk of the backward without a `chunk_size`: the forward's vocabulary-split memory budget."""
    return max(1, int(slice_budget_bytes(num_rows, vocab, itemsize) // (vocab * itemsize)))


def _row_chunks(num_rows: int, chunk_size: int):
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


@torch.library.impl("siri::fused_linear_token_logprobs_backward", "default")
def _backward_op(hidden, weight, bias, targets, logprobs, entropy, grad_logprobs, grad_entropy, temperature,
                 backend, chunk_size, grad_hidden, grad_weight):
    impl = resolve_backend(backend, hidden.device)
    targets = targets.contiguous()
    grad_logprobs = grad_logprobs.to(torch.float32).contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.to(torch.float32).contiguous()
    hidden_grad = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    weight_grad = torch.zeros_like(weight) if grad_weight else weight.new_empty(0)
    bias_grad = (
        torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device)
        if grad_weight and bias is not None
        else hidden.new_empty(0)
    )
    buffer = LogitsBuffer(hidden, min(chunk_size, hidden.shape[0]) * weight.shape[0])
    for rows in _row_chunks(hidden.shape[0], chunk_size):
        hidden_chunk = hidden[rows]
        logits = buffer.linear(hidden_chunk, weight, bias)
        # The row statistic the backend's backward reads, by that backend (in its unit and its
        # rounding: Backend.lse_base).
        lse, unused_logprobs = lse_buffer(logits.shape[0], logits.device), torch.empty_like(logprobs[rows])
        impl.logprob_rows(logits, targets[rows], temperature, unused_logprobs, None, lse)
        grad_logits = logits  # written over the logits (backends.py allows it)
        impl.logprob_backward(
            logits, targets[rows], temperature, lse, logprobs[rows], None if entropy is None else entropy[rows],
            grad_logprobs[rows], None if grad_entropy is None else grad_entropy[rows], grad_logits,
        )
        if grad_hidden:
            torch.mm(grad_logits, weight, out=hidden_grad[rows])
        if grad_weight:
            weight_grad.addmm_(grad_logits.t(), hidden_chunk)
            if bias is not None:
                bias_grad += grad_logits.sum(0, dtype=torch.float32)
    if bias is not None and grad_weight:
        bias_grad = bias_grad.to(bias.dtype)
    return hidden_grad, weight_grad, bias_grad


@torch.library.register_fake("siri::fused_linear_token_logprobs_backward")
def _(hidden, weight, bias, *args):
    grad_hidden, grad_weight = args[-2], args[-1]
    hidden_grad = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    weight_grad = torch.empty_like(weight) if grad_weight else weight.new_empty(0)
    bias_grad = torch.empty_like(bias) if grad_weight and bias is not None else hidden.new_empty(0)
    return hidden_grad, weight_grad, bias_grad


class FusedLinearTokenLogprobs(torch.autograd.Function):
    """(logprobs, entropy) of the forward op, with the chunked backward above."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, backend, chunk_size):
        logprobs, entropy = torch.ops.siri.fused_linear_token_logprobs(
            hidden, weight, bias, targets, temperature, with_entropy, backend, chunk_size
        )
        ctx.save_for_backward(hidden, weight, bias, targets, logprobs, entropy if with_entropy else None)
        ctx.settings = (temperature, backend, chunk_size or backward_rows(*hidden.shape[:1], weight.shape[0],
                                                                          hidden.dtype.itemsize))
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, targets, logprobs, entropy = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_logprobs is None and grad_entropy is None:
            return _LOGPROBS_GRADIENTS()
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(logprobs)
        if entropy is None:
            grad_entropy = None
        hidden_grad, weight_grad, bias_grad = torch.ops.siri.fused_linear_token_logprobs_backward(
            hidden, weight, bias, targets, logprobs, entropy, grad_logprobs, grad_entropy, *ctx.settings,
            needs_hidden, needs_weight or needs_bias,
        )
        return _LOGPROBS_GRADIENTS(hidden=hidden_grad if needs_hidden else None,
                                   weight=weight_grad if needs_weight else None,
                                   bias=bias_grad if needs_bias else None)


_LOGPROBS_GRADIENTS = InputGradients(FusedLinearTokenLogprobs.forward)
