"""Benchmarks of siri on the device present; prints tables and writes a results file.

    python benchmarks/run.py            # every section, full sizes for the device
    python benchmarks/run.py --quick    # smaller shapes, fewer repetitions
    python benchmarks/run.py --only policy_loss

Every baseline is measured in the same process as siri's kernels, against a floor measured
in the same run (copy bandwidth for the memory-bound logits path). Results go to
`benchmarks/results/<device>.json` with the device name, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/run.py` from a checkout
    sys.path.insert(0, ROOT)

from benchmarks.timing import copy_bandwidth_gbs  # noqa: E402

# section name -> module with `measure(device, quick, copy_gbs) -> list[dict]`
SECTIONS = {
    "policy_loss": "benchmarks.policy_loss_bench",
    "fused_linear": "benchmarks.fused_linear_bench",
    "packing": "benchmarks.packing_bench",
}
COLUMNS = ("method", "T", "V", "H", "dtype", "ms", "gbs", "tflops", "floor_fraction", "speedup_vs_eager",
           "tokens_per_s", "speedup", "peak_extra_mb", "overhead_mb", "extra_vs_naive")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read())
            model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "transformers"):
        try:
            found[package] = importlib.import_module(package).__version__
        except ImportError:
            found[package] = None
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
    return found


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    columns = [c for c in COLUMNS if any(c in row and row[c] is not None for row in rows)]
    cells = [[("" if row.get(c) is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n## {title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/<device>.json)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    name = device_name(device)
    copy_gbs = copy_bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (1 << 28))
    print(f"device: {name}\nversions: {versions()}\nmeasured copy bandwidth: {copy_gbs:.1f} GB/s")

    results = {
        "device": name, "versions": versions(), "date": datetime.date.today().isoformat(),
        "quick": args.quick, "copy_bandwidth_gbs": round(copy_gbs, 1), "sections": {},
    }
    for section in args.only or SECTIONS:
        module = importlib.import_module(SECTIONS[section])
        rows = module.measure(device, args.quick, copy_gbs)
        results["sections"][section] = rows
        print_table(section, rows)

    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{file_stem(name)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"\nwrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
