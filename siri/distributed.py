"""Data parallelism for the trainer: torchrun, FSDP2 sharding, and exact loss weights.

Without torchrun (no WORLD_SIZE in the environment) every function here is the identity
of a single process. Under torchrun each rank generates for its share of the prompts,
packs its own samples, and the policy is sharded with FSDP2 (`fully_shard` on every
decoder layer, then the root).

Exactness: `siri.packing` normalises loss weights over the samples it is given. A rank
only has its share, so its weights are rescaled by local/global normaliser (tokens for
token-mean, samples otherwise) times the world size, because FSDP averages the gradients
across ranks: that average is then exactly the single-process mini-batch gradient. The
factor sits in the weights, not on the loss, so the backward's incoming gradient stays
exactly 1 and the fused kernels skip their scaling pass. FSDP's collectives need every
rank to run the same number of micro-batches: ranks with fewer run zero-weight ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from siri.packing import Sample, loss_normaliser, pack


@dataclass
class DistState:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> DistState:
    """Initialise the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistState()
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistState(True, dist.get_rank(), dist.get_world_size(), device)


def teardown(state: DistState) -> None:
    if state.enabled and dist.is_initialized():
        # A rank that tears the group down while another still uses it can abort the
        # process (gloo's threads); leave together.
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a torchrun worker now that its work is saved.

    A gloo process group can leave a native thread joinable at interpreter teardown, which
    aborts the process after the last line of Python ran (seen about once in six two-rank
    CPU runs), and torchrun then reports a finished run as failed. Every file is closed
    and synced by the time this is called, so skipping the teardown loses nothing.
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A gradient-free copy of the policy (the KL reference)."""
    ref = copy.deepcopy(model).eval()
    for parameter in ref.parameters():
        parameter.requires_grad_(False)
    return ref


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP2 shards one by one: the modules whose class transformers lists in
    `_no_split_modules` (Qwen2DecoderLayer, ...), as verl's and accelerate's wrap policies do."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in block_classes]
    if not layers:
        raise ValueError(f"model: {type(model).__name__} names no decoder layer class in _no_split_modules, "
                         "so FSDP2 cannot shard it layer by layer")
    return layers


def shard(model: torch.nn.Module, state: DistState) -> torch.nn.Module:
    """FSDP2: shard every decoder layer, then the rest, across the ranks."""
    if not state.enabled:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state_dict(model: torch.nn.Module, state: DistState) -> dict | None:
    """The whole (unsharded) state dict on CPU for rank 0, None for the others; None
    without distribution (the model's own state dict is used)."""
    if not state.enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if state.is_main else None


def _all_reduce(values: torch.Tensor, state: DistState, op) -> torch.Tensor:
    if state.enabled:
        values = values.to(state.device)
        dist.all_reduce(values, op=op)
    return values.cpu()


def sum_metrics(local: dict[str, float], state: DistState) -> dict[str, float]:
    names = sorted(local)
    totals = _all_reduce(torch.tensor([local[n] for n in names], dtype=torch.float64), state, dist.ReduceOp.SUM)
    return dict(zip(names, totals.tolist()))


def max_value(value: float, state: DistState) -> float:
    return float(_all_reduce(torch.tensor([value], dtype=torch.float64), state, dist.ReduceOp.MAX)[0])


def global_normaliser(samples, loss_agg: str, mask_truncated: bool, state: DistState) -> tuple[int, float]:
    """This rank's loss normaliser of a mini-batch and its sum over all ranks (the same
    number without torchrun)."""
    local = loss_normaliser(samples, loss_agg, mask_truncated)
    if not state.enabled:
        return local, float(local)
    return local, float(_all_reduce(torch.tensor([local], dtype=torch.float64), state, dist.ReduceOp.SUM)[0])


def globalise_weights(batches, samples, local: int, total: float, state: DistState):
    """Rescale one rank's micro-batch weights from its `local` to the `total` normaliser
    (`global_normaliser`) times the world size (FSDP averages the ranks' gradients), then
    pad the list as `pad_micro_batches` does. Each rank's loss is world_size times its share."""
    if not state.enabled:
        return batches
    factor = local / total * state.world_size if total > 0 else 0.0
    return pad_micro_batches([dataclasses.replace(b, weights=b.weights * factor) for b in batches], samples, state)


def pad_micro_batches(batches, samples, state: DistState):
    """Pad with zero-weight micro-batches up to the largest count of any rank: under FSDP
    every rank must run as many forwards (and backwards) as the others."""
    if not state.enabled:
        return batches
    most = int(max_value(len(batches), state))
    padded = list(batches)
    while len(padded) < most:
        padded.append(_zero_weight_batch(padded[-1] if padded else None, samples))
    return padded


def _zero_weight_batch(template, samples):
    """A micro-batch that runs the model (so FSDP's collectives line up) and scores nothing."""
    if template is None:
        token = samples[0].prompt_ids[0] if samples else 0
        # Every log-prob field, so the loss accepts it whatever the options need (tis_cap
        # needs rollout log-probs, kl_coef reference ones); with weight 0 their values never count.
        (template,) = pack([Sample(prompt_ids=[token], response_ids=[token], advantage=0.0, old_logprobs=[0.0],
                                   ref_logprobs=[0.0], rollout_logprobs=[0.0])], max_tokens=2)
    return dataclasses.replace(template, weights=torch.zeros_like(template.weights))


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """The global gradient norm before clipping, as a 0-dim tensor on the device (no host
    transfer); the gradients are scaled down to `max_norm` when it is exceeded, and left as
    they are with `max_norm` None."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if max_norm is None else max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return norm.detach()
