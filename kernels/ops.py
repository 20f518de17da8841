"""`torch.library` custom ops around the backends, with fake (meta) implementations.

The ops are opaque to `torch.compile`: it traces through the public functions and the
autograd Functions, sees each op as one node whose output shapes the fake implementations
give, and never breaks the graph on the data-dependent checks or the launches inside.

    siri::policy_loss_rows          -> (logprobs, entropy, loss_rows, kl, clipped, grad_logits)
    siri::policy_loss_rows_inplace  -> (logprobs, entropy, loss_rows, kl, clipped); grad into logits
    siri::token_logprobs            -> (logprobs, entropy, lse [T, 2]: the row's max and log-sum)
    siri::token_logprobs_backward   -> grad_logits
    siri::scale_grad_               grad *= scale, in place
    siri::fused_linear_policy_loss  -> (logprobs, entropy, loss_rows, kl, clipped, grad_hidden, grad_weight,
                                        grad_bias), from hidden states and an LM head (fused_linear.py)
    siri::fused_linear_token_logprobs -> (logprobs, entropy)

Per-row outputs are float32 [T]; an output that was not asked for is an empty tensor.
"""

from __future__ import annotations

import torch

from . import fused_linear_algorithms as linear
from .backends import RowOutputs, lse_buffer, resolve_backend
from .config import LossConfig, check_temperature
from .validation import check_policy_values, check_target_values

_POLICY_ARGS = (
    "Tensor targets, Tensor advantages, Tensor weights, Tensor? old_logprobs, Tensor? ref_logprobs, "
    "Tensor? rollout_logprobs, float temperature, float clip_low, float clip_high, float? dual_clip, "
    "float kl_coef, str kl_estimator, float entropy_coef, float? tis_cap, str backend"
)
_ROWS = "Tensor, Tensor, Tensor, Tensor, Tensor"

torch.library.define(
    "siri::policy_loss_rows", f"(Tensor logits, {_POLICY_ARGS}, bool compute_grad) -> ({_ROWS}, Tensor)"
)
torch.library.define("siri::policy_loss_rows_inplace", f"(Tensor(a!) logits, {_POLICY_ARGS}) -> ({_ROWS})")
torch.library.define(
    "siri::token_logprobs",
    "(Tensor logits, Tensor targets, float temperature, bool with_entropy, str backend)"
    " -> (Tensor, Tensor, Tensor)",
)
torch.library.define(
    "siri::token_logprobs_backward",
    "(Tensor logits, Tensor targets, Tensor lse, Tensor logprobs, Tensor? entropy, Tensor grad_logprobs, "
    "Tensor? grad_entropy, float temperature, str backend) -> Tensor",
)
torch.library.define("siri::scale_grad_", "(Tensor(a!) grad, Tensor scale) -> ()")


def _float32(tensor):
    return None if tensor is None else tensor.to(torch.float32).contiguous()


def _policy_loss_rows(logits, targets, advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs,
                      temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef,
                      tis_cap, backend, grad_logits) -> RowOutputs:
    cfg = LossConfig(temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap)
    check_policy_values(targets, advantages, weights, logits.shape[1], dict(
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs))
    impl = resolve_backend(backend, logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = RowOutputs.empty(logits.shape[0], logits.device)
    impl.policy_loss_rows(
        logits, targets.contiguous(), _float32(advantages), _float32(weights),
        _float32(old_logprobs), _float32(ref_logprobs), _float32(rollout_logprobs), cfg, out, grad_logits,
    )
    return out


@torch.library.impl("siri::policy_loss_rows", "default")
def _policy_loss_rows_op(logits, *args):
    *policy_args, compute_grad = args
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    out = _policy_loss_rows(logits, *policy_args, grad if compute_grad else None)
    return out.logprobs, out.entropy, out.loss, out.kl, out.clipped, grad


@torch.library.impl("siri::policy_loss_rows_inplace", "default")
def _policy_loss_rows_inplace_op(logits, *args):
    out = _policy_loss_rows(logits, *args, logits)
    # The native and Triton kernels write through raw pointers, unseen by autograd: bump the
    # version counter as any in-place op does, so that a backward which saved these logits
    # (tanh, exp, log_softmax...) fails autograd's check instead of reading the gradient.
    torch.autograd.graph.increment_version(logits)
    return out.logprobs, out.entropy, out.loss, out.kl, out.clipped


def _fake_rows(logits):
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(5))


@torch.library.register_fake("siri::policy_loss_rows")
def _(logits, *args):
    compute_grad = args[-1]
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    return (*_fake_rows(logits), grad)


@torch.library.register_fake("siri::policy_loss_rows_inplace")
def _(logits, *args):
    return _fake_rows(logits)


