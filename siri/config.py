"""Training and evaluation configuration: dataclasses, YAML files and `key=value` overrides.

A config file is YAML whose sections mirror the dataclasses below; overrides on the command
line use dotted keys (`optim.lr=2e-6 schedule.period=320`). Unknown keys, wrong types and
values out of their domain raise ValueError naming the key, before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from siri.kernels.config import KL_ESTIMATORS

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")
SCHEDULE_KINDS = ("cosine", "stair", "stair-cosine", "constant", "staged")
ENGINES = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    path: str = ""  # a local directory with a Hugging Face causal LM (config, weights, tokenizer)
    dtype: str = "bfloat16"  # the forward's (autocast) and the rollout engine's
    param_dtype: str = "float32"  # parameters, gradients and AdamW state (see siri.precision)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # jsonl or parquet
    problem_key: str = "problem"
    answer_key: str = "answer"
    # Appended to the problem before the chat template (DeepScaleR's instruction).
    instruction: str = "Let's think step by step and output the final answer within \\boxed{}."
    use_chat_template: bool = True
    max_prompt_length: int = 1024
    shuffle: bool = True


@dataclass
class ScheduleConfig:
    kind: str = "cosine"
    l_max: int = 16384
    l_min: int = 8192
    period: int = 640
    length: int | None = None  # for kind "constant"
    stages: list[list[int]] | None = None  # for kind "staged": [[step, length], ...]
    round_to: int = 1


@dataclass
class RolloutConfig:
    engine: str = "hf"
    n: int = 8  # samples per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    # vLLM only
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = False
    # transformers only: prompts generated together
    generation_batch_size: int = 64


@dataclass
class RewardConfig:
    fn: str = "length_capped"  # a built-in name or a dotted path "package.module:function"
    mask_truncated: bool = False  # truncated samples get weight 0 in the loss
    overlong_buffer: int | None = None  # DAPO's soft overlong penalty over the last N tokens
    timeout_s: float = 5.0


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    loss_agg: str = "token-mean"
    loss_norm_length: int = 16384  # Dr. GRPO's constant; does not follow the budget
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    mini_batches: int = 1  # optimizer steps per rollout batch; > 1 needs old log-probs
    max_tokens_per_micro_batch: int = 16384
    fused_linear: bool = True  # LM head + loss without building [T, V] logits
    kernel_backend: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class CheckpointConfig:
    every: int = 50  # steps; also saved at the end of every compression and expansion half
    keep_last: int = 3  # periodic checkpoints kept; "low"/"high" ones are always kept


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "siri"
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prompts_per_step: int = 128
    total_steps: int = 1920
    seed: int = 0
    output_dir: str = "runs/siri"
    device: str = "auto"  # "auto": cuda when present, else cpu


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Domain checks beyond types; ValueError naming the key."""
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("model.param_dtype", cfg.model.param_dtype, DTYPES)
    if cfg.model.param_dtype not in ("float32", cfg.model.dtype):
        raise ValueError(f"model.param_dtype must be float32 or model.dtype ({cfg.model.dtype!r}): autocast only "
                         f"narrows, got {cfg.model.param_dtype!r}")
    _choice("schedule.kind", cfg.schedule.kind, SCHEDULE_KINDS)
    _choice("rollout.engine", cfg.rollout.engine, ENGINES)
    _choice("algorithm.advantage", cfg.algorithm.advantage, ADVANTAGE_ESTIMATORS)
    _choice("algorithm.loss_agg", cfg.algorithm.loss_agg, LOSS_AGGREGATIONS)
    _choice("algorithm.kl_estimator", cfg.algorithm.kl_estimator, sorted(KL_ESTIMATORS))
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    for key in ("rollout.n", "rollout.temperature", "rollout.generation_batch_size", "algorithm.mini_batches",
                "algorithm.max_tokens_per_micro_batch", "algorithm.loss_norm_length", "optim.lr",
                "checkpoint.every", "prompts_per_step", "total_steps", "data.max_prompt_length"):
        section, _, name = key.rpartition(".")
        _positive(key, getattr(getattr(cfg, section) if section else cfg, name))
    if not 0 < cfg.rollout.top_p <= 1:
        raise ValueError(f"rollout.top_p must be in (0, 1], got {cfg.rollout.top_p!r}")
    if cfg.prompts_per_step % cfg.algorithm.mini_batches:
        raise ValueError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of algorithm.mini_batches "
            f"({cfg.algorithm.mini_batches}): each optimizer step takes whole groups"
        )
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas must hold two numbers, got {cfg.optim.betas!r}")
    return cfg


def _convert(key: str, value: Any, annotation) -> Any:
    """`value` as the annotated type, or ValueError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(key, value, option)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]!r}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.lr=2e-6", "rollout.n=4"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(values: dict, overrides: list[str] = ()) -> TrainConfig:
    return validate(_build(TrainConfig, _merge(values or {}, parse_overrides(list(overrides)))))


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (or the defaults when `path` is None) and overrides."""
    values = {}
    if path is not None:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    return config_from_dict(values, overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
