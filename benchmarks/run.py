"""Benchmarks of siri on the device present; prints tables and writes a results file.

    python benchmarks/run.py            # every section, full sizes for the device
    python benchmarks/run.py --quick    # smaller shapes, fewer repetitions
    python benchmarks/run.py --only policy_loss
    python benchmarks/run.py --no-peers # without Liger-Kernel / Cut Cross-Entropy rows

Every baseline is measured in the same process as siri's kernels, against a floor measured
in the same run (copy bandwidth for the memory-bound logits path). Results go to
`benchmarks/results/<device>.json` with the device name, versions and date, rewritten
(atomically) after every row: a crash keeps what was measured. A method that fails gets a
row naming its error and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/run.py` from a checkout
    sys.path.insert(0, ROOT)

from benchmarks import peers  # noqa: E402
from benchmarks.timing import copy_bandwidth_gbs  # noqa: E402
from siri.files import write_json_atomically  # noqa: E402

# section name -> module with `measure(device, quick, copy_gbs)`: an iterable of rows (dicts)
SECTIONS = {
    "policy_loss": "benchmarks.policy_loss_bench",
    "fused_linear": "benchmarks.fused_linear_bench",
    "packing": "benchmarks.packing_bench",
}
COLUMNS = ("method", "T", "V", "H", "dtype", "ms", "gbs", "tflops", "floor_fraction", "speedup_vs_eager",
           "tokens_per_s", "speedup", "peak_extra_mb", "overhead_mb", "extra_vs_naive", "peer", "computes", "error")


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
    for peer in (peers.LIGER, peers.CCE, peers.TRL, peers.VERL):  # None: absent, or left out by --no-peers
        found[peer] = peers.version(peer)
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


def run_sections(sections: dict, results: dict, out: str) -> None:
    """Rows of each section into `results["sections"]`, the file at `out` rewritten after each.

    `sections` maps a name to a callable returning that section's rows (any iterable). A
    section that raises keeps the rows it gave, gets one row naming the error, and the next
    section runs.
    """
    for section, measure in sections.items():
        rows = results["sections"][section] = []
        try:
            for row in measure():
                rows.append(row)
                write_json_atomically(out, results, indent=2)
                shape = " ".join(f"{k}={row[k]}" for k in ("T", "H", "V", "dtype") if k in row)
                figure = f"{row['ms']} ms" if "ms" in row else row.get("error")
                print(f"  {section} {row.get('method')} {shape}: {figure}", flush=True)
        except Exception as error:  # a section that cannot go on: say why, keep its rows, run the next
            rows.append({"section": section, "method": "(section)", "error": f"{type(error).__name__}: {error}"})
            write_json_atomically(out, results, indent=2)
        print_table(section, rows)
    results["complete"] = True
    write_json_atomically(out, results, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/<device>.json)")
    parser.add_argument("--no-peers", action="store_true", help="leave out the peers' rows (benchmarks/peers.py)")
    args = parser.parse_args()
    peers.enabled = not args.no_peers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    name = device_name(device)
    copy_gbs = copy_bandwidth_gbs(device, (1 << 30) if device.type == "cuda" else (1 << 28))
    print(f"device: {name}\nversions: {versions()}\nmeasured copy bandwidth: {copy_gbs:.1f} GB/s", flush=True)

    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{file_stem(name)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results = {
        "device": name, "versions": versions(), "date": datetime.date.today().isoformat(),
        "quick": args.quick, "copy_bandwidth_gbs": round(copy_gbs, 1), "complete": False, "sections": {},
    }

    def section_rows(module):
        return lambda: importlib.import_module(module).measure(device, args.quick, copy_gbs)

    run_sections({section: section_rows(SECTIONS[section]) for section in args.only or SECTIONS}, results, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
