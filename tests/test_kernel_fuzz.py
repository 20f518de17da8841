"""Property-based fuzz of the kernel API: every backend against the float64 oracle.

Hypothesis draws shapes, dtypes, temperatures (down to 1e-9), logit scales (up to 1e30),
masks (weight-0 rows with targets outside [0, V)), -inf logits (on targets too, and whole
rows), every option of `policy_loss` and `token_logprobs`, int32 / int64 targets, strided
rows, in-place gradients and non-unit upstream gradients. A case passes when every output
has the oracle's NaN and infinities exactly, and elsewhere at most twice the error of
PyTorch computing the same formulas in float32 on the same logits, plus (ATOL + float32's
rounding of |u| = |logits / temperature|) x scale.

The "ci" profile (tests/conftest.py) draws the same SIRI_FUZZ_EXAMPLES cases (default 50 per
test) on every run; a larger hunt draws fresh ones:
    HYPOTHESIS_PROFILE=explore SIRI_FUZZ_EXAMPLES=2000 python -m pytest tests/test_kernel_fuzz.py
"""

import os

import pytest
import torch
from conftest import DEVICE
from kernel_cases import ATOL, U_ROUNDING, backends_on, bf16_ulp, interpreter_truncates_bf16, largest_u

from siri.kernels import policy_loss, token_logprobs
from siri.kernels.config import KL_ESTIMATORS, LossConfig
from siri.kernels.reference import logprobs_and_entropy, policy_loss_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKENDS = backends_on(DEVICE)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EXAMPLES = int(os.environ.get("SIRI_FUZZ_EXAMPLES", "50"))
# 1 and 2: degenerate rows; 97, 1000: a vector body and a scalar tail; 2049 and 8193: just
# past a statistics block of the cpu kernels (2048) and a Triton tile (8192).
VOCABS = [1, 2, 3, 97, 1000, 2049, 8193]
# |logits / temperature| stays below this: float32 holds it, its exponentials and the
# gradient's 1 / temperature with room to spare.
U_BOUND = 1e36
# No "explain" phase: it reruns a failing case hundreds of times to annotate it.
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], deadline=None,
                         phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])


