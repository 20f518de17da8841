"""Hidden states and LM head to the policy loss and its gradients, never building [T, V].

The T scored rows are cut into chunks. Per chunk of c rows:

    logits  = hidden_c @ weight.T (+ bias)            [c, V], the only vocabulary-sized buffer
    row kernel: per-row outputs, and d loss / d logits written over `logits` in place
    grad_hidden_c  = dlogits @ weight                 [c, H]
    grad_weight   += dlogits.T @ hidden_c             [V, H]
    grad_bias     += dlogits.sum(0)

so the gradients are complete when the forward returns and the backward only scales them
by the incoming gradient. Three GEMMs of 2 * T * H * V flops each are the floor.

Chunk size trades memory for speed. The chunk's logits cost c * V * itemsize bytes, while
every chunk re-reads and re-writes the [V, H] weight gradient: (T / c) * V * H * 4 bytes
of traffic in bf16. At V = 151,936 the default (logits of one chunk <= 1% of the full
logits) keeps the memory target and pays that traffic; `chunk_size` of ~1,024 or more
rows is the faster choice where memory allows. Below 32 MiB the 1% rule gives way to a
32 MiB chunk (see CHUNK_MEMORY_FLOOR_BYTES).
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers torch.ops.siri.scale_grad_)
from .backends import RowOutputs, check_backend_name, resolve_backend
from .config import LossConfig, check_loss_settings, check_temperature
from .policy_loss import PolicyLossOutput, policy_metrics
from .validation import (
    check_per_token,
    check_policy_structure,
    check_policy_values,
    check_target_values,
    check_targets,
)

# Default chunk: its logits take at most this fraction of the full [T, V] logits...
CHUNK_MEMORY_FRACTION = 0.01
# ...or this many bytes where that is more: below it, chunks get so thin (a few rows) that
# the GEMMs run far under the machine's matmul rate, for a saving of a few MiB.
CHUNK_MEMORY_FLOOR_BYTES = 32 << 20
# Rows are a multiple of this (tensor-core tiles), never fewer.
CHUNK_ROW_MULTIPLE = 16


def default_chunk_size(num_rows: int, vocab: int, itemsize: int) -> int:
    budget = max(CHUNK_MEMORY_FRACTION * num_rows * vocab * itemsize, CHUNK_MEMORY_FLOOR_BYTES)
    rows = int(budget // (vocab * itemsize)) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(CHUNK_ROW_MULTIPLE, rows)


def _chunks(num_rows: int, chunk_size: int):
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


def _chunk_logits(hidden_chunk, weight, bias):
    if bias is None:
        return hidden_chunk @ weight.t()
    return torch.addmm(bias, hidden_chunk, weight.t())


def _float32(tensor):
    return None if tensor is None else tensor.to(torch.float32).contiguous()


torch.library.define(
    "siri::fused_linear_policy_loss",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor advantages, Tensor weights, "
    "Tensor? old_logprobs, Tensor? ref_logprobs, Tensor? rollout_logprobs, float temperature, float clip_low, "
    "float clip_high, float? dual_clip, float kl_coef, str kl_estimator, float entropy_coef, float? tis_cap, "
    "str backend, int chunk_size, bool grad_hidden, bool grad_weight) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "siri::fused_linear_token_logprobs",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, bool with_entropy, "
    "str backend, int chunk_size) -> (Tensor, Tensor)",
)


@torch.library.impl("siri::fused_linear_policy_loss", "default")
def _fused_linear_policy_loss_op(hidden, weight, bias, targets, advantages, weights, old_logprobs, ref_logprobs,
                                 rollout_logprobs, temperature, clip_low, clip_high, dual_clip, kl_coef,
                                 kl_estimator, entropy_coef, tis_cap, backend, chunk_size, grad_hidden, grad_weight):
    cfg = LossConfig(temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap)
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    check_policy_values(targets, advantages, weights, vocab, dict(
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs))
    impl = resolve_backend(backend, hidden.device)
    targets = targets.contiguous()
    advantages, weights = _float32(advantages), _float32(weights)
    old, ref, rollout = _float32(old_logprobs), _float32(ref_logprobs), _float32(rollout_logprobs)
    out = RowOutputs.empty(num_rows, hidden.device)
    any_grad = grad_hidden or grad_weight
    hidden_grad = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    weight_grad = torch.zeros_like(weight) if grad_weight else weight.new_empty(0)
    bias_grad = (
        torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
        if grad_weight and bias is not None
        else hidden.new_empty(0)
    )
    pick = lambda t, rows: None if t is None else t[rows]  # noqa: E731
    for rows in _chunks(num_rows, chunk_size):
        hidden_chunk = hidden[rows]
        logits = _chunk_logits(hidden_chunk, weight, bias)
        chunk_out = RowOutputs(out.logprobs[rows], out.entropy[rows], out.loss[rows], out.kl[rows], out.clipped[rows])
        impl.policy_loss_rows(
            logits, targets[rows], advantages[rows], weights[rows], pick(old, rows), pick(ref, rows),
            pick(rollout, rows), cfg, chunk_out, logits if any_grad else None,
        )
        if grad_hidden:
            torch.mm(logits, weight, out=hidden_grad[rows])
        if grad_weight:
            weight_grad.addmm_(logits.t(), hidden_chunk)
            if bias is not None:
                bias_grad += logits.sum(0, dtype=torch.float32)
    if bias is not None and grad_weight:
        bias_grad = bias_grad.to(bias.dtype)
    return out.logprobs, out.entropy, out.loss, out.kl, out.clipped, hidden_grad, weight_grad, bias_grad


@torch.library.register_fake("siri::fused_linear_policy_loss")
def _(hidden, weight, bias, *args):
    grad_hidden, grad_weight = args[-2], args[-1]
    num_rows = hidden.shape[0]
    rows = tuple(hidden.new_empty(num_rows, dtype=torch.float32) for _ in range(5))
    hidden_grad = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    weight_grad = torch.empty_like(weight) if grad_weight else weight.new_empty(0)
    bias_grad = torch.empty_like(bias) if grad_weight and bias is not None else hidden.new_empty(0)
    return (*rows, hidden_grad, weight_grad, bias_grad)


@torch.library.impl("siri::fused_linear_token_logprobs", "default")
def _fused_linear_token_logprobs_op(hidden, weight, bias, targets, temperature, with_entropy, backend, chunk_size):
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    check_target_values(targets, vocab)
    impl = resolve_backend(backend, hidden.device)
    targets = targets.contiguous()
    logprobs = hidden.new_empty(num_rows, dtype=torch.float32)
    entropy = hidden.new_empty(num_rows if with_entropy else 0, dtype=torch.float32)
    lse = hidden.new_empty(num_rows, dtype=torch.float32)
    for rows in _chunks(num_rows, chunk_size):
        logits = _chunk_logits(hidden[rows], weight, bias)
        impl.logprob_rows(
            logits, targets[rows], temperature, logprobs[rows], entropy[rows] if with_entropy else None, lse[rows]
        )
    return logprobs, entropy


@torch.library.register_fake("siri::fused_linear_token_logprobs")
def _(hidden, weight, bias, targets, temperature, with_entropy, backend, chunk_size):
    num_rows = hidden.shape[0]
    return (
        hidden.new_empty(num_rows, dtype=torch.float32),
        hidden.new_empty(num_rows if with_entropy else 0, dtype=torch.float32),
    )


class _FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap, backend,
                chunk_size, grad_hidden, grad_weight):
        logprobs, entropy, loss_rows, kl, clipped, hidden_grad, weight_grad, bias_grad = (
            torch.ops.siri.fused_linear_policy_loss(
                hidden, weight, bias, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap, backend,
                chunk_size, grad_hidden, grad_weight,
            )
        )
        ctx.grad_flags = (grad_hidden, grad_weight, grad_weight and bias is not None)
        ctx.save_for_backward(hidden_grad, weight_grad, bias_grad)
        ctx.mark_non_differentiable(logprobs, entropy, kl, clipped)
        return loss_rows.sum(), logprobs, entropy, kl, clipped

    @staticmethod
    def backward(ctx, grad_loss, *_non_differentiable):
        grads = []
        for needed, grad in zip(ctx.grad_flags, ctx.saved_tensors):
            if needed:
                torch.ops.siri.scale_grad_(grad.view(-1, grad.shape[-1]), grad_loss)  # 2-D rows, as the op takes
            grads.append(grad if needed else None)
        return (*grads,) + (None,) * 18


def _check_linear(hidden, weight, bias) -> None:
    for name, value, rank in (("hidden", hidden, 2), ("weight", weight, 2)):
        if not isinstance(value, torch.Tensor) or value.dim() != rank:
            raise ValueError(f"{name} must be a {rank}-D tensor, got {getattr(value, 'shape', type(value).__name__)}")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"hidden must be float16, bfloat16 or float32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, H] with H = {hidden.shape[1]} (hidden's last dimension), got {list(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None:
        check_per_token("bias", bias, hidden.device, weight.shape[0])
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")


def _resolve_chunk_size(chunk_size, num_rows: int, vocab: int, itemsize: int) -> int:
    if chunk_size is None:
        return default_chunk_size(num_rows, vocab, itemsize)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    tis_cap: float | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> PolicyLossOutput:
    """`policy_loss` of logits = hidden @ weight.T (+ bias), without building them.

    Args:
        hidden: [T, H] float16, bfloat16 or float32: the hidden states of the scored rows
            (e.g. the model body's output at `PackedBatch.logit_index`).
        weight: [V, H], the LM head, same dtype; bias: optional [V].
        targets, advantages, weights and every keyword of `policy_loss`, same meaning.
            `inplace_backward` changes nothing here: each chunk's logits always take their
            own gradient in place.
        chunk_size: rows per chunk (default: the chunk's logits take 1% of the full logits,
            or 32 MiB where that is more).

    Returns:
        PolicyLossOutput, as `policy_loss`; `loss` is differentiable in hidden, weight and
        bias. Their gradients are formed during the forward (grad of weight accumulated in
        weight's dtype, one rounding per chunk) and only scaled in the backward.
    """
    _check_linear(hidden, weight, bias)
    check_loss_settings(temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap)
    check_policy_structure(hidden, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                           tis_cap, kl_coef, False, logits_name="hidden")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    check_backend_name(backend)
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = _resolve_chunk_size(chunk_size, num_rows, vocab, hidden.dtype.itemsize)
    grad_enabled = torch.is_grad_enabled()
    grad_hidden = grad_enabled and hidden.requires_grad
    grad_weight = grad_enabled and (weight.requires_grad or (bias is not None and bias.requires_grad))
    loss, logprobs, entropy, kl, clipped = _FusedLinearPolicyLoss.apply(
        hidden, weight, bias, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
        float(temperature), float(clip_low), float(clip_high), None if dual_clip is None else float(dual_clip),
        float(kl_coef), kl_estimator, float(entropy_coef), None if tis_cap is None else float(tis_cap), backend,
        chunk, grad_hidden, grad_weight,
    )
    return PolicyLossOutput(loss, logprobs, entropy, policy_metrics(weights, kl, entropy, clipped))


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
):
    """Log-probs (and entropy) of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    Forward only, for the no-grad passes that score old and reference log-probs: call it
    under `torch.no_grad()`. Memory beyond the outputs is one chunk of logits.

    Returns logprobs [T] float32, or (logprobs, entropy) with `return_entropy`.
    """
    _check_linear(hidden, weight, bias)
    check_targets(targets, hidden.device, hidden.shape[0])
    check_temperature(temperature)
    check_backend_name(backend)
    if not isinstance(return_entropy, bool):
        raise ValueError(f"return_entropy must be a bool, got {return_entropy!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        raise ValueError(
            "fused_linear_token_logprobs is forward-only and its outputs carry no gradient: call it under "
            "torch.no_grad(), or use fused_linear_policy_loss to train"
        )
    chunk = _resolve_chunk_size(chunk_size, hidden.shape[0], weight.shape[0], hidden.dtype.itemsize)
    logprobs, entropy = torch.ops.siri.fused_linear_token_logprobs(
        hidden, weight, bias, targets, float(temperature), return_entropy, backend, chunk
    )
    return (logprobs, entropy) if return_entropy else logprobs
