"""TRL's `GRPOTrainer` with its loss computed by `siri.kernels.fused_linear_policy_loss`.

`SiriGRPOTrainer` is a drop-in subclass: generation, rewards, advantages, old and reference
log-probs stay TRL's; only the training loss changes. TRL scores the completion tokens
with its own chunked log-prob head and builds the loss from the per-token log-probs
(autograd then keeps each chunk's softmax for the backward). Here the model body runs
once, its hidden states at the scored completion positions go through the LM head and
the clipped policy loss in one fused pass that also forms the gradients, so neither
[B, C, V] logits nor per-chunk softmaxes are kept.

The loss is TRL's own, term by term: each `loss_type`'s normalisation becomes the
per-token `weights` of `fused_linear_policy_loss` (`trl_loss_weights`), `beta` the k3 KL
coefficient (`kl_estimator="k3_ratio"`, k3 times the importance ratio, under TRL's default
`use_bias_correction_kl=True`), `delta` (two-sided clipping) the dual clip, vLLM's importance-sampling
ratio a positive scale of the advantages (the clipped surrogate is homogeneous in A),
and the entropy bonus, a per-micro-batch token mean in TRL whatever the loss type, its
own token weights. A TRL setting this cannot reproduce is refused when the trainer is
built, with an error naming it (`unsupported_settings`).
"""

from __future__ import annotations

import functools
import types

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from siri.kernels import fused_linear_policy_loss

__all__ = ["SiriGRPOTrainer", "trl_loss_weights", "unsupported_settings"]

# TRL loss types whose per-token loss is the clipped surrogate siri computes.
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# The others, and why: their surrogate is not the clipped ratio.
UNSUPPORTED_LOSS_TYPES = {
    "cispo": "its loss is -stop_grad(min(ratio, epsilon_high)) * A * log-prob, a REINFORCE term",
    "sapo": "its loss gates the ratio with a sigmoid instead of clipping it",
    "vespo": "its loss weights -A * log-prob by a sequence-level gamma function of the ratio",
}
# Inputs of vision-language models: their forward is not the text backbone this trainer calls.
MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "num_images")


def trl_loss_weights(
    loss_type: str,
    mask: torch.Tensor,
    *,
    accumulation_steps: int,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
    training: bool = True,
) -> torch.Tensor:
    """[B, C] float32 weights w such that TRL 1.16's loss of a micro-batch is sum(w * l).

    `mask` is the [B, C] loss mask (completion mask times tool mask). As TRL does: grpo
    averages each row over its tokens and the rows over all B rows (a fully masked row
    counts); bnpo divides by the micro-batch's tokens; dr_grpo by B * max_completion_length;
    dapo by the generation batch's tokens (`num_items_in_batch`) rescaled to one
    accumulation window; luspo sums each row and averages over the rows. In training every
    type but dapo is further divided by the accumulation steps.
    """
    mask = mask.to(torch.float32)
    rows = mask.shape[0]
    accumulation = accumulation_steps if training else 1
    if loss_type == "grpo":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * rows * accumulation)
    if loss_type == "bnpo":
        return mask / (mask.sum().clamp(min=1.0) * accumulation)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return mask / (rows * max_completion_length * accumulation)
    if loss_type == "dapo":
        if num_items_in_batch is None:
            raise ValueError("loss_type 'dapo' needs num_items_in_batch (the generation batch's token count)")
        normalizer = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device).clamp(min=1.0)
        normalizer = normalizer / num_processes
        if training:
            normalizer = normalizer * accumulation_steps / steps_per_generation
        return mask / normalizer
    if loss_type == "luspo":
        return mask / (rows * accumulation)
    raise ValueError(f"loss_type must be one of {list(SUPPORTED_LOSS_TYPES)}, got {loss_type!r}")


def entropy_bonus_weights(mask: torch.Tensor, *, accumulation_steps: int, training: bool = True) -> torch.Tensor:
    """[B, C] weights of TRL's entropy bonus: a token mean over the micro-batch, over the accumulation steps."""
    mask = mask.to(torch.float32)
    return mask / (mask.sum().clamp(min=1.0) * (accumulation_steps if training else 1))


