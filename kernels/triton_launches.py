"""Every Triton kernel launch of the "triton" backend: its argument types and feature switches.

The backend (`triton_backend.py`, and `ops.py` through it) launches each kernel through one
`Launch` of `LAUNCHES`, and the offline compile (`triton_compile.py`, run on every CPU by
tests/test_triton_compile.py) builds every Launch here for real GPU targets. So a switch
the backend passes without declaring it here fails at its first call (the CPU tests launch
every kernel in the interpreter), and a kernel parameter missing here fails the compile check.
Public `@triton.jit` functions of `triton_kernels.py` are launched kernels and must appear in
`LAUNCHES`; device helpers they call are named with a leading underscore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .triton_kernels import (
    logprob_backward_kernel,
    logprob_kernel,
    policy_loss_kernel,
    row_tiling,
    scale_unless_one_kernel,
)

# Placeholders in `Launch.arguments` for the two dtypes a call decides: pointers of the
# logits' dtype (fp16, bf16, fp32) and the targets' integer dtype (i32, i64).
LOGITS = "*logits"
TARGETS = "*targets"


def block_along_vocab(vocab: int) -> tuple[dict[str, int], int]:
    """({"BLOCK_V": tile width}, num_warps) of a kernel that walks a row in tiles."""
    block, warps = row_tiling(vocab)
    return {"BLOCK_V": block}, warps


@dataclass(frozen=True)
class Launch:
    """One kernel as the backend launches it.

    arguments: every runtime parameter of the kernel, in order, with its Triton type
        (`LOGITS` / `TARGETS` where the call's dtypes decide). Integers are "i32": the sizes
        and row strides the backend passes fit, and Triton then specialises them so.
    switches: the constexpr feature switches -> the values the backend may pass, the one
        meaning "off" first.
    tiling: vocabulary -> (the size constexprs, num_warps); the compile check uses the same.
    options: Triton compile options of every launch (and of the offline compile).
    typical: switch settings the trainer launches most, compiled by the check beside the
        all-off / all-on / one-on ones (a combination those miss can spill on its own).
    """

    name: str
    kernel: Any
    arguments: dict[str, str]
    switches: dict[str, tuple]
    tiling: Callable[[int], tuple[dict[str, int], int]] = block_along_vocab
    options: dict = field(default_factory=dict)
    typical: tuple = ()

    def __call__(self, grid, vocab: int, *args, **switches) -> None:
        if switches.keys() != self.switches.keys():
            raise TypeError(
                f"{self.name}: launched with switches {sorted(switches)}, but triton_launches.py declares "
                f"{sorted(self.switches)}: declare every switch there, so the offline compile check covers it"
            )
        for switch, value in switches.items():
            if value not in self.switches[switch]:
                raise ValueError(f"{self.name}: {switch}={value!r} is outside its declared {self.switches[switch]}")
        sizes, warps = self.tiling(vocab)
        self.kernel[grid](*args, **switches, **sizes, num_warps=warps, **self.options)


_F32 = "*fp32"
_OFF_ON = (False, True)
# The logits kernels' compile options. No implicit FMA: fused, x * inv_temperature - m is formed from the
# unrounded product while the row's max m and lse come from rounded ones, which gave the
# argmax a positive log-prob of the order of ulp(m) on sm_90 (it grows as 1 / temperature).
# And a register budget of 128: at 16 warps that is the whole register file of one CTA, the
# one CTA per SM the persistent grid runs; left to itself, ptxas for sm_80 capped the GRPO
# variant at 64 registers and spilled.
_LOGITS_OPTIONS = dict(enable_fp_fusion=False, maxnreg=128)

POLICY_LOSS = Launch(
    "policy_loss_kernel",
    policy_loss_kernel,
    arguments=dict(
        logits_ptr=LOGITS, logits_row_stride="i32", grad_ptr=LOGITS, grad_row_stride="i32",
        targets_ptr=TARGETS, advantages_ptr=_F32, weights_ptr=_F32, old_ptr=_F32, ref_ptr=_F32, rollout_ptr=_F32,
        logprobs_ptr=_F32, entropy_ptr=_F32, loss_ptr=_F32, kl_ptr=_F32, clipped_ptr=_F32,
        num_rows="i32", V="i32", scale="fp32", inv_temperature="fp32", clip_low="fp32", clip_high="fp32",
        dual_clip="fp32", kl_coef="fp32", entropy_coef="fp32", tis_cap="fp32", ratio_log_clamp="fp32",
    ),
    # KL_ESTIMATOR: the ids of config.KL_ESTIMATORS; "k3" (the default) is what runs when HAS_REF is off.
    switches=dict(
        HAS_OLD=_OFF_ON, HAS_REF=_OFF_ON, KL_ESTIMATOR=(3, 1, 2, 4, 5), HAS_DUAL_CLIP=_OFF_ON, HAS_TIS=_OFF_ON,
        HAS_ENTROPY_GRAD=_OFF_ON, COMPUTE_GRAD=_OFF_ON,
    ),
    options=_LOGITS_OPTIONS,
    # GRPO's update with several mini-batches: old log-probs and the gradient.
    typical=(dict(HAS_OLD=True, HAS_REF=False, KL_ESTIMATOR=3, HAS_DUAL_CLIP=False, HAS_TIS=False,
                  HAS_ENTROPY_GRAD=False, COMPUTE_GRAD=True),),
)

LOGPROB = Launch(
    "logprob_kernel",
    logprob_kernel,
    arguments=dict(
        logits_ptr=LOGITS, logits_row_stride="i32", targets_ptr=TARGETS, logprobs_ptr=_F32, entropy_ptr=_F32,
        lse_ptr=_F32, num_rows="i32", V="i32", scale="fp32",
    ),
    switches=dict(WITH_ENTROPY=_OFF_ON),
    options=_LOGITS_OPTIONS,
)

LOGPROB_BACKWARD = Launch(
    "logprob_backward_kernel",
    logprob_backward_kernel,
    arguments=dict(
        logits_ptr=LOGITS, logits_row_stride="i32", grad_ptr=LOGITS, grad_row_stride="i32", targets_ptr=TARGETS,
        lse_ptr=_F32, logprobs_ptr=_F32, entropy_ptr=_F32, grad_logprobs_ptr=_F32, grad_entropy_ptr=_F32,
        num_rows="i32", V="i32", scale="fp32", inv_temperature="fp32",
    ),
    switches=dict(HAS_GRAD_ENTROPY=_OFF_ON),
    options=_LOGITS_OPTIONS,
)

# The gradient it scales has the logits' dtype (or, in fused_linear, hidden's and weight's).
SCALE_UNLESS_ONE = Launch(
    "scale_unless_one_kernel",
    scale_unless_one_kernel,
    arguments=dict(grad_ptr=LOGITS, grad_row_stride="i32", scale_ptr=_F32, num_rows="i32", V="i32"),
    switches={},
)

LAUNCHES = (POLICY_LOSS, LOGPROB, LOGPROB_BACKWARD, SCALE_UNLESS_ONE)
