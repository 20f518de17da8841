"""Every backend against the float64 reference at the sizes a GPU trains at.

The `gpu` cases run where CUDA is (benchmarks/gpu_check.sh runs them on a lent GPU): the
vocabulary of Qwen2.5 (V = 151,936), up to T = 16,384 rows (2.49e9 logits elements, past
2^31, where 32-bit offsets overflow), each logits dtype, and a view whose rows start off a
16-byte boundary with an odd row stride. The same bodies run on the CPU at small sizes, so
they are checked everywhere. Backend ids read `backend-<name>` (`-k backend-cuda` picks one).

The oracle is `reference_outputs` of kernel_cases.py (float64, autograd for the gradient),
evaluated over blocks of rows: every row's outputs and gradient depend on that row alone, so
the blocks give exactly the full reference without its [T, V] float64 buffers.
"""

import pytest
import torch
from kernel_cases import (
    OPTION_SETS,
    assert_close_to_oracle,
    backends_on,
    interpreter_truncates_bf16,
    reference_outputs,
)

from siri.kernels import policy_loss, token_logprobs

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
OPTIONS = OPTION_SETS["everything"]
ORACLE_ROWS = 256  # rows per block of the float64 oracle

# (label, T, V, dtype, offset view)
GPU_CASES = [("full", 4096, 151_936, dtype, False) for dtype in (torch.bfloat16, torch.float16, torch.float32)] + [
    ("offset-odd-stride", 1031, 151_935, torch.bfloat16, True),
    ("offset-odd-stride", 1031, 151_935, torch.float32, True),
    ("past-2^31-elements", 16_384, 151_936, torch.bfloat16, False),
]
CPU_CASES = [("small", 37, 97, dtype, False) for dtype in (torch.bfloat16, torch.float16, torch.float32)] + [
    ("offset-odd-stride", 29, 95, torch.bfloat16, True),
]


def case_label(case):
    label, num_rows, vocab, dtype, _ = case
    return f"{label}-T{num_rows}-V{vocab}-{str(dtype).removeprefix('torch.')}"


def make_inputs(num_rows, vocab, dtype, device, offset, seed=0):
    """Logits (std 3) and per-token inputs drawn on `device`; a quarter of the rows weigh 0
    and hold a target outside [0, V) that must never be read. With `offset` the logits are a
    view one element into rows of V + 3: misaligned for vector loads, odd row stride."""
    gen = torch.Generator(device=device).manual_seed(seed)
    width = vocab + 3 if offset else vocab
    base = (torch.randn(num_rows, width, generator=gen, device=device) * 3).to(dtype)
    logits = base[:, 1:vocab + 1] if offset else base
    targets = torch.randint(0, vocab, (num_rows,), generator=gen, device=device)
    advantages = torch.randn(num_rows, generator=gen, device=device)
    weights = torch.rand(num_rows, generator=gen, device=device) + 0.1
    ignored = torch.rand(num_rows, generator=gen, device=device) < 0.25
    weights[ignored] = 0.0
    targets[ignored] = vocab + 7
    with torch.no_grad():  # old, ref and rollout log-probs near the current ones
        current = token_logprobs(logits, targets.clamp(0, vocab - 1), temperature=OPTIONS["temperature"],
                                 backend="torch")
    keywords = {k: v for k, v in OPTIONS.items() if k not in ("old", "ref", "rollout")}
    for name, spread in (("old", 0.3), ("ref", 0.5), ("rollout", 0.4)):
        keywords[f"{name}_logprobs"] = current + spread * torch.randn(num_rows, generator=gen, device=device)
    return logits, targets, advantages, weights, keywords


def oracle_blocks(logits, targets, advantages, weights, keywords):
    """(rows, float64 reference, PyTorch in the logits' dtype) over blocks of rows."""
    for start in range(0, logits.shape[0], ORACLE_ROWS):
        rows = slice(start, start + ORACLE_ROWS)
        block = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in keywords.items()}
        args = (logits[rows], targets[rows], advantages[rows], weights[rows], block)
        yield rows, reference_outputs(*args, torch.float64), reference_outputs(*args, logits.dtype)


