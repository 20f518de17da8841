"""The demo's report: training curves of the two RL runs and a Table-1-style summary.

`plot_curves` reads the per-step metrics the trainer logs (one JSON object per line, with
`step` and the metrics `budget`, `response_len_mean` and `accuracy`) for a constant-budget
run and a SIRI run, and draws budget, mean response length and accuracy against step.
`format_table` lays out accuracy and length of `base`, `constant`, `siri_low` and
`siri_high` the way the paper's Table 1 does, with the length change against the base.
"""

from __future__ import annotations

import json
import os

from siri.files import write_atomically

__all__ = ["CURVE_METRICS", "TABLE_ROWS", "format_table", "plot_curves", "read_metrics"]

# (metric key in the trainer's log, axis label), top panel to bottom.
CURVE_METRICS = (
    ("budget", "length budget (tokens)"),
    ("response_len_mean", "mean response length (tokens)"),
    ("accuracy", "accuracy"),
)

# The rows of the demo's table, in the paper's order: the SFT model, RL at a constant long
# budget, and SIRI at the end of its last compression (low) and expansion (high).
TABLE_ROWS = ("base", "constant", "siri_low", "siri_high")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics jsonl file (`siri.tracking`'s flat `{"step": 3, "budget":
    256, ...}` rows), sorted by step. Blank lines are skipped."""
    records = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "step" not in record:
                raise ValueError(f"{path}:{line_number}: record has no 'step'")
            records.append(record)
    return sorted(records, key=lambda r: r["step"])


def plot_curves(runs: dict[str, str | os.PathLike | list[dict]], path: str | os.PathLike) -> None:
    """Draw `CURVE_METRICS` against step for each run into the PNG `path`.

    `runs` maps a run's label ("constant", "SIRI") to its metrics jsonl file or to records
    as `read_metrics` returns them. A run lacking a metric is left out of that panel.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("drawing the curves needs matplotlib: pip install matplotlib") from error
    loaded = {label: source if isinstance(source, list) else read_metrics(source) for label, source in runs.items()}
    fig, axes = plt.subplots(len(CURVE_METRICS), 1, figsize=(7, 2.4 * len(CURVE_METRICS)), sharex=True)
    for ax, (key, label) in zip(axes, CURVE_METRICS):
        for run, records in loaded.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                # The budget is a step function of the step; draw it as one.
                ax.plot(steps, values, label=run, drawstyle="steps-post" if key == "budget" else "default")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[-1].set_xlabel("RL step")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def format_table(results: dict[str, dict]) -> str:
    """A Table-1-style text table: one row per model, accuracy (%), mean length, change in length.

    `results` maps a row name to `{"acc": accuracy in [0, 1], "len": mean response tokens}`.
    Rows come in `TABLE_ROWS` order, then any others; a missing `TABLE_ROWS` entry is
    skipped. The length change is against `base` when it is present.
    """
    names = [n for n in TABLE_ROWS if n in results] + [n for n in results if n not in TABLE_ROWS]
    base_len = results["base"]["len"] if "base" in results else None
    header = ["model", "acc (%)", "len (tokens)", "len vs base"]
    rows = []
    for name in names:
        acc, length = results[name]["acc"], results[name]["len"]
        change = f"{100 * (length / base_len - 1):+.0f}%" if base_len else "-"
        rows.append([name, f"{100 * acc:.1f}", f"{length:.1f}", change])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
