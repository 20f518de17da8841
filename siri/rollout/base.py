"""The rollout-engine contract: sampling settings, one rollout, the engine interface.

A rollout engine samples `n` responses for each prompt of a step under that step's length
budget (`max_tokens`, which the SIRI schedule moves between L_min and L_max). Two engines
implement it: `HFEngine` (the training model's own `generate`, any device) and `VLLMEngine`
(a colocated vLLM engine, on a CUDA GPU or vLLM's CPU backend). Both follow the same rules:

- Order: `generate` returns `len(prompts) * n` rollouts grouped by prompt, in prompt order
  (the `n` samples of prompt 0, then those of prompt 1, ...).
- EOS: a list of token ids (Qwen models end turns with several, e.g. `<|im_end|>` and
  `<|endoftext|>`), gathered by `eos_token_ids` from the tokenizer and the model's
  generation config. A response ends at its first EOS token and keeps it: the policy chose
  to stop, and that choice is an action the loss must see (verl and TRL do the same).
- Truncation: a response is truncated iff it holds no EOS token and reached `max_tokens`,
  that is the engine cut it at the budget (`is_truncated`). The length-capped reward and
  `reward.mask_truncated` read this flag.
- Log-probs: `Rollout.logprobs[i]` is the log-probability of `response_ids[i]` under the
  distribution the engine sampled from, scaled by the temperature. See each engine for the
  exact semantics with top-p / top-k (they agree when both are off, SIRI's setting).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from siri.checks import FRACTION_DOMAIN, as_int, is_fraction
from siri.kernels.config import check_temperature

if TYPE_CHECKING:
    from siri.config import RolloutConfig

FINISH_STOP = "stop"  # the response ends with an EOS token
FINISH_LENGTH = "length"  # the response was cut at max_tokens (truncated)

# Derived seeds go to torch.Generator.manual_seed and to vLLM, which adds the sample index
# to a request's seed for each of its n samples: stay well inside a signed 64-bit integer.
_SEED_MODULUS = 2**62
_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele et al., 2014): a bijective, well-mixing 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample one step's rollouts.

    `top_k <= 0` disables top-k and `top_p == 1` disables top-p (RolloutConfig's defaults,
    and the paper's: temperature 1, no truncation of the distribution). `temperature` is
    finite and > 0, the rule every temperature follows (`siri.kernels.config.is_temperature`).
    `seed=None` samples without a fixed seed (not reproducible).
    """

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int | None = None

    def __post_init__(self):
        check_temperature(self.temperature)
        if not is_fraction(self.top_p):
            raise ValueError(f"top_p must be {FRACTION_DOMAIN}, got {self.top_p!r}")
        # Stored as Python ints (the class is frozen, hence object.__setattr__): numpy or torch
        # integer scalars would reach the seed mixing and transformers' warpers, which take int.
        minimums = {"n": 1, "top_k": None, "max_tokens": 1}  # top_k <= 0 disables it
        if self.seed is not None:
            minimums["seed"] = None
        for name, minimum in minimums.items():
            object.__setattr__(self, name, as_int(name, getattr(self, name), minimum=minimum))

    @classmethod
    def from_config(cls, cfg: RolloutConfig, budget: int, seed: int) -> SamplingSettings:
        """Settings for one step: the sampling knobs of `cfg`, `budget` response tokens."""
        return cls(n=cfg.n, temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=cfg.top_k,
                   max_tokens=budget, seed=seed)

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def top_p_enabled(self) -> bool:
        return self.top_p < 1.0


@dataclass
class Rollout:
    """One sampled response.

    `prompt_index` indexes the `prompts` list given to `generate`. `response_ids` ends with
    the EOS token when the policy stopped (`finish_reason == "stop"`), and is exactly
    `max_tokens` long without an EOS when the budget cut it (`truncated`, `finish_reason ==
    "length"`). `logprobs` holds one value per response token, or None when the engine did
    not report them.
    """

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float] | None
    truncated: bool
    finish_reason: str


def derive_seed(seed: int, *offsets: int) -> int:
    """A seed for a sub-task (a batch, a prompt) of a step seeded with `seed`.

    Hashing rather than adding keeps streams apart: with `seed + offset`, step s's second
    batch would reuse step s+1's first batch's random stream.
    """
    value = _splitmix64(seed & _MASK64)
    for offset in offsets:
        value = _splitmix64(value ^ (offset & _MASK64))
    return value % _SEED_MODULUS


def is_truncated(response_ids: Sequence[int], eos_token_ids: Iterable[int], max_tokens: int) -> bool:
    """The truncation rule shared by every engine: no EOS token and `max_tokens` long."""
    eos = set(eos_token_ids)
    return len(response_ids) >= max_tokens and not any(t in eos for t in response_ids)


def cut_at_eos(token_ids: Sequence[int], eos_token_ids: Iterable[int]) -> tuple[list[int], bool]:
    """`token_ids` up to and including its first EOS token, and whether one was found.

    Engines that decode in padded batches keep writing pad tokens after a row's EOS; those
    are not part of the response.
    """
    eos = set(eos_token_ids)
    for i, token in enumerate(token_ids):
        if token in eos:
            return [int(t) for t in token_ids[: i + 1]], True
    return [int(t) for t in token_ids], False


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(tokenizer=None, model=None) -> list[int]:
    """Every token id that ends a response, deduplicated, in a stable order.

    Taken from the model's generation config first (where chat models list all their
    end-of-turn tokens, e.g. Qwen2.5-Instruct's [151645, 151643]), then its config, then the
    tokenizer's `eos_token_id`. Raises ValueError when none is found: without an EOS token
    every rollout would run to the budget and count as truncated.
    """
    found: list[int] = []
    if model is not None:
        generation_config = getattr(model, "generation_config", None)
        found += _as_id_list(getattr(generation_config, "eos_token_id", None))
        config = getattr(model, "config", None)
        found += _as_id_list(getattr(config, "eos_token_id", None))
    if tokenizer is not None:
        found += _as_id_list(getattr(tokenizer, "eos_token_id", None))
    unique = list(dict.fromkeys(found))
    if not unique:
        raise ValueError("no EOS token id found in the tokenizer, model.config or model.generation_config")
    return unique


def check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    """ValueError unless `prompts` is a list of non-empty token-id lists."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: a rollout needs at least one prompt token")


class RolloutEngine(abc.ABC):
    """Samples rollouts for the trainer; see the module docstring for the shared rules.

    The trainer drives an engine in this order each step: `sync_weights(model)` (the policy
    just changed), `wake_up()`, `generate(...)`, `sleep()` (give GPU memory back to the
    update). Engines are also context managers that `close()` on exit.
    """

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        """`settings.n` rollouts per prompt, grouped by prompt in prompt order."""

    @abc.abstractmethod
    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (a no-op for an engine that
        generates with the training model itself). Under FSDP every rank must call it."""

    @abc.abstractmethod
    def sleep(self) -> None:
        """Free the engine's GPU memory (weights, KV cache) for the training update."""

    @abc.abstractmethod
    def wake_up(self) -> None:
        """Restore what `sleep` freed; `generate` may follow."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every resource; the engine is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
