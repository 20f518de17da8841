"""benchmarks/packing_bench.py: every method it times computes the same update (the same
parameter gradients from the same samples), so that its speedups compare equal work."""

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import packing_bench  # noqa: E402


def test_every_method_gives_the_same_gradients():
    device = torch.device("cpu")
    cfg = packing_bench.config(device, quick=True)
    model = packing_bench.make_model(cfg, device)
    samples = packing_bench.make_samples(cfg)
    grads = {}
    for name in [f"packed-{attn}" for attn in packing_bench.packed_attentions(device)] + \
            list(packing_bench.PADDED_METHODS):
        batches, step, _, attn = packing_bench.prepare(name, cfg, samples, device)
        model.set_attn_implementation(attn)
        model.zero_grad(set_to_none=True)
        step(model, batches)
        grads[name] = [p.grad.clone() for p in model.parameters()]
    default = grads.pop(f"packed-{packing_bench.packed_attentions(device)[0]}")
    for name, got in grads.items():
        for g, want in zip(got, default):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=name)
