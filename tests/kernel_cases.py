"""Random inputs and the float64 oracle shared by the kernel tests."""

from __future__ import annotations

import os

import torch

from siri.kernels import available_backends, get_backend
from siri.kernels.config import LossConfig
from siri.kernels.reference import policy_loss_reference

# Extra absolute error allowed on top of twice PyTorch's own error at the same precision:
# a kernel that accumulates in float32 must not be worse than eager PyTorch in that dtype.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}

# Settings that each switch on one feature of the contract, and all of them together.
OPTION_SETS = {
    "on-policy": dict(),
    "old-logprobs": dict(old=True),
    "dual-clip": dict(old=True, dual_clip=3.0),
    "tis": dict(old=True, rollout=True, tis_cap=2.0),
    "kl-k1": dict(ref=True, kl_coef=0.1, kl_estimator="k1"),
    "kl-k2": dict(ref=True, kl_coef=0.1, kl_estimator="k2"),
    "kl-k3": dict(ref=True, kl_coef=0.1, kl_estimator="k3"),
    # Reference log-probs spread far enough (ref_spread) that the clamp of k3 at 10 binds on some rows.
    "kl-low-var-kl": dict(old=True, ref=True, ref_spread=3.0, kl_coef=0.1, kl_estimator="low_var_kl"),
    "kl-low-var-kl-on-policy": dict(ref=True, ref_spread=3.0, kl_coef=0.1, kl_estimator="low_var_kl"),
    "kl-k3-ratio": dict(old=True, ref=True, kl_coef=0.1, kl_estimator="k3_ratio"),
    "kl-k3-ratio-on-policy": dict(ref=True, kl_coef=0.1, kl_estimator="k3_ratio"),
    "entropy": dict(entropy_coef=0.05),
    "temperature": dict(old=True, temperature=0.7),
    "everything": dict(old=True, ref=True, rollout=True, tis_cap=1.5, dual_clip=2.5, kl_coef=0.2,
                       kl_estimator="k3", entropy_coef=0.01, temperature=1.3, clip_low=0.1, clip_high=0.3),
}

_TENSOR_FLAGS = ("old", "ref", "rollout")
# Options of the inputs, not keywords of the loss: the spread of ref_logprobs around the true log-probs.
_INPUT_OPTIONS = ("ref_spread",)


def backends_on(device) -> list[str]:
    """Names of the backends present here that run on `device`."""
    return [name for name in available_backends() if get_backend(name).supports_device(device)]


def make_case(num_rows, vocab, dtype, options, *, seed, device="cpu", target_dtype=torch.int64):
    """Logits, per-token inputs and loss keywords for one test case.

    Logits have a spread like a language model's (std 3); old log-probs sit near the current
    ones so that ratios fall on both sides of the clip bounds; a quarter of the rows have
    weight 0 and a target outside [0, V), which must never be read.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    advantages = torch.randn(num_rows, generator=gen)
    weights = torch.rand(num_rows, generator=gen) + 0.1
    ignored = torch.rand(num_rows, generator=gen) < 0.25
    weights[ignored] = 0.0
    targets[ignored] = torch.where(torch.rand(int(ignored.sum()), generator=gen) < 0.5, -100, vocab + 7)
    true_logp = torch.log_softmax(logits.double() / options.get("temperature", 1.0), -1)
    true_logp = true_logp.gather(-1, targets.clamp(0, vocab - 1)[:, None])[:, 0].float()
    per_token = {
        "old": true_logp + 0.3 * torch.randn(num_rows, generator=gen),
        "ref": true_logp + options.get("ref_spread", 0.5) * torch.randn(num_rows, generator=gen),
        "rollout": true_logp + 0.4 * torch.randn(num_rows, generator=gen),
    }
    keywords = {k: v for k, v in options.items() if k not in _TENSOR_FLAGS + _INPUT_OPTIONS}
    for flag in _TENSOR_FLAGS:
        if options.get(flag):
            keywords[f"{flag}_logprobs"] = per_token[flag].to(device)
    return (logits.to(device), targets.to(device=device, dtype=target_dtype), advantages.to(device),
            weights.to(device), keywords)


def loss_config(keywords) -> LossConfig:
    return LossConfig(**{k: v for k, v in keywords.items() if not k.endswith("_logprobs")})


def reference_outputs(logits, targets, advantages, weights, keywords, compute_dtype):
    """Reference loss, per-row outputs and logits gradient, the logits in `compute_dtype`.

    Per-token inputs stay in float32 (float64 for the oracle), as a PyTorch user would keep
    them: in half precision exp(ratio) would overflow before any kernel is judged.
    """
    token_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(token_dtype)  # noqa: E731
    x = logits.detach().to(compute_dtype).requires_grad_(True)
    out = policy_loss_reference(
        x, targets, cast(advantages), cast(weights), cast(keywords.get("old_logprobs")),
        cast(keywords.get("ref_logprobs")), cast(keywords.get("rollout_logprobs")), loss_config(keywords),
    )
    (grad,) = torch.autograd.grad(out.loss, x) if logits.shape[0] else (torch.zeros_like(x),)
    return out, grad


def max_error(actual, expected) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def interpreter_truncates_bf16(backend: str) -> bool:
    """Whether `backend`'s bfloat16 stores are cast by truncation here.

    The Triton interpreter casts float32 to bfloat16 by dropping the low 16 bits (toward
    zero, whatever rounding mode the kernel asks for), where GPUs round to nearest even.
    Under it a Triton kernel's bfloat16 output can sit one unit in the last place from the
    correctly rounded value, an error no GPU run shows.
    """
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at each |value| (8 significant bits); 0 at 0."""
    _, exponent = torch.frexp(values.double().abs())  # |v| = m * 2**e, m in [0.5, 1)
    return torch.where(values == 0, 0.0, torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - 8))


# float32's relative spacing: u = logits / temperature, rounded to float32 by every
# implementation (PyTorch's too), carries an error up to this times |u|; whatever a
# result's scale, it moves by that much of it (p, and so the gradient, by its relative
# error in u). One sample of PyTorch's rounding can be luckier than that; a kernel rounding
# u otherwise (Triton's base 2) is held to float32's own bound.
U_ROUNDING = 2.0**-23


def largest_u(logits, temperature) -> float:
    """max |logits / temperature| over the finite logits (0 when there are none)."""
    finite = logits[torch.isfinite(logits)]
    return finite.double().abs().max().item() / temperature if finite.numel() else 0.0


def assert_close_to_oracle(name, actual, oracle, pytorch, dtype, *, truncated_bf16=False, u_max=0.0):
    """|actual - oracle| <= 2 |pytorch - oracle| + ATOL[dtype], elementwise maximum.

    `truncated_bf16` (see `interpreter_truncates_bf16`) lets each bfloat16 element of
    `actual` be off by one more unit in the last place of its oracle value. `u_max`
    (`largest_u`) adds float32's rounding of u, U_ROUNDING x u_max x the result's scale.
    """
    error = (actual.double() - oracle.double()).abs()
    if truncated_bf16 and actual.dtype == torch.bfloat16:
        error = (error - bf16_ulp(oracle)).clamp_min(0)
    err = error.max().item() if error.numel() else 0.0
    scale = max(1.0, oracle.double().abs().max().item()) if oracle.numel() else 1.0
    budget = 2 * max_error(pytorch, oracle) + ATOL[dtype] + U_ROUNDING * u_max * scale
    assert err <= budget, f"{name}: max error {err:.3g} > allowed {budget:.3g}"
