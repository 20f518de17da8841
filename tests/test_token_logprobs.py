"""token_logprobs on every backend against the float64 reference, values and gradients."""

import math

import pytest
import torch
from conftest import DEVICE
from kernel_cases import assert_close_to_oracle, backends_on, interpreter_truncates_bf16

from siri.kernels import get_backend, token_logprobs
from siri.kernels.reference import logprobs_and_entropy

BACKENDS = backends_on(DEVICE)


def make_inputs(num_rows, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    grad_logp, grad_ent = torch.randn(num_rows, generator=gen), torch.randn(num_rows, generator=gen)
    return logits.to(DEVICE), targets.to(DEVICE), grad_logp.to(DEVICE), grad_ent.to(DEVICE)


def reference(logits, targets, grad_logp, grad_ent, temperature, compute_dtype):
    x = logits.detach().to(compute_dtype).requires_grad_(True)
    logp, ent, _ = logprobs_and_entropy(x, targets, temperature)
    total = (logp * grad_logp.to(logp.dtype)).sum() + (ent * grad_ent.to(ent.dtype)).sum()
    (grad,) = torch.autograd.grad(total, x) if x.shape[0] else (torch.zeros_like(x),)
    return logp, ent, grad


@pytest.mark.parametrize(
    "num_rows, vocab, temperature",
    [(0, 50, 1.0), (1, 1, 1.0), (31, 4099, 1.0), (17, 1823, 0.6), (2, 151_936, 1.0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_entropy_and_gradients(backend, dtype, num_rows, vocab, temperature):
    logits, targets, grad_logp, grad_ent = make_inputs(num_rows, vocab, dtype, seed=vocab + num_rows)
    oracle = reference(logits, targets, grad_logp, grad_ent, temperature, torch.float64)
    eager = reference(logits, targets, grad_logp, grad_ent, temperature, dtype)
    x = logits.clone().requires_grad_(True)
    logp, ent = token_logprobs(x, targets, temperature=temperature, return_entropy=True, backend=backend)
    ((logp * grad_logp).sum() + (ent * grad_ent).sum()).backward()
    for name, actual, i in (("logprobs", logp, 0), ("entropy", ent, 1), ("grad", x.grad, 2)):
        assert_close_to_oracle(name, actual, oracle[i], eager[i], dtype,
                               truncated_bf16=interpreter_truncates_bf16(backend))
    assert logp.dtype == ent.dtype == torch.float32 and x.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_gradient(backend):
    logits, targets, grad_logp, _ = make_inputs(12, 700, torch.float32, seed=3)
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, targets.to(torch.int32), backend=backend)
    (logp * grad_logp).sum().backward()
    _, _, expected = reference(logits, targets, grad_logp, torch.zeros_like(grad_logp), 1.0, torch.float64)
    torch.testing.assert_close(x.grad.double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_fills_poisoned_outputs(backend):
    logits, targets, grad_logp, grad_ent = make_inputs(9, 333, torch.bfloat16, seed=4)
    impl = get_backend(backend)
    logp, ent = (torch.full((9,), float("nan"), device=DEVICE) for _ in range(2))
    lse = torch.full((9, 2), float("nan"), device=DEVICE)
    impl.logprob_rows(logits, targets, 1.0, logp, ent, lse)
    grad = torch.full_like(logits, float("nan"))
    impl.logprob_backward(logits, targets, 1.0, lse, logp, ent, grad_logp, grad_ent, grad)
    expected = reference(logits, targets, grad_logp, grad_ent, 1.0, torch.float64)
    torch.testing.assert_close(logp.double(), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), expected[2], atol=2e-2, rtol=2e-2)
    lse_nats = lse.double().sum(-1) * math.log(impl.lse_base)
    torch.testing.assert_close(lse_nats, torch.logsumexp(logits.double(), -1), atol=1e-5, rtol=1e-5)
