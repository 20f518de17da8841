"""The tests' tiny models and tokenizers, built here from configs (nothing is downloaded).

Every test that builds a Hugging Face model of its own takes it from `tiny_model`, naming
only what it changes from `TINY` (the demo's tests use the demo's model, `siri.demo.model`);
`char_tokenizer` and `word_tokenizer` are the two tokenizers the tests need (one token per
character, or one per space-separated word).
"""

from __future__ import annotations

import torch
import transformers

from siri.models import random_model

# Two layers, two attention heads of 16 and one KV head (GQA, as in Qwen2): the smallest
# shape that still runs every path of a decoder (grouped heads, a residual stack).
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
            attn_implementation="sdpa")
ARCHITECTURES = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}


def tiny_config(vocab_size: int, architecture: str = "qwen2", **overrides) -> transformers.PretrainedConfig:
    """`TINY` with `overrides` (any keyword of the architecture's config), over `vocab_size` tokens."""
    return ARCHITECTURES[architecture](vocab_size=vocab_size, **{**TINY, **overrides})


def tiny_model(vocab_size: int, *, seed: int = 0, architecture: str = "qwen2", **overrides):
    """A float32 model of `tiny_config(vocab_size, architecture, **overrides)`, in train mode.

    Seeds torch's global RNG with `seed` first, so what a test draws after building its
    model follows from the seed too.
    """
    torch.manual_seed(seed)
    return random_model(tiny_config(vocab_size, architecture, **overrides))


def char_tokenizer(chars: str, *, unk_token: str = "<pad>", pad: bool = True,
                   eos_token: str = "<eos>") -> transformers.PreTrainedTokenizerFast:
    """One token per character of `chars` (ids 2, 3, ...), `unk_token` at id 0 (with `pad` it is
    the tokenizer's pad token, else its unk token) and `eos_token` at id 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {unk_token: 0, eos_token: 1, **{c: i + 2 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    special = dict(pad_token=unk_token) if pad else dict(unk_token=unk_token)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos_token, **special)


def word_tokenizer(vocab_size: int, special: dict[str, int], *, pad_token: str, unk_token: str,
                   eos_token: str) -> transformers.PreTrainedTokenizerFast:
    """Space-separated words "t0" ... f"t{vocab_size - 1}", the ids of `special` (token -> id)
    taking those ids' places."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    taken = set(special.values())
    vocab = {f"t{i}": i for i in range(vocab_size) if i not in taken} | special
    backend = Tokenizer(WordLevel(vocab, unk_token=unk_token))
    backend.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad_token, unk_token=unk_token,
                                                eos_token=eos_token)
