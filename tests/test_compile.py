"""The ops trace under torch.compile(fullgraph=True), forward and backward, and pass opcheck."""

import pytest
import torch
from conftest import DEVICE
from kernel_cases import OPTION_SETS, make_case

import siri.kernels.ops  # noqa: F401  (registers torch.ops.siri.*)
from siri.kernels import policy_loss, token_logprobs

# Inductor generates and compiles C++ on a CPU (tens of seconds); aot_eager traces the same
# forward and backward graphs through AOTAutograd without code generation.
COMPILERS = ["aot_eager", "inductor"]


def loss_step(logits, targets, advantages, weights, old_logprobs, ref_logprobs):
    out = policy_loss(logits, targets, advantages, weights, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                      kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    return out.loss, out.logprobs, out.metrics["clip_frac"]


@pytest.mark.parametrize("compiler", COMPILERS)
def test_policy_loss_compiles_without_graph_break(compiler):
    torch._dynamo.reset()
    logits, targets, advantages, weights, kw = make_case(
        16, 97, torch.float32, dict(old=True, ref=True), seed=0, device=DEVICE
    )
    old, ref = kw["old_logprobs"], kw["ref_logprobs"]
    compiled = torch.compile(loss_step, fullgraph=True, backend=compiler)
    x_eager, x_compiled = (logits.clone().requires_grad_(True) for _ in range(2))
    expected = loss_step(x_eager, targets, advantages, weights, old, ref)
    actual = compiled(x_compiled, targets, advantages, weights, old, ref)
    expected[0].backward()
    actual[0].backward()
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_inplace_backward_under_compile():
    torch._dynamo.reset()
    logits, targets, advantages, weights, _ = make_case(8, 64, torch.float32, {}, seed=1, device=DEVICE)

    def step(x):
        return policy_loss(x * 2, targets, advantages, weights, inplace_backward=True).loss

    x_eager, x_compiled = (logits.clone().requires_grad_(True) for _ in range(2))
    step(x_eager).backward()
    torch.compile(step, fullgraph=True, backend="aot_eager")(x_compiled).backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_token_logprobs_compiles_without_graph_break():
    torch._dynamo.reset()
    logits = torch.randn(10, 33, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 33, (10,), device=DEVICE)

    def f(x):
        logp, ent = token_logprobs(x, targets, temperature=0.8, return_entropy=True)
        return logp.sum() + 0.5 * ent.sum()

    torch.compile(f, fullgraph=True, backend="aot_eager")(logits).backward()
    x = logits.detach().clone().requires_grad_(True)
    f(x).backward()
    torch.testing.assert_close(logits.grad, x.grad)


def _policy_args(logits, targets, advantages, weights, kw):
    return (targets, advantages, weights, kw.get("old_logprobs"), kw.get("ref_logprobs"), kw.get("rollout_logprobs"),
            1.3, 0.1, 0.3, 2.5, 0.2, "k3", 0.01, 1.5, "auto")


def test_opcheck_every_op():
    logits, targets, advantages, weights, kw = make_case(
        6, 40, torch.float32, OPTION_SETS["everything"], seed=2, device=DEVICE
    )
    args = _policy_args(logits, targets, advantages, weights, kw)
    torch.library.opcheck(torch.ops.siri.policy_loss_rows.default, (logits, *args, True))
    torch.library.opcheck(torch.ops.siri.policy_loss_rows.default, (logits, *args, False))
    torch.library.opcheck(torch.ops.siri.policy_loss_rows_inplace.default, (logits.clone(), *args))
    valid = targets.clamp(0, 39)
    torch.library.opcheck(torch.ops.siri.token_logprobs.default, (logits, valid, 0.9, True, "auto"))
    logp, ent, lse = torch.ops.siri.token_logprobs(logits, valid, 0.9, True, "auto")
    torch.library.opcheck(
        torch.ops.siri.token_logprobs_backward.default,
        (logits, valid, lse, logp, ent, torch.randn(6), torch.randn(6), 0.9, "auto"),
    )
    torch.library.opcheck(torch.ops.siri.scale_grad_.default, (torch.randn(6, 40), torch.tensor(3.0)))