@st.composite
def logit_cases(draw):
    """(logits, targets, temperature, weights, on_policy_only) for one case."""
    num_rows = draw(st.integers(0, 6))
    vocab = draw(st.sampled_from(VOCABS))
    dtype = draw(st.sampled_from(DTYPES))
    # Extreme cases (tiny temperatures, huge logits) are where float32 cannot resolve a
    # log-ratio any more (|logp| ~ 1e9): they run on-policy, the others take every option.
    extreme = draw(st.booleans())
    if extreme:
        temperature = 10.0 ** draw(st.floats(-9, 2))
        scale = 10.0 ** draw(st.floats(-1, 30))
    else:
        temperature = draw(st.sampled_from([1.0, 0.6, 1.7]))
        scale = draw(st.sampled_from([0.0, 1.0, 3.0, 10.0]))
    if dtype == torch.float16:  # its range: 65504, and gradients ~ 1 / temperature
        temperature, scale = max(temperature, 1e-3), min(scale, 1e4)
    scale = min(scale, U_BOUND * temperature / 6)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = (torch.randn(num_rows, vocab, generator=gen, dtype=torch.float64) * scale).clamp(-6 * scale, 6 * scale)
    masked = torch.rand(num_rows, vocab, generator=gen) < draw(st.sampled_from([0.0, 0.0, 0.2, 0.9]))
    logits[masked] = float("-inf")
    if num_rows and draw(st.integers(0, 9)) == 0:
        logits[0] = float("-inf")  # no distribution: NaN on every backend
    logits = logits.to(dtype)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    weights = torch.rand(num_rows, generator=gen) + 0.1
    ignored = torch.rand(num_rows, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    weights[ignored] = 0.0
    targets[ignored] = torch.where(torch.rand(int(ignored.sum()), generator=gen) < 0.5, -100, vocab + 7)
    return logits, targets, temperature, weights, extreme, gen


def check(name, actual, oracle, eager, dtype, *, truncated_bf16=False, u_max=0.0):
    """Same NaN and infinities as the oracle rounded to actual's dtype; elsewhere within
    2 x eager float32's error + (ATOL[dtype] + U_ROUNDING x u_max) x scale."""
    rounded = oracle.to(actual.dtype).double()
    truncated_bf16 = truncated_bf16 and actual.dtype == torch.bfloat16
    actual, oracle, eager = actual.double(), oracle.double(), eager.double()
    assert torch.equal(torch.isnan(actual), torch.isnan(rounded)), f"{name}: NaN differs\n{actual}\n{oracle}"
    infinite = torch.isinf(rounded)
    assert torch.equal(actual[infinite], rounded[infinite]), f"{name}: infinities differ\n{actual}\n{oracle}"
    finite = torch.isfinite(rounded)
    assert torch.isfinite(actual[finite]).all(), f"{name}: non-finite where the oracle is finite\n{actual}\n{oracle}"
    if not finite.any():
        return
    error = (actual - oracle).abs()
    if truncated_bf16:
        error = (error - bf16_ulp(oracle)).clamp_min(0)
    eager_ok = finite & torch.isfinite(eager)
    eager_error = (eager - oracle).abs()[eager_ok].max().item() if eager_ok.any() else 0.0
    budget = 2 * eager_error + (ATOL[dtype] + U_ROUNDING * u_max) * max(1.0, oracle[finite].abs().max().item())
    worst = error[finite].max().item()
    assert worst <= budget, f"{name}: max error {worst:.3g} > allowed {budget:.3g}"


def reference_policy(logits, targets, advantages, weights, given, cfg, compute_dtype, grad_out):
    """Loss, per-row outputs and d(grad_out * loss)/d logits by autograd of the reference."""
    x = logits.detach().to(compute_dtype).requires_grad_(True)
    token = torch.float64 if compute_dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(token)  # noqa: E731
    out = policy_loss_reference(x, targets, cast(advantages), cast(weights), cast(given.get("old_logprobs")),
                                cast(given.get("ref_logprobs")), cast(given.get("rollout_logprobs")), cfg)
    (grad,) = torch.autograd.grad(out.loss * grad_out, x) if x.shape[0] else (torch.zeros_like(x),)
    return out, grad


@FUZZ_SETTINGS
@given(case=logit_cases(), data=st.data())
def test_policy_loss_fuzz(case, data):
    logits, targets, temperature, weights, on_policy_only, gen = case
    draw = data.draw
    num_rows, vocab = logits.shape
    advantages = torch.randn(num_rows, generator=gen) * draw(st.sampled_from([0.0, 1.0, 3.0]))
    options = dict(temperature=temperature, clip_low=draw(st.floats(0.0, 0.95)), clip_high=draw(st.floats(0.0, 2.0)),
                   entropy_coef=draw(st.sampled_from([0.0, 0.0, 0.01, -0.02])))
    given_logprobs = {}
    if not on_policy_only:
        true_logp = logprobs_and_entropy(logits.double(), targets.clamp(0, vocab - 1), temperature)[0].float()

        def near(spread):
            values = true_logp + spread * torch.randn(num_rows, generator=gen)
            # Now and then a log-prob of probability 0 (and always on a row of only -inf logits).
            zero = (torch.rand(num_rows, generator=gen) < 0.1) | torch.isnan(values)
            return torch.where(zero, float("-inf"), values)

        if draw(st.booleans()):
            given_logprobs["old_logprobs"] = near(0.3)
        if draw(st.booleans()):
            given_logprobs["ref_logprobs"] = near(0.5)
            options.update(kl_coef=draw(st.sampled_from([0.0, 0.1, -0.05])),
                           kl_estimator=draw(st.sampled_from(sorted(KL_ESTIMATORS))))
        if draw(st.booleans()):
            given_logprobs["rollout_logprobs"] = near(0.4)
            options["tis_cap"] = draw(st.sampled_from([None, 0.5, 2.0]))
        if draw(st.booleans()):
            options["dual_clip"] = draw(st.floats(1.01, 5.0))
    cfg = LossConfig(**options)
    target_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    inplace = draw(st.booleans())
    strided = draw(st.booleans())
    grad_out = draw(st.sampled_from([1.0, 1.0, -2.5, 0.5]))

    oracle, oracle_grad = reference_policy(logits, targets, advantages, weights, given_logprobs, cfg,
                                           torch.float64, grad_out)
    eager, eager_grad = reference_policy(logits, targets, advantages, weights, given_logprobs, cfg,
                                         torch.float32, 1.0)
    # As the kernels do: the gradient is stored in the logits' dtype in the forward, and the
    # backward scales that by the upstream gradient (two roundings in half precision).
    eager_grad = (eager_grad.to(logits.dtype).float() * grad_out).to(logits.dtype)
    u_max = largest_u(logits, temperature)
    for backend in BACKENDS:
        base = torch.full((num_rows, vocab + 5), float("nan"), dtype=logits.dtype, device=DEVICE)
        base[:, :vocab] = logits
        x = (base[:, :vocab] if strided else logits.to(DEVICE).clone()).detach().requires_grad_(True)
        out = policy_loss(x * 1 if inplace else x, targets.to(device=DEVICE, dtype=target_dtype),
                          advantages.to(DEVICE), weights.to(DEVICE), inplace_backward=inplace, backend=backend,
                          **{k: v.to(DEVICE) for k, v in given_logprobs.items()}, **options)
        (out.loss * grad_out).backward()
        label = f"{backend} {logits.dtype} T={temperature:.3g} {options} {sorted(given_logprobs)}"
        for name in ("loss", "logprobs", "entropy"):
            check(f"{label}: {name}", getattr(out, name).cpu(), getattr(oracle, name), getattr(eager, name),
                  logits.dtype, u_max=u_max)
        check(f"{label}: grad", x.grad.cpu(), oracle_grad, eager_grad, logits.dtype,
              truncated_bf16=interpreter_truncates_bf16(backend), u_max=u_max)
        assert x.grad.dtype == logits.dtype


def reference_logprobs(logits, targets, temperature, grad_logp, grad_ent, compute_dtype):
    x = logits.detach().to(compute_dtype).requires_grad_(True)
    logp, ent, _ = logprobs_and_entropy(x, targets, temperature)
    total = (logp * grad_logp.to(logp.dtype)).sum()
    if grad_ent is not None:
        total = total + (ent * grad_ent.to(ent.dtype)).sum()
    (grad,) = torch.autograd.grad(total, x) if x.shape[0] else (torch.zeros_like(x),)
    return logp, ent, grad


@FUZZ_SETTINGS
@given(case=logit_cases(), with_entropy=st.booleans(), strided=st.booleans())
def test_token_logprobs_fuzz(case, with_entropy, strided):
    logits, targets, temperature, _, _, gen = case
    num_rows, vocab = logits.shape
    targets = targets.clamp(0, vocab - 1)  # every row is read here
    grad_logp = torch.randn(num_rows, generator=gen)
    grad_ent = torch.randn(num_rows, generator=gen) if with_entropy else None
    oracle = reference_logprobs(logits, targets, temperature, grad_logp, grad_ent, torch.float64)
    eager = reference_logprobs(logits, targets, temperature, grad_logp, grad_ent, torch.float32)
    eager = (*eager[:2], eager[2].to(logits.dtype))
    u_max = largest_u(logits, temperature)
    for backend in BACKENDS:
        base = torch.full((num_rows, vocab + 3), float("nan"), dtype=logits.dtype, device=DEVICE)
        base[:, :vocab] = logits
        x = (base[:, :vocab] if strided else logits.to(DEVICE).clone()).detach().requires_grad_(True)
        result = token_logprobs(x, targets.to(DEVICE), temperature=temperature, return_entropy=with_entropy,
                                backend=backend)
        logp, ent = result if with_entropy else (result, None)
        total = (logp * grad_logp.to(DEVICE)).sum()
        if with_entropy:
            total = total + (ent * grad_ent.to(DEVICE)).sum()
        total.backward()
        label = f"{backend} {logits.dtype} T={temperature:.3g}"
        check(f"{label}: logprobs", logp.cpu(), oracle[0], eager[0], logits.dtype, u_max=u_max)
        if with_entropy:
            check(f"{label}: entropy", ent.cpu(), oracle[1], eager[1], logits.dtype, u_max=u_max)
        check(f"{label}: grad", x.grad.cpu(), oracle[2], eager[2], logits.dtype,
              truncated_bf16=interpreter_truncates_bf16(backend), u_max=u_max)


# Vocabularies of several statistics blocks (cpu: 2048 entries) and Triton tiles (8192),
# beyond the width Triton keeps on chip (16384).
WIDE_VOCAB = 20011


# (logit scale, temperature): u = logits / temperature of about -1e31, -1e37, 1e37, 3e37.
MAGNITUDES = [(-1.0, 1e-31), (-1e37, 1.0), (1e37, 1.0), (3e37, 1.0)]


@pytest.mark.parametrize("magnitude,temperature", MAGNITUDES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_magnitudes_over_many_tiles(dtype, magnitude, temperature):
    """Rows whose u are all below -1e30 (where the running maximum once started: they came
    out as rows of only -inf, logp = +inf), or huge and positive (the rescale from the start
    value overflows to -inf unless clamped), their first tiles -inf. Three levels with many
    ties each keep the distribution non-trivial at these magnitudes."""
    gen = torch.Generator().manual_seed(11)
    levels = torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64) * magnitude
    logits = levels[torch.randint(0, 3, (3, WIDE_VOCAB), generator=gen)]
    logits[:, :9000] = float("-inf")
    logits[1, 9000:12000] = float("-inf")
    top = levels.max()
    logits[2] = torch.where(logits[2] == top, levels.min(), logits[2])
    logits[2, -1] = top  # row 2's maximum only in its last (tail) tile
    logits = logits.to(dtype)
    targets = torch.tensor([9500, 13000, WIDE_VOCAB - 1])
    advantages, weights = torch.tensor([1.0, -0.5, 2.0]), torch.full((3,), 1 / 3)
    cfg = LossConfig(temperature=temperature, entropy_coef=0.1)
    oracle, oracle_grad = reference_policy(logits, targets, advantages, weights, {}, cfg, torch.float64, 1.0)
    eager, eager_grad = reference_policy(logits, targets, advantages, weights, {}, cfg, torch.float32, 1.0)
    eager_grad = eager_grad.to(dtype)
    grad_logp, grad_entropy = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1, -1.0])
    oracle_logprobs = reference_logprobs(logits, targets, temperature, grad_logp, grad_entropy, torch.float64)
    eager_logprobs = reference_logprobs(logits, targets, temperature, grad_logp, grad_entropy, torch.float32)
    for backend in BACKENDS:
        x = logits.to(DEVICE).clone().requires_grad_(True)
        out = policy_loss(x, targets.to(DEVICE), advantages.to(DEVICE), weights.to(DEVICE), temperature=temperature,
                          entropy_coef=0.1, backend=backend)
        out.loss.backward()
        label = f"{backend} {dtype} u~{magnitude / temperature:.0e}"
        for name in ("loss", "logprobs", "entropy"):
            check(f"{label}: {name}", getattr(out, name).cpu(), getattr(oracle, name), getattr(eager, name), dtype)
        check(f"{label}: grad", x.grad.cpu(), oracle_grad, eager_grad, dtype,
              truncated_bf16=interpreter_truncates_bf16(backend))
        # token_logprobs: its backward re-forms p from the forward's saved (m, log s).
        x = logits.to(DEVICE).clone().requires_grad_(True)
        logp, entropy = token_logprobs(x, targets.to(DEVICE), temperature=temperature, return_entropy=True,
                                       backend=backend)
        (logp * grad_logp.to(DEVICE) + entropy * grad_entropy.to(DEVICE)).sum().backward()
        check(f"{label}: token_logprobs", logp.cpu(), oracle.logprobs, eager.logprobs, dtype)
        check(f"{label}: token_logprobs entropy", entropy.cpu(), oracle.entropy, eager.entropy, dtype)
        check(f"{label}: token_logprobs grad", x.grad.cpu(), oracle_logprobs[2], eager_logprobs[2].to(dtype), dtype,
              truncated_bf16=interpreter_truncates_bf16(backend))
