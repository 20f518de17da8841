"""The native extension siri._C: it loads, registers its backends, and its CPU kernels match
the float64 reference within twice PyTorch's own float32 error (plus a small atol).

The general cross-backend tests live in test_policy_loss.py; these are the native-specific
ones: every kernel switch, dtypes, target index types, strides, in-place gradients, and the
sizes where a vectorised loop has no full vector (V = 1) or a scalar tail (V = 97, 4099).
"""

import zlib

import pytest
import torch

from siri.kernels import native_backend
from siri.kernels.backends import RowOutputs, available_backends
from siri.kernels.config import LossConfig
from siri.kernels.reference import logprobs_and_entropy, policy_loss_reference

pytestmark = pytest.mark.skipif(native_backend._C is None, reason="siri._C was not built (SIRI_SKIP_EXT=1?)")

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# V = 1: no full vector and p = 1; 97: a prime, all scalar tail after a few vectors;
# 4099: several vectors plus a tail, over two statistics blocks.
VOCABS = [1, 97, 4099]
# Tolerance added to twice PyTorch's error, per dtype, relative to the output's scale.
ATOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}

CONFIGS = {
    "default": LossConfig(),
    "dual_clip_tis_k3": LossConfig(dual_clip=3.0, tis_cap=1.5, kl_coef=0.1, kl_estimator="k3"),
    "k1_entropy_temperature": LossConfig(temperature=0.7, kl_coef=0.05, kl_estimator="k1", entropy_coef=0.01),
    "k2_wide_clip": LossConfig(temperature=1.3, clip_low=0.1, clip_high=0.5, kl_coef=0.2, kl_estimator="k2",
                               entropy_coef=-0.02, dual_clip=2.0),
}


def test_extension_loads_and_registers_cpu():
    from siri import _C

    assert _C.has_cpu
    assert _C.cpu_capability() in ("avx512", "avx2", "default")
    assert "cpu" in available_backends()
    assert (native_backend.make_backend("cuda") is None) == (not _C.has_cuda)
    cpu = native_backend.make_backend("cpu")
    assert cpu.supports_device(CPU) and not cpu.supports_device(torch.device("cuda"))


def _logits(num_rows, vocab, dtype, strided, generator):
    # Scale 3: peaked rows (entropy well below log V), as trained models give.
    values = torch.randn(num_rows, vocab + 7 if strided else vocab, generator=generator) * 3.0
    values = values.to(dtype)
    return values[:, :vocab] if strided else values


def _poisoned_rows(num_rows):
    make = lambda: torch.full((num_rows,), float("nan"))  # noqa: E731
    return RowOutputs(make(), make(), make(), make(), make())


def _max_error(value, expected):
    return (value.double() - expected.double()).abs().max().item() if value.numel() else 0.0


