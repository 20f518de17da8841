"""Run a Hugging Face causal LM on a PackedBatch, with the LM head on the scored rows only.

``model(**inputs)`` would apply the LM head to all N packed positions and build an [N, V]
logits tensor (V = 151,936 for Qwen2: 1.2 GB in bf16 at N = 4096), of which only the T
rows that predict a response token are used. Here the model's body runs once, the hidden
states are gathered at ``batch.logit_index``, and only those T rows go through the head
and the loss:

    hidden = packed_hidden_states(model, batch)                 # [T, H]
    out = lm_head_policy_loss(hidden, model, targets, ...)      # LM head + loss

With `fused_linear=True` (the default) the LM head and the loss run as one
`siri.kernels.fused_linear_policy_loss`, so not even the [T, V] logits of the scored rows
are built; heads that post-process their logits (Gemma 2's soft-capping) fall back to
materialising them. Under `torch.autocast` (the trainer's mixed precision) the fused head
runs in the autocast dtype, as the unfused `head(hidden)` would.

Usage::

    out = packed_policy_loss(model, batch, clip_low=0.2, clip_high=0.28)
    out.loss.backward()
    logprobs = packed_logprobs(model, batch)                    # [T] float32
"""

from __future__ import annotations

import torch

from siri.attention import warn_if_dense_mask
from siri.kernels import (
    PolicyLossOutput,
    fused_linear_policy_loss,
    fused_linear_token_logprobs,
    policy_loss,
    token_logprobs,
)
from siri.packing import PackedBatch
from siri.precision import autocast_dtype

__all__ = [
    "decoder_body", "enable_activation_checkpointing", "lm_head_logits", "lm_head_policy_loss",
    "packed_hidden_states", "packed_logprobs", "packed_policy_loss",
]

# Filled from the batch by `packed_policy_loss`; a caller passing them would be ambiguous.
_BATCH_LOSS_FIELDS = ("targets", "advantages", "weights", "old_logprobs", "ref_logprobs", "rollout_logprobs")


def _check_batch(batch) -> None:
    if not isinstance(batch, PackedBatch):
        raise ValueError(f"batch must be a siri.packing.PackedBatch, got {type(batch).__name__}")


def decoder_body(model) -> torch.nn.Module:
    """The body of a transformers causal LM: the module whose output is the final-norm
    hidden states (`Qwen2Model` inside `Qwen2ForCausalLM`).

    `get_decoder()` is the newer API; transformers 4.x's generic one returns None for
    models whose body has no `decoder` or `model` attribute (Qwen2, Llama), where
    `base_model` (the attribute named by `base_model_prefix`) is the body.
    """
    if not hasattr(model, "get_decoder"):
        raise ValueError(f"model: {type(model).__name__} is not a transformers PreTrainedModel (no get_decoder)")
    body = model.get_decoder()
    if body is None:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"model: cannot find the decoder body of {type(model).__name__} "
                         "(get_decoder() and base_model give none)")
    return body


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations
    (`model.gradient_checkpointing`): transformers' `activation_checkpointing_enable`, named
    `gradient_checkpointing_enable` before it (deprecated since, removed in v6)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _lm_head(model) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"model: {type(model).__name__} has no output embeddings (LM head); "
                         "pass a causal LM such as Qwen2ForCausalLM")
    return head


def packed_hidden_states(model, batch: PackedBatch) -> torch.Tensor:
    """The final hidden states [T, H] of `model`'s body at `batch.logit_index`.

    `model` is a transformers causal LM (e.g. `Qwen2ForCausalLM`). Its own forward runs, so
    that wrappers around it (FSDP2 gathers the root's embeddings, norm and head in the
    root's forward) see a normal call, but with `logits_to_keep` an empty index: the head
    scores no position there. The body's output (after the final norm) is taken by a hook
    on the body (`decoder_body`). `batch` must be on the model's device. Samples never
    attend to each other; with "packed_sdpa" or "flash_attention_2" (`siri.attention`) no
    [N, N] mask is built either, with "sdpa" or "eager" it is (a warning says so once).
    """
    _check_batch(batch)
    warn_if_dense_mask(model)
    body = decoder_body(model)
    captured = {}

    def keep_output(module, args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = body.register_forward_hook(keep_output)
    try:
        nothing = batch.logit_index[:0]
        model(**batch.model_inputs(), logits_to_keep=nothing)
    finally:
        handle.remove()
    # [1, N, H] -> [T, H]; index_select's backward scatters into the N rows, so the body
    # gets its gradient at the scored positions and zeros elsewhere.
    return captured["hidden"][0].index_select(0, batch.logit_index)


def _softcap(model):
    # Models that soft-cap their logits (Gemma 2) do it after the head, in their forward.
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None)


