"""Non-finite values and extreme temperatures: the float64 oracle's own edges, then every
backend against it (the contract is in policy_loss's docstring)."""

import math

import pytest
import torch
from conftest import DEVICE
from kernel_cases import backends_on

from siri.kernels import policy_loss, token_logprobs
from siri.kernels.config import LossConfig
from siri.kernels.reference import logprobs_and_entropy, policy_loss_reference

BACKENDS = backends_on(DEVICE)
INF = float("inf")
NAN = float("nan")

# One row with a masked (-inf) entry; p = softmax([0, 1, 2]) on the others.
MASKED = [[0.0, 1.0, -INF, 2.0]]
P = torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), -1)


def oracle(logits, targets, advantages, weights, *, old=None, ref=None, rollout=None, **options):
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    as64 = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
    out = policy_loss_reference(x, torch.tensor(targets), as64(advantages), as64(weights), as64(old), as64(ref),
                                as64(rollout), LossConfig(**options))
    out.loss.backward()
    return out, x.grad


def run(backend, logits, targets, advantages, weights, *, old=None, ref=None, rollout=None, **options):
    x = torch.tensor(logits, device=DEVICE, requires_grad=True)
    as32 = lambda v: None if v is None else torch.tensor(v, device=DEVICE)  # noqa: E731
    out = policy_loss(x, torch.tensor(targets, device=DEVICE), as32(advantages), as32(weights), old_logprobs=as32(old),
                      ref_logprobs=as32(ref), rollout_logprobs=as32(rollout), backend=backend, **options)
    out.loss.backward()
    return out, x.grad


def assert_same(actual, expected, atol=1e-6):
    """Equal NaN and infinities, close elsewhere."""
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=1e-5, equal_nan=True)


# --- the oracle's own edges ---------------------------------------------------------------


def test_oracle_masked_entry_adds_nothing():
    out, grad = oracle(MASKED, [1], [1.0], [1.0], entropy_coef=0.1)
    entropy = -(P * P.log()).sum()
    assert torch.isfinite(grad).all() and grad[0, 2] == 0  # 0 log 0 = 0, and p = 0 takes no gradient
    assert out.entropy.item() == pytest.approx(entropy.item(), abs=1e-12)
    # Same row without the masked entry: same loss and gradient on the other entries.
    out3, grad3 = oracle([[0.0, 1.0, 2.0]], [1], [1.0], [1.0], entropy_coef=0.1)
    assert out.loss.item() == pytest.approx(out3.loss.item(), abs=1e-12)
    torch.testing.assert_close(grad[0, [0, 1, 3]], grad3[0])


def test_oracle_masked_target_on_policy_is_cross_entropy_like():
    out, grad = oracle(MASKED, [2], [1.0], [1.0])
    assert out.logprobs.item() == -INF
    assert out.loss.item() == -1.0  # ratio exactly 1: pg = -A
    # d(-A logp)/d logits = -A (onehot - p), finite as F.cross_entropy's gradient
    expected = torch.zeros(1, 4, dtype=torch.float64)
    expected[0, [0, 1, 3]] = P
    expected[0, 2] = -1.0
    torch.testing.assert_close(grad, expected)
    ce = torch.tensor(MASKED, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.cross_entropy(ce, torch.tensor([2])).backward()
    torch.testing.assert_close(grad, ce.grad)


def test_oracle_masked_target_off_policy_and_kl():
    out, grad = oracle(MASKED, [2], [1.0], [1.0], old=[-1.0])
    assert out.loss.item() == pytest.approx(-math.exp(-20), rel=1e-9)  # log-ratio -inf, clamped at -20
    assert torch.equal(grad, torch.zeros_like(grad))  # the ratio clamp binds: no gradient
    out, grad = oracle(MASKED, [2], [1.0], [1.0], ref=[-1.0], kl_coef=0.1, kl_estimator="k3")
    assert out.kl.item() == INF and out.loss.item() == INF
    assert torch.isnan(grad[0, 2]) and torch.isinf(grad[0, [0, 1, 3]]).all()
    out, grad = oracle(MASKED, [2], [1.0], [1.0], ref=[-1.0], kl_coef=0.0)
    assert out.kl.item() == INF and out.loss.item() == -1.0 and torch.isfinite(grad).all()


def test_oracle_nan_in_gives_nan_out():
    for inputs in (dict(old=[NAN]), dict(old=[-1.0], rollout=[NAN], tis_cap=2.0), dict(ref=[NAN], kl_coef=0.1)):
        out, grad = oracle(MASKED, [1], [1.0], [1.0], **inputs)
        assert math.isnan(out.loss.item()) and torch.isnan(grad).all(), inputs


def test_oracle_weight_zero_row_of_minus_inf_gives_zeros():
    out, grad = oracle([[-INF, -INF], [0.0, 1.0]], [0, 1], [1.0, 1.0], [0.0, 1.0])
    assert torch.equal(grad[0], torch.zeros(2, dtype=torch.float64)) and torch.isfinite(out.loss)


def test_oracle_argmax_logprob_at_tiny_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.999]], dtype=torch.float64)
    for temperature in (1e-2, 1e-6, 1e-9):
        logp, entropy, _ = logprobs_and_entropy(logits, torch.tensor([1]), temperature)
        expected = -math.log1p(math.exp(-0.001 / temperature))
        assert logp.item() <= 0 and logp.item() == pytest.approx(expected, abs=1e-12)
        assert entropy.item() >= 0


