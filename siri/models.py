"""Where a model runs, how a local model directory is loaded (the trainer, `siri eval`, the
demo) and how a model with fresh random weights is built (the demo, the tests, the benchmarks).

Nothing is downloaded: a path that is not a local Hugging Face model directory is a
`UserError` naming it, never a look-up on a model hub.
"""

from __future__ import annotations

import os

import torch

from siri.attention import PACKED_SDPA, register_packed_sdpa, resolve_attn_implementation
from siri.errors import UserError
from siri.precision import TORCH_DTYPES

__all__ = ["check_model_dir", "load_model", "load_tokenizer", "random_model", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """"auto" is cuda when a CUDA device is present, else cpu; "cuda" without one is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: 'cuda' asked for but no CUDA device is available")
    return torch.device(name)


def check_model_dir(key: str, path: str) -> None:
    """UserError naming `key` unless `path` is a directory holding a Hugging Face config.json."""
    if not path:
        raise UserError(f"{key} must name a local Hugging Face model directory")
    if not os.path.exists(path):
        raise UserError(f"{key} {path!r} does not exist (a local Hugging Face model directory; nothing is downloaded)")
    if not os.path.isdir(path):
        raise UserError(f"{key} {path!r} is a file; it must be a Hugging Face model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{key} {path!r} holds no config.json: not a Hugging Face model directory")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as error:  # transformers' "can't load tokenizer": a file the directory lacks
        raise UserError(f"model directory {path!r} has no loadable tokenizer: {' '.join(str(error).split())}") \
            from error


def load_model(path: str, device: torch.device, dtype: str, *, weights: bool = True,
               attn_implementation: str | None = None, tokenizer=None):
    """(model, tokenizer) of a model directory, the model in eval mode; the model is None
    without `weights` (vLLM loads its own copy). A `tokenizer` already loaded is reused.
    `attn_implementation` as `model.attn_implementation`
    (`siri.attention.resolve_attn_implementation`); None keeps transformers' default."""
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    if not weights:
        return None, tokenizer
    if attn_implementation is not None:
        attn_implementation = resolve_attn_implementation(attn_implementation, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype],
                                                     attn_implementation=attn_implementation)
    except OSError as error:  # transformers' "no file named model.safetensors ...": missing weights
        raise UserError(f"model directory {path!r} has no loadable weights: {' '.join(str(error).split())}") \
            from error
    return model.to(device).eval(), tokenizer


def random_model(config, *, seed: int | None = None):
    """A causal LM with freshly initialised weights, built from a transformers `config`
    (`Qwen2Config(...)`, `LlamaConfig(...)`): nothing is downloaded or loaded.

    The model is in `config.dtype` (torch's default, float32, when that is unset) and in
    train mode, as transformers builds it. A `config` asking for "packed_sdpa" attention gets
    it registered first. `seed`: an int draws the initial weights from
    `torch.manual_seed(seed)` and gives the caller's RNG state back; None draws them from
    torch's global RNG, as constructing any module does.
    """
    from transformers import AutoModelForCausalLM

    if getattr(config, "_attn_implementation", None) == PACKED_SDPA:
        register_packed_sdpa()
    if seed is None:
        return AutoModelForCausalLM.from_config(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