def _assert_close(name, native, torch_value, expected, dtype):
    """Native error at most 2x PyTorch's own float32 error at this dtype, plus atol x scale."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    native_error, torch_error = _max_error(native, expected), _max_error(torch_value, expected)
    bound = 2.0 * torch_error + ATOL[dtype] * scale
    assert native_error <= bound, f"{name}: native error {native_error:.3g} > {bound:.3g} (torch {torch_error:.3g})"


def _policy_inputs(num_rows, vocab, dtype, strided, target_dtype, old_given, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = _logits(num_rows, vocab, dtype, strided, generator)
    targets = torch.randint(0, vocab, (num_rows,), generator=generator)
    weights = torch.rand(num_rows, generator=generator) + 0.1
    inactive = torch.rand(num_rows, generator=generator) < 0.25
    weights[inactive] = 0.0
    targets[inactive] = -123456789  # never read on a weight-0 row
    logp, _, _ = logprobs_and_entropy(logits.double(), targets.clamp(0, vocab - 1), 1.0)
    near = lambda: (logp + 0.3 * torch.randn(num_rows, generator=generator, dtype=torch.float64)).float()  # noqa: E731
    return dict(
        logits=logits,
        targets=targets.to(target_dtype),
        advantages=torch.randn(num_rows, generator=generator),
        weights=weights,
        old=near() if old_given else None,
        ref=near(),
        rollout=near(),
    )


def _reference(inputs, cfg, logits):
    """policy_loss_reference on `logits` (float64 or float32) and its gradient."""
    logits = logits.detach().requires_grad_()
    cast = lambda t: None if t is None else t.to(logits.dtype)  # noqa: E731
    result = policy_loss_reference(
        logits, inputs["targets"].long(), cast(inputs["advantages"]), cast(inputs["weights"]),
        cast(inputs["old"]), cast(inputs["ref"]), cast(inputs["rollout"]), cfg,
    )
    (grad,) = torch.autograd.grad(result.loss, logits) if logits.numel() else (torch.zeros_like(logits),)
    return result, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("old_given", [False, True], ids=["on_policy", "old_given"])
@pytest.mark.parametrize("num_rows", [0, 1, 37])
def test_policy_loss_rows_matches_reference(dtype, vocab, config, old_given, num_rows):
    cfg = CONFIGS[config]
    seed = zlib.crc32(repr((dtype, vocab, config, old_given, num_rows)).encode())
    target_dtype = torch.int32 if seed % 2 else torch.int64
    inputs = _policy_inputs(num_rows, vocab, dtype, seed % 3 == 0, target_dtype, old_given, seed)
    logits = inputs["logits"]
    expected, expected_grad = _reference(inputs, cfg, logits.double())
    by_torch, torch_grad = _reference(inputs, cfg, logits.float())

    out = _poisoned_rows(num_rows)
    grad = torch.full(logits.shape, float("nan"), dtype=dtype)
    native_backend.policy_loss_rows(
        logits, inputs["targets"], inputs["advantages"], inputs["weights"], inputs["old"], inputs["ref"],
        inputs["rollout"], cfg, out, grad,
    )
    for name in ("logprobs", "entropy", "kl"):
        _assert_close(name, getattr(out, name), getattr(by_torch, name), getattr(expected, name), dtype)
    _assert_close("loss", out.loss, by_torch.loss_rows, expected.loss_rows, dtype)
    _assert_close("grad_logits", grad, torch_grad.to(dtype), expected_grad, dtype)
    assert torch.equal(out.clipped, expected.clipped.float())

    inactive = inputs["weights"] == 0
    for name in ("logprobs", "entropy", "loss", "kl", "clipped"):
        assert torch.all(getattr(out, name)[inactive] == 0), name
    assert torch.all(grad[inactive] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 4099])
def test_policy_loss_gradient_in_place(dtype, vocab):
    """grad_logits may be the logits buffer: the target's logit is read before it is overwritten."""
    cfg = CONFIGS["k1_entropy_temperature"]
    inputs = _policy_inputs(23, vocab, dtype, True, torch.int64, True, seed=vocab)
    logits = inputs["logits"]
    expected, expected_grad = _reference(inputs, cfg, logits.double())
    _, torch_grad = _reference(inputs, cfg, logits.float())
    separate = torch.full(logits.shape, float("nan"), dtype=dtype)
    out_separate, out_in_place = _poisoned_rows(23), _poisoned_rows(23)
    args = (
        inputs["targets"], inputs["advantages"], inputs["weights"], inputs["old"], inputs["ref"], inputs["rollout"], cfg
    )
    native_backend.policy_loss_rows(logits, *args, out_separate, separate)
    native_backend.policy_loss_rows(logits, *args, out_in_place, logits)
    assert torch.equal(logits, separate)
    assert torch.equal(out_in_place.loss, out_separate.loss)
    _assert_close("grad_logits", logits, torch_grad.to(dtype), expected_grad, dtype)
    _assert_close("loss", out_in_place.loss, out_in_place.loss, expected.loss_rows, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp_entropy"])
@pytest.mark.parametrize("num_rows", [0, 1, 29])
def test_logprob_rows_and_backward(dtype, vocab, with_entropy, num_rows):
    generator = torch.Generator().manual_seed(vocab * 7 + num_rows)
    temperature = 0.8
    logits = _logits(num_rows, vocab, dtype, num_rows % 2 == 1, generator)
    targets = torch.randint(0, vocab, (num_rows,), generator=generator, dtype=torch.int32)
    grad_logprobs = torch.randn(num_rows, generator=generator)
    grad_entropy = torch.randn(num_rows, generator=generator) if with_entropy else None

    def reference(values):
        values = values.detach().requires_grad_()
        logp, entropy, lse = logprobs_and_entropy(values, targets.long(), temperature)
        total = (logp * grad_logprobs.to(values.dtype)).sum()
        if with_entropy:
            total = total + (entropy * grad_entropy.to(values.dtype)).sum()
        (grad,) = torch.autograd.grad(total, values) if values.numel() else (torch.zeros_like(values),)
        return logp, entropy, lse, grad

    expected, by_torch = reference(logits.double()), reference(logits.float())
    logprobs, lse = torch.full((num_rows,), float("nan")), torch.full((num_rows, 2), float("nan"))
    entropy = torch.full((num_rows,), float("nan")) if with_entropy else None
    native_backend.logprob_rows(logits, targets, temperature, logprobs, entropy, lse)
    _assert_close("logprobs", logprobs, by_torch[0], expected[0], dtype)
    _assert_close("lse", lse.sum(-1), by_torch[2], expected[2], dtype)
    if with_entropy:
        _assert_close("entropy", entropy, by_torch[1], expected[1], dtype)

    grad = torch.full(logits.shape, float("nan"), dtype=dtype)
    native_backend.logprob_backward(logits, targets, temperature, lse, logprobs, entropy, grad_logprobs,
                                    grad_entropy, grad)
    _assert_close("grad_logits", grad, by_torch[3].to(dtype), expected[3], dtype)


def test_policy_loss_through_public_api():
    """policy_loss(backend="cpu") end to end, forward and backward, against the torch backend."""
    from siri.kernels import policy_loss

    inputs = _policy_inputs(16, 257, torch.float32, False, torch.int64, False, seed=5)
    results = {}
    for backend in ("cpu", "torch"):
        logits = inputs["logits"].clone().requires_grad_()
        result = policy_loss(logits, inputs["targets"], inputs["advantages"], inputs["weights"],
                             ref_logprobs=inputs["ref"], kl_coef=0.1, entropy_coef=0.01, backend=backend)
        result.loss.backward()
        results[backend] = (result.loss.detach(), logits.grad)
    torch.testing.assert_close(results["cpu"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["cpu"][1], results["torch"][1], rtol=1e-4, atol=1e-6)


def test_logprob_entry_points_refuse_a_one_column_lse():
    """The log-sum-exp travels as (max, log-sum) per row: a [T] buffer is refused by name."""
    logits, targets = torch.randn(3, 17), torch.tensor([0, 5, 16])
    logprobs, flat_lse = torch.empty(3), torch.empty(3)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[3, 2\]"):
        native_backend.logprob_rows(logits, targets, 1.0, logprobs, None, flat_lse)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[3, 2\]"):
        native_backend.logprob_backward(logits, targets, 1.0, flat_lse, logprobs, None, torch.ones(3), None,
                                        torch.empty_like(logits))
