"""The "triton" backend: launchers of the kernels in `triton_kernels.py`.

Every launch goes through `triton_launches.py`, which declares each kernel's arguments and
switches for the offline compile check.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter
(`TRITON_INTERPRET=1`), which is how the CPU-only test suite exercises every kernel.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .backends import Backend, RowOutputs
from .config import RATIO_LOG_CLAMP, LossConfig

try:
    import triton

    from .triton_kernels import rereads_row
    from .triton_launches import LOGPROB, LOGPROB_BACKWARD, POLICY_LOSS, SCALE_UNLESS_ONE
except ImportError:  # triton is optional: the backend reports itself unavailable
    triton = None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _supports_device(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def _or(tensor, fallback):
    # Triton needs a pointer for every argument; absent optional inputs are never read
    # (their constexpr flag is off), so any float32 tensor stands in.
    return fallback if tensor is None else tensor


# Share of L2 that the rows in flight of a re-reading kernel may fill: pass 2 must find
# them there, next to the gradient rows streaming out and other tenants of the cache.
L2_ROW_FRACTION = 0.6
# CTAs per SM at most for such a kernel (16 warps each: 2 fill half of an SM's warps).
MAX_CTAS_PER_SM = 2
# Programs of the persistent scale grid per SM: enough to stream, one launch when skipped.
SCALE_PROGRAMS_PER_SM = 4
# Programs under the interpreter (no SMs): few, and not a divisor of the test shapes, so
# each program takes several rows and the row loop is exercised.
INTERPRETER_PROGRAMS = 3


def _device_shape(device: torch.device) -> tuple[int, int]:
    """(SMs, L2 bytes) of a CUDA device."""
    return _device_shape_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_shape_of(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.L2_cache_size


def rows_in_flight(device: torch.device, vocab: int, itemsize: int) -> int:
    """Programs of a persistent grid over rows that re-read part of each row from L2.

    One CTA per SM at least; more only while the rows in flight (one per CTA, `vocab *
    itemsize` bytes each) fit in L2_ROW_FRACTION of L2, so that pass 2 re-reads from L2.
    At V = 151,936 bf16 (304 KB a row) that is one CTA per SM: 40 MB on an H100's 132 SMs
    against 50 MB of L2, 40 MB against an H200's 60 MB.
    """
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return rows_in_flight_on(*_device_shape(device), vocab * itemsize)


def rows_in_flight_on(sms: int, l2_bytes: int, row_bytes: int) -> int:
    """`rows_in_flight` for a GPU of `sms` SMs and `l2_bytes` of L2 (no device needed)."""
    per_sm = int(L2_ROW_FRACTION * l2_bytes // (sms * row_bytes))
    return sms * max(1, min(MAX_CTAS_PER_SM, per_sm))


def _grid(device: torch.device, num_rows: int, programs: int) -> tuple[int]:
    # Under the interpreter every kernel gets the short grid, so its row loop is tested.
    return (min(num_rows, programs if device.type == "cuda" else INTERPRETER_PROGRAMS),)


def _base2_scale(temperature: float) -> float:
    return math.log2(math.e) / temperature


def policy_loss_rows(
    logits, targets, advantages, weights, old, ref, rollout, cfg: LossConfig, out: RowOutputs, grad_logits
):
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return
    has_tis = rollout is not None and cfg.tis_cap is not None
    grad = logits if grad_logits is None else grad_logits
    # A row that pass 2 re-reads must still be in L2: bound the rows in flight.
    programs = rows_in_flight(logits.device, vocab, logits.element_size()) if rereads_row(vocab) else num_rows
    POLICY_LOSS(
        _grid(logits.device, num_rows, programs), vocab, logits, logits.stride(0), grad, grad.stride(0),
        targets, advantages, weights, _or(old, weights), _or(ref, weights), _or(rollout, weights),
        out.logprobs, out.entropy, out.loss, out.kl, out.clipped,
        num_rows, vocab, _base2_scale(cfg.temperature), 1.0 / cfg.temperature, cfg.clip_low, cfg.clip_high,
        cfg.dual_clip if cfg.has_dual_clip else 0.0, cfg.kl_coef, cfg.entropy_coef,
        cfg.tis_cap if has_tis else 0.0, RATIO_LOG_CLAMP,
        HAS_OLD=old is not None, HAS_REF=ref is not None, KL_ESTIMATOR=cfg.kl_estimator_id,
        HAS_DUAL_CLIP=cfg.has_dual_clip, HAS_TIS=has_tis, HAS_ENTROPY_GRAD=cfg.has_entropy_grad,
        COMPUTE_GRAD=grad_logits is not None,
    )


def logprob_rows(logits, targets, temperature, logprobs, entropy, lse):
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return
    LOGPROB(
        _grid(logits.device, num_rows, num_rows), vocab, logits, logits.stride(0), targets, logprobs,
        _or(entropy, lse), lse, num_rows, vocab, _base2_scale(temperature), WITH_ENTROPY=entropy is not None,
    )


def logprob_backward(logits, targets, temperature, lse, logprobs, entropy, grad_logprobs, grad_entropy, grad_logits):
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return
    LOGPROB_BACKWARD(
        _grid(logits.device, num_rows, num_rows), vocab, logits, logits.stride(0), grad_logits,
        grad_logits.stride(0), targets, lse, logprobs, _or(entropy, lse), grad_logprobs, _or(grad_entropy, lse),
        num_rows, vocab, _base2_scale(temperature), 1.0 / temperature, HAS_GRAD_ENTROPY=grad_entropy is not None,
    )


def scale_unless_one_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale on a CUDA tensor, with no pass over grad when scale == 1 (see kernel)."""
    num_rows, vocab = grad.shape
    if num_rows == 0 or vocab == 0:
        return
    programs = SCALE_PROGRAMS_PER_SM * _device_shape(grad.device)[0] if grad.is_cuda else INTERPRETER_PROGRAMS
    SCALE_UNLESS_ONE(_grid(grad.device, num_rows, programs), vocab, grad, grad.stride(0), scale, num_rows, vocab)


def make_backend(name: str) -> Backend | None:
    if triton is None:
        return None
    return Backend(
        name="triton",
        supports_device=_supports_device,
        policy_loss_rows=policy_loss_rows,
        logprob_rows=logprob_rows,
        logprob_backward=logprob_backward,
        lse_base=2.0,
    )
