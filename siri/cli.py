"""The `siri` command: `siri train`, `siri eval`, `siri demo`.

    siri train --config configs/siri-1.5b.yaml model.path=/models/r1-distill-1.5b output_dir=runs/a
    siri eval --model runs/a/checkpoints/step-0001599-low/policy --data aime24.jsonl --preset paper
    siri demo --out demo-results [--quick | --full]

A problem with what the user gave (a config key, a file, an argument: `siri.errors.UserError`)
or a missing optional package (ImportError, which says what to install) is one line on
stderr and exit code 2; any other error is a fault of siri and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from siri.checks import FRACTION_DOMAIN, POSITIVE_DOMAIN, is_fraction, is_positive
from siri.config import (
    DEVICES,
    ENGINES,
    SEED_DOMAIN,
    DataConfig,
    ModelConfig,
    RolloutConfig,
    TrainConfig,
    is_seed,
    load_config,
)
from siri.errors import UserError
from siri.files import check_output_dir
from siri.kernels.config import TEMPERATURE_DOMAIN, is_temperature
from siri.precision import TORCH_DTYPES
from siri.rewards import DEFAULT_THINK_END


def _train(args) -> int:
    from siri.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=not args.no_resume)
    return 0


def _eval(args) -> int:
    from siri.evaluate import resolve_protocol, run_eval
    from siri.models import resolve_device

    protocol = resolve_protocol(args.preset, budget=args.budget, temperature=args.temperature, k=args.k)
    rollout = RolloutConfig(engine=args.engine, temperature=protocol["temperature"], top_p=args.top_p,
                            generation_batch_size=args.generation_batch_size, kv_cache_gib=args.kv_cache_gib,
                            gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager)
    data = DataConfig(problem_key=args.problem_key, answer_key=args.answer_key,
                      use_chat_template=not args.no_chat_template, max_prompt_length=args.max_prompt_length)
    run_eval(args.model, args.data, budget=protocol["budget"], k=protocol["k"], out_dir=args.out, rollout_cfg=rollout,
             data_cfg=data, device=resolve_device(args.device), dtype=args.dtype, seed=args.seed,
             think_end=None if args.think_end.lower() == "none" else args.think_end)
    return 0


def _demo(args) -> int:
    from siri.demo.run import run_demo

    check_output_dir("--out", args.out)
    run_demo(args.out, quick=args.quick, full=args.full)
    return 0


def _number(kind, text: str, ok, domain: str):
    """`text` as a `kind` in `domain` (`ok(value)` holds), or argparse's one-line error."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {domain}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def _seed(text: str) -> int:
    return _number(int, text, is_seed, SEED_DOMAIN)


def _fraction(text: str) -> float:
    return _number(float, text, is_fraction, f"a number {FRACTION_DOMAIN}")


def _positive_float(text: str) -> float:
    return _number(float, text, is_positive, POSITIVE_DOMAIN)


def _temperature(text: str) -> float:
    return _number(float, text, is_temperature, TEMPERATURE_DOMAIN)


def build_parser() -> argparse.ArgumentParser:
    from siri.evaluate import EVAL_DEFAULTS, EVAL_PRESETS

    parser = argparse.ArgumentParser(
        prog="siri", description="RL for reasoning models under an interleaved length budget")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run SIRI training from a YAML config")
    train.add_argument("--config", help="YAML config file (defaults: the paper's setting)")
    train.add_argument("--no-resume", action="store_true",
                       help="start at step 0 instead of resuming from output_dir's newest checkpoint; refused when "
                            "output_dir already holds checkpoints (they are never overwritten or mixed with a new "
                            "run's): give a new output_dir instead")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.set_defaults(run=_train)

    ev = commands.add_parser("eval", help="pass@1 over k samples at a length budget, Table-1 style")
    ev.add_argument("--model", action="append", required=True, help="model directory (repeat for several)")
    ev.add_argument("--data", action="append", required=True, help="jsonl or parquet file (repeat for several)")
    ev.add_argument("--preset", choices=sorted(EVAL_PRESETS),
                    help="a named protocol, its values overridden by the flags: "
                         + "; ".join(f"{name}: {values}" for name, values in EVAL_PRESETS.items()))
    ev.add_argument("--budget", type=_positive_int, help="maximum response tokens (required without --preset)")
    ev.add_argument("--k", type=_positive_int,
                    help=f"samples per problem (default: the preset's, else {EVAL_DEFAULTS['k']})")
    ev.add_argument("--temperature", type=_temperature,
                    help=f"sampling temperature (default: the preset's, else {EVAL_DEFAULTS['temperature']})")
    ev.add_argument("--top-p", type=_fraction, default=0.95)
    # The defaults and choices are the training config's (siri.config), so eval and training agree.
    ev.add_argument("--engine", choices=ENGINES, default=RolloutConfig.engine)
    ev.add_argument("--kv-cache-gib", type=_positive_float,
                    help="vLLM only: the KV cache's size in GiB (default: from --gpu-memory-utilization)")
    ev.add_argument("--gpu-memory-utilization", type=_fraction, default=RolloutConfig.gpu_memory_utilization,
                    help="vLLM only: the fraction of the device's memory vLLM may take")
    ev.add_argument("--enforce-eager", action="store_true", help="vLLM only: no CUDA graphs or compilation")
    ev.add_argument("--generation-batch-size", type=_positive_int, default=RolloutConfig.generation_batch_size)
    ev.add_argument("--problem-key", default=DataConfig.problem_key)
    ev.add_argument("--answer-key", default=DataConfig.answer_key)
    ev.add_argument("--max-prompt-length", type=_positive_int, default=DataConfig.max_prompt_length)
    ev.add_argument("--no-chat-template", action="store_true")
    ev.add_argument("--think-end", default=DEFAULT_THINK_END,
                    help="the answer is read after this end-of-thinking marker; 'none': anywhere in the response")
    ev.add_argument("--device", default=TrainConfig.device, choices=DEVICES)
    ev.add_argument("--dtype", default=ModelConfig.dtype, choices=list(TORCH_DTYPES))
    ev.add_argument("--seed", type=_seed, default=TrainConfig.seed)
    ev.add_argument("--out", help="folder for eval.json and accuracy_vs_length.png")
    ev.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="SIRI and its baselines end to end on a tiny model and a synthetic task, "
                                            "on a CPU (nothing downloaded)")
    demo.add_argument("--out", required=True, help="folder for results.json, pareto.png, curves.png, metrics, "
                                                   "checkpoints")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="tiny sizes: the same files in well under a minute, too short to show anything")
    size.add_argument("--full", action="store_true", help="5 seeds and 2 samples per held-out problem")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except (UserError, ImportError) as error:
        print(f"siri {args.command}: error: {error}", file=sys.stderr)
        code = 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from siri.distributed import exit_process

        exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
