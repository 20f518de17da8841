"""Input checks of the public kernels: every failure is a ValueError naming the argument.

Two kinds of check:

- structural (`check_*_structure`): ranks, lengths, dtypes, devices. They read only
  metadata, so they cost nothing and trace under `torch.compile`.
- value checks (`check_*_values`): targets inside [0, V) where the weight is non-zero,
  finite advantages and weights. They read the data and therefore wait for the device once
  per call (all conditions are gathered into one transfer). They run inside the custom ops,
  so compiled graphs keep them too. `SIRI_VALIDATE=0` switches them off; an out-of-range
  target is then clamped into the row by the kernels rather than read out of bounds.
"""

from __future__ import annotations

import os

import torch

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TARGET_DTYPES = (torch.int32, torch.int64)


def value_checks_enabled() -> bool:
    return os.environ.get("SIRI_VALIDATE", "1") != "0"


def _check_tensor(name: str, value, device: torch.device, num_rows: int | None) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but logits are on {device}")
    if num_rows is not None and (value.dim() != 1 or value.shape[0] != num_rows):
        raise ValueError(f"{name} must have shape [{num_rows}] (one value per row of logits), got {list(value.shape)}")


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, V], got shape {list(logits.shape)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"{name} must have a vocabulary of at least 1 (got V = 0)")


def check_targets(targets, device: torch.device, num_rows: int) -> None:
    _check_tensor("targets", targets, device, num_rows)
    if targets.dtype not in TARGET_DTYPES:
        raise ValueError(f"targets must be int32 or int64, got {targets.dtype}")


def check_per_token(name: str, value, device: torch.device, num_rows: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check_tensor(name, value, device, num_rows)
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")


def check_policy_structure(
    logits,
    targets,
    advantages,
    weights,
    old_logprobs,
    ref_logprobs,
    rollout_logprobs,
    tis_cap,
    inplace_backward,
    logits_name="logits",
) -> None:
    check_logits(logits_name, logits)
    device, num_rows = logits.device, logits.shape[0]
    check_targets(targets, device, num_rows)
    check_per_token("advantages", advantages, device, num_rows)
    check_per_token("weights", weights, device, num_rows)
    check_per_token("old_logprobs", old_logprobs, device, num_rows, optional=True)
    check_per_token("ref_logprobs", ref_logprobs, device, num_rows, optional=True)
    check_per_token("rollout_logprobs", rollout_logprobs, device, num_rows, optional=True)
    if tis_cap is not None and rollout_logprobs is None:
        raise ValueError("tis_cap needs rollout_logprobs (the rollout engine's log-probs of the targets)")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if inplace_backward and logits.stride(1) != 1:
        raise ValueError(
            "inplace_backward=True needs logits with unit stride along V (the gradient is written into them)"
        )


def _raise_first(failures: list[bool], messages: list[str]) -> None:
    for failed, message in zip(failures, messages):
        if failed:
            raise ValueError(message)


def check_policy_values(targets, advantages, weights, vocab: int) -> None:
    if not value_checks_enabled() or targets.numel() == 0:
        return
    scored = weights != 0
    bad_target = scored & ((targets < 0) | (targets >= vocab))
    flags = torch.stack([
        ~torch.isfinite(weights).all(),
        ~torch.isfinite(advantages).all(),
        bad_target.any(),
    ]).tolist()  # the one host synchronisation of the call
    _raise_first(flags, [
        "weights must be finite (found NaN or inf)",
        "advantages must be finite (found NaN or inf)",
        f"targets must lie in [0, {vocab}) on every row whose weight is non-zero",
    ])


def check_target_values(targets, vocab: int) -> None:
    if not value_checks_enabled() or targets.numel() == 0:
        return
    if bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"targets must lie in [0, {vocab})")