def test_oracle_stays_finite_far_below_minus_1e30():
    """u = logits / T of about -1e31 (a tiny temperature) is an ordinary row: finite results,
    the mass on the maxima (float64 rounds log 2 away at this magnitude: log p = u - lse)."""
    logits = torch.tensor([[-1.0, -1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    logp, entropy, lse = logprobs_and_entropy(logits, torch.tensor([0]), 1e-31)
    assert lse.item() == -1e31 and logp.item() <= 0 and entropy.item() >= 0
    (logp + entropy).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2] == 0


# --- every backend against the oracle -----------------------------------------------------

CASES = {
    "masked-entry": (MASKED, [1], dict(entropy_coef=0.1)),
    "masked-entry-entropy-tiny-t": (MASKED, [1], dict(entropy_coef=0.5, temperature=1e-3)),
    "masked-target-on-policy": (MASKED, [2], dict()),
    "masked-target-on-policy-tis": (MASKED, [2], dict(rollout=[-1.0], tis_cap=2.0)),
    "masked-target-off-policy": (MASKED, [2], dict(old=[-1.0], entropy_coef=0.1)),
    "masked-target-old-too": (MASKED, [2], dict(old=[-INF])),
    "masked-target-k1": (MASKED, [2], dict(ref=[-1.0], kl_coef=0.1, kl_estimator="k1")),
    "masked-target-k2": (MASKED, [2], dict(ref=[-1.0], kl_coef=0.1, kl_estimator="k2")),
    "masked-target-k3": (MASKED, [2], dict(ref=[-1.0], kl_coef=0.1, kl_estimator="k3")),
    # Clamped at 10 with no gradient: a finite loss and gradient where k3 is infinite.
    "masked-target-low-var-kl": (MASKED, [2], dict(ref=[-1.0], kl_coef=0.1, kl_estimator="low_var_kl")),
    "masked-target-k3-ratio": (MASKED, [2], dict(ref=[-1.0], kl_coef=0.1, kl_estimator="k3_ratio")),
    "masked-target-k3-ratio-off-policy": (MASKED, [2], dict(old=[-1.0], ref=[-1.0], kl_coef=0.1,
                                                            kl_estimator="k3_ratio")),
    "masked-target-kl-coef-0": (MASKED, [2], dict(ref=[-1.0], kl_coef=0.0)),
    "old-minus-inf": (MASKED, [1], dict(old=[-INF], dual_clip=3.0)),
    # exp(old - rollout) = exp(-inf - -inf) is NaN: a NaN loss, and (the log-ratio clamp binds,
    # as autograd of the oracle has it) a zero gradient, on every backend.
    "old-and-rollout-minus-inf": (MASKED, [1], dict(old=[-INF], rollout=[-INF], tis_cap=2.0, entropy_coef=0.1)),
    "only-minus-inf": ([[-INF, -INF, -INF]], [1], dict()),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_match_the_oracle(backend, case):
    logits, targets, options = CASES[case]
    expected, expected_grad = oracle(logits, targets, [1.0], [1.0], **options)
    out, grad = run(backend, logits, targets, [1.0], [1.0], **options)
    for name in ("loss", "logprobs", "entropy"):
        assert_same(getattr(out, name), getattr(expected, name))
    assert_same(out.metrics["kl"], expected.kl[0])
    assert_same(grad, expected_grad)


@pytest.mark.parametrize("inputs", [dict(old=[NAN]), dict(old=[-1.0], rollout=[NAN], tis_cap=2.0),
                                    dict(ref=[NAN], kl_coef=0.1), dict(old=[NAN], dual_clip=2.0)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_log_probs_give_nan_loss_and_gradient_without_validation(backend, inputs, monkeypatch):
    monkeypatch.setenv("SIRI_VALIDATE", "0")
    logits = [[0.5, 1.0, -INF, 2.0], [0.0, 1.0, 2.0, 3.0]]
    two = lambda v: v + [-1.0]  # noqa: E731  a second, finite row
    per_row = {k: two(v) if isinstance(v, list) else v for k, v in inputs.items()}
    out, grad = run(backend, logits, [1, 2], [1.0, -1.0], [1.0, 1.0], **per_row)
    assert math.isnan(out.loss.item())
    assert torch.isnan(grad[0]).all(), "NaN in gives NaN out in every entry of the row's gradient"
    assert torch.isfinite(grad[1]).all()


@pytest.mark.parametrize("temperature", [1e-2, 1e-4, 1e-6, 1e-8, 1e-9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_logprob_at_tiny_temperature(backend, dtype, temperature):
    """At T -> 0 the argmax token's log-prob tends to 0 from below: never positive (the cpu
    kernel's FMA gave +2.7e-5 at T = 0.01, +0.46 at 1e-6, inf at 1e-9)."""
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(64, 1000, generator=gen) * 3).to(dtype)
    targets = logits.float().argmax(-1)
    expected, expected_entropy, _ = logprobs_and_entropy(logits.double(), targets, temperature)
    x = logits.to(DEVICE).requires_grad_(True)
    logp, entropy = token_logprobs(x, targets.to(DEVICE), temperature=temperature, return_entropy=True,
                                   backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert (logp <= 0).all(), logp.max()
    assert (entropy >= -1e-6).all()
    # float32 holds u = x / T to ~1e-7 relative: that much error is PyTorch's too.
    atol = 1e-5 + 1e-6 * logits.abs().max().item() / temperature
    torch.testing.assert_close(logp.double().cpu(), expected, atol=atol, rtol=0)
    torch.testing.assert_close(entropy.double().cpu(), expected_entropy, atol=atol, rtol=0)
    assert torch.isfinite(x.grad).all()
    out = policy_loss(x.detach(), targets.to(DEVICE), torch.ones(64, device=DEVICE), torch.ones(64, device=DEVICE),
                      temperature=temperature, backend=backend)
    assert (out.logprobs <= 0).all() and torch.isfinite(out.loss)
