"""`siri eval`: pass@1 over k samples at a length budget, per data set, like the paper's Table 1.

For each model (a checkpoint's `policy` directory, or any Hugging Face model directory)
and each data set, every problem is sampled k times with the budget as the maximum
response length; a sample is correct when the answer extracted from it (cut at the budget,
read after the end-of-thinking marker, `siri.rewards`) matches the gold one. pass@1 is the
mean over problems of the fraction of correct samples; length is the mean response length
in tokens. With several models, accuracy against length is drawn as a PNG.
`EVAL_PRESETS` names protocols: "paper" is SIRI's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from siri.checks import as_int
from siri.config import DataConfig, RolloutConfig, TrainConfig
from siri.data import PromptDataset
from siri.errors import UserError
from siri.files import check_output_dir, write_atomically, write_json_atomically
from siri.models import check_model_dir, load_model, load_tokenizer
from siri.rewards import DEFAULT_THINK_END, load_reward_fn, score_rollouts
from siri.rollout import SamplingSettings, make_engine
from siri.text_table import format_text_table


# Evaluation protocols by name (`siri eval --preset`). "paper": SIRI's (arXiv 2509.25176,
# §5): every model, SIRI-low included, at a 16,384-token budget, temperature 0.6, pass@1
# over 64 samples per problem. The paper does not restate top-p; 0.95 is DeepScaleR's and
# the command's default, and stays ours.
EVAL_PRESETS: dict[str, dict] = {
    "paper": {"budget": 16384, "temperature": 0.6, "k": 64},
}
# What `siri eval` uses where neither a flag nor a preset sets the value (budget has none):
# the paper's temperature, and fewer samples.
EVAL_DEFAULTS: dict = {"temperature": EVAL_PRESETS["paper"]["temperature"], "k": 4}


def resolve_protocol(preset: str | None, **given) -> dict:
    """budget, temperature and k: each as given when not None, else the preset's, else `EVAL_DEFAULTS`'.

    UserError naming `preset` for an unknown one, and `budget` when nothing sets it.
    """
    if preset is not None and preset not in EVAL_PRESETS:
        raise UserError(f"preset must be one of {sorted(EVAL_PRESETS)}, got {preset!r}")
    chosen = {**EVAL_DEFAULTS, **(EVAL_PRESETS[preset] if preset else {}),
              **{key: value for key, value in given.items() if value is not None}}
    if chosen.get("budget") is None:
        raise UserError("budget: give --budget or a --preset that sets it (e.g. --preset paper)")
    return chosen


@dataclass
class EvalResult:
    model: str
    budget: int
    # data set name -> {"acc": pass@1 in [0, 1], "len": mean response tokens, "n": problems}
    datasets: dict[str, dict] = field(default_factory=dict)

    @property
    def average(self) -> dict:
        if not self.datasets:
            return {"acc": 0.0, "len": 0.0}
        values = list(self.datasets.values())
        return {"acc": sum(v["acc"] for v in values) / len(values), "len": sum(v["len"] for v in values) / len(values)}


def evaluate_model(model, tokenizer, datasets: dict[str, PromptDataset], *, budget: int, k: int,
                   rollout_cfg: RolloutConfig, seed: int = 0, model_path: str = "", dtype: str = "float32",
                   name: str = "model", think_end: str | None = DEFAULT_THINK_END) -> EvalResult:
    """pass@1 (mean over k samples) and mean length of `model` on each data set; a sample is
    correct by the training reward (`length_capped`, the answer read after `think_end`)."""
    k = as_int("k", k, minimum=1)
    accuracy_fn = load_reward_fn("length_capped", think_end=think_end)
    budget = as_int("budget", budget, minimum=1)
    longest = max((len(d[i].prompt_ids) for d in datasets.values() for i in range(len(d))), default=0)
    cfg = RolloutConfig(**{**rollout_cfg.__dict__, "n": k})
    engine = make_engine(cfg, model=model, tokenizer=tokenizer, model_path=model_path, max_budget=longest + budget,
                         dtype=dtype, seed=seed)
    result = EvalResult(model=name, budget=budget)
    try:
        settings = SamplingSettings.from_config(cfg, budget, seed=seed)
        for data_name, dataset in datasets.items():
            problems = [dataset[i] for i in range(len(dataset))]
            with torch.no_grad():
                rollouts = engine.generate([p.prompt_ids for p in problems], settings)
            correct = score_rollouts(accuracy_fn, rollouts, [p.answer for p in problems], tokenizer, budget=budget)
            per_problem = [0.0] * len(problems)
            for rollout, score in zip(rollouts, correct):
                per_problem[rollout.prompt_index] += score / k
            result.datasets[data_name] = {
                "acc": sum(per_problem) / max(len(problems), 1),
                "len": sum(len(r.response_ids) for r in rollouts) / max(len(rollouts), 1),
                "n": len(problems),
            }
    finally:
        engine.close()
    return result


def format_table(results: list[EvalResult]) -> str:
    """Rows: models; columns: each data set's accuracy (%) and mean length, then the average."""
    names = sorted({d for r in results for d in r.datasets})
    header = ["model"] + [f"{n} acc" for n in names] + [f"{n} len" for n in names] + ["avg acc", "avg len"]
    rows = []
    for r in results:
        avg = r.average
        rows.append([r.model]
                    + [f"{100 * r.datasets[n]['acc']:.1f}" if n in r.datasets else "-" for n in names]
                    + [f"{r.datasets[n]['len']:.0f}" if n in r.datasets else "-" for n in names]
                    + [f"{100 * avg['acc']:.1f}", f"{avg['len']:.0f}"])
    return format_text_table(header, rows)


