"""Draw a results file of `benchmarks/run.py`: time, and fraction of the floor (or tokens/s), per method.

    python benchmarks/plot.py benchmarks/results/<device>.json      # writes <device>.png beside it

One row of panels per section; within a panel, one group of bars per shape (T, V, H,
dtype), one bar per method. Where a section has several token counts T, the bars are
ordered by T, which gives the scaling at a glance.
"""

from __future__ import annotations

import argparse
import json
import os

from siri.files import write_atomically


def shape_label(row: dict) -> str:
    parts = [f"{k}={row[k]}" for k in ("T", "V", "H") if k in row] + [row.get("dtype", "")]
    return " ".join(p for p in parts if p)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Rows that record an error have no time to draw (the JSON keeps them).
    timed = {name: [row for row in rows if "ms" in row] for name, rows in results["sections"].items()}
    sections = {name: rows for name, rows in timed.items() if rows}
    fig, axes = plt.subplots(len(sections), 2, figsize=(12, 3.2 * len(sections)), squeeze=False)
    for (name, rows), (ax_ms, ax_floor) in zip(sections.items(), axes):
        order = {}
        for row in sorted(rows, key=lambda r: (r.get("T", 0), r.get("H", 0), r.get("dtype", ""))):
            order.setdefault(shape_label(row), None)
        shapes = list(order)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        # Sections measured against a floor show the fraction of it; the others their rate.
        second = "floor_fraction" if any(r.get("floor_fraction") for r in rows) else "tokens_per_s"
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            by_shape = {shape_label(r): r for r in rows if r["method"] == method}
            xs = [j + i * width for j in range(len(shapes))]
            ax_ms.bar(xs, [by_shape.get(s, {}).get("ms", 0) for s in shapes], width, label=method)
            ax_floor.bar(xs, [by_shape.get(s, {}).get(second, 0) or 0 for s in shapes], width, label=method)
        for ax, ylabel in ((ax_ms, "ms (median)"), (ax_floor, second.replace("_", " "))):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_title(name)
            ax.grid(axis="y", alpha=0.3)
        ax_ms.set_yscale("log")
        ax_floor.legend(fontsize=7)
    fig.suptitle(f"{results['device']} — torch {results['versions']['torch']} — {results['date']}")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a JSON file written by benchmarks/run.py")
    args = parser.parse_args()
    with open(args.results) as handle:
        data = json.load(handle)
    out = os.path.splitext(args.results)[0] + ".png"
    plot(data, out)
    print(f"wrote {out}")
