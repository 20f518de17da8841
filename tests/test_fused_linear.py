"""fused_linear_policy_loss / fused_linear_token_logprobs against the logits path by hand."""

import pytest
import torch
from conftest import DEVICE
from kernel_cases import OPTION_SETS, assert_close_to_oracle, backends_on, largest_u, loss_config, make_case

from siri.kernels import fused_linear_policy_loss, fused_linear_token_logprobs
from siri.kernels import fused_linear_algorithms
from siri.kernels.fused_linear_algorithms import vocab_slice_size
from siri.kernels.reference import logprobs_and_entropy, policy_loss_reference

BACKENDS = backends_on(DEVICE)
# chunk_size None: the vocabulary split (made to cut these small vocabularies into several
# slices and row blocks by `small_slices`); an int: row chunks.
CHUNKINGS = [None, 16]


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    """Slices of 32 columns at the tests' sizes, so that the merge across slices and the rows
    whose target lies in another slice are exercised (the defaults give one slice here)."""
    monkeypatch.setattr(fused_linear_algorithms, "SLICE_MEMORY_FLOOR_BYTES", 0)
    monkeypatch.setattr(fused_linear_algorithms, "SLICE_COLUMN_MULTIPLE", 32)


def make_linear(num_rows, hidden_size, vocab, dtype, seed, with_bias):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 2 / hidden_size**0.5).to(dtype)
    bias = (torch.randn(vocab, generator=gen) * 0.5).to(dtype) if with_bias else None
    return hidden.to(DEVICE), weight.to(DEVICE), None if bias is None else bias.to(DEVICE)


