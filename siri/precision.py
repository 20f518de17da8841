"""Mixed precision for training: master weights in `model.param_dtype`, the forward in `model.dtype`.

AdamW on bfloat16 parameters loses the update: at the paper's lr of 1e-6 a step moves a
weight by about 1e-6, while a bfloat16 weight of magnitude 0.02 has a spacing of 1.2e-4
between neighbours, so the sum rounds back to the old weight (a tiny Qwen2 in bfloat16 kept
98% of its elements unchanged over ten such steps). As verl, TRL and OpenRLHF do, the
trainer therefore keeps the parameters, their gradients and the optimizer state in float32
and runs the forward under `torch.autocast` in the compute dtype; the rollout engine
(vLLM) still serves the compute dtype.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters; ValueError if they disagree."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"model: expected one floating-point parameter dtype, found {sorted(map(str, dtypes))}")
    return dtypes.pop()


def compute_context(device: torch.device, compute_dtype: torch.dtype, param_dtype: torch.dtype):
    """A factory of contexts in which the model's forward runs in `compute_dtype`.

    `torch.autocast` when the two dtypes differ (its casts of the weights are
    differentiable, so the float32 master weights get float32 gradients); a no-op context
    when they agree.
    """
    if compute_dtype == param_dtype:
        return contextlib.nullcontext
    if compute_dtype == torch.float16:
        warnings.warn("model.dtype=float16 runs the forward in float16 without loss scaling: small gradients "
                      "may underflow to zero; bfloat16 has float32's range", stacklevel=2)
    return lambda: torch.autocast(device.type, dtype=compute_dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on `device_type` here, None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
