"""verl's FSDP actor with its PPO loss computed by `siri.kernels.fused_linear_policy_loss`.

verl 0.9 trains the actor through an engine (`FSDPEngineWithLMHead`): its `forward_step`
runs the model to full [tokens, V] logits, turns them into log-probs and entropy, and hands
those to the loss function (`verl.workers.utils.losses.ppo_loss`). A loss registered with
verl's `register_policy_loss` only ever sees those log-probs, so it cannot fuse anything;
the fused place is the engine's forward step. `SiriFSDPEngineWithLMHead` replaces it for
training steps whose loss is verl's `ppo_loss`: the model body runs once, and the hidden
states of the scored response tokens go through the LM head and the loss in one fused pass
inside the model's forward (so FSDP's hooks see every parameter use), never building the
logits. Forward-only passes (old and reference log-probs) stay verl's.

The loss is verl's, term by term: `loss_agg_mode` becomes per-token weights exactly as
verl's `agg_loss` defines them (`verl_loss_weights`), `clip_ratio_c` the dual clip,
`rollout_is_weights` a non-negative scale of the advantages (the clipped surrogate is
homogeneous in A), `entropy_coeff` and `kl_loss_coef` the kernel's coefficients with the
same weights. What it cannot reproduce is refused with an error naming the setting
(`unsupported_settings`).
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext

import torch
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.dataset_utils import DatasetPadMode
from verl.utils.device import get_device_id, get_device_name
from verl.utils.metric import AggregationType, Metric
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.utils.losses import ppo_loss

from siri.kernels import fused_linear_policy_loss

__all__ = ["SiriFSDPEngineWithLMHead", "register_engine", "siri_ppo_loss", "unsupported_settings",
           "verl_loss_weights"]

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's kl_loss_type names and the kernel's estimator of each: verl's "k3" is its low_var_kl,
# k3 clamped to [-10, 10].
KL_ESTIMATORS = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl", "k3": "low_var_kl"}
# verl adds this to a sequence's token count in "seq-mean-token-mean".
SEQ_TOKEN_MEAN_EPS = 1e-8


def verl_loss_weights(
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    dp_size: int = 1,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
    loss_scale_factor: int | None = None,
) -> torch.Tensor:
    """[B, R] float32 weights w such that verl 0.9's `agg_loss(loss_mat, mask, mode, ...)` is sum(w * loss_mat).

    As verl defines the modes, with n the tokens of the global batch (`batch_num_tokens`)
    and G its sequences (`global_batch_size`), each defaulting to this micro-batch's:
    token-mean: dp / n; token-sum: dp; seq-mean-token-sum: dp / G; seq-mean-token-mean:
    dp / (G * (L_b + 1e-8)); seq-mean-token-sum-norm: dp / (G * L_norm), L_norm being
    `loss_scale_factor` or the padded response length. Fully masked sequences weigh 0.
    """
    mask = response_mask.to(torch.float32)
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {list(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("loss_agg_mode 'token-mean' with dp_size > 1 needs batch_num_tokens (of the global batch)")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError(f"loss_agg_mode {loss_agg_mode!r} with dp_size > 1 needs global_batch_size")
    if loss_agg_mode == "token-mean":
        tokens = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return mask * dp_size / tokens
    if loss_agg_mode == "token-sum":
        return mask * dp_size
    lengths = mask.sum(-1, keepdim=True)
    has_tokens = (lengths > 0).to(torch.float32)
    sequences = has_tokens.sum() if global_batch_size is None else global_batch_size
    if loss_agg_mode == "seq-mean-token-mean":
        return mask / (lengths + SEQ_TOKEN_MEAN_EPS) * has_tokens * dp_size / sequences
    weights = mask * has_tokens * dp_size / sequences
    if loss_agg_mode == "seq-mean-token-sum-norm":
        weights = weights / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return weights


def unsupported_settings(config) -> list[str]:
    """The settings of a verl `ActorConfig` this loss cannot reproduce, each with the reason."""
    problems = []
    loss_mode = config.policy_loss.get("loss_mode", "vanilla")
    if loss_mode != "vanilla":
        problems.append(f"policy_loss.loss_mode={loss_mode!r}: only verl's 'vanilla' clipped surrogate is fused")
    if config.loss_agg_mode not in LOSS_AGG_MODES:
        problems.append(f"loss_agg_mode={config.loss_agg_mode!r}: not a verl 0.9 mode")
    if config.use_kl_loss and config.kl_loss_type not in KL_ESTIMATORS:
        reason = "the kernel's estimators are k1, k2 and low_var_kl (verl's k3), without straight-through variants"
        problems.append(f"kl_loss_type={config.kl_loss_type!r}: {reason}")
    low = config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low
    if not 0 <= low < 1:
        problems.append(f"clip_ratio_low={low!r}: must be in [0, 1)")
    if config.get("clip_ratio_c", 3.0) <= 1:
        problems.append(f"clip_ratio_c={config.clip_ratio_c!r}: must be > 1")
    return problems


def check_config(config) -> None:
    problems = unsupported_settings(config)
    if problems:
        raise ValueError("siri's fused PPO loss cannot reproduce these verl settings: " + "; ".join(problems))


def siri_ppo_loss(config, hidden, weight, bias, targets, selected, data, *, temperature=1.0, with_entropy=False,
                  global_batch_info=None, backend="auto", chunk_size=None):
    """verl's `ppo_loss` of the selected response tokens, from hidden states and the LM head.

    hidden: [N, H], the body's output at the positions that predict `targets` [N], the
    response tokens where `selected` ([B, R] bool, the response mask) is true. `data`
    holds verl's padded [B, R] fields: old_log_probs, advantages, and where present
    rollout_is_weights and ref_log_prob. `global_batch_info`: verl's dp_size,
    batch_num_tokens, global_batch_size. Returns (loss, metrics) as verl's `ppo_loss`.
    """
    check_config(config)
    info = dict(global_batch_info or {})
    info.pop("loss_scale_factor", None)
    weights = verl_loss_weights(selected, config.loss_agg_mode, loss_scale_factor=config.loss_scale_factor, **info)
    weights = weights[selected]

    def rows(name):
        return None if data.get(name) is None else data[name].to(torch.float32)[selected]

    advantages, old = rows("advantages"), rows("old_log_probs")
    scaled_advantages = advantages
    if data.get("rollout_is_weights") is not None:
        scaled_advantages = advantages * rows("rollout_is_weights")
    ref = rows("ref_log_prob") if config.use_kl_loss else None
    low = config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low
    high = config.clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high
    kl_coef = config.kl_loss_coef if config.use_kl_loss else 0.0
    entropy_coef = config.entropy_coeff if with_entropy else 0.0
    out = fused_linear_policy_loss(
        hidden, weight, targets, scaled_advantages, weights, bias=bias, old_logprobs=old, ref_logprobs=ref,
        temperature=temperature, clip_low=low, clip_high=high, dual_clip=config.get("clip_ratio_c", 3.0),
        kl_coef=kl_coef, kl_estimator=KL_ESTIMATORS.get(config.kl_loss_type, "k1"), entropy_coef=entropy_coef,
        backend=backend, chunk_size=chunk_size,
    )
    return out.loss, _metrics(config, out, weights, advantages, old, low, high, kl_coef, entropy_coef, info)


@torch.no_grad()
def _metrics(config, out, weights, advantages, old, low, high, kl_coef, entropy_coef, info):
    """The metrics verl's `ppo_loss` reports, from the kernel's per-token outputs."""
    summed = (info.get("dp_size", 1) > 1 or info.get("batch_num_tokens") is not None
              or info.get("global_batch_size") is not None or config.loss_scale_factor is not None)
    aggregation = AggregationType.SUM if summed else AggregationType.MEAN
    total = weights.sum()
    kl_loss, entropy_loss = out.metrics["kl"] * total, out.metrics["entropy"] * total
    log_ratio = (out.logprobs - old).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    surrogate = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - low, 1 + high)
    dual = -advantages * config.get("clip_ratio_c", 3.0)
    lower = (torch.maximum(surrogate, clipped) > dual) & (advantages < 0)

    def token_mean(values):
        return Metric(value=values.float().mean().item(), aggregation=AggregationType.MEAN)

    metrics = {
        "actor/pg_clipfrac": token_mean(clipped > surrogate),
        "actor/ppo_kl": token_mean(-log_ratio),
        "actor/pg_clipfrac_lower": token_mean(lower),
        "actor/pg_loss": Metric(value=out.loss - kl_coef * kl_loss + entropy_coef * entropy_loss,
                                aggregation=aggregation),
    }
    if entropy_coef != 0.0:
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=aggregation)
    if config.use_kl_loss:
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return metrics


def _call_as_forward(module, function):
    """function(module), run as `module`'s forward.

    FSDP gathers a wrapped module's parameters only around its own forward (verl wraps the
    LM head as its own unit), and hooks the backward there to reduce their gradients.
    """
    module.forward = lambda: function(module)
    try:
        return module()
    finally:
        del module.forward


def _install_fused_forward(module) -> None:
    """`module(..., siri_loss=f)` runs the body and returns f(hidden [1, T, H], lm_head) under the head's forward."""
    previous_forward = module.forward

    @functools.wraps(type(module).forward)
    def forward(self, *args, siri_loss=None, **kwargs):
        if siri_loss is None:
            return previous_forward(*args, **kwargs)
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return _call_as_forward(self.get_output_embeddings(), functools.partial(siri_loss, hidden))

    module.forward = types.MethodType(forward, module)