def unsupported_settings(args) -> list[str]:
    """The settings of a `GRPOConfig` this trainer cannot reproduce, each with the reason."""
    problems = []
    if args.loss_type in UNSUPPORTED_LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r}: {UNSUPPORTED_LOSS_TYPES[args.loss_type]}")
    elif args.loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r}: not a loss type of TRL 1.16")
    if args.importance_sampling_level != "token":
        problems.append(
            f"importance_sampling_level={args.importance_sampling_level!r}: the kernel's ratio is per token"
        )
    if not 0 <= args.epsilon < 1:
        problems.append(f"epsilon={args.epsilon!r}: the lower clip must be in [0, 1)")
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if args.delta is not None and args.delta <= 1 + epsilon_high:
        problems.append(
            f"delta={args.delta!r}: two-sided clipping is the dual clip only for delta > 1 + epsilon_high "
            f"({1 + epsilon_high})"
        )
    if args.top_entropy_quantile < 1.0:
        problems.append("top_entropy_quantile < 1: the entropy mask needs the entropies before the loss")
    if args.off_policy_mask_threshold is not None:
        problems.append("off_policy_mask_threshold: the off-policy mask needs the log-probs before the loss")
    if args.use_adaptive_entropy:
        problems.append("use_adaptive_entropy=True: the adaptive entropy controller is not reproduced")
    return problems


def _model_problems(model) -> list[str]:
    """Model-level settings the fused head does not apply (TRL's own head does)."""
    problems = []
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        problems.append("the model's final_logit_softcapping: the fused head applies no softcap")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            problems.append(f"the model's {name}: the fused head applies no logit scale")
    if getattr(text_config, "output_router_logits", False):
        problems.append("a Mixture-of-Experts model's router aux loss: not added by this trainer")
    return problems


def _install_hidden_states_forward(model) -> None:
    """`model(..., siri_hidden_states=True)` returns the body's last hidden states.

    Going through `model(...)` keeps DDP's and accelerate's forward wrappers in the path,
    as TRL's own fused head does; without the flag the forward is the one it replaces.
    """
    previous_forward = model.forward

    @functools.wraps(type(model).forward)  # `generate` validates its kwargs against the signature
    def forward(self, *args, siri_hidden_states=False, **kwargs):
        if not siri_hidden_states:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)


def _rows(tensor, selected, like):
    """The values of a [B, C] or [B] / [B, 1] tensor at the selected [B, C] positions, float32."""
    if tensor is None:
        return None
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(1)
    return tensor.to(torch.float32).expand_as(like)[selected]


class SiriGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose loss runs through `siri.kernels.fused_linear_policy_loss`.

    Takes TRL's arguments unchanged. Raises ValueError at construction for a setting it
    cannot reproduce (`unsupported_settings`), a PEFT model, or a model whose head TRL
    scales or softcaps. `siri_backend` and `siri_chunk_size` pass through to the kernel.
    """

    def __init__(self, *args, siri_backend: str = "auto", siri_chunk_size: int | None = None, **kwargs):
        if kwargs.get("peft_config") is not None:
            raise ValueError("SiriGRPOTrainer does not support peft_config: the fused head reads lm_head.weight")
        super().__init__(*args, **kwargs)
        problems = unsupported_settings(self.args) + _model_problems(self.model)
        if hasattr(self.model, "peft_config"):
            problems.append("a PEFT model: the fused head reads lm_head.weight")
        if problems:
            raise ValueError("SiriGRPOTrainer cannot reproduce these TRL settings: " + "; ".join(problems))
        self.siri_backend, self.siri_chunk_size = siri_backend, siri_chunk_size
        _install_hidden_states_forward(self.model)

    def _compute_loss(self, model, inputs):
        for name in MULTIMODAL_INPUTS:
            if inputs.get(name) is not None:
                raise ValueError(f"SiriGRPOTrainer scores text only; the batch carries {name!r}")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        selected = mask.bool()
        length = completion_ids.size(1)

        with self.accelerator.autocast():
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, siri_hidden_states=True)
        # Position i predicts token i + 1: the last `length` tokens are scored from the positions before them.
        hidden = hidden[:, -length - 1:-1][selected]
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden = hidden.float() if self.args.cast_lm_head_to_fp32 else hidden.to(weight.dtype)

        training = self.model.training
        weights = trl_loss_weights(
            self.loss_type, mask, accumulation_steps=self.current_gradient_accumulation_steps,
            max_completion_length=self.max_completion_length, num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes, steps_per_generation=self.args.steps_per_generation,
            training=training,
        )[selected]
        raw_advantages = _rows(inputs["advantages"], selected, mask)
        advantages = raw_advantages
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies the surrogate by the (non-negative, detached) ratio; pg(s * A) = s * pg(A) for s >= 0.
            advantages = advantages * _rows(inputs["importance_sampling_ratio"], selected, mask)
        old = _rows(inputs.get("old_per_token_logps"), selected, mask)
        ref = _rows(inputs["ref_per_token_logps"], selected, mask) if self.beta != 0.0 else None
        # TRL's bias correction multiplies k3 by the (unclipped, differentiable) importance ratio.
        kl_estimator = "k3_ratio" if self.args.use_bias_correction_kl else "k3"
        entropy_coef = self.entropy_coef if self._entropy_bonus_enabled else 0.0
        entropy_weights = entropy_bonus_weights(
            mask, accumulation_steps=self.current_gradient_accumulation_steps, training=training
        )[selected]

        loss_kwargs = dict(
            bias=bias, old_logprobs=old, temperature=self.temperature, clip_low=self.epsilon_low,
            clip_high=self.epsilon_high, dual_clip=self.args.delta, kl_estimator=kl_estimator,
            backend=self.siri_backend, chunk_size=self.siri_chunk_size,
        )
        targets = completion_ids[selected]
        with torch.autocast(hidden.device.type, enabled=False):
            if entropy_coef == 0.0:
                out = fused_linear_policy_loss(
                    hidden, weight, targets, advantages, weights, ref_logprobs=ref, kl_coef=self.beta, **loss_kwargs
                )
                loss = out.loss
            elif self.beta == 0.0 or self.loss_type == "bnpo":
                # One pass: rows weighted by the bonus's weights e, A scaled by w / e, keeps sum(w * pg);
                # with beta != 0 the KL term needs w == e, which holds for bnpo only.
                out = fused_linear_policy_loss(
                    hidden, weight, targets, advantages * (weights / entropy_weights), entropy_weights,
                    ref_logprobs=ref, kl_coef=self.beta, entropy_coef=entropy_coef, **loss_kwargs,
                )
                loss = out.loss
            else:
                # Two passes: the surrogate and KL with the loss type's weights, the bonus with its own.
                out = fused_linear_policy_loss(
                    hidden, weight, targets, advantages, weights, ref_logprobs=ref, kl_coef=self.beta, **loss_kwargs
                )
                bonus = fused_linear_policy_loss(
                    hidden, weight, targets, torch.zeros_like(advantages), entropy_weights,
                    entropy_coef=entropy_coef, **loss_kwargs,
                )
                loss = out.loss + bonus.loss
        self._log_loss_metrics(loss, out, raw_advantages, old, ref, entropy_weights, entropy_coef, mask, selected)
        return loss

    @torch.no_grad()
    def _log_loss_metrics(self, loss, out, advantages, old, ref, entropy_weights, entropy_coef, mask, selected):
        """The metrics TRL's `_compute_loss` logs, from the kernel's per-token outputs."""
        mode = "train" if self.model.training else "eval"
        logprobs, entropy = out.logprobs, out.entropy

        def global_masked_mean(values):
            totals = self.accelerator.reduce(torch.stack([values.sum(), mask.sum().float()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def per_sequence(values):
            full = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(selected, values)
            return self.accelerator.gather(full.sum(-1) / mask.sum(-1))

        if self._entropy_bonus_enabled:
            policy_loss = loss + entropy_coef * (entropy_weights * entropy).sum()
            if mode == "train" and self.loss_type != "dapo":
                policy_loss = policy_loss * self.current_gradient_accumulation_steps
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        ratio = torch.ones_like(logprobs) if old is None else torch.exp(logprobs - old)
        if ref is not None:
            d = ref - logprobs
            kl = torch.exp(d) - d - 1
            self._metrics[mode]["kl"].append(global_masked_mean(kl * ratio if self.args.use_bias_correction_kl else kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropy))
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(per_sequence(low)).item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(per_sequence(high)).item())
