"""`siri demo`: the whole SIRI experiment, scaled down to a CPU and a few minutes.

Stage 1 trains the base model (`siri.demo.sft`): it sums two digits and re-checks its step a
long-tailed number of times. Stage 2 runs the real `siri.trainer.Trainer` (HF rollout
engine, packed varlen micro-batches, the fused policy-loss kernels, float32 on the CPU)
twice from that base, with the same seed, number of steps and length-capping reward:

* ``constant``: the budget stays at L_max;
* ``siri``: SIRI's cosine budget between L_max and L_min, three cycles.

All four models (base, constant, SIRI-low = the trainer's third "low" checkpoint, SIRI-high
= the end of the third cycle) are then measured the same way: `siri.demo.measure`, k
temperature-1 samples of every problem at the long budget L_max. The output folder gets

* ``results.json``: per model ``acc`` (0-1), ``len`` (mean response tokens) and more;
* ``curves.png``: budget, mean response length and accuracy against step, both runs;
* ``constant/metrics.jsonl`` and ``siri/metrics.jsonl``: the trainers' per-step metrics;
* ``base/`` and the runs' ``checkpoints/``: Hugging Face model directories;

and the Table-1-style table is printed. ``quick`` runs every stage with tiny sizes so that
the same files appear within a few minutes; its numbers show nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from siri.checkpoint import list_checkpoints
from siri.demo.measure import measure
from siri.demo.model import ModelSize
from siri.demo.plot import format_table, plot_curves, read_metrics
from siri.demo.sft import SFTConfig, build_base_model
from siri.demo.task import TaskConfig, all_problems
from siri.errors import UserError
from siri.files import write_json_atomically
from siri.models import load_model
from siri.tracking import METRICS_FILE

__all__ = ["FULL", "QUICK", "DemoConfig", "find_checkpoint", "rl_config", "run_demo"]

RUNS = ("constant", "siri")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run.

    Budgets are set against the trace lengths of the task (`TaskConfig`): a two-term trace
    is about 18 tokens with no check (``7+5=12``, ``\\boxed{12}``, EOS) plus 13 per
    ``check 7+5=12`` line. L_min = 32 fits at most one check, so at the bottom of a
    compression half only answers that dropped their re-checks are rewarded (the base model
    writes about two on average); L_max = 256 fits the longest SFT trace (16 checks, 226
    tokens), so at the long budget the base model is almost never cut.
    """

    task: TaskConfig = field(default_factory=TaskConfig)
    size: ModelSize = field(default_factory=ModelSize)
    sft: SFTConfig = field(default_factory=SFTConfig)
    l_max: int = 256
    l_min: int = 32
    period: int = 20  # steps per compression-expansion cycle
    cycles: int = 3  # the paper's three cycles; the constant run gets as many steps
    prompts_per_step: int = 16
    n: int = 8  # rollouts per prompt (the GRPO group)
    lr: float = 2e-4
    # Packed tokens per micro-batch. On the CPU the packed attention is dense over a
    # micro-batch, so its cost grows with the square of this; 2048 keeps it small.
    max_tokens_per_micro_batch: int = 2048
    eval_samples: int = 8  # samples of every problem when measuring a model
    seed: int = 0

    @property
    def rl_steps(self) -> int:
        return self.period * self.cycles


FULL = DemoConfig(sft=SFTConfig(steps=600))

# Every stage runs, on a smaller model with fewer steps: it writes the same files, to check
# the pipeline, and its numbers are not meant to show anything.
QUICK = DemoConfig(
    size=ModelSize(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=192),
    sft=SFTConfig(steps=60, lr=4e-3, warmup_steps=10, bucket_batches=4),
    l_max=96, l_min=24, period=4, prompts_per_step=4, n=4, eval_samples=1,
)


def rl_config(demo: DemoConfig, run: str, output_dir: str, *, progress: bool = True):
    """The `TrainConfig` of one RL run: "constant" (budget L_max) or "siri" (cosine).

    Everything but the schedule is the same in both runs, seed included. Checkpoints:
    `checkpoint.every` lies past the end, so only the schedule's "low"/"high" ones and the
    final one are written.
    """
    from siri.config import config_from_dict

    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    schedule = ({"kind": "constant", "length": demo.l_max} if run == "constant"
                else {"kind": "cosine", "l_max": demo.l_max, "l_min": demo.l_min, "period": demo.period})
    return config_from_dict({
        "model": {"dtype": "float32"},
        "data": {"use_chat_template": False},
        "schedule": schedule,
        "rollout": {"engine": "hf", "n": demo.n, "temperature": 1.0,
                    "generation_batch_size": demo.prompts_per_step},
        "reward": {"fn": "length_capped"},
        "algorithm": {"max_tokens_per_micro_batch": demo.max_tokens_per_micro_batch},
        "optim": {"lr": demo.lr},
        "checkpoint": {"every": demo.rl_steps + 1},
        "logging": {"progress": progress},
        "prompts_per_step": demo.prompts_per_step,
        "total_steps": demo.rl_steps,
        "seed": demo.seed,
        "output_dir": output_dir,
        "device": "cpu",
    })