def _fusable_head(model):
    """The head as a plain nn.Linear the fused kernels can take, or None."""
    head = _lm_head(model)
    if isinstance(head, torch.nn.Linear) and _softcap(model) is None:
        return head
    return None


def _head_operands(hidden: torch.Tensor, head: torch.nn.Linear):
    """(hidden, weight, bias) for the fused kernels, in the dtype autocast gives an
    nn.Linear here: under mixed precision the float32 head runs in the compute dtype, as
    the unfused `head(hidden)` would (the casts are differentiable)."""
    dtype = autocast_dtype(hidden.device.type)
    weight, bias = head.weight, head.bias
    if dtype is None:
        return hidden, weight, bias
    return hidden.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def lm_head_logits(hidden: torch.Tensor, model) -> torch.Tensor:
    """The logits [T, V] of the gathered hidden states, as the model's forward would make them."""
    logits = _lm_head(model)(hidden)
    softcap = _softcap(model)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def lm_head_policy_loss(hidden: torch.Tensor, model, targets: torch.Tensor, advantages: torch.Tensor,
                        weights: torch.Tensor, *, fused_linear: bool = True, chunk_size: int | None = None,
                        **loss_kwargs) -> PolicyLossOutput:
    """LM head + policy loss of the T gathered rows.

    With `fused_linear` and a plain linear head: `fused_linear_policy_loss` (never builds
    [T, V]; `chunk_size` as there). Otherwise the logits are built and go through
    `policy_loss`. `loss_kwargs`: the keywords of `siri.kernels.policy_loss`.
    """
    head = _fusable_head(model) if fused_linear else None
    if head is not None:
        hidden, weight, bias = _head_operands(hidden, head)
        return fused_linear_policy_loss(hidden, weight, targets, advantages, weights, bias=bias,
                                        chunk_size=chunk_size, **loss_kwargs)
    return policy_loss(lm_head_logits(hidden, model), targets, advantages, weights, **loss_kwargs)


def packed_policy_loss(model, batch: PackedBatch, *, fused_linear: bool = True, chunk_size: int | None = None,
                       **loss_kwargs) -> PolicyLossOutput:
    """Policy loss of one packed micro-batch; `loss.backward()` accumulates its gradients.

    The targets, advantages, weights and old / ref / rollout log-probs come from `batch`;
    `loss_kwargs` are the remaining keywords of `siri.kernels.policy_loss` (temperature,
    clip_low, clip_high, dual_clip, kl_coef, kl_estimator, entropy_coef, tis_cap,
    inplace_backward, backend); `fused_linear` and `chunk_size` as in `lm_head_policy_loss`.
    Because the batch's weights are normalised over the whole
    mini-batch, the micro-batch losses add up to the mini-batch loss.

    Returns:
        PolicyLossOutput(loss 0-dim, logprobs [T], entropy [T], metrics), per token in
        `batch.logit_index` order (`siri.packing.unpack` splits them per sample).
    """
    _check_batch(batch)
    clashing = sorted(set(loss_kwargs) & set(_BATCH_LOSS_FIELDS))
    if clashing:
        raise ValueError(f"loss_kwargs: {clashing} come from the batch; do not pass them")
    hidden = packed_hidden_states(model, batch)
    return lm_head_policy_loss(
        hidden, model, batch.targets, batch.advantages, batch.weights,
        old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs,
        rollout_logprobs=batch.rollout_logprobs, fused_linear=fused_linear, chunk_size=chunk_size, **loss_kwargs,
    )


def packed_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0, return_entropy: bool = False,
                    backend: str = "auto", fused_linear: bool = True):
    """Log-probs [T] (float32) of the response tokens of one micro-batch, and their entropy
    [T] with `return_entropy`. Run it under `torch.no_grad()` to compute old / reference
    log-probs (then, with `fused_linear`, without building the [T, V] logits); it is
    differentiable otherwise."""
    hidden = packed_hidden_states(model, batch)
    head = _fusable_head(model) if fused_linear and not torch.is_grad_enabled() else None
    if head is not None:
        hidden, weight, bias = _head_operands(hidden, head)
        return fused_linear_token_logprobs(hidden, weight, batch.targets, bias=bias, temperature=temperature,
                                           return_entropy=return_entropy, backend=backend)
    logits = lm_head_logits(hidden, model)
    return token_logprobs(logits, batch.targets, temperature=temperature, return_entropy=return_entropy,
                          backend=backend)
