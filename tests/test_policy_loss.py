"""policy_loss on every backend against the float64 reference (kernel_cases.py)."""

import zlib

import pytest
import torch
from conftest import DEVICE
from kernel_cases import (
    ATOL,
    OPTION_SETS,
    assert_close_to_oracle,
    backends_on,
    interpreter_truncates_bf16,
    loss_config,
    make_case,
    max_error,
    reference_outputs,
)

from siri.kernels import get_backend, policy_loss
from siri.kernels.backends import RowOutputs
from siri.kernels.reference import policy_loss_reference

BACKENDS = backends_on(DEVICE)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run_and_check(backend, num_rows, vocab, dtype, options, seed, *, inplace=False, target_dtype=torch.int64):
    logits, targets, advantages, weights, kw = make_case(
        num_rows, vocab, dtype, options, seed=seed, device=DEVICE, target_dtype=target_dtype
    )
    oracle, oracle_grad = reference_outputs(logits, targets, advantages, weights, kw, torch.float64)
    eager, eager_grad = reference_outputs(logits, targets, advantages, weights, kw, dtype)
    x = logits.clone().requires_grad_(True)
    # A non-leaf view of the logits, as a model's LM head output would be, so that an
    # in-place gradient can be written into it.
    source = x * 1 if inplace else x
    out = policy_loss(source, targets, advantages, weights, inplace_backward=inplace, backend=backend, **kw)
    out.loss.backward()
    for name in ("loss", "logprobs", "entropy"):
        assert_close_to_oracle(name, getattr(out, name), getattr(oracle, name), getattr(eager, name), dtype)
    assert_close_to_oracle("grad", x.grad, oracle_grad, eager_grad, dtype,
                           truncated_bf16=interpreter_truncates_bf16(backend))
    assert x.grad.dtype == dtype
    assert out.logprobs.dtype == out.entropy.dtype == torch.float32
    return out, oracle, weights


@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_option_matches_reference(backend, dtype, options):
    # V = 4099 is prime: no tile divides it, so every kernel handles a ragged tail.
    # A seed per case that is the same in every process (str hashes are salted per process).
    seed = zlib.crc32(f"{backend}-{options}".encode()) % 1000
    run_and_check(backend, 37, 4099, dtype, OPTION_SETS[options], seed=seed)


