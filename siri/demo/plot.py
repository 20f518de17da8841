"""The demo's plots: training curves of the RL arms, and held-out accuracy against length.

`plot_curves` reads the per-step metrics the trainer logs (one JSON object per line, with
`step` and the metrics `budget`, `response_len_mean` and `accuracy`) of each arm and draws
budget, mean response length and training accuracy against step. `plot_pareto` draws the
held-out accuracy of every measured model against its mean length (SIRI's path low1 ->
high1 -> ... -> high3 joined by arrows) and, for equal compute, against the rollout tokens
RL had generated when the checkpoint was written.
"""

from __future__ import annotations

import json
import os

from siri.files import write_atomically

__all__ = ["CURVE_METRICS", "plot_curves", "plot_pareto", "read_metrics"]

# (metric key in the trainer's log, axis label), top panel to bottom.
CURVE_METRICS = (
    ("budget", "length budget (tokens)"),
    ("response_len_mean", "mean response length (tokens)"),
    ("accuracy", "accuracy"),
)


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


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("drawing the demo's plots needs matplotlib: pip install matplotlib") from error
    return plt


def plot_curves(runs: dict[str, str | os.PathLike | list[dict]], path: str | os.PathLike) -> None:
    """Draw `CURVE_METRICS` against step for each run into the PNG `path`.

    `runs` maps a run's label ("constant_long", "siri") to its metrics jsonl file or to
    records as `read_metrics` returns them. A run lacking a metric is left out of that panel.
    """
    plt = _pyplot()
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


def plot_pareto(summary: dict, path: str | os.PathLike) -> None:
    """Two panels into the PNG `path`: held-out accuracy against mean length, and against RL
    rollout tokens generated (equal compute). `summary` is `siri.demo.report.summarise`'s:
    per model its `arm`, `checkpoint`, `acc`, `acc_ci`, `len`, `len_ci`, `tokens`, `step`."""
    plt = _pyplot()
    arms = list(dict.fromkeys(entry["arm"] for entry in summary.values()))
    colors = {arm: f"C{i}" for i, arm in enumerate(arms)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for arm in arms:
        entries = sorted((e for e in summary.values() if e["arm"] == arm), key=lambda e: e["step"])
        for e in entries:
            left.errorbar(e["len"], 100 * e["acc"], xerr=[[e["len"] - e["len_ci"][0]], [e["len_ci"][1] - e["len"]]],
                          yerr=[[100 * (e["acc"] - e["acc_ci"][0])], [100 * (e["acc_ci"][1] - e["acc"])]],
                          fmt="o", color=colors[arm], ms=4, elinewidth=0.6, capsize=2)
            left.annotate(e["checkpoint"] if arm != "base" else "base", (e["len"], 100 * e["acc"]),
                          textcoords="offset points", xytext=(4, 3), fontsize=7, color=colors[arm])
        if arm == "siri":  # the low1 -> high1 -> ... -> high3 path
            for a, b in zip(entries, entries[1:]):
                left.annotate("", xy=(b["len"], 100 * b["acc"]), xytext=(a["len"], 100 * a["acc"]),
                              arrowprops={"arrowstyle": "->", "color": colors[arm], "lw": 1.0})
        left.plot([], [], "o", color=colors[arm], label=arm)
        if arm != "base":
            right.plot([e["tokens"] / 1000 for e in entries], [100 * e["acc"] for e in entries], "o-",
                       color=colors[arm], label=arm, ms=4)
    base = summary.get("base")
    if base is not None:
        right.axhline(100 * base["acc"], color=colors["base"], ls=":", label="base")
    left.set_xlabel("mean response length on held-out problems (tokens)")
    left.set_ylabel("held-out accuracy (%)")
    left.set_title("accuracy against length (SIRI's path drawn)")
    right.set_xlabel("rollout tokens generated by RL so far (thousands)")
    right.set_ylabel("held-out accuracy (%)")
    right.set_title("equal compute: accuracy against tokens generated")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