def check_policy_loss(backend, num_rows, vocab, dtype, device, offset):
    logits, targets, advantages, weights, keywords = make_inputs(num_rows, vocab, dtype, device, offset)
    x = logits.detach().requires_grad_(True)
    out = policy_loss(x, targets, advantages, weights, backend=backend, **keywords)
    (grad,) = torch.autograd.grad(out.loss, x)
    truncated = interpreter_truncates_bf16(backend)
    loss = {"oracle": 0.0, "pytorch": 0.0}
    for rows, (oracle, oracle_grad), (pytorch, pytorch_grad) in oracle_blocks(
        logits, targets, advantages, weights, keywords
    ):
        for name in ("logprobs", "entropy"):
            assert_close_to_oracle(f"{name}[{rows.start}:]", getattr(out, name)[rows], getattr(oracle, name),
                                   getattr(pytorch, name), dtype)
        assert_close_to_oracle(f"grad[{rows.start}:]", grad[rows], oracle_grad, pytorch_grad, dtype,
                               truncated_bf16=truncated)
        loss["oracle"] += oracle.loss.item()
        loss["pytorch"] += pytorch.loss.item()
    assert_close_to_oracle("loss", out.loss, torch.tensor(loss["oracle"], dtype=torch.float64),
                           torch.tensor(loss["pytorch"]), dtype)


def check_token_logprobs(backend, num_rows, vocab, dtype, device, offset):
    logits, targets, _, weights, _ = make_inputs(num_rows, vocab, dtype, device, offset, seed=1)
    targets = targets.clamp(0, vocab - 1)
    x = logits.detach().requires_grad_(True)
    logp, entropy = token_logprobs(x, targets, temperature=0.7, return_entropy=True, backend=backend)
    # Weighted sum of both outputs: the backward then carries both incoming gradients.
    (grad,) = torch.autograd.grad((weights * logp).sum() + (0.3 * weights * entropy).sum(), x)
    for start in range(0, num_rows, ORACLE_ROWS):
        rows = slice(start, start + ORACLE_ROWS)
        results = {}
        for compute in (torch.float64, dtype):
            block = logits[rows].detach().to(compute).requires_grad_(True)
            scaled = torch.log_softmax(block / 0.7, -1)
            ref_logp = scaled.gather(-1, targets[rows, None])[:, 0]
            ref_entropy = -(scaled.exp() * scaled).sum(-1)
            w = weights[rows].to(compute)
            (ref_grad,) = torch.autograd.grad((w * ref_logp).sum() + (0.3 * w * ref_entropy).sum(), block)
            results[compute] = (ref_logp, ref_entropy, ref_grad)
        for index, (name, actual) in enumerate((("logprobs", logp), ("entropy", entropy), ("grad", grad))):
            assert_close_to_oracle(f"{name}[{start}:]", actual[rows], results[torch.float64][index],
                                   results[dtype][index], dtype, truncated_bf16=interpreter_truncates_bf16(backend))


CHECKS = [check_policy_loss, check_token_logprobs]


def device_cases():
    """(device, backend, case) of every backend that runs there: CUDA's marked `gpu`."""
    for device, cases, marks in ((CUDA, GPU_CASES, [pytest.mark.gpu]), (CPU, CPU_CASES, [])):
        for backend in backends_on(device):
            for case in cases:
                label = f"{device.type}-backend-{backend}-{case_label(case)}"
                yield pytest.param(device, backend, case, marks=marks, id=label)


@pytest.mark.parametrize("device, backend, case", list(device_cases()))
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_backend_matches_oracle(check, device, backend, case):
    _, num_rows, vocab, dtype, offset = case
    check(backend, num_rows, vocab, dtype, device, offset)


def test_gpu_cases_cover_the_sizes_they_claim():
    assert max(num_rows * vocab for _, num_rows, vocab, _, _ in GPU_CASES) > 2**31
    assert {dtype for *_, dtype, _ in GPU_CASES} == {torch.bfloat16, torch.float16, torch.float32}
    assert any(offset for *_, offset in GPU_CASES)
    assert max(num_rows for _, num_rows, *_ in GPU_CASES) == 16_384