def reference(hidden, weight, bias, targets, advantages, weights, kw, dtype):
    """The logits path built by hand: materialised logits, the reference loss, autograd."""
    leaves = [t.detach().to(dtype).requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.t() + (b if b is not None else 0)
    cast = lambda t: None if t is None else t.to(dtype if dtype == torch.float64 else torch.float32)  # noqa: E731
    out = policy_loss_reference(
        logits, targets, cast(advantages), cast(weights), cast(kw.get("old_logprobs")),
        cast(kw.get("ref_logprobs")), cast(kw.get("rollout_logprobs")), loss_config(kw),
    )
    grads = torch.autograd.grad(out.loss, [t for t in leaves if t is not None]) if h.shape[0] else None
    return out, grads


def near_linear_logprobs(kw, hidden, weight, bias, targets, seed):
    """Old, reference and rollout log-probs near the linear model's own (make_case's sit near
    its random logits'), so that ratios fall on both sides of the clip bounds rather than at
    exp(6), where a loss of thousands turns one float32 rounding of the GEMM into 1e-4."""
    logits = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
    true_logp = torch.log_softmax(logits / kw.get("temperature", 1.0), -1)
    true_logp = true_logp.gather(-1, targets.clamp(0, weight.shape[0] - 1)[:, None])[:, 0]
    gen = torch.Generator().manual_seed(seed)
    for name, spread in (("old_logprobs", 0.3), ("ref_logprobs", 0.5), ("rollout_logprobs", 0.4)):
        if name in kw:
            noise = torch.randn(targets.shape[0], generator=gen, dtype=torch.float64).to(DEVICE)
            kw[name] = (true_logp + spread * noise).float()


def check(backend, num_rows, hidden_size, vocab, options, *, chunk_size, with_bias, seed, dtype=torch.float32,
          active_targets=None):
    """The fused op against the float64 logits path; (its output, the leaves with their
    gradients). `active_targets`: the targets of the rows of nonzero weight, in turn."""
    hidden, weight, bias = make_linear(num_rows, hidden_size, vocab, dtype, seed, with_bias)
    _, targets, advantages, weights, kw = make_case(num_rows, vocab, torch.float32, options, seed=seed, device=DEVICE)
    if active_targets is not None:
        active = (weights != 0).nonzero()[:, 0]
        targets[active] = active_targets.to(DEVICE).repeat(len(active) // len(active_targets) + 1)[:len(active)]
    near_linear_logprobs(kw, hidden, weight, bias, targets, seed)
    oracle, oracle_grads = reference(hidden, weight, bias, targets, advantages, weights, kw, torch.float64)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    out = fused_linear_policy_loss(
        leaves[0], leaves[1], targets, advantages, weights, bias=leaves[2], chunk_size=chunk_size, backend=backend, **kw
    )
    out.loss.backward()
    # float32: tight against float64. Half precision: no worse than PyTorch's own logits
    # path in that dtype (a row near a clip bound may flip in both).
    eager, eager_grads = reference(hidden, weight, bias, targets, advantages, weights, kw, dtype)
    for name in ("loss", "logprobs", "entropy"):
        assert_close_to_oracle(name, getattr(out, name), getattr(oracle, name), getattr(eager, name), dtype)
    if oracle_grads is not None:
        for leaf, expected, pytorch in zip([t for t in leaves if t is not None], oracle_grads, eager_grads):
            assert leaf.grad.dtype == dtype
            assert_close_to_oracle("grad", leaf.grad, expected, pytorch, dtype)
    return out, leaves


@pytest.mark.parametrize("chunk_size", CHUNKINGS, ids=str)
@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_option_matches_logits_path(backend, options, chunk_size):
    # 50 rows in chunks of 16 (the last one ragged), or V = 211 in 7 slices of 32 columns
    # (the last one ragged). H = 37 and V = 211 are prime.
    check(backend, 50, 37, 211, OPTION_SETS[options], chunk_size=chunk_size, with_bias=options == "everything",
          seed=11)


@pytest.mark.parametrize(
    "num_rows, hidden_size, vocab, chunk_size",
    [
        (0, 8, 30, None),  # nothing to score
        (1, 1, 1, None),  # one row, a one-token vocabulary
        (33, 64, 1823, 7),  # chunks that divide nothing
        (33, 64, 1823, None),  # slices that divide nothing
        (40, 24, 97, 1000),  # one chunk larger than T
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes_and_chunks(backend, num_rows, hidden_size, vocab, chunk_size):
    check(
        backend, num_rows, hidden_size, vocab, OPTION_SETS["everything"],
        chunk_size=chunk_size, with_bias=True, seed=num_rows,
    )


@pytest.mark.parametrize("chunk_size", [None, 8], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend, chunk_size):
    check(backend, 24, 32, 300, OPTION_SETS["old-logprobs"], chunk_size=chunk_size, with_bias=False, seed=3,
          dtype=torch.bfloat16)


# V = 211 in 7 slices of 32 columns (small_slices): targets at both edges of the first slice,
# in a middle one and at both ends of the ragged last one.
SLICE_EDGE_TARGETS = torch.tensor([0, 31, 32, 100, 191, 192, 210])


# Half precision without the clip-bound-heavy "everything" set: there the loss of bf16 logits
# (row chunks' as the split's) lands 0.007 from float64 where eager bf16's errors happen to cancel.
@pytest.mark.parametrize("options, dtype, with_bias", [
    ("everything", torch.float32, True), ("old-logprobs", torch.float32, False),
    ("old-logprobs", torch.bfloat16, False), ("entropy", torch.bfloat16, True), ("old-logprobs", torch.float16, True),
], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_split_targets_in_first_middle_and_last_slices(backend, with_bias, options, dtype):
    """Each slice's gradient from the backend's logprob_backward: a row's one-hot term in the
    slice holding its target only, and rows of weight 0 contributing nothing."""
    _, leaves = check(backend, 49, 37, 211, OPTION_SETS[options], chunk_size=None, with_bias=with_bias, seed=21,
                      dtype=dtype, active_targets=SLICE_EDGE_TARGETS)
    weights = make_case(49, 211, torch.float32, OPTION_SETS[options], seed=21, device=DEVICE)[3]
    ignored = weights == 0
    assert ignored.any()
    assert (leaves[0].grad[ignored] == 0).all()


@pytest.mark.parametrize("chunk_size", CHUNKINGS, ids=str)
@pytest.mark.parametrize("temperature", [1e-3, 1e-5, 1e-7], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperatures_match_the_logits_path(backend, temperature, chunk_size):
    """At |u| = |logits| / temperature up to ~1e8 the split's merge of its slices loses nothing
    that the logits path keeps: each log-prob, entropy and gradient as close to float64 as
    PyTorch's float32 logits path, on the rows whose target is the argmax (log p ~ 0, where an
    lse rounded to |u| showed: log-probs of +0.001 at a temperature of 1e-3, +4.7 at 1e-7) and
    on the others. hidden is one-hot, so the GEMM is exact and the float32 logits are known."""
    num_rows, vocab = 40, 211
    gen = torch.Generator().manual_seed(7)
    hidden = torch.eye(num_rows).to(DEVICE)
    weight = (torch.randn(vocab, num_rows, generator=gen) * 3).to(DEVICE)  # logits = weight.T
    targets = torch.randint(0, vocab, (num_rows,), generator=gen).to(DEVICE)
    argmax_rows = torch.arange(num_rows, device=DEVICE) % 2 == 0
    targets[argmax_rows] = weight.t()[argmax_rows].argmax(-1)
    advantages, weights = torch.randn(num_rows, generator=gen).to(DEVICE), torch.ones(num_rows, device=DEVICE)
    kw = {"temperature": temperature, "entropy_coef": 0.01}
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    out = fused_linear_policy_loss(*leaves, targets, advantages, weights, chunk_size=chunk_size, backend=backend,
                                   **kw)
    out.loss.backward()
    assert (out.logprobs <= 0).all()
    oracle, oracle_grads = reference(hidden, weight, None, targets, advantages, weights, kw, torch.float64)
    eager, eager_grads = reference(hidden, weight, None, targets, advantages, weights, kw, torch.float32)
    assert_close_to_oracle("loss", out.loss, oracle.loss, eager.loss, torch.float32)
    for rows in (argmax_rows, ~argmax_rows):
        for name in ("logprobs", "entropy"):
            assert_close_to_oracle(name, getattr(out, name)[rows], getattr(oracle, name)[rows],
                                   getattr(eager, name)[rows], torch.float32)
        # d loss / d weight[j, t] = d loss / d logits[t, j]: row t's gradient, whose p carries
        # the relative error of u (Triton's base 2 rounds u once more than PyTorch does).
        assert_close_to_oracle("grad", leaves[1].grad.t()[rows], oracle_grads[1].t()[rows],
                               eager_grads[1].t()[rows], torch.float32, u_max=largest_u(weight, temperature))


def test_frozen_head_gets_no_weight_gradient():
    hidden, weight, _ = make_linear(10, 16, 50, torch.float32, 0, False)
    _, targets, advantages, weights, kw = make_case(10, 50, torch.float32, {}, seed=0, device=DEVICE)
    h = hidden.clone().requires_grad_(True)
    fused_linear_policy_loss(h, weight, targets, advantages, weights).loss.backward()
    assert h.grad is not None and weight.grad is None


def test_incoming_gradient_scales_every_gradient():
    hidden, weight, bias = make_linear(12, 16, 40, torch.float32, 1, True)
    _, targets, advantages, weights, kw = make_case(12, 40, torch.float32, {}, seed=1, device=DEVICE)
    results = []
    for scale in (1.0, 3.0):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        (
            fused_linear_policy_loss(leaves[0], leaves[1], targets, advantages, weights, bias=leaves[2]).loss * scale
        ).backward()
        results.append([leaf.grad for leaf in leaves])
    for one, three in zip(*results):
        torch.testing.assert_close(three, 3 * one)


@pytest.mark.parametrize("chunk_size", [None, 6], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs(backend, chunk_size):
    hidden, weight, bias = make_linear(29, 20, 333, torch.float32, 5, True)
    targets = torch.randint(0, 333, (29,), device=DEVICE)
    with torch.no_grad():
        logp, ent = fused_linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.8,
                                                return_entropy=True, chunk_size=chunk_size, backend=backend)
    expected = logprobs_and_entropy((hidden.double() @ weight.double().t() + bias.double()), targets, 0.8)
    torch.testing.assert_close(logp.double(), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), expected[1], atol=1e-5, rtol=1e-5)


def check_token_logprobs(backend, vocab, targets, *, with_entropy, with_bias, chunk_size):
    """Outputs and gradients of fused_linear_token_logprobs against the float64 logits path."""
    num_rows = targets.shape[0]
    hidden, weight, bias = make_linear(num_rows, 17, vocab, torch.float32, 11, with_bias)
    gen = torch.Generator().manual_seed(12)
    targets = targets.to(DEVICE)
    grad_logp, grad_ent = (torch.randn(num_rows, generator=gen).to(DEVICE) for _ in range(2))
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    out = fused_linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2] if with_bias else None,
                                      temperature=0.7, return_entropy=with_entropy, chunk_size=chunk_size,
                                      backend=backend)
    logp, ent = out if with_entropy else (out, None)
    objective = (grad_logp * logp).sum() + ((grad_ent * ent).sum() if with_entropy else 0)
    grads = torch.autograd.grad(objective, leaves)

    exact = [t.double().requires_grad_(True) for t in leaves]
    logits = exact[0] @ exact[1].t() + (exact[2] if with_bias else 0)
    logp64, ent64, _ = logprobs_and_entropy(logits, targets, 0.7)
    torch.testing.assert_close(logp.double(), logp64.detach(), atol=1e-5, rtol=1e-5)
    objective64 = (grad_logp.double() * logp64).sum() + ((grad_ent.double() * ent64).sum() if with_entropy else 0)
    for got, want in zip(grads, torch.autograd.grad(objective64, exact)):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy, with_bias, chunk_size", [(True, True, 7), (True, False, 64), (False, True, 5)])
def test_token_logprobs_gradients_match_float64(backend, with_entropy, with_bias, chunk_size):
    """Both outputs are differentiable in hidden, weight and bias, as the float64 logits path is."""
    targets = torch.randint(0, 301, (23,), generator=torch.Generator().manual_seed(13))
    check_token_logprobs(backend, 301, targets, with_entropy=with_entropy, with_bias=with_bias, chunk_size=chunk_size)


@pytest.mark.parametrize("with_entropy, with_bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_split_targets_in_first_middle_and_last_slices(backend, with_entropy, with_bias):
    """chunk_size None: the forward's vocabulary split (7 slices of V = 211), its backward by rows."""
    check_token_logprobs(backend, 211, SLICE_EDGE_TARGETS.repeat(3), with_entropy=with_entropy, with_bias=with_bias,
                         chunk_size=None)


def test_token_logprobs_gradient_of_entropy_alone():
    hidden, weight, _ = make_linear(9, 8, 50, torch.float32, 2, False)
    targets = torch.randint(0, 50, (9,)).to(DEVICE)
    leaf = hidden.clone().requires_grad_(True)
    _, ent = fused_linear_token_logprobs(leaf, weight, targets, return_entropy=True, chunk_size=4)
    (grad,) = torch.autograd.grad(ent.sum(), [leaf])
    exact = hidden.double().requires_grad_(True)
    (want,) = torch.autograd.grad(logprobs_and_entropy(exact @ weight.double().t(), targets, 1.0)[1].sum(), [exact])
    torch.testing.assert_close(grad.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(weight=torch.randn(10, 9)), "weight"),
        (dict(weight=torch.randn(10, 8).double()), "weight"),
        (dict(bias=torch.randn(11)), "bias"),
        (dict(hidden=torch.randn(4, 8, 1)), "hidden"),
        (dict(targets=torch.tensor([0, 1, 2, 10])), "targets"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(advantages=torch.randn(3)), "advantages"),
    ],
)
def test_bad_input(change, named):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.tensor([0, 1, 2, 3]),
                advantages=torch.randn(4), weights=torch.ones(4), bias=None, chunk_size=None)
    args.update(change)
    with pytest.raises(ValueError, match=named):
        fused_linear_policy_loss(args["hidden"], args["weight"], args["targets"], args["advantages"], args["weights"],
                                 bias=args["bias"], chunk_size=args["chunk_size"])


def test_vocab_slice_size(monkeypatch):
    monkeypatch.undo()  # the real sizes, not the small_slices fixture's
    for num_rows, vocab, itemsize in ((16_384, 151_936, 2), (4096, 151_936, 2), (8192, 32_000, 4), (10, 100, 4)):
        columns = vocab_slice_size(num_rows, vocab, itemsize)
        budget = max(0.01 * num_rows * vocab * itemsize, 32 << 20)
        # The slice of logits fits the budget (its gradient is written over it, no temporaries).
        assert num_rows * columns * itemsize <= budget
        assert columns == vocab or columns % 128 == 0
    # Qwen2's vocabulary at 16K bf16 tokens: 1,408-column slices (108 of them) in 1% of the logits.
    assert vocab_slice_size(16_384, 151_936, 2) == 1408
    # A vocabulary narrower than a slice is one slice.
    assert vocab_slice_size(10, 100, 4) == 100


def test_row_chunks_within_budget(monkeypatch):
    monkeypatch.undo()  # the real budget, not the small_slices fixture's
    chunks = fused_linear_algorithms.row_chunks_within_budget
    # Small vocabularies: every row in one chunk, or chunks of the rows the split's 32 MiB floor holds.
    assert chunks(757, 8192, 128, 4) == 757
    assert chunks(4096, 8192, 128, 4) == 1024
    assert chunks(10, 100, 4, 4) == 10
    # Qwen2's vocabulary: the split (a bf16 head's float32 gradient accumulator alone exceeds the budget).
    assert chunks(16_384, 151_936, 1536, 2) is None
    assert chunks(2048, 151_936, 64, 4) is None
    # Chunks shorter than 1,024 rows of a longer batch: the split.
    assert chunks(4096, 32_000, 128, 4) is None
    assert chunks(0, 100, 4, 4) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_takes_row_chunks_where_they_fit(backend, monkeypatch):
    monkeypatch.undo()  # the real budget: these shapes fit it
    taken = []
    row_chunks = fused_linear_algorithms.row_chunked_policy_loss

    def spy(*args):
        taken.append(args[-3])  # chunk_size
        return row_chunks(*args)

    monkeypatch.setattr(fused_linear_algorithms, "row_chunked_policy_loss", spy)
    check(backend, 40, 24, 300, OPTION_SETS["everything"], chunk_size=None, with_bias=True, seed=5)
    assert taken == [40]
    # Without gradients both do one GEMM per slice or chunk: the split, as before.
    hidden, weight, bias = make_linear(40, 24, 300, torch.float32, 5, True)
    _, targets, advantages, weights, _ = make_case(40, 300, torch.float32, {}, seed=5, device=DEVICE)
    with torch.no_grad():
        fused_linear_policy_loss(hidden, weight, targets, advantages, weights, bias=bias, backend=backend)
    assert taken == [40]


def test_compiles_without_graph_break():
    torch._dynamo.reset()
    hidden, weight, bias = make_linear(20, 16, 64, torch.float32, 2, True)
    _, targets, advantages, weights, _ = make_case(20, 64, torch.float32, {}, seed=2, device=DEVICE)

    def step(h, w, b):
        return fused_linear_policy_loss(h, w, targets, advantages, weights, bias=b, chunk_size=8).loss

    eager = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    compiled = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    step(*eager).backward()
    torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.parametrize("chunk_size", [None, 8], ids=str)
def test_opcheck_fused_linear_ops(chunk_size):
    hidden, weight, bias = make_linear(12, 16, 70, torch.float32, 4, True)
    _, targets, advantages, weights, kw = make_case(12, 70, torch.float32, OPTION_SETS["everything"], seed=4,
                                                    device=DEVICE)
    policy_args = (targets, advantages, weights, kw["old_logprobs"], kw["ref_logprobs"], kw["rollout_logprobs"],
                   1.3, 0.1, 0.3, 2.5, 0.2, "k3", 0.01, 1.5, "auto", chunk_size)
    for grads in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.siri.fused_linear_policy_loss.default, (hidden, weight, bias, *policy_args,
                                                                                *grads))
    valid = targets.clamp(0, 69)
    torch.library.opcheck(torch.ops.siri.fused_linear_token_logprobs.default,
                          (hidden, weight, bias, valid, 0.9, True, "auto", chunk_size))


def test_token_logprobs_compiles_forward_and_backward():
    hidden, weight, bias = make_linear(10, 8, 40, torch.float32, 4, True)
    targets = torch.randint(0, 40, (10,)).to(DEVICE)

    def objective(h, w, b):
        logp, ent = fused_linear_token_logprobs(h, w, targets, bias=b, return_entropy=True, chunk_size=4)
        return logp.sum() + 0.1 * ent.sum()

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    eager = torch.autograd.grad(objective(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(objective, fullgraph=True)(*leaves), leaves)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)
