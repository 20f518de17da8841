"""The scalar settings of the policy loss, validated once and shared by every backend.

Every field is a runtime value for the kernels (changing one never recompiles) except the
feature switches derived from them (`has_dual_clip`, `has_entropy_grad`), which the Triton
and native kernels specialise on. Truncated importance sampling is a switch too, but it also
needs `rollout_logprobs`, a tensor, so each backend derives it at the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# KL estimators of d = ref - logp: Schulman's k1, k2, k3; "low_var_kl", k3 clamped above at
# LOW_VAR_KL_CLAMP as verl and OpenRLHF clamp it (k3 >= 0, so only the upper bound of their
# [-10, 10] can bind); "k3_ratio", k3 times the importance ratio r_t, differentiable through
# r_t, as TRL's `use_bias_correction_kl`. The integer is what kernels take.
KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3, "low_var_kl": 4, "k3_ratio": 5}
LOW_VAR_KL_CLAMP = 10.0

# The importance ratio is exp(clamp(logp - old, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP)):
# exp(20) ~ 4.9e8 keeps the ratio finite in float32 while never binding in practice.
RATIO_LOG_CLAMP = 20.0

# Codes written per row into `clipped`: which clip, if any, cut the gradient of that row.
CLIP_NONE, CLIP_RATIO, CLIP_DUAL = 0.0, 1.0, 2.0


def _require_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# Every temperature siri takes (the kernels', the rollout engines', `siri eval --temperature`)
# divides logits by it. 0 is greedy decoding, not a distribution; +inf makes every logit 0,
# uniform sampling whatever the model says; NaN is no number. So: finite and > 0.
TEMPERATURE_DOMAIN = "a finite number > 0"


def is_temperature(value) -> bool:
    """Whether `value` is a temperature (`TEMPERATURE_DOMAIN`): a real number, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_temperature(temperature, name: str = "temperature") -> None:
    """ValueError naming `name` unless `temperature` is `TEMPERATURE_DOMAIN`."""
    if not is_temperature(temperature):
        raise ValueError(f"{name} must be {TEMPERATURE_DOMAIN}, got {temperature!r}")


def check_loss_settings(
    temperature, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap
) -> None:
    """ValueError naming the first setting out of its domain. Reads Python scalars only."""
    check_temperature(temperature)
    if not 0 <= _require_finite("clip_low", clip_low) < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if _require_finite("clip_high", clip_high) < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    if dual_clip is not None and _require_finite("dual_clip", dual_clip) <= 1:
        raise ValueError(f"dual_clip must be > 1 (it caps -A*ratio for A < 0), got {dual_clip!r}")
    _require_finite("kl_coef", kl_coef)
    _require_finite("entropy_coef", entropy_coef)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {kl_estimator!r}")
    if tis_cap is not None and _require_finite("tis_cap", tis_cap) <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap!r}")


@dataclass(frozen=True)
class LossConfig:
    """Scalar settings of `policy_loss`, as docs/design.md defines them."""

    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        check_loss_settings(
            self.temperature, self.clip_low, self.clip_high, self.dual_clip,
            self.kl_coef, self.kl_estimator, self.entropy_coef, self.tis_cap,
        )

    @property
    def kl_estimator_id(self) -> int:
        return KL_ESTIMATORS[self.kl_estimator]

    @property
    def has_dual_clip(self) -> bool:
        return self.dual_clip is not None

    @property
    def has_entropy_grad(self) -> bool:
        return self.entropy_coef != 0.0