def find_checkpoint(run_dir: str, tag: str, occurrence: int = -1) -> str:
    """The `policy/` directory of the `occurrence`-th checkpoint tagged `tag` ("low", "high",
    "final") under `run_dir`, counted in step order (-1: the last)."""
    from siri.checkpoint import POLICY_DIR, list_checkpoints, parse_checkpoint_name

    # Complete checkpoints only: a torn one (killed mid-save) is never evaluated.
    found = [path for path in list_checkpoints(run_dir) if parse_checkpoint_name(os.path.basename(path))[1] == tag]
    if not found or not -len(found) <= occurrence < len(found):
        raise FileNotFoundError(f"{run_dir}: no {tag!r} checkpoint number {occurrence} (found {len(found)})")
    return os.path.join(found[occurrence], POLICY_DIR)


def _print(line: str) -> None:
    # Flushed, so progress shows at once when the output goes to a file or a pipe.
    print(line, flush=True)


def run_demo(out_dir: str | os.PathLike, quick: bool = False, *, demo: DemoConfig | None = None,
             log: Callable[[str], None] = _print) -> dict:
    """Run both stages into `out_dir`, print the table; returns what `results.json` holds.

    `demo` overrides the sizes (`FULL`, or `QUICK` when `quick`). `log` gets one line per
    stage and per SFT progress report; the trainers print their own per-step lines.
    """
    from siri.trainer import train

    demo = demo or (QUICK if quick else FULL)
    out_dir = os.fspath(out_dir)
    for run in RUNS:  # checked before stage 1: the trainer never starts over a saved run
        saved = list_checkpoints(os.path.join(out_dir, run))
        if saved:
            raise UserError(f"out_dir {out_dir!r} holds the checkpoints of an earlier demo ({saved[-1]}): "
                            "give a new folder, or remove that one first")
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()

    def clock() -> str:
        return f"[{time.perf_counter() - started:6.0f}s]"

    log(f"{clock()} stage 1: supervised warm-up, {demo.sft.steps} steps")
    base_dir = os.path.join(out_dir, "base")
    model, tokenizer, _ = build_base_model(
        base_dir, size=demo.size, sft=demo.sft, task=demo.task,
        log=lambda step, loss, elapsed: log(f"{clock()}   sft step {step + 1}/{demo.sft.steps} loss {loss:.3f}"))
    # The RL prompts and the evaluation set: with `task.hold_out` off (the default) both are
    # the whole task distribution, every sum once; with it on, RL practises on "train" and
    # models are measured on "test".
    train_problems = all_problems(tokenizer, demo.task, split="train")
    eval_problems = all_problems(tokenizer, demo.task, split="test")

    def evaluate(name: str, model) -> dict:
        m = measure(model, tokenizer, eval_problems, demo.l_max, samples_per_problem=demo.eval_samples,
                    seed=demo.seed)
        summary = m.summary()
        log(f"{clock()} {name}: acc {100 * summary['acc']:.1f}%  len {summary['len']:.1f}  "
            f"(median {summary['len_median']:.0f}, p90 {summary['len_p90']:.0f}, "
            f"truncated {100 * summary['truncation_rate']:.1f}%)")
        return summary

    results: dict = {"base": {**evaluate("base", model), "path": os.path.relpath(base_dir, out_dir)}}
    del model

    for run in RUNS:
        run_dir = os.path.join(out_dir, run)
        cfg = rl_config(demo, run, run_dir)
        log(f"{clock()} stage 2 ({run}): {demo.rl_steps} RL steps, budget "
            + (f"{demo.l_max}" if run == "constant" else f"cosine {demo.l_max} -> {demo.l_min}, period {demo.period}"))
        policy, _ = load_model(base_dir, CPU, "float32")  # every run starts from the same base weights
        train(cfg, model=policy, tokenizer=tokenizer, train_problems=train_problems, resume=False)
        del policy

    log(f"{clock()} measuring the RL checkpoints at budget {demo.l_max}")
    checkpoints = {
        "constant": find_checkpoint(os.path.join(out_dir, "constant"), "final"),
        "siri_low": find_checkpoint(os.path.join(out_dir, "siri"), "low", demo.cycles - 1),
        "siri_high": find_checkpoint(os.path.join(out_dir, "siri"), "high", demo.cycles - 1),
    }
    for name, path in checkpoints.items():
        model, _ = load_model(path, CPU, "float32")
        results[name] = {**evaluate(name, model), "path": os.path.relpath(path, out_dir)}
        del model

    metrics = {run: os.path.join(out_dir, run, METRICS_FILE) for run in RUNS}
    records = {run: read_metrics(path) for run, path in metrics.items()}
    plot_curves({"constant": records["constant"], "SIRI": records["siri"]}, os.path.join(out_dir, "curves.png"))
    report = {
        **results,
        "config": {**asdict(demo), "quick": quick, "rl_steps": demo.rl_steps,
                   "eval": {"problems": len(eval_problems), "samples_per_problem": demo.eval_samples,
                            "budget": demo.l_max, "held_out": demo.task.hold_out}},
        "metrics": {run: os.path.relpath(path, out_dir) for run, path in metrics.items()},
        "rl_final_step": {run: rows[-1] for run, rows in records.items()},
        "wall_s": time.perf_counter() - started,
    }
    write_json_atomically(os.path.join(out_dir, "results.json"), report, indent=2)
    log(f"{clock()} done; measured at budget {demo.l_max}, {demo.eval_samples} samples of each of "
        f"{len(eval_problems)} problems")
    log(format_table({name: results[name] for name in ("base", "constant", "siri_low", "siri_high")}))
    return report
