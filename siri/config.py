"""Training and evaluation configuration: dataclasses, YAML files and `key=value` overrides.

A config file is YAML whose sections mirror the dataclasses below; overrides on the command
line use dotted keys (`optim.lr=2e-6 schedule.period=320`). Unknown keys, wrong types and
values out of their domain raise `siri.errors.UserError` (a ValueError) naming the key, before
anything heavy loads. The choice lists come from the modules that implement them and the
loss defaults from `siri.kernels.config.LossConfig`, so no list or default is written twice.

Resuming a run (`resume_changes`) compares the saved config with the one given: the keys
that define the restored state (`RESUME_FIXED`) cannot change, the optimizer's
hyper-parameters (`RESUME_REAPPLIED`) are re-applied over the restored optimizer state, and
every other key is read afresh at each step, so a change applies from the resumed step on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from siri.advantages import ADVANTAGE_ESTIMATORS
from siri.checks import FRACTION_DOMAIN, POSITIVE_DOMAIN, is_fraction, is_positive
from siri.errors import UserError
from siri.files import check_output_dir
from siri.kernels.backends import BACKEND_CHOICES
from siri.kernels.config import KL_ESTIMATORS, LossConfig
from siri.models import check_model_dir
from siri.packing import LOSS_AGGS
from siri.precision import TORCH_DTYPES
from siri.schedule import SCHEDULE_KINDS, LengthSchedule, make_schedule
from siri.rewards import DEFAULT_THINK_END
from siri.verifier import DEFAULT_TIMEOUT_S

ENGINES = ("hf", "vllm")  # what siri.rollout.make_engine builds
DEVICES = ("auto", "cpu", "cuda")
# Seeds are mixed with the step and the rank into 64-bit sampling seeds (siri.trainer):
# below 2**32 every mix stays in range.
SEED_LIMIT = 2**32
SEED_DOMAIN = "an integer in [0, 2**32)"


def is_seed(value: int) -> bool:
    return 0 <= value < SEED_LIMIT


@dataclass
class ModelConfig:
    path: str = ""  # a local directory with a Hugging Face causal LM (config, weights, tokenizer)
    dtype: str = "bfloat16"  # the forward's (autocast) and the rollout engine's
    param_dtype: str = "float32"  # parameters, gradients and AdamW state (see siri.precision)
    # "auto": flash_attention_2 where flash-attn is usable, else packed_sdpa (siri.attention)
    attn_implementation: str = "auto"
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
    temperature: float = LossConfig.temperature  # the loss scores at the rollout temperature (loss_config)
    top_p: float = 1.0
    top_k: int = -1
    # vLLM only
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = False
    kv_cache_gib: float | None = None  # the KV cache's size; None: from gpu_memory_utilization
    # transformers only: prompts generated together
    generation_batch_size: int = 64


@dataclass
class RewardConfig:
    fn: str = "length_capped"  # a built-in name or a dotted path "package.module:function"
    mask_truncated: bool = False  # truncated samples get weight 0 in the loss
    overlong_buffer: int | None = None  # DAPO's soft overlong penalty over the last N tokens
    # The answer is read after this end-of-thinking marker only (DeepScaleR's rule: none in the
    # response, reward 0); null reads the whole response. Built-in rewards only.
    think_end: str | None = DEFAULT_THINK_END
    timeout_s: float = DEFAULT_TIMEOUT_S  # seconds one math-verify check may take, then "incorrect"


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    loss_agg: str = "token-mean"
    loss_norm_length: int = 16384  # Dr. GRPO's constant; does not follow the budget
    clip_low: float = LossConfig.clip_low
    clip_high: float = LossConfig.clip_high
    dual_clip: float | None = LossConfig.dual_clip
    kl_coef: float = LossConfig.kl_coef
    kl_estimator: str = LossConfig.kl_estimator
    entropy_coef: float = LossConfig.entropy_coef
    tis_cap: float | None = LossConfig.tis_cap
    mini_batches: int = 1  # optimizer steps per rollout batch; > 1 needs old log-probs
    # Must hold the longest sample, prompt + the schedule's largest budget.
    max_tokens_per_micro_batch: int = 32768
    fused_linear: bool = True  # LM head + loss without building [T, V] logits
    kernel_backend: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float | None = 1.0  # max gradient norm; null measures the norm without clipping


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
        raise UserError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _at_least(key: str, value, minimum) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
        raise UserError(f"{key} must be a finite number >= {minimum}, got {value!r}")


def _positive(key: str, value) -> None:
    if not is_positive(value):
        raise UserError(f"{key} must be {POSITIVE_DOMAIN}, got {value!r}")


def _non_empty(key: str, value: str) -> None:
    if not value.strip():
        raise UserError(f"{key} must not be empty")


def _value(cfg: TrainConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def build_schedule(cfg: TrainConfig) -> LengthSchedule:
    """The length schedule the `schedule` section describes."""
    s = cfg.schedule
    if s.kind == "constant":
        return make_schedule("constant", length=s.length if s.length is not None else s.l_max, round_to=s.round_to)
    if s.kind == "staged":
        if not s.stages:
            raise UserError("schedule.stages must list [step, length] pairs for kind 'staged'")
        return make_schedule("staged", stages=[tuple(stage) for stage in s.stages], round_to=s.round_to)
    return make_schedule(s.kind, l_max=s.l_max, l_min=s.l_min, period=s.period, round_to=s.round_to)


# The config key behind each LossConfig field: the loss samples at the rollout temperature.
_LOSS_KEYS = {f.name: f"algorithm.{f.name}" for f in dataclasses.fields(LossConfig)} | {
    "temperature": "rollout.temperature"}


def loss_config(cfg: TrainConfig) -> LossConfig:
    """The policy loss's settings (`siri.kernels.config.LossConfig`) from the config, in one place."""
    values = {name: _value(cfg, key) for name, key in _LOSS_KEYS.items()}
    try:
        return LossConfig(**values)
    except ValueError as error:
        # LossConfig names its field first ("clip_low must be ..."): name the config key instead.
        name, _, rest = str(error).partition(" ")
        raise UserError(f"{_LOSS_KEYS.get(name, name)} {rest}") from None