@torch.library.impl("siri::token_logprobs", "default")
def _token_logprobs_op(logits, targets, temperature, with_entropy, backend):
    check_temperature(temperature)
    check_target_values(targets, logits.shape[1])
    impl = resolve_backend(backend, logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_rows = logits.shape[0]
    logprobs = logits.new_empty(num_rows, dtype=torch.float32)
    lse = lse_buffer(num_rows, logits.device)
    entropy = logits.new_empty(num_rows if with_entropy else 0, dtype=torch.float32)
    impl.logprob_rows(logits, targets.contiguous(), temperature, logprobs, entropy if with_entropy else None, lse)
    return logprobs, entropy, lse


@torch.library.register_fake("siri::token_logprobs")
def _(logits, targets, temperature, with_entropy, backend):
    num_rows = logits.shape[0]
    make = lambda *shape: logits.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return make(num_rows), make(num_rows if with_entropy else 0), make(num_rows, 2)


@torch.library.impl("siri::token_logprobs_backward", "default")
def _token_logprobs_backward_op(
    logits, targets, lse, logprobs, entropy, grad_logprobs, grad_entropy, temperature, backend
):
    impl = resolve_backend(backend, logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad_logits = torch.empty_like(logits)
    impl.logprob_backward(
        logits, targets.contiguous(), temperature, lse, logprobs, entropy,
        _float32(grad_logprobs), _float32(grad_entropy), grad_logits,
    )
    return grad_logits


@torch.library.register_fake("siri::token_logprobs_backward")
def _(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.impl("siri::scale_grad_", "default")
def _scale_grad_op(grad, scale):
    if grad.is_cuda:
        from .triton_backend import scale_unless_one_, triton

        if triton is not None:
            scale_unless_one_(grad, scale)
            return
        grad.mul_(scale.to(grad.dtype))
    elif float(scale) != 1.0:  # a CPU scalar: reading it waits for nothing
        grad.mul_(scale.to(torch.float32))


@torch.library.register_fake("siri::scale_grad_")
def _(grad, scale):
    return None


# The fused-linear ops: `chunk_size` None runs the vocabulary split (or, with gradients, row
# chunks where they fit its memory budget), an int the row chunks (fused_linear_algorithms.py);
# gradients not asked for come back as empty tensors.
torch.library.define(
    "siri::fused_linear_policy_loss",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor advantages, Tensor weights, "
    "Tensor? old_logprobs, Tensor? ref_logprobs, Tensor? rollout_logprobs, float temperature, float clip_low, "
    "float clip_high, float? dual_clip, float kl_coef, str kl_estimator, float entropy_coef, float? tis_cap, "
    "str backend, int? chunk_size, bool grad_hidden, bool grad_weight) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "siri::fused_linear_token_logprobs",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, bool with_entropy, "
    "str backend, int? chunk_size) -> (Tensor, Tensor)",
)


def _cast_or_empty(grad, like, fallback):
    return fallback.new_empty(0) if grad is None else grad.to(like.dtype)


@torch.library.impl("siri::fused_linear_policy_loss", "default")
def _fused_linear_policy_loss_op(hidden, weight, bias, targets, advantages, weights, old_logprobs, ref_logprobs,
                                 rollout_logprobs, temperature, clip_low, clip_high, dual_clip, kl_coef,
                                 kl_estimator, entropy_coef, tis_cap, backend, chunk_size, grad_hidden, grad_weight):
    cfg = LossConfig(temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap)
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    check_policy_values(targets, advantages, weights, vocab, dict(
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs))
    impl = resolve_backend(backend, hidden.device)
    per_token = [_float32(t) for t in (advantages, weights, old_logprobs, ref_logprobs, rollout_logprobs)]
    if chunk_size is None and (grad_hidden or grad_weight):  # three GEMMs instead of four where they fit
        chunk_size = linear.row_chunks_within_budget(num_rows, vocab, hidden.shape[1], hidden.dtype.itemsize)
    if chunk_size is None:
        algorithm = linear.vocab_split_policy_loss
        size = linear.vocab_slice_size(num_rows, vocab, hidden.dtype.itemsize)
    else:
        algorithm, size = linear.row_chunked_policy_loss, chunk_size
    out, hidden_grad, weight_grad, bias_grad = algorithm(
        hidden, weight, bias, targets.contiguous(), *per_token, cfg, impl, size, grad_hidden, grad_weight
    )
    return (out.logprobs, out.entropy, out.loss, out.kl, out.clipped, _cast_or_empty(hidden_grad, hidden, hidden),
            _cast_or_empty(weight_grad, weight, hidden),
            _cast_or_empty(bias_grad, bias, hidden) if bias is not None else hidden.new_empty(0))


@torch.library.register_fake("siri::fused_linear_policy_loss")
def _(hidden, weight, bias, *args):
    grad_hidden, grad_weight = args[-2], args[-1]
    rows = _fake_rows(hidden)
    hidden_grad = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    weight_grad = torch.empty_like(weight) if grad_weight else weight.new_empty(0)
    bias_grad = torch.empty_like(bias) if grad_weight and bias is not None else hidden.new_empty(0)
    return (*rows, hidden_grad, weight_grad, bias_grad)


@torch.library.impl("siri::fused_linear_token_logprobs", "default")
def _fused_linear_token_logprobs_op(hidden, weight, bias, targets, temperature, with_entropy, backend, chunk_size):
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    check_target_values(targets, vocab)
    impl = resolve_backend(backend, hidden.device)
    if chunk_size is None:
        size = linear.vocab_slice_size(num_rows, vocab, hidden.dtype.itemsize)
        logprobs, entropy = linear.vocab_split_token_logprobs(
            hidden, weight, bias, targets.contiguous(), temperature, impl, size
        )
    else:
        logprobs, entropy = linear.row_chunked_token_logprobs(
            hidden, weight, bias, targets.contiguous(), temperature, with_entropy, impl, chunk_size
        )
    return logprobs, entropy if with_entropy else entropy.new_empty(0)


@torch.library.register_fake("siri::fused_linear_token_logprobs")
def _(hidden, weight, bias, targets, temperature, with_entropy, backend, chunk_size):
    num_rows = hidden.shape[0]
    return (
        hidden.new_empty(num_rows, dtype=torch.float32),
        hidden.new_empty(num_rows if with_entropy else 0, dtype=torch.float32),
    )