@pytest.mark.parametrize(
    "num_rows, vocab",
    [
        (0, 97),  # an empty micro-batch: nothing launched, loss 0
        (1, 1),  # a one-token vocabulary: logp = 0, entropy = 0
        (1, 97),  # a one-token response
        (3, 151_936),  # Qwen2's vocabulary: several tiles per row
        (19, 1823),  # odd sizes that match no block
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend, dtype, num_rows, vocab):
    run_and_check(backend, num_rows, vocab, dtype, OPTION_SETS["everything"], seed=num_rows * vocab)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_matches(backend, dtype):
    run_and_check(backend, 23, 1000, dtype, OPTION_SETS["everything"], seed=5, inplace=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets(backend):
    run_and_check(backend, 11, 333, torch.float32, OPTION_SETS["old-logprobs"], seed=9, target_dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_zero_rows_give_zero_rows(backend):
    logits, targets, advantages, weights, kw = make_case(
        40, 257, torch.float32, OPTION_SETS["everything"], seed=3, device=DEVICE
    )
    x = logits.clone().requires_grad_(True)
    out = policy_loss(x, targets, advantages, weights, backend=backend, **kw)
    out.loss.backward()
    ignored = weights == 0
    assert ignored.any() and (~ignored).any()
    assert torch.all(x.grad[ignored] == 0)
    assert torch.all(out.logprobs[ignored] == 0) and torch.all(out.entropy[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_fills_poisoned_outputs(backend):
    """Every output element is written, whatever the buffers held before."""
    logits, targets, advantages, weights, kw = make_case(
        29, 515, torch.bfloat16, OPTION_SETS["everything"], seed=4, device=DEVICE
    )
    oracle, oracle_grad = reference_outputs(logits, targets, advantages, weights, kw, torch.float64)
    out = RowOutputs(*(torch.full((29,), float("nan"), device=DEVICE) for _ in range(5)))
    grad = torch.full_like(logits, float("nan"))
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    get_backend(backend).policy_loss_rows(
        logits, targets, advantages, weights, f32(kw.get("old_logprobs")), f32(kw.get("ref_logprobs")),
        f32(kw.get("rollout_logprobs")), loss_config(kw), out, grad,
    )
    for name in ("logprobs", "entropy", "kl", "clipped"):
        assert torch.isfinite(getattr(out, name)).all(), name
    assert torch.isfinite(grad).all()
    assert max_error(out.loss, oracle.loss_rows) < 1e-4
    assert torch.equal(out.clipped, oracle.clipped.float()) or max_error(out.clipped, oracle.clipped) <= 2
    assert max_error(grad, oracle_grad) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_incoming_gradient(backend):
    logits, targets, advantages, weights, kw = make_case(
        13, 300, torch.float32, OPTION_SETS["kl-k3"], seed=8, device=DEVICE
    )
    grads = []
    for scale in (1.0, -2.5):
        x = logits.clone().requires_grad_(True)
        (policy_loss(x, targets, advantages, weights, backend=backend, **kw).loss * scale).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], -2.5 * grads[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_work_without_grad(backend):
    logits, targets, advantages, weights, kw = make_case(9, 200, torch.float32, {}, seed=2, device=DEVICE)
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        out = policy_loss(x, targets, advantages, weights, inplace_backward=True, backend=backend, **kw)
    assert out.loss.grad_fn is None
    assert torch.equal(x.detach(), logits), "no gradient was asked for, so the logits stay untouched"


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_are_weighted_means(backend):
    logits, targets, advantages, weights, kw = make_case(
        64, 129, torch.float32, OPTION_SETS["everything"], seed=6, device=DEVICE
    )
    out = policy_loss(logits, targets, advantages, weights, backend=backend, **kw)
    oracle, _ = reference_outputs(logits, targets, advantages, weights, kw, torch.float64)
    w = weights.double()
    expected = {
        "kl": (w * oracle.kl).sum() / w.sum(),
        "entropy": (w * oracle.entropy).sum() / w.sum(),
        "clip_frac": (w * (oracle.clipped == 1)).sum() / w.sum(),
        "dual_clip_frac": (w * (oracle.clipped == 2)).sum() / w.sum(),
    }
    for name, value in expected.items():
        assert out.metrics[name].device == logits.device and out.metrics[name].dim() == 0
        assert abs(out.metrics[name].item() - value.item()) < 1e-4, name
    assert 0 < out.metrics["clip_frac"].item() < 1, "the case should exercise the clip"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend):
    """Rows of a wider buffer (a row stride larger than V) are read in place."""
    logits, targets, advantages, weights, kw = make_case(
        7, 150, torch.float32, OPTION_SETS["entropy"], seed=1, device=DEVICE
    )
    wide = torch.randn(7, 180, device=DEVICE)
    wide[:, :150] = logits
    view = wide[:, :150]
    expected = policy_loss(logits, targets, advantages, weights, backend=backend, **kw)
    actual = policy_loss(view, targets, advantages, weights, backend=backend, **kw)
    torch.testing.assert_close(actual.loss, expected.loss)
    torch.testing.assert_close(actual.logprobs, expected.logprobs)


def test_backends_agree_at_qwen_vocabulary_in_bf16():
    """All backends on the contract's headline shape agree with each other to bf16 rounding."""
    logits, targets, advantages, weights, kw = make_case(
        4, 151_936, torch.bfloat16, OPTION_SETS["old-logprobs"], seed=12, device=DEVICE
    )
    losses = {b: policy_loss(logits, targets, advantages, weights, backend=b, **kw).loss.item() for b in BACKENDS}
    reference = losses["torch"]
    for name, value in losses.items():
        assert abs(value - reference) <= 1e-4 * max(1.0, abs(reference)), (name, losses)


def test_tolerance_table_covers_dtypes():
    assert set(ATOL) == set(DTYPES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_dual_clip_tie_splits_the_gradient(backend):
    """With A < 0, dual_clip = 2 and a ratio of exactly 2, both arguments of the dual clip's
    min are -2A: every backend passes half the gradient, as torch.minimum does."""
    logits = torch.zeros(1, 4, device=DEVICE)  # logp = log(1/4) exactly
    targets = torch.tensor([1], device=DEVICE)
    old = torch.tensor([float(torch.log(torch.tensor(0.125)))], device=DEVICE)  # ratio = 2
    advantages, weights = torch.tensor([-1.0], device=DEVICE), torch.ones(1, device=DEVICE)
    grads = []
    for b in ("torch", backend):
        x = logits.clone().requires_grad_(True)
        policy_loss(x, targets, advantages, weights, old_logprobs=old, dual_clip=2.0, backend=b).loss.backward()
        grads.append(x.grad)
    # The tie is exact in float32 only, so autograd of the float32 reference is the oracle.
    x = logits.clone().requires_grad_(True)
    policy_loss_reference(x, targets, advantages, weights, old, cfg=loss_config({"dual_clip": 2.0})).loss.backward()
    assert x.grad.abs().sum() > 0, "a tie passes half the gradient, not none"
    for grad in grads:
        torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("upstream", [torch.tanh, torch.exp, lambda x: torch.log_softmax(x, -1)],
                         ids=["tanh", "exp", "log_softmax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_over_saved_logits_raises(backend, upstream):
    """An op that saved its output for its backward sees it overwritten by the gradient: autograd's
    version check must fire on every backend (cpu and Triton wrote unseen and gave a wrong gradient)."""
    logits, targets, advantages, weights, kw = make_case(5, 64, torch.float32, {}, seed=1, device=DEVICE)
    x = logits.clone().requires_grad_(True)
    h = upstream(x)
    out = policy_loss(h, targets, advantages, weights, inplace_backward=True, backend=backend, **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_a_leaf(backend):
    logits, targets, advantages, weights, _ = make_case(3, 16, torch.float32, {}, seed=1, device=DEVICE)
    x = logits.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_backward.*leaf"):
        policy_loss(x, targets, advantages, weights, inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_through_a_retained_graph(backend):
    logits, targets, advantages, weights, kw = make_case(7, 50, torch.float32, OPTION_SETS["entropy"], seed=2,
                                                         device=DEVICE)
    x = logits.clone().requires_grad_(True)
    out = policy_loss(x, targets, advantages, weights, backend=backend, **kw)
    out.loss.backward(retain_graph=True)
    once = x.grad.clone()
    out.loss.backward(retain_graph=True)  # unit upstream gradients: the saved gradient is intact
    torch.testing.assert_close(x.grad, 2 * once)
    (out.loss * 3).backward(retain_graph=True)  # scales it in place, and says so next time
    torch.testing.assert_close(x.grad, 5 * once)
    with pytest.raises(RuntimeError, match="second backward.*retain_graph.*3.0"):
        (out.loss * 2).backward()


@pytest.mark.parametrize("options", ["kl-low-var-kl", "kl-low-var-kl-on-policy"])
def test_low_var_kl_cases_reach_the_clamp(options):
    """The low_var_kl option sets have active rows on both sides of the clamp, so the backends'
    comparisons with the oracle cover the rows where it binds (value 10, no gradient)."""
    logits, targets, _, weights, kw = make_case(37, 4099, torch.float32, OPTION_SETS[options], seed=0)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(0, 4098)[:, None])[:, 0]
    d = kw["ref_logprobs"].double() - logp
    k3 = (torch.exp(d) - d - 1)[weights > 0]
    assert (k3 > 10).sum() >= 3 and (k3 < 10).sum() >= 3


@pytest.mark.parametrize("estimator", ["low_var_kl", "k3_ratio"])
@pytest.mark.parametrize("old", [False, True], ids=["on-policy", "off-policy"])
def test_hand_slope_of_the_new_estimators_is_autograds(estimator, old):
    """The slope the torch backend uses (per_token_loss) is autograd's, in float64, across the clamp."""
    from siri.kernels.reference import per_token_loss

    gen = torch.Generator().manual_seed(3)
    logp = (torch.randn(200, generator=gen, dtype=torch.float64) - 2).requires_grad_(True)
    ref = logp.detach() + 4 * torch.randn(200, generator=gen, dtype=torch.float64)
    old_logprobs = logp.detach() + 0.3 * torch.randn(200, generator=gen, dtype=torch.float64) if old else None
    cfg = loss_config(dict(kl_coef=0.3, kl_estimator=estimator))
    loss, kl, _, slope = per_token_loss(logp, torch.zeros_like(logp), torch.zeros_like(logp), old_logprobs, ref,
                                        None, cfg)
    (autograd_slope,) = torch.autograd.grad(loss.sum(), [logp])
    torch.testing.assert_close(slope, autograd_slope)
    if estimator == "low_var_kl":
        assert (kl == 10).any() and (slope[kl == 10] == 0).all() and (kl < 10).any()