def plot_accuracy_vs_length(results: list[EvalResult], path: str) -> None:
    """Each model's average accuracy against its average response length (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("drawing the plot needs matplotlib: pip install matplotlib") from error
    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = [r.average["len"] for r in results]
    accuracies = [100 * r.average["acc"] for r in results]
    ax.plot(lengths, accuracies, "o-", color="tab:blue")
    for r, x, y in zip(results, lengths, accuracies):
        ax.annotate(r.model, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("mean response length (tokens)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title(f"accuracy against length (budget {results[0].budget})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _data_set_names(data_files: list[str]) -> list[str]:
    """Each file's name without its extension: the table's column; two alike are an error
    (one data set would silently replace the other)."""
    names = [os.path.splitext(os.path.basename(f))[0] for f in data_files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"data: files {repeated} share a name; rename them so each data set has its own column")
    return names


def model_name(path: str) -> str:
    """A checkpoint's `.../step-0001599-low/policy` is named by its checkpoint folder."""
    parts = os.path.normpath(path).split(os.sep)
    return parts[-2] if parts[-1] == "policy" and len(parts) > 1 else parts[-1]


def run_eval(models: list[str], data_files: list[str], *, budget: int, k: int, out_dir: str | None,
             rollout_cfg: RolloutConfig, data_cfg: DataConfig, device: torch.device, dtype: str,
             seed: int = TrainConfig.seed, think_end: str | None = DEFAULT_THINK_END) -> list[EvalResult]:
    """Evaluate each model directory on each data file; print the table, save JSON and PNG."""
    if not models:
        raise UserError("models: give at least one model directory")
    if not data_files:
        raise UserError("data: give at least one jsonl or parquet file")
    # Every argument is checked before the first model loads, not after hours of evaluation.
    for path in data_files:
        if not os.path.isfile(path):
            raise UserError(f"data {path!r} is not a file")
    names = _data_set_names(data_files)
    for path in models:
        check_model_dir("model", path)
    for name, value in (("budget", budget), ("k", k)):
        try:
            as_int(name, value, minimum=1)
        except ValueError as error:
            raise UserError(str(error)) from None
    if out_dir:
        check_output_dir("out", out_dir)
    results = []
    for path in models:
        tokenizer = load_tokenizer(path)
        datasets = {name: PromptDataset([f], tokenizer, data_cfg) for name, f in zip(names, data_files)}
        for name, f in zip(names, data_files):
            if len(datasets[name]) == 0:
                dropped = datasets[name].num_dropped
                why = f"all {dropped} prompts are longer than --max-prompt-length" if dropped else "no problem"
                raise UserError(f"data {f!r} holds {why}: there is nothing to evaluate")
        model, tokenizer = load_model(path, device, dtype, weights=rollout_cfg.engine == "hf", tokenizer=tokenizer)
        results.append(evaluate_model(model, tokenizer, datasets, budget=budget, k=k, rollout_cfg=rollout_cfg,
                                      seed=seed, model_path=path, dtype=dtype, name=model_name(path),
                                      think_end=think_end))
        del model
    print(format_table(results))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomically(os.path.join(out_dir, "eval.json"),
                              [{"model": r.model, "budget": r.budget, "datasets": r.datasets, "average": r.average}
                               for r in results], indent=2)
        if len(results) > 1:
            plot_accuracy_vs_length(results, os.path.join(out_dir, "accuracy_vs_length.png"))
    return results
