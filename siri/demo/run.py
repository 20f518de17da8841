"""`siri demo`: the SIRI experiment with its baselines, scaled down to a CPU and minutes.

Stage 1 trains the base model (`siri.demo.sft`): it adds 4 to 7 digits modulo 10 step by step,
re-checks its steps a long-tailed number of times, and repairs its slips with those checks
(`siri.demo.task`). Stage 2 runs the real `siri.trainer.Trainer` (HF rollout engine, packed
varlen micro-batches, the fused policy-loss kernels, the length-capping reward read after
``</think>``, several optimizer steps per rollout batch so the clip acts) from that base,
for every arm and every seed, the same number of steps and everything else equal:

* ``constant_long``: the budget stays at L_max;
* ``constant_short``: the budget stays at L_min;
* ``staged``: L_min for the first half, L_max for the second (DeepScaleR's short-then-long);
* ``siri``: SIRI's cosine budget between L_max and L_min, three cycles.

Stage 3 measures every model the same way (`siri.demo.measure`) on the held-out test
split, which no SFT trace and no RL prompt contains: the base, every arm's checkpoint at the
end of each cycle, and SIRI's every low and high checkpoint. All at the long budget,
temperature 1. The output folder gets `results.json` (per seed and pooled, per level, with
95% confidence intervals, tokens generated, the verdict on each success criterion),
`pareto.png`, `curves.png`, the table on stdout, and each run's metrics and checkpoints.
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
from siri.demo.plot import plot_curves, plot_pareto, read_metrics
from siri.demo.report import format_report, judge, summarise
from siri.demo.sft import SFTConfig, build_base_model
from siri.demo.task import THINK_END, TaskConfig, level_of, make_problems
from siri.errors import UserError
from siri.files import write_json_atomically
from siri.models import load_model
from siri.tracking import METRICS_FILE

__all__ = ["ARMS", "FULL", "QUICK", "DEFAULT", "DemoConfig", "arm_checkpoints", "rl_config", "run_demo"]

ARMS = ("constant_long", "constant_short", "staged", "siri")
CPU = torch.device("cpu")
# The evaluation set is drawn once, with its own seed, the same for every model.
EVAL_SEED = 12345


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run.

    Budgets are set against the trace lengths of the task (`TaskConfig`): a step line takes
    5 tokens, a check 6, and the answer part (``</think>\\boxed{N}`` and EOS) 11, so a
    solution without checks takes 5k + 11 tokens for k terms: 31, 36, 41, 46 for the levels
    4 to 7. L_min = 36 leaves room for the necessary steps of a 4- or 5-term sum (and one
    check of a 4-term one) but cuts the chain of the two hardest levels (6 and 7 terms);
    L_max = 72 fits the longest SFT trace (70). SFT traces average 56 tokens.
    """

    task: TaskConfig = field(default_factory=TaskConfig)
    size: ModelSize = field(default_factory=ModelSize)
    sft: SFTConfig = field(default_factory=SFTConfig)
    l_max: int = 72
    l_min: int = 36
    period: int = 10  # steps per compression-expansion cycle
    cycles: int = 3  # the paper's three cycles; every arm gets as many steps
    prompts_per_step: int = 12
    n: int = 8  # rollouts per prompt (the GRPO group)
    mini_batches: int = 2  # optimizer steps per rollout batch: the ratio leaves 1, so the clip acts
    lr: float = 2e-4
    # Packed tokens per micro-batch: the trainer attends per sample (packed_sdpa on a CPU),
    # so this bounds one forward's activations; 2048 keeps them small.
    max_tokens_per_micro_batch: int = 2048
    train_problems: int = 2048  # RL prompts, drawn from the train split
    eval_per_level: int = 64  # held-out problems of each level
    eval_samples: int = 1  # samples of every held-out problem per model
    seeds: tuple[int, ...] = (0, 1)  # RL seeds; every seed starts from the same base model

    @property
    def rl_steps(self) -> int:
        return self.period * self.cycles


DEFAULT = DemoConfig()
FULL = DemoConfig(seeds=(0, 1, 2, 3, 4), eval_samples=2)

# Every stage runs, on a smaller model with fewer steps: it writes the same files, to check
# the pipeline, and its numbers are not meant to show anything.
QUICK = DemoConfig(
    size=ModelSize(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=128),
    sft=SFTConfig(steps=20, batch_size=8, lr=4e-3, warmup_steps=5, bucket_batches=2),
    l_max=32, l_min=16, period=2, cycles=3, prompts_per_step=2, n=2, train_problems=16, eval_per_level=2,
    seeds=(0,),
)


