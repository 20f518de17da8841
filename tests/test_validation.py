"""Bad input raises ValueError naming the argument, before any kernel runs."""

import pytest
import torch
from kernel_cases import backends_on

from siri.kernels import policy_loss, token_logprobs


def good(num_rows=4, vocab=10):
    return dict(
        logits=torch.randn(num_rows, vocab), targets=torch.randint(0, vocab, (num_rows,)),
        advantages=torch.randn(num_rows), weights=torch.ones(num_rows),
    )


def call(**changes):
    args = good()
    keywords = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    keywords.setdefault("backend", "torch")
    return policy_loss(args["logits"], args["targets"], args["advantages"], args["weights"], **keywords)


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(logits=torch.randn(4, 10, 2)), "logits"),
        (dict(logits=torch.randn(4, 10).double()), "logits"),
        (dict(logits=torch.randn(4, 0)), "logits"),
        (dict(targets=torch.zeros(5, dtype=torch.long)), "targets"),
        (dict(targets=torch.zeros(4)), "targets"),
        (dict(targets=torch.tensor([0, 1, 10, 2])), "targets"),
        (dict(targets=torch.tensor([0, -1, 3, 2])), "targets"),
        (dict(advantages=torch.randn(3)), "advantages"),
        (dict(advantages=torch.tensor([0.0, float("nan"), 1.0, 1.0])), "advantages"),
        (dict(advantages=torch.zeros(4, dtype=torch.long)), "advantages"),
        (dict(weights=torch.tensor([1.0, float("inf"), 1.0, 1.0])), "weights"),
        (dict(weights=torch.ones(4, 1)), "weights"),
        (dict(old_logprobs=torch.randn(2)), "old_logprobs"),
        (dict(ref_logprobs=torch.randn(5)), "ref_logprobs"),
        (dict(rollout_logprobs=torch.randn(4, 2)), "rollout_logprobs"),
        (dict(tis_cap=2.0), "tis_cap"),
        (dict(kl_coef=0.1), "kl_coef=0.1 needs ref_logprobs"),
        (dict(old_logprobs=torch.tensor([0.0, float("nan"), -1.0, -1.0])), "old_logprobs must not be NaN"),
        (dict(ref_logprobs=torch.tensor([float("nan")] * 4)), "ref_logprobs must not be NaN"),
        (dict(rollout_logprobs=torch.tensor([0.0, 0.0, -1.0, float("nan")]), tis_cap=2.0),
         "rollout_logprobs must not be NaN"),
        (dict(advantages="1.0"), "advantages must be a torch.Tensor, got str"),
        (dict(advantages=1.0), "advantages must be a torch.Tensor, got float"),
        (dict(advantages=torch.tensor(1.0)), r"advantages must have shape \[4\]"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(backend="fastest"), "backend"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(kl_coef=float("inf")), "kl_coef"),
        (dict(entropy_coef="0.1"), "entropy_coef"),
        (dict(logits=torch.randn(10, 4).t(), inplace_backward=True), "inplace_backward"),
    ],
)
def test_policy_loss_rejects(changes, named):
    with pytest.raises(ValueError, match=named):
        call(**changes)


def test_out_of_range_target_is_fine_where_weight_is_zero():
    out = call(targets=torch.tensor([0, -100, 99, 2]), weights=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.isfinite(out.loss)


def test_tensors_on_another_device():
    meta = torch.randn(4, device="meta")
    with pytest.raises(ValueError, match="advantages"):
        call(advantages=meta)


def test_unavailable_backend_is_named():
    with pytest.raises(ValueError, match="cuda"):
        call(backend="cuda")


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        call(backend="triton")


def test_siri_backend_overrides_auto(monkeypatch):
    monkeypatch.setenv("SIRI_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SIRI_BACKEND"):
        policy_loss(**good())


def test_value_checks_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("SIRI_VALIDATE", "0")
    out = call(advantages=torch.tensor([0.0, float("nan"), 1.0, 1.0]))
    assert torch.isnan(out.loss)


def test_minus_inf_log_probs_are_accepted():
    inf = float("inf")
    out = call(old_logprobs=torch.tensor([-inf, -1.0, -1.0, -1.0]), ref_logprobs=torch.tensor([-1.0, -inf, -1.0, -1.0]),
               kl_coef=0.1, kl_estimator="k2")
    assert out.loss.item() == float("inf")  # a reference log-prob of -inf: an infinite KL, honestly


@pytest.mark.parametrize("backend", backends_on(torch.device("cpu")))
def test_out_of_range_targets_are_clamped_without_validation(backend, monkeypatch):
    """With SIRI_VALIDATE=0 every backend clamps a target into [0, V), as the docs say (the
    torch backend raised inside gather)."""
    monkeypatch.setenv("SIRI_VALIDATE", "0")
    args = good()
    clamped = torch.tensor([0, 9, 9, 2])
    expected = policy_loss(args["logits"], clamped, args["advantages"], args["weights"], backend=backend)
    out = policy_loss(args["logits"], torch.tensor([-5, 10, 99, 2]), args["advantages"], args["weights"],
                      backend=backend)
    torch.testing.assert_close(out.loss, expected.loss)
    logp = token_logprobs(args["logits"], torch.tensor([-5, 10, 99, 2]), backend=backend)
    torch.testing.assert_close(logp, expected.logprobs)


def test_token_logprobs_rejects():
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(torch.randn(3, 5), torch.tensor([0, 5, 1]), backend="torch")
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(torch.randn(3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="return_entropy"):
        token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 1]), return_entropy=1)


@pytest.mark.parametrize("advantage", ["1.0", True, None])
def test_sample_advantage_that_is_no_number_is_named(advantage):
    from siri.packing import Sample, pack

    with pytest.raises(ValueError, match=r"samples\[0\]\.advantage must be a real number .* got "):
        pack([Sample(prompt_ids=[1, 2], response_ids=[3], advantage=advantage)], max_tokens=8)
