"""Every Triton kernel the backend launches compiles for sm_90 and sm_80 without spilling, on a CPU.

The rest of the suite runs the kernels in the Triton interpreter, which accepts code the
compiler rejects. This builds real cubins through `siri.kernels.triton_compile` (the
variants are its: each switch on and off, each logits dtype, the tiling of V = 97, 32,000
and 151,936), in a fresh process without the interpreter and with an empty Triton cache.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(root / "cache"), PYTHONWARNINGS="ignore")
    report = root / "compile.json"
    process = subprocess.run(
        [sys.executable, "-m", "siri.kernels.triton_compile", "--arch", "90", "--arch", "80", "--json", str(report)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert report.exists(), f"the offline compile crashed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    found = json.loads(report.read_text())
    found["log"] = process.stdout
    return found


def test_every_kernel_and_parameter_is_declared(compiled):
    assert compiled["errors"] == []


def test_every_variant_compiles_for_sm90_and_sm80(compiled):
    results = compiled["results"]
    failed = [line for line in compiled["log"].splitlines() if "FAILED" in line]
    assert not failed, "\n".join(failed)
    assert {r["variant"]["arch"] for r in results} == {90, 80}
    assert {r["variant"]["logits"] for r in results} == {"bf16", "fp16", "fp32"}
    launched = {r["variant"]["launch"] for r in results}
    assert launched == {"policy_loss_kernel", "logprob_kernel", "logprob_backward_kernel", "scale_unless_one_kernel"}


def test_no_variant_spills_registers(compiled):
    spilled = [r for r in compiled["results"] if r["error"] is None and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, "\n".join(line for line in compiled["log"].splitlines() if "spill stores" in line
                                  and " 0 B spill stores, 0 B spill loads" not in line)
    most = max((r for r in compiled["results"] if r["error"] is None), key=lambda r: r["registers"])
    print(f"most registers: {most['registers']} ({most['variant']})")


def test_each_switch_is_compiled_on_and_off(compiled):
    from siri.kernels.triton_launches import LAUNCHES

    for launch in LAUNCHES:
        rows = [r["variant"]["switches"] for r in compiled["results"] if r["variant"]["launch"] == launch.name]
        for switch, values in launch.switches.items():
            assert {row[switch] for row in rows} == set(values), f"{launch.name}.{switch}"


def test_a_launch_refuses_switches_it_does_not_declare():
    import torch

    from siri.kernels.triton_launches import LOGPROB

    logits, targets, out = torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), torch.empty(2)
    with pytest.raises(TypeError, match="declares"):
        LOGPROB((2,), 8, logits, 8, targets, out, out, out, 8, 1.0, WITH_ENTROPY=True, NEW_SWITCH=True)
    with pytest.raises(ValueError, match="WITH_ENTROPY=2"):
        LOGPROB((2,), 8, logits, 8, targets, out, out, out, 8, 1.0, WITH_ENTROPY=2)