def _schedule(demo: DemoConfig, arm: str) -> dict:
    if arm == "constant_long":
        return {"kind": "constant", "length": demo.l_max}
    if arm == "constant_short":
        return {"kind": "constant", "length": demo.l_min}
    if arm == "staged":
        return {"kind": "staged", "stages": [[0, demo.l_min], [demo.rl_steps // 2, demo.l_max]]}
    if arm == "siri":
        return {"kind": "cosine", "l_max": demo.l_max, "l_min": demo.l_min, "period": demo.period}
    raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")


def rl_config(demo: DemoConfig, arm: str, output_dir: str, *, seed: int = 0, progress: bool = True):
    """The `TrainConfig` of one RL run of `arm` (one of `ARMS`) with RL seed `seed`.

    Everything but the schedule is the same in every arm. Checkpoints: one at the end of
    every cycle (`checkpoint.every` = period, all kept), and SIRI's low / high ones.
    """
    from siri.config import config_from_dict

    return config_from_dict({
        "model": {"dtype": "float32"},
        "data": {"use_chat_template": False},
        "schedule": _schedule(demo, arm),
        "rollout": {"engine": "hf", "n": demo.n, "temperature": 1.0,
                    "generation_batch_size": demo.prompts_per_step},
        "reward": {"fn": "length_capped", "think_end": THINK_END},
        "algorithm": {"max_tokens_per_micro_batch": demo.max_tokens_per_micro_batch,
                      "mini_batches": demo.mini_batches},
        "optim": {"lr": demo.lr},
        "checkpoint": {"every": demo.period, "keep_last": demo.cycles},
        "logging": {"progress": progress},
        "prompts_per_step": demo.prompts_per_step,
        "total_steps": demo.rl_steps,
        "seed": seed,
        "output_dir": output_dir,
        "device": "cpu",
    })


def arm_checkpoints(run_dir: str) -> list[tuple[str, int, str]]:
    """(name, step, policy directory) of the checkpoints of one run worth measuring, in step
    order: "low1", "high1", ... for SIRI's tags, "step10", "step20", ... for the others
    (the end of every cycle, counted in steps done)."""
    from siri.checkpoint import POLICY_DIR, parse_checkpoint_name

    found, counts = [], {"low": 0, "high": 0}
    for path in list_checkpoints(run_dir):  # complete ones only: a torn one is never measured
        step, tag = parse_checkpoint_name(os.path.basename(path))
        if tag in counts:
            counts[tag] += 1
            name = f"{tag}{counts[tag]}"
        else:
            name = f"step{step + 1}"
        found.append((name, step, os.path.join(path, POLICY_DIR)))
    return found


def _print(line: str) -> None:
    # Flushed, so progress shows at once when the output goes to a file or a pipe.
    print(line, flush=True)


def run_demo(out_dir: str | os.PathLike, quick: bool = False, *, full: bool = False, demo: DemoConfig | None = None,
             log: Callable[[str], None] = _print) -> dict:
    """Run every stage into `out_dir`, print the report; returns what `results.json` holds.

    `demo` overrides the sizes (`DEFAULT`; `QUICK` with `quick`, `FULL` with `full`). `log`
    gets one line per stage and per measurement; the trainers print their own per-step lines.
    """
    if quick and full:
        raise ValueError("quick and full: choose one")
    demo = demo or (QUICK if quick else FULL if full else DEFAULT)
    out_dir = os.fspath(out_dir)
    for seed in demo.seeds:  # checked before stage 1: the trainer never starts over a saved run
        for arm in ARMS:
            saved = list_checkpoints(os.path.join(out_dir, f"seed{seed}", arm))
            if saved:
                raise UserError(f"out_dir {out_dir!r} holds the checkpoints of an earlier demo ({saved[-1]}): "
                                "give a new folder, or remove that one first")
    os.makedirs(out_dir, exist_ok=True)
    threads = torch.get_num_threads()
    # One thread: the tiny model's matrices are too small for a second thread to pay, and on
    # a machine whose cores are shared, a second thread spin-waits for the descheduled one
    # (an SFT step took ten times longer with two threads than with one on a loaded 2-core machine).
    torch.set_num_threads(1)
    try:
        return _run(out_dir, demo, quick, full, log)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: str, demo: DemoConfig, quick: bool, full: bool, log: Callable[[str], None]) -> dict:
    from siri.trainer import train

    started = time.perf_counter()

    def clock() -> str:
        return f"[{time.perf_counter() - started:6.0f}s]"

    log(f"{clock()} stage 1: supervised warm-up, {demo.sft.steps} steps")
    base_dir = os.path.join(out_dir, "base")
    model, tokenizer, _ = build_base_model(
        base_dir, size=demo.size, sft=demo.sft, task=demo.task,
        log=lambda step, loss, elapsed: log(f"{clock()}   sft step {step + 1}/{demo.sft.steps} loss {loss:.3f}"))
    train_problems = make_problems(demo.train_problems, seed=0, tokenizer=tokenizer, cfg=demo.task, split="train")
    eval_problems = make_problems(demo.eval_per_level, seed=EVAL_SEED, tokenizer=tokenizer, cfg=demo.task,
                                  split="test", per_level=True)
    levels = [level_of(eval_problems[i]) for i in range(len(eval_problems))] * demo.eval_samples

    def evaluate(label: str, model) -> dict:
        m = measure(model, tokenizer, eval_problems, demo.l_max, samples_per_problem=demo.eval_samples, seed=0)
        log(f"{clock()} {label}: acc {100 * m.acc:.1f}%  len {m.mean_len:.1f}  "
            f"(truncated {100 * sum(m.truncated) / len(m.truncated):.1f}%)")
        return {"correct": m.correct, "lengths": m.lengths, "levels": levels}

    # measured[arm][checkpoint][seed]: the base model is one, shared by every seed.
    measured: dict = {"base": {"base": {"shared": evaluate("base", model)}}}
    del model

    runs: dict = {}
    for seed in demo.seeds:
        for arm in ARMS:
            run_dir = os.path.join(out_dir, f"seed{seed}", arm)
            cfg = rl_config(demo, arm, run_dir, seed=seed)
            log(f"{clock()} stage 2, seed {seed}, {arm}: {demo.rl_steps} RL steps, {cfg.schedule.kind} budget")
            policy, _ = load_model(base_dir, CPU, "float32")  # every run starts from the same base weights
            train(cfg, model=policy, tokenizer=tokenizer, train_problems=train_problems, resume=False)
            del policy
            records = read_metrics(os.path.join(run_dir, METRICS_FILE))
            runs.setdefault(arm, {})[seed] = {"dir": run_dir, "records": records}
            for name, step, path in arm_checkpoints(run_dir):
                policy, _ = load_model(path, CPU, "float32")
                result = evaluate(f"seed {seed} {arm} {name}", policy)
                # The rollout tokens this run had generated when the checkpoint was written.
                result["tokens"] = sum(r["response_len_mean"] * demo.prompts_per_step * demo.n
                                       for r in records if r["step"] <= step)
                result["step"] = step + 1
                measured.setdefault(arm, {}).setdefault(name, {})[seed] = result
                del policy

    summary = summarise(measured, demo)
    verdicts = judge(summary, demo)
    plot_pareto(summary, os.path.join(out_dir, "pareto.png"))
    plot_curves({arm: runs[arm][demo.seeds[0]]["records"] for arm in ARMS}, os.path.join(out_dir, "curves.png"))
    report = {
        "summary": summary,
        "criteria": verdicts,
        "config": {**asdict(demo), "quick": quick, "full": full, "rl_steps": demo.rl_steps,
                   "eval": {"problems_per_level": demo.eval_per_level, "samples_per_problem": demo.eval_samples,
                            "budget": demo.l_max, "temperature": 1.0, "split": "test", "levels": demo.task.levels}},
        "metrics": {arm: {str(seed): os.path.relpath(os.path.join(run["dir"], METRICS_FILE), out_dir)
                          for seed, run in by_seed.items()} for arm, by_seed in runs.items()},
        "wall_s": time.perf_counter() - started,
    }
    write_json_atomically(os.path.join(out_dir, "results.json"), report, indent=2)
    log(f"{clock()} done; held-out test split, {demo.eval_per_level} problems per level x {demo.eval_samples} "
        f"sample(s), budget {demo.l_max}, {len(demo.seeds)} seeds")
    log(format_report(summary, verdicts))
    return report
