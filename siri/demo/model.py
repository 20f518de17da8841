"""The demo's tiny policy: a Qwen2-architecture causal LM small enough to train on a laptop CPU.

Same architecture as the Qwen2.5 / R1-Distill models the paper trains (RoPE, GQA,
SwiGLU, RMSNorm), so every code path of the trainer — packed forward, fused loss,
checkpoints, `siri eval` — runs on it unchanged; only the sizes are tiny.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from siri.models import random_model

__all__ = ["ModelSize", "build_model"]


@dataclass(frozen=True)
class ModelSize:
    """Shape of the tiny model. The defaults have about 0.8 M parameters; an SFT step of 32
    traces takes about 0.2 s on two uncontended CPU cores."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA, as in Qwen2, so the KV-head path is exercised
    intermediate_size: int = 384
    max_position_embeddings: int = 512  # prompt + the longest budget, with room to spare


def build_model(tokenizer, size: ModelSize = ModelSize(), seed: int = 0) -> Qwen2ForCausalLM:
    """A freshly initialised float32 `Qwen2ForCausalLM` over `tokenizer`'s vocabulary.

    Sampling defaults are pure temperature-1 sampling (no top-k / top-p), the way the
    paper's rollouts are drawn, and generation stops at the tokenizer's EOS.
    """
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=size.max_position_embeddings,
        # Tied embeddings: with a ~80-token vocabulary the LM head is tiny either way, and
        # tying is what the small Qwen2.5 checkpoints do.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
        dtype="float32",
    )
    # Seed only the initialisation: the caller's RNG state is given back.
    model = random_model(config, seed=seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    return model
