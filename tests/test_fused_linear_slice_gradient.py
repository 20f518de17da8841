"""Every backend's `logprob_backward` on a vocabulary slice, as the vocabulary split calls it.

The slice holds some columns of each row; lse, entropy and log-probs are the whole rows'
(lse as the backend's own `logprob_rows` gives it, in its unit and its rounding of
u = logits / temperature, which the split's merge of its slices' lse reproduces). A row whose
target lies in another slice has target -1: it takes no one-hot term, and its log-prob is not
read (poisoned with NaN here). The oracle is float64 autograd over the whole rows, restricted
to the slice's columns.
"""

import math

import pytest
import torch
from conftest import DEVICE
from kernel_cases import assert_close_to_oracle, backends_on, interpreter_truncates_bf16

from siri.kernels import get_backend
from siri.kernels.backends import lse_buffer
from siri.kernels.reference import logits_gradient, logprobs_and_entropy

BACKENDS = backends_on(DEVICE)


def make_rows(num_rows, vocab, dtype, seed, *, masked):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    if masked:
        # Masked tokens (-inf logits, p = 0: 0 log 0 = 0), some of them targets (logp = -inf).
        logits[torch.rand(num_rows, vocab, generator=gen) < 0.2] = -math.inf
        logits[0, targets[0]] = -math.inf
        logits[torch.arange(num_rows), torch.randint(0, vocab, (num_rows,), generator=gen)] = 1.0  # a finite entry
    grad_logp, grad_ent = torch.randn(num_rows, generator=gen), torch.randn(num_rows, generator=gen)
    return logits.to(dtype).to(DEVICE), targets.to(DEVICE), grad_logp.to(DEVICE), grad_ent.to(DEVICE)


def whole_row_gradient(logits, targets, grad_logp, grad_ent, temperature, compute_dtype, with_entropy):
    """(d (c logp + e H) / d logits over the whole rows, logp, H) in `compute_dtype`."""
    x = logits.detach().to(compute_dtype).requires_grad_(True)
    logp, ent, _ = logprobs_and_entropy(x, targets, temperature)
    total = (logp * grad_logp.to(compute_dtype)).sum()
    if with_entropy:
        total = total + (ent * grad_ent.to(compute_dtype)).sum()
    (grad,) = torch.autograd.grad(total, x)
    return grad, logp.detach(), ent.detach()


def backend_lse(impl, logits, targets, temperature):
    lse, unused = lse_buffer(logits.shape[0], DEVICE), torch.empty(logits.shape[0], device=DEVICE)
    impl.logprob_rows(logits, targets, temperature, unused, None, lse)
    return lse


def slice_inputs(targets, columns, logp):
    """Targets local to the slice (-1 where it does not hold them) and the log-probs the
    backend may read: NaN on the rows whose target is elsewhere, which must not be read."""
    local = targets - columns.start
    holds = (local >= 0) & (local < columns.stop - columns.start)
    return torch.where(holds, local, -1), torch.where(holds, logp.float(), math.nan), holds


# Slices of a 1,031-column vocabulary (prime): the first, a middle one, the last (ragged); and
# one of more columns than a Triton row held on chip (16,384), whose full tiles are re-read.
SLICES = {"first-middle-last": (37, 1031, [slice(0, 160), slice(480, 611), slice(900, 1031)]),
          "wide": (5, 20_011, [slice(1_000, 18_517)])}


@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("with_entropy", [True, False], ids=["entropy", "no-entropy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SLICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_slice_gradient_matches_float64(backend, shape, dtype, with_entropy, in_place):
    impl = get_backend(backend)
    temperature = 0.7
    num_rows, vocab, slices = SLICES[shape]
    logits, targets, grad_logp, grad_ent = make_rows(num_rows, vocab, dtype, seed=vocab, masked=False)
    targets[:2] = torch.tensor([0, vocab - 1])  # the row's first and last columns: outside the wide slice
    oracle, logp, ent = whole_row_gradient(logits, targets, grad_logp, grad_ent, temperature, torch.float64,
                                           with_entropy)
    eager = whole_row_gradient(logits, targets, grad_logp, grad_ent, temperature, dtype, with_entropy)[0]
    lse = backend_lse(impl, logits, targets, temperature)
    for columns in slices:
        local, read_logp, holds = slice_inputs(targets, columns, logp)
        assert holds.any() and not holds.all()
        part = logits[:, columns].contiguous()
        grad = part if in_place else torch.full_like(part, math.nan)
        impl.logprob_backward(part, local, temperature, lse, read_logp, ent.float(), grad_logp,
                              grad_ent if with_entropy else None, grad)
        assert_close_to_oracle("grad", grad, oracle[:, columns], eager[:, columns], dtype,
                               truncated_bf16=interpreter_truncates_bf16(backend))


@pytest.mark.parametrize("temperature", [1.0, 1e-3], ids=["tau-1", "tau-1e-3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_slice_gradient_edges(backend, temperature):
    """-inf logits (one of them a target), tiny temperatures, int32 targets, a strided slice."""
    impl = get_backend(backend)
    logits, targets, grad_logp, grad_ent = make_rows(40, 700, torch.float32, seed=7, masked=True)
    oracle, logp, ent = whole_row_gradient(logits, targets, grad_logp, grad_ent, temperature, torch.float64, True)
    lse = backend_lse(impl, logits, targets, temperature)
    eager = whole_row_gradient(logits, targets, grad_logp, grad_ent, temperature, torch.float32, True)[0]
    for columns in (slice(0, 300), slice(300, 700)):
        local, read_logp, holds = slice_inputs(targets, columns, logp)
        part = logits[:, columns]  # rows 700 apart: a strided view, as a slice of wider logits
        grad = torch.full_like(part, math.nan)
        impl.logprob_backward(part, local.to(torch.int32), temperature, lse, read_logp, ent.float(), grad_logp,
                              grad_ent, grad)
        assert_close_to_oracle("grad", grad, oracle[:, columns], eager[:, columns], torch.float32)


def test_reference_slice_gradient_takes_no_one_hot_without_target():
    """The oracle's own rule: with target -1 the row is -p_j (c + e (log p_j + H)) / tau exactly,
    also where c is infinite (no one-hot term multiplied in)."""
    logits = torch.randn(3, 5, dtype=torch.float64)
    lse, ent = torch.logsumexp(logits / 2.0, -1), torch.rand(3, dtype=torch.float64)
    c = torch.tensor([0.5, math.inf, -2.0], dtype=torch.float64)
    e = torch.tensor([0.1, 0.0, 0.3], dtype=torch.float64)
    grad = logits_gradient(logits, torch.tensor([-1, -1, 2]), 2.0, lse, ent, c, e)
    log_p = logits / 2.0 - lse[:, None]
    expected = -log_p.exp() * (c[:, None] + e[:, None] * (log_p + ent[:, None])) / 2.0
    expected[2, 2] += c[2] / 2.0
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)
