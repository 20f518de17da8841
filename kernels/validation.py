"""Input checks of the public kernels: every failure is a ValueError naming the argument.

Two kinds of check:

- structural (`check_*_structure`): ranks, lengths, dtypes, devices. They read only
  metadata, so they cost nothing and trace under `torch.compile`.
- value checks (`check_*_values`): targets inside [0, V) where the weight is non-zero,
  finite advantages and weights, no NaN in the given log-probs (old, ref, rollout: -inf
  is a log-prob, NaN is not). They read the data and therefore wait for the device once
  per call (all conditions are gathered into one transfer). They run inside the custom ops,
  so compiled graphs keep them too. `SIRI_VALIDATE=0` switches them off: an out-of-range
  target is then clamped into [0, V) by every backend rather than read out of bounds, and
  a NaN input gives NaN outputs (its row's loss and every entry of its gradient row).
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
    kl_coef,
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
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef!r} needs ref_logprobs (the reference policy's log-probs of the targets)")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if inplace_backward and logits.is_leaf and logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"inplace_backward=True would overwrite {logits_name}, a leaf that requires grad, with its gradient"
        )
    if inplace_backward and logits.stride(1) != 1 and logits.shape[1] > 1:
        raise ValueError(
            "inplace_backward=True needs logits with unit stride along V (the gradient is written into them)"
        )


def _raise_first(failures: list[bool], messages: list[str]) -> None:
    for failed, message in zip(failures, messages):
        if failed:
            raise ValueError(message)


def check_policy_values(targets, advantages, weights, vocab: int, logprobs: dict | None = None) -> None:
    """`logprobs`: the optional per-token log-prob inputs by argument name (None: not given)."""
    if not value_checks_enabled() or targets.numel() == 0:
        return
    scored = weights != 0
    bad_target = scored & ((targets < 0) | (targets >= vocab))
    given = {name: value for name, value in (logprobs or {}).items() if value is not None}
    flags = torch.stack([
        ~torch.isfinite(weights).all(),
        ~torch.isfinite(advantages).all(),
        bad_target.any(),
        *(torch.isnan(value).any() for value in given.values()),
    ]).tolist()  # the one host synchronisation of the call
    _raise_first(flags, [
        "weights must be finite (found NaN or inf)",
        "advantages must be finite (found NaN or inf)",
        f"targets must lie in [0, {vocab}) on every row whose weight is non-zero",
        *(f"{name} must not be NaN (-inf is allowed: a log-prob of 0 probability)" for name in given),
    ])


def check_target_values(targets, vocab: int) -> None:
    if not value_checks_enabled() or targets.numel() == 0:
        return
    if bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"targets must lie in [0, {vocab})")
