"""Two CPU processes on gloo with FSDP2 get the loss and gradients of one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from trainer_fixtures import tiny_overrides

HERE = os.path.dirname(os.path.abspath(__file__))


# (loss_agg, the forward's dtype over float32 parameters, relative tolerance). Under bfloat16
# autocast the two runs pack different micro-batches, so they agree to bfloat16 rounding.
CASES = [("token-mean", "float32", 1e-5), ("seq-mean-token-mean", "float32", 1e-5), ("token-mean", "bfloat16", 1e-2)]


@pytest.mark.parametrize("loss_agg,dtype,rtol", CASES)
def test_two_ranks_match_one_process(tmp_path, loss_agg, dtype, rtol):
    overrides = tiny_overrides(tmp_path, **{"algorithm.loss_agg": loss_agg, "reward.mask_truncated": "true",
                                            "algorithm.fused_linear": "true", "model.dtype": dtype})
    config = tmp_path / "overrides.json"
    config.write_text(json.dumps(overrides))
    script = os.path.join(HERE, "distributed_update.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, script, str(tmp_path / "one.pt"), str(config)], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    script, str(tmp_path / "two.pt"), str(config)], check=True, env=env)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["loss"] == pytest.approx(one["loss"], rel=rtol)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=rtol)
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        assert grad.dtype == two["grads"][name].dtype == torch.float32, name
        atol = 1e-7 if dtype == "float32" else rtol * grad.abs().max().item()
        torch.testing.assert_close(two["grads"][name], grad, atol=atol, rtol=max(rtol, 1e-4), msg=name)


def test_a_rank_without_samples_runs_a_zero_weight_batch_under_every_option():
    # A rank whose groups were all dropped pads with a dummy micro-batch; if the loss refused
    # it (tis_cap needs rollout log-probs, kl_coef reference ones), that rank would raise
    # while its peers wait in FSDP's collectives forever.
    from trainer_fixtures import make_model, make_tokenizer

    from siri.distributed import _zero_weight_batch
    from siri.model_forward import packed_policy_loss

    model = make_model(make_tokenizer())
    batch = _zero_weight_batch(None, [])
    out = packed_policy_loss(model, batch, clip_low=0.2, clip_high=0.28, tis_cap=2.0, kl_coef=0.1)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_the_ranks_normalise_by_packings_own_rule():
    # One definition of which samples count: a second copy in siri.distributed could drift
    # from packing's and mis-scale multi-GPU gradients without a sound.
    from siri import distributed, packing

    assert not hasattr(distributed, "weight_normaliser")
    assert distributed.loss_normaliser is packing.loss_normaliser
    samples = [packing.Sample(prompt_ids=[1], response_ids=[2] * n, truncated=t) for n, t in ((3, False), (4, True))]
    assert distributed.global_normaliser(samples, "token-mean", True, distributed.DistState()) == (3, 3.0)


@pytest.mark.parametrize("max_norm", [0.5, None])
def test_clip_grad_norm_stays_on_the_device_and_null_does_not_clip(max_norm):
    from siri.distributed import clip_grad_norm

    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(4, 3)).pow(2).sum().backward()
    before = torch.cat([p.grad.flatten() for p in layer.parameters()])
    norm = clip_grad_norm(layer, max_norm)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0  # read with the step's other metrics
    assert norm.item() == pytest.approx(before.norm().item(), rel=1e-6)
    after = torch.cat([p.grad.flatten() for p in layer.parameters()])
    expected = before if max_norm is None else before * (max_norm / before.norm())
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
