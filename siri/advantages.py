"""Group-relative advantages from outcome rewards: GRPO, Dr. GRPO and RLOO, plus DAPO's filter.

Each prompt is sampled n times; the n responses form a group (``group_ids``, verl's
``index`` / ``uid``), and a response's advantage is its reward relative to its group's.
With r_i the reward of response i, its group's n rewards having mean μ and unbiased
standard deviation σ (``torch.std``, as verl and TRL use):

- ``grpo``   (verl ``compute_grpo_outcome_advantage``): A_i = (r_i − μ) / (σ + eps)
- ``drgrpo`` (Dr. GRPO, verl's GRPO with ``norm_adv_by_std_in_grpo=False``): A_i = r_i − μ
- ``rloo``   (leave-one-out baseline): A_i = r_i − mean_{j≠i} r_j = n / (n − 1) · (r_i − μ)

A group of one response has no baseline to compare with, so its advantage is 0: it
carries no learning signal. (verl instead gives it r_i / (1 + eps) for GRPO and r_i for
RLOO, which rewards a lone sample for its absolute score.)

The per-group statistics are computed in float64 on a dense [groups, largest group]
layout filled by unique indices, so the result is bit-for-bit deterministic on every
device: no atomic scatter-add, whose summation order varies on GPUs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["ADVANTAGE_ESTIMATORS", "compute_advantages", "dynamic_sampling_mask"]

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")


def _as_rewards(rewards: torch.Tensor | Sequence[float]) -> torch.Tensor:
    if isinstance(rewards, torch.Tensor):
        values = rewards
    else:
        try:
            values = torch.as_tensor(np.asarray(rewards, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError("rewards must be a 1-D tensor or a sequence of numbers") from None
    if values.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(values.shape)}")
    if values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"rewards must be real numbers, got dtype {values.dtype}")
    values = values.to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("rewards must be finite")
    return values


def _group_index(group_ids: torch.Tensor | Sequence, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense group index in [0, groups) per sample, and the number of groups."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1 or group_ids.is_floating_point() or group_ids.is_complex():
            raise ValueError(
                f"group_ids must be a 1-D integer tensor, got {group_ids.dtype} of shape {tuple(group_ids.shape)}"
            )
        if group_ids.numel() != n:
            raise ValueError(f"group_ids has {group_ids.numel()} entries, rewards has {n}")
        uniques, index = torch.unique(group_ids.to(device), return_inverse=True)
    else:
        # Lists may hold ints or strings (verl's uid is a uuid string); np.unique gives the
        # dense index without a Python loop over samples either way.
        try:
            array = np.asarray(group_ids)
        except (TypeError, ValueError):
            raise ValueError("group_ids must be a 1-D sequence of ints or strings") from None
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iuUS"):
            raise ValueError(
                f"group_ids must be a 1-D sequence of ints or strings, got {array.dtype} of shape {array.shape}"
            )
        if array.size != n:
            raise ValueError(f"group_ids has {array.size} entries, rewards has {n}")
        uniques, inverse = np.unique(array, return_inverse=True)
        index = torch.as_tensor(inverse.reshape(-1).astype(np.int64), device=device)
    return index, len(uniques)


def _grouped(
    rewards: torch.Tensor, index: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards laid out as [groups, largest group] (0-padded), the validity mask and group sizes."""
    n = rewards.numel()
    sizes = torch.bincount(index, minlength=num_groups)
    # A stable sort keeps each group's samples in their original order, so each row is
    # summed in the same order whatever the device.
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    group_start = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(n, device=rewards.device) - group_start[sorted_index]
    width = int(sizes.max()) if n else 0
    dense = rewards.new_zeros(num_groups, width)
    mask = torch.zeros(num_groups, width, dtype=torch.bool, device=rewards.device)
    dense[sorted_index, slot] = rewards[order]
    mask[sorted_index, slot] = True
    return dense, mask, sizes


def compute_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: torch.Tensor | Sequence,
    estimator: str = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-response advantages relative to each response's group.

    Args:
        rewards: [N] outcome rewards (tensor or sequence of numbers), finite.
        group_ids: [N] the group (prompt) of each response: an integer tensor, or a
            sequence of ints or strings. Groups need not be contiguous nor equal in size.
        estimator: ``"grpo"``, ``"drgrpo"`` or ``"rloo"`` (see the module docstring).
        eps: added to the group's standard deviation by ``"grpo"`` (verl's default, 1e-6).

    Returns:
        [N] float32 advantages on the device of `rewards` (CPU for sequences). Responses
        in a group of one get 0. Within a group of equal rewards every estimator gives 0.

    Raises:
        ValueError: naming the argument, for mismatched lengths, non-finite rewards, an
            unknown estimator or a negative eps.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    values = _as_rewards(rewards)
    index, num_groups = _group_index(group_ids, values.numel(), values.device)
    if values.numel() == 0:
        return values.to(torch.float32)

    dense, mask, sizes = _grouped(values, index, num_groups)
    counts = sizes.to(torch.float64)
    mean = dense.sum(dim=1) / counts
    # Center before squaring (two passes): E[x²] − E[x]² cancels catastrophically when
    # rewards are large and close together.
    centered = values - mean[index]
    if estimator == "grpo":
        dense_centered = torch.where(mask, dense - mean[:, None], 0.0)
        variance = dense_centered.square().sum(dim=1) / (counts - 1).clamp(min=1)
        advantages = centered / (variance.sqrt()[index] + eps)
    elif estimator == "drgrpo":
        advantages = centered
    else:
        # r_i − (n μ − r_i) / (n − 1) = n / (n − 1) · (r_i − μ); n = 1 is zeroed below.
        advantages = centered * (counts / (counts - 1).clamp(min=1))[index]
    advantages = torch.where(sizes[index] > 1, advantages, 0.0)
    return advantages.to(torch.float32)


def dynamic_sampling_mask(rewards: torch.Tensor | Sequence[float], group_ids: torch.Tensor | Sequence) -> torch.Tensor:
    """DAPO's dynamic sampling: True for responses whose group's rewards are not all equal.

    A group whose responses all scored the same (all correct or all wrong) has zero
    advantage under every estimator here and only dilutes the batch; DAPO drops it and
    samples more prompts. Groups of one are dropped too.

    Returns:
        [N] bool on the device of `rewards` (CPU for sequences).
    """
    values = _as_rewards(rewards)
    index, num_groups = _group_index(group_ids, values.numel(), values.device)
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=values.device)
    dense, mask, _ = _grouped(values, index, num_groups)
    group_max = torch.where(mask, dense, -torch.inf).amax(dim=1)
    group_min = torch.where(mask, dense, torch.inf).amin(dim=1)
    return (group_max != group_min)[index]
