"""Attention for packed micro-batches that keeps samples apart without an N x N mask.

A packed micro-batch (`siri.packing.PackedBatch.model_inputs`) is one row of N tokens from
several samples. transformers' "sdpa" and "eager" implementations keep the samples apart
by building a dense block-diagonal [N, N] mask from the restarting `position_ids`, and
then attend over all N x N pairs: at N = 32,768 that is a 1 GiB boolean mask per forward
and attention across samples that the mask throws away. Two implementations avoid it:

- "flash_attention_2" (flash-attn installed, CUDA): transformers calls flash-attn's varlen
  kernel with the batch's `cu_seq_lens_*` / `max_length_*`;
- "packed_sdpa" (registered here with transformers' attention interfaces): PyTorch's
  `scaled_dot_product_attention` once per sample, causal inside it, over that sample's
  slice of the queries, keys and values. It costs Σ len² per layer instead of N², builds no
  mask, and trains on any device (transformers' "flex_attention" cannot on a CPU: PyTorch
  2.13 has no flex-attention backward there). Inputs that are not packed (generation with a
  cache, left-padded prompts) go through transformers' "sdpa" unchanged, so the same model
  also serves the transformers rollout engine.

`resolve_attn_implementation` turns the config's `model.attn_implementation` into the one
used: "auto" (the default) picks flash-attn where it is usable and "packed_sdpa" elsewhere;
"flash_attention_2" falls back to "packed_sdpa" with a warning where flash-attn is missing;
other names are kept. `use_packed_attention(model, name, device)` applies the result to a
built model; `siri.model_forward` warns once when a packed micro-batch meets "sdpa" or
"eager", which give it a dense mask.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["AUTO", "PACKED_SDPA", "flash_attention_available", "register_packed_sdpa", "resolve_attn_implementation",
           "use_packed_attention", "warn_if_dense_mask"]

AUTO = "auto"
PACKED_SDPA = "packed_sdpa"
FLASH_ATTENTION = "flash_attention_2"
# transformers' implementations that give a packed micro-batch a dense [N, N] mask.
DENSE_MASK_IMPLEMENTATIONS = ("sdpa", "eager")

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Warn the first time a process meets `message` (the trainer and evaluation may both resolve)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _transformers_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _sample_bounds(cu_seq_lens_q, cu_seq_lens_k, position_ids, batch_size: int, length: int) -> list[list[int]]:
    """Per row, the offsets where its samples start, and its length at the end.

    From `cu_seq_lens_q` (siri.packing's boundaries, one row) when given; otherwise from
    `position_ids`, a sample starting wherever a position does not follow its predecessor
    by one (transformers' own packed-sequence rule); otherwise each row is one sequence.
    """
    if cu_seq_lens_q is not None:
        if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q \
                and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
            raise ValueError("packed_sdpa: cu_seq_lens_k must equal cu_seq_lens_q (self-attention without a cache)")
        bounds = cu_seq_lens_q.tolist()
        if batch_size != 1 or bounds[0] != 0 or bounds[-1] != length:
            raise ValueError(f"packed_sdpa: cu_seq_lens_q {bounds} does not cover one row of {length} tokens "
                             f"(got {batch_size} rows)")
        return [bounds]
    if position_ids is None:
        return [[0, length]] * batch_size
    positions = position_ids.expand(batch_size, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return [row.nonzero().flatten().tolist() + [length] for row in starts]


def packed_sdpa_attention(module, query, key, value, attention_mask, *, cu_seq_lens_q=None, cu_seq_lens_k=None,
                          position_ids=None, sliding_window=None, **kwargs):
    """transformers attention function (`AttentionInterface`): query [B, Hq, N, D], key and
    value [B, Hkv, N, D] -> ([B, N, Hq, D], None).

    Without a mask over N queries and N keys (a packed micro-batch, or a plain causal
    sequence) each sample is attended alone; anything else (a padding mask, a cache) is
    transformers' sdpa, given the mask `packed_sdpa_mask` built.
    """
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return _transformers_sdpa(module, query, key, value, attention_mask, position_ids=position_ids,
                              sliding_window=sliding_window, **kwargs)
    is_causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
        raise ValueError("packed_sdpa: attention is not causal; this implementation is for causal decoders")
    if sliding_window is not None:
        raise ValueError(f"packed_sdpa: sliding-window layers (window {sliding_window}) are not supported; "
                         "use flash_attention_2, or sdpa (which builds a dense mask of a packed micro-batch)")
    if kwargs.get("softcap") is not None:
        raise ValueError("packed_sdpa: attention logit soft-capping is not supported; use flash_attention_2 or eager")
    batch_size, _, length, _ = query.shape
    scale = kwargs.get("scaling")
    dropout = kwargs.get("dropout", 0.0)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    rows = []
    for row, bounds in enumerate(_sample_bounds(cu_seq_lens_q, cu_seq_lens_k, position_ids, batch_size, length)):
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        # split, not slicing: its backward writes each sample's gradient into one [N] buffer
        # (a single concatenation), where every slice's backward would zero a buffer of all N
        # positions and the buffers would then be summed (samples x N work per layer).
        pieces = [
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=gqa,
            ).transpose(1, 2)  # [1, len, Hq, D], a view: the concatenation below is the one copy
            for q, k, v in zip(*(t[row:row + 1].split(lengths, dim=2) for t in (query, key, value)))
        ]
        rows.append(torch.cat(pieces, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def packed_sdpa_mask(**kwargs):
    """transformers mask function (`AttentionMaskInterface`): no mask where
    `packed_sdpa_attention` keeps the samples apart itself, i.e. N queries over the same N
    keys of full causal attention with no padding (packed or not); transformers' sdpa mask
    otherwise.

    The keywords differ between transformers versions (`q_length` in 5.x, `cache_position`
    in 4.x) and pass through to the sdpa mask as they came.
    """
    from transformers.masking_utils import sdpa_mask

    q_length = kwargs["q_length"] if "q_length" in kwargs else kwargs["cache_position"].shape[0]
    q_offset = kwargs.get("q_offset", 0)
    # Sliding-window and chunked layers (`local_size`) and overlays on the causal pattern
    # (`use_vmap`) keep their mask: per-sample causal attention would drop them.
    unmasked = (kwargs.get("attention_mask") is None and kwargs.get("kv_offset", 0) == 0
                and isinstance(q_offset, int) and q_offset == 0 and q_length == kwargs["kv_length"]
                and kwargs.get("local_size") is None and not kwargs.get("use_vmap", False))
    return None if unmasked else sdpa_mask(**kwargs)


def register_packed_sdpa() -> None:
    """Make "packed_sdpa" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def flash_attention_available(device: torch.device) -> bool:
    """flash-attn 2 is installed (as transformers checks it) and `device` is a CUDA device."""
    from transformers.utils import is_flash_attn_2_available

    return torch.device(device).type == "cuda" and is_flash_attn_2_available()


def resolve_attn_implementation(requested: str | None, device: torch.device) -> str:
    """The attention implementation to build a model with, for `model.attn_implementation`
    = `requested` on `device` (see the module docstring); registers "packed_sdpa"."""
    register_packed_sdpa()
    if requested is None or requested == AUTO:
        return FLASH_ATTENTION if flash_attention_available(device) else PACKED_SDPA
    if requested == FLASH_ATTENTION and not flash_attention_available(device):
        why = "flash-attn is not installed" if torch.device(device).type == "cuda" else f"the device is {device}"
        _warn_once(f"model.attn_implementation: flash_attention_2 asked for but {why}; "
                   f"packed micro-batches use {PACKED_SDPA} (per-sample SDPA) instead")
        return PACKED_SDPA
    return requested


def warn_if_dense_mask(model) -> None:
    """Warn once when `model` would give a packed micro-batch a dense [N, N] mask."""
    name = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if name in DENSE_MASK_IMPLEMENTATIONS:
        _warn_once(f"attention {name!r} builds a dense [N, N] mask for every packed micro-batch of N tokens; "
                   f"set {PACKED_SDPA!r} or {FLASH_ATTENTION!r} (siri.attention.use_packed_attention)")


def use_packed_attention(model, requested: str | None, device: torch.device) -> str:
    """Switch a built transformers model to `resolve_attn_implementation(requested, device)`;
    returns the implementation it now uses."""
    chosen = resolve_attn_implementation(requested, device)
    if model.config._attn_implementation != chosen:
        model.set_attn_implementation(chosen)
    return chosen
