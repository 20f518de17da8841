"""benchmarks/run.py keeps every measured row: the file is rewritten after each, and a failing
method or section is recorded with its error while the run goes on."""

import json

import torch

from benchmarks.run import run_sections
from benchmarks.timing import measured


def test_results_file_holds_each_row_as_soon_as_it_is_measured(tmp_path):
    out = tmp_path / "results.json"
    seen = []

    def first():
        yield {"method": "a", "ms": 1.0}
        seen.append(json.loads(out.read_text()))  # the file as it stands while the next row runs
        yield {"method": "b", "ms": 2.0}

    def crashing():
        yield {"method": "c", "ms": 3.0}
        raise RuntimeError("the device fell over")

    def last():
        return [{"method": "d", "ms": 4.0}]

    results = {"sections": {}, "complete": False}
    run_sections({"first": first, "crashing": crashing, "last": last}, results, str(out))
    assert seen[0]["sections"]["first"] == [{"method": "a", "ms": 1.0}] and not seen[0]["complete"]
    final = json.loads(out.read_text())
    assert final["complete"]
    assert [r["method"] for r in final["sections"]["crashing"]] == ["c", "(section)"]
    assert final["sections"]["crashing"][1]["error"] == "RuntimeError: the device fell over"
    assert final["sections"]["last"] == [{"method": "d", "ms": 4.0}]


def test_a_failing_method_becomes_a_row_naming_its_error():
    def fails():
        raise ValueError("needs CUDA\nsecond line")

    row = measured({"method": "peer"}, fails, torch.device("cpu"))
    assert row == {"method": "peer", "error": "ValueError: needs CUDA"}
    assert measured({"method": "ok"}, lambda: {"ms": 1.5}, torch.device("cpu")) == {"method": "ok", "ms": 1.5}


def test_every_policy_loss_method_runs_and_computes_the_same_loss():
    """Each measured method runs (no row of the real benchmark would be an error row), and
    every one of the GRPO loss gives eager PyTorch's loss and gradient: a method left on
    other settings would time another computation."""
    from benchmarks import policy_loss_bench

    device = torch.device("cpu")
    inputs = policy_loss_bench.make_inputs(37, 101, torch.float32, device)
    results = {}
    for name, method in policy_loss_bench.methods(device).items():
        setup, run = method.make(inputs)
        results[name] = run(setup())  # raises on a method the benchmark would record as an error row
        if method.computes == "grpo" and method.peer is None:
            loss, grad = results[name]
            torch.testing.assert_close(loss, results["eager"][0], rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(grad, results["eager"][1], rtol=1e-4, atol=1e-6, msg=name)