def _ppo_loss_config(loss_function):
    """The ActorConfig of `functools.partial(ppo_loss, config=...)`, the loss verl's actor worker builds."""
    if isinstance(loss_function, functools.partial) and loss_function.func is ppo_loss:
        return loss_function.keywords.get("config")
    return None


def _response_positions(micro_batch, selected):
    """[N] indices into the packed tokens of the positions that predict each selected response token."""
    prompts, responses = micro_batch["prompts"], micro_batch["responses"]
    if prompts.is_nested:
        prompt_lens, response_lens = prompts.offsets().diff(), responses.offsets().diff()
    else:
        attention_mask = micro_batch["attention_mask"]
        prompt_lens = attention_mask[:, : prompts.shape[1]].sum(dim=1)
        response_lens = attention_mask[:, prompts.shape[1]:].sum(dim=1)
    ends = (prompt_lens + response_lens).cumsum(0)
    # verl's layout: response token j of sequence b is predicted at ends[b] - response_lens[b] - 1 + j.
    starts = ends - response_lens - 1
    offsets = torch.arange(selected.shape[1], device=selected.device)
    positions = starts.to(selected.device).unsqueeze(1) + offsets
    return positions[selected]


class SiriFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl's FSDP language-model engine whose PPO training steps take siri's fused path.

    A training micro-batch whose loss function is verl's `ppo_loss` (what the actor
    worker sets) runs through `siri_ppo_loss`; anything else (forward-only log-prob
    passes, other losses) is verl's own `forward_step`. Needs `use_remove_padding=True`
    and no Ulysses sequence parallelism.
    """

    siri_backend = "auto"
    siri_chunk_size = None

    def _build_module(self):
        module = super()._build_module()
        _install_fused_forward(module)
        return module

    def forward_step(self, micro_batch, loss_function, forward_only):
        config = _ppo_loss_config(loss_function)
        if forward_only or config is None:
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        check_config(config)
        self._check_micro_batch(micro_batch)
        micro_batch = micro_batch.to(get_device_id())
        model_inputs, output_args = self.prepare_model_inputs(micro_batch=micro_batch)
        fields = ["response_mask", "old_log_probs", "advantages"]
        fields += [name for name in ("rollout_is_weights", "ref_log_prob") if name in micro_batch]
        data = micro_batch.select(*fields).to_padded_tensor()
        selected = data["response_mask"].to(torch.bool)
        positions = _response_positions(micro_batch, selected)
        targets = output_args["input_ids_rmpad_rolled"][positions]
        global_batch_info = {key: micro_batch[key] for key in ("dp_size", "batch_num_tokens", "global_batch_size")}
        with_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        temperature = float(micro_batch["temperature"])

        def loss_of_hidden(hidden, lm_head):
            weight, bias = lm_head.weight, lm_head.bias
            rows = hidden[0, positions].to(weight.dtype)
            with torch.autocast(rows.device.type, enabled=False):
                return siri_ppo_loss(
                    config, rows, weight, bias, targets, selected, data, temperature=temperature,
                    with_entropy=with_entropy, global_batch_info=global_batch_info, backend=self.siri_backend,
                    chunk_size=self.siri_chunk_size,
                )

        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast = (nullcontext() if autocast_dtype == torch.float32
                    else torch.autocast(device_type=get_device_name(), dtype=autocast_dtype))
        with autocast:
            loss, metrics = self.module(**model_inputs, use_cache=False, siri_loss=loss_of_hidden)
        return loss, {"model_output": {}, "loss": loss.detach().item(), "metrics": metrics}

    def _check_micro_batch(self, micro_batch) -> None:
        if self.use_ulysses_sp:
            raise ValueError("SiriFSDPEngineWithLMHead does not support ulysses_sequence_parallel_size > 1")
        if not tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            raise ValueError("SiriFSDPEngineWithLMHead needs use_remove_padding=True")
        if tu.get_non_tensor_data(data=micro_batch, key="pad_mode", default=DatasetPadMode.NO_PADDING) != (
            DatasetPadMode.NO_PADDING
        ):
            raise ValueError("SiriFSDPEngineWithLMHead needs pad_mode NO_PADDING")
        if micro_batch.get("multi_modal_inputs", None) is not None:
            raise ValueError("SiriFSDPEngineWithLMHead scores text only; the batch carries multi_modal_inputs")
        if isinstance(micro_batch["temperature"], torch.Tensor) and micro_batch["temperature"].numel() > 1:
            raise ValueError("SiriFSDPEngineWithLMHead needs one temperature for the micro-batch")


def register_engine(devices=("cuda", "npu")) -> None:
    """Make verl build `SiriFSDPEngineWithLMHead` for language models under fsdp and fsdp2.

    Call it in every process that builds an engine before verl does, e.g. as Ray's
    `runtime_env={"worker_process_setup_hook": "siri.integrations.verl.register_engine"}`.
    """
    engines = EngineRegistry._engines.setdefault("language_model", {})
    for backend in ("fsdp", "fsdp2"):
        for device in devices:
            engines.setdefault(backend, {})[device] = SiriFSDPEngineWithLMHead