def _check_paths(cfg: TrainConfig) -> None:
    if cfg.model.path:  # empty when the caller passes the model itself; the trainer checks that case
        check_model_dir("model.path", cfg.model.path)
    for i, path in enumerate(cfg.data.train_files):
        if not os.path.isfile(path):
            raise UserError(f"data.train_files[{i}] {path!r} is not a file")
    _non_empty("output_dir", cfg.output_dir)
    check_output_dir("output_dir", cfg.output_dir)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Domain checks of every key beyond its type, and the paths; UserError naming the key."""
    _choice("model.dtype", cfg.model.dtype, tuple(TORCH_DTYPES))
    _choice("model.param_dtype", cfg.model.param_dtype, tuple(TORCH_DTYPES))
    if cfg.model.param_dtype not in ("float32", cfg.model.dtype):
        raise UserError(f"model.param_dtype must be float32 or model.dtype ({cfg.model.dtype!r}): autocast only "
                        f"narrows, got {cfg.model.param_dtype!r}")
    _choice("schedule.kind", cfg.schedule.kind, SCHEDULE_KINDS)
    _choice("rollout.engine", cfg.rollout.engine, ENGINES)
    _choice("algorithm.advantage", cfg.algorithm.advantage, ADVANTAGE_ESTIMATORS)
    _choice("algorithm.loss_agg", cfg.algorithm.loss_agg, LOSS_AGGS)
    _choice("algorithm.kl_estimator", cfg.algorithm.kl_estimator, sorted(KL_ESTIMATORS))
    _choice("algorithm.kernel_backend", cfg.algorithm.kernel_backend, BACKEND_CHOICES)
    _choice("device", cfg.device, DEVICES)
    for key in ("model.attn_implementation", "data.problem_key", "data.answer_key", "reward.fn",
                "logging.wandb_project"):
        _non_empty(key, _value(cfg, key))
    for key in ("rollout.n", "rollout.generation_batch_size", "algorithm.mini_batches",
                "algorithm.max_tokens_per_micro_batch", "algorithm.loss_norm_length", "optim.lr", "reward.timeout_s",
                "checkpoint.every", "prompts_per_step", "total_steps", "data.max_prompt_length"):
        _positive(key, _value(cfg, key))
    for key in ("optim.warmup_steps", "optim.weight_decay"):
        _at_least(key, _value(cfg, key), 0)
    _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    if cfg.optim.grad_clip is not None:
        _positive("optim.grad_clip (null turns clipping off)", cfg.optim.grad_clip)
    if cfg.reward.overlong_buffer is not None:
        _at_least("reward.overlong_buffer", cfg.reward.overlong_buffer, 1)
    if not is_seed(cfg.seed):
        raise UserError(f"seed must be {SEED_DOMAIN}, got {cfg.seed!r}")
    for key in ("rollout.top_p", "rollout.gpu_memory_utilization"):
        if not is_fraction(_value(cfg, key)):
            raise UserError(f"{key} must be {FRACTION_DOMAIN}, got {_value(cfg, key)!r}")
    if len(cfg.optim.betas) != 2 or not all(0 <= beta < 1 for beta in cfg.optim.betas):
        raise UserError(f"optim.betas must hold two numbers in [0, 1), got {cfg.optim.betas!r}")
    if cfg.rollout.kv_cache_gib is not None:
        _positive("rollout.kv_cache_gib", cfg.rollout.kv_cache_gib)
    if cfg.prompts_per_step % cfg.algorithm.mini_batches:
        raise UserError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of algorithm.mini_batches "
            f"({cfg.algorithm.mini_batches}): each optimizer step takes whole groups"
        )
    if cfg.reward.think_end == "":
        raise UserError("reward.think_end must be a marker such as '</think>', or null to read the whole response")
    loss_config(cfg)
    try:
        schedule = build_schedule(cfg)
    except UserError:
        raise
    except ValueError as error:
        raise UserError(f"schedule: {error}") from None
    # The shortest prompt is one token; the trainer checks the real longest prompt once the
    # data is tokenized (still before the model loads).
    check_micro_batch_fits(cfg, 1 + schedule.max_budget(), "a one-token prompt")
    _check_paths(cfg)
    return cfg


def check_micro_batch_fits(cfg: TrainConfig, longest: int, what: str) -> None:
    """UserError unless one micro-batch holds a sample of `longest` tokens (`what` says which)."""
    if cfg.algorithm.max_tokens_per_micro_batch < longest:
        raise UserError(
            f"algorithm.max_tokens_per_micro_batch ({cfg.algorithm.max_tokens_per_micro_batch}) is smaller than "
            f"the longest possible sample, {longest} tokens ({what} plus the schedule's largest budget): "
            f"raise it to at least {longest}"
        )


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
            except UserError as error:
                errors.append(str(error))
        raise UserError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_convert(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown config key {prefix}{unknown[0]!r}; known: {sorted(fields)}")
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
            raise UserError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # YAML's messages span lines; the CLI prints one


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.lr=2e-6", "rollout.n=4"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise UserError(f"override {item!r}: the value is not valid YAML ({_one_line(error)})") from None
        _set_dotted(tree, key.strip(), value)
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
        if not os.path.exists(path):
            raise UserError(f"--config {path!r} does not exist")
        if not os.path.isfile(path):
            raise UserError(f"--config {path!r} is not a file")
        try:
            with open(path, encoding="utf-8") as handle:
                values = yaml.safe_load(handle)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise UserError(f"--config {path!r} is not readable YAML: {_one_line(error)}") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"--config {path!r} must hold a mapping of sections (model:, data:, ...), "
                            f"got a {type(values).__name__}")
    return config_from_dict(values, overrides)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# -- resuming ----------------------------------------------------------------------------

# Keys that define the state a checkpoint restores: the data and its cursor, the length
# schedule, the seed of the data order, and the dtype of the saved optimizer state. A resume
# with any of them changed would continue another run; it is refused.
RESUME_FIXED = ("data", "schedule", "seed", "model.param_dtype")
# Keys whose values the restored optimizer and scheduler state carry; on resume the new
# values are written over the restored ones (siri.trainer), so a change takes effect.
RESUME_REAPPLIED = ("optim.lr", "optim.betas", "optim.weight_decay", "optim.warmup_steps")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(key: str, sections: tuple[str, ...]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in sections)


def resume_changes(saved: dict, cfg: TrainConfig, checkpoint: str) -> list[str]:
    """The keys whose value differs from the checkpoint's saved config, as `key: old -> new`.

    Raises UserError for a change of a `RESUME_FIXED` key (naming the key, both values and
    `checkpoint`). Keys one of the two configs lacks (another siri version) are not compared.
    """
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changed = sorted(key for key in old.keys() & new.keys() if old[key] != new[key])
    fixed = [key for key in changed if _under(key, RESUME_FIXED)]
    if fixed:
        details = "; ".join(f"{key}: {old[key]!r} there, {new[key]!r} now" for key in fixed)
        raise UserError(f"cannot resume {checkpoint!r} with a changed {', '.join(fixed)} ({details}): these keys "
                        "define the restored run. Keep the saved values, or start a new run in another output_dir")
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in changed]
