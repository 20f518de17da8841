"""The SIRI training loop: interleaved length budgets around a GRPO update.

One step:
1. the schedule gives the step's length budget (and whether it compresses or expands);
2. the rollout engine samples `rollout.n` responses for each of the step's prompts, cut at
   the budget;
3. rewards (by default the paper's length-capping reward) and group-relative advantages;
4. `algorithm.mini_batches` optimizer steps, each over whole groups, packed into varlen
   micro-batches whose loss weights sum to the mini-batch loss, through the fused kernels;
5. metrics, and a checkpoint every `checkpoint.every` steps and at the end of every
   compression ("low") and expansion ("high") half.

Runs on one CPU or GPU, or on several GPUs (or CPU processes) under torchrun, the policy
sharded with FSDP2 and each rank generating for its share of the prompts.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from siri import distributed
from siri.advantages import compute_advantages, dynamic_sampling_mask
from siri.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from siri.config import TrainConfig, to_dict
from siri.data import DataCursor, PromptDataset
from siri.evaluate import load_model
from siri.model_forward import enable_activation_checkpointing, packed_logprobs, packed_policy_loss
from siri.packing import Sample, pack, unpack
from siri.precision import TORCH_DTYPES, compute_context, parameter_dtype
from siri.rewards import length_capped_reward, load_reward_fn, score_batch
from siri.rollout import SamplingSettings, make_engine
from siri.schedule import make_schedule
from siri.tracking import Tracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked for but no CUDA device is available")
    return torch.device(name)


def build_schedule(cfg: TrainConfig):
    s = cfg.schedule
    if s.kind == "constant":
        return make_schedule("constant", length=s.length if s.length is not None else s.l_max, round_to=s.round_to)
    if s.kind == "staged":
        if not s.stages:
            raise ValueError("schedule.stages must list [step, length] pairs for kind 'staged'")
        return make_schedule("staged", stages=[tuple(stage) for stage in s.stages], round_to=s.round_to)
    return make_schedule(s.kind, l_max=s.l_max, l_min=s.l_min, period=s.period, round_to=s.round_to)


def load_policy(cfg: TrainConfig, device: torch.device):
    """(model, tokenizer) from `model.path`, a local Hugging Face model directory; the
    parameters in `model.param_dtype`."""
    if not cfg.model.path:
        raise ValueError("model.path must name a local Hugging Face model directory")
    model, tokenizer = load_model(cfg.model.path, device, cfg.model.param_dtype,
                                  attn_implementation=cfg.model.attn_implementation)
    return model, tokenizer


def lr_lambda(warmup_steps: int):
    """Linear warm-up to the base rate over `warmup_steps` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class StepResult:
    step: int
    metrics: dict


class Trainer:
    """Runs `cfg.total_steps` SIRI steps; `model` and `tokenizer` may be given directly
    (tests, the demo), otherwise they are loaded from `cfg.model.path`."""

    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, train_problems=None, resume: bool = True):
        self.cfg = cfg
        self.dist = distributed.setup(cfg.device)
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)
        seed_everything(cfg.seed + self.dist.rank)
        if model is None:
            model, tokenizer = load_policy(cfg, self.device)
        if tokenizer is None:
            raise ValueError("tokenizer must be given along with model")
        self.tokenizer = tokenizer
        self.model = model.to(self.device)
        # A given model keeps its own dtype; autocast engages when it differs from model.dtype.
        self.compute = compute_context(self.device, TORCH_DTYPES[cfg.model.dtype], parameter_dtype(self.model))
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.ref_model = distributed.frozen_copy(self.model) if cfg.algorithm.kl_coef != 0 else None
        self.model = distributed.shard(self.model, self.dist)
        if self.ref_model is not None:
            self.ref_model = distributed.shard(self.ref_model, self.dist)

        self.schedule = build_schedule(cfg)
        if train_problems is None:
            train_problems = PromptDataset(cfg.data.train_files, tokenizer, cfg.data)
        self.dataset = train_problems
        if len(self.dataset) == 0:
            raise ValueError("data.train_files hold no usable problem")
        self.cursor = DataCursor(len(self.dataset), seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.reward_fn = load_reward_fn(cfg.reward.fn, overlong_buffer=cfg.reward.overlong_buffer)
        max_prompt = max(len(self.dataset[i].prompt_ids) for i in range(len(self.dataset)))
        self.engine = make_engine(
            cfg.rollout, model=self.model, tokenizer=tokenizer, model_path=cfg.model.path,
            max_budget=max_prompt + self.schedule.max_budget(), dtype=cfg.model.dtype, seed=cfg.seed,
        )
        betas = tuple(cfg.optim.betas)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=betas,
                                           weight_decay=cfg.optim.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim.warmup_steps))
        self.start_step = 0
        if resume:
            found = latest_checkpoint(cfg.output_dir)
            if found is not None:
                self._restore(found)
        self.tracker = Tracker(cfg.output_dir, cfg.logging, to_dict(cfg), cfg.total_steps,
                               start_step=self.start_step, is_main=self.dist.is_main)

    # -- checkpoints -------------------------------------------------------------------

    def _trainer_state(self, step: int) -> dict:
        return {"step": step, "schedule": self.schedule.state_dict(), "cursor": self.cursor.state_dict(),
                "config": to_dict(self.cfg)}

    def _restore(self, path: str) -> None:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                lr_scheduler=self.lr_scheduler, rank=self.dist.rank)
        self.schedule.load_state_dict(state["schedule"])
        self.cursor.load_state_dict(state["cursor"])
        self.start_step = state["step"] + 1  # train_step syncs the restored weights into the engine

    def save(self, step: int, tag: str | None) -> str | None:
        return save_checkpoint(
            self.cfg.output_dir, step, model=self.model, tokenizer=self.tokenizer,
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, trainer_state=self._trainer_state(step),
            tag=tag, keep_last=self.cfg.checkpoint.keep_last,
            model_state_dict=distributed.full_state_dict(self.model, self.dist),
            is_main=self.dist.is_main, rank=self.dist.rank,
        )

    # -- one step ----------------------------------------------------------------------

    def _prompts_of_step(self) -> tuple[list, list[int]]:
        """This rank's share of the step's prompts, and their group ids.

        Every rank draws the same global list. A group is one draw, identified by its
        position in the step: the same problem drawn twice (across an epoch boundary) makes
        two groups, not one merged group.
        """
        indices = self.cursor.next_indices(self.cfg.prompts_per_step)
        positions = list(range(self.dist.rank, len(indices), self.dist.world_size))
        return [self.dataset[indices[p]] for p in positions], positions

    def _rollouts(self, problems, budget: int, step: int):
        settings = SamplingSettings.from_config(self.cfg.rollout, budget,
                                                seed=self.cfg.seed * 1_000_003 + step * 1009 + self.dist.rank)
        self.engine.wake_up()
        try:
            with self.compute():  # HFEngine samples with the training model
                rollouts = self.engine.generate([p.prompt_ids for p in problems], settings)
        finally:
            self.engine.sleep()
        return rollouts

    def _score(self, problems, rollouts, budget: int):
        texts = self.tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
        golds = [problems[r.prompt_index].answer for r in rollouts]
        truncated = [r.truncated for r in rollouts]
        lengths = [len(r.response_ids) for r in rollouts]
        rewards = score_batch(self.reward_fn, texts, golds, truncated=truncated, response_lens=lengths, budget=budget)
        if self.reward_fn is length_capped_reward:
            accuracy = rewards
        else:  # accuracy is always the paper's: a correct answer within the budget
            accuracy = score_batch(length_capped_reward, texts, golds, truncated=truncated, response_lens=lengths,
                                   budget=budget)
        return torch.tensor(rewards, dtype=torch.float32), torch.tensor(accuracy, dtype=torch.float32)

    def _samples(self, group_ids, rollouts, advantages, keep) -> list[Sample]:
        samples = []
        for rollout, group_id, advantage, kept in zip(rollouts, group_ids, advantages.tolist(), keep.tolist()):
            if not kept:
                continue
            samples.append(Sample(
                prompt_ids=rollout.prompt_ids, response_ids=rollout.response_ids, advantage=advantage,
                rollout_logprobs=rollout.logprobs if self.cfg.algorithm.tis_cap is not None else None,
                truncated=rollout.truncated, group_id=group_id,
            ))
        return samples

    def _pack(self, samples):
        a = self.cfg.algorithm
        return pack(samples, a.max_tokens_per_micro_batch, a.loss_agg,
                    loss_norm_length=a.loss_norm_length if a.loss_agg == "seq-mean-token-sum-norm" else None,
                    mask_truncated=self.cfg.reward.mask_truncated)

    @torch.no_grad()
    def _score_logprobs(self, model, samples) -> list[list[float]]:
        """Per-sample log-probs of the responses under `model`, by a no-grad packed pass."""
        batches = self._pack(samples)
        padded = distributed.pad_micro_batches(batches, samples, self.dist)  # the padding is dropped below
        values = []
        for batch in padded:
            with self.compute():
                values.append(packed_logprobs(model, batch.to(self.device), temperature=self.cfg.rollout.temperature,
                                              backend=self.cfg.algorithm.kernel_backend,
                                              fused_linear=self.cfg.algorithm.fused_linear).cpu())
        return [t.tolist() for t in unpack(values[:len(batches)], batches)]

    def _with_logprobs(self, samples, old, ref) -> list[Sample]:
        for i, sample in enumerate(samples):
            if old is not None:
                sample.old_logprobs = old[i]
            if ref is not None:
                sample.ref_logprobs = ref[i]
        return samples

    def _mini_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        """Split the samples into `algorithm.mini_batches` parts of whole groups, in order."""
        count = self.cfg.algorithm.mini_batches
        groups = list(dict.fromkeys(s.group_id for s in samples))
        per_part = math.ceil(len(groups) / count) if groups else 0
        parts = []
        for k in range(count):
            chosen = set(groups[k * per_part:(k + 1) * per_part])
            parts.append([s for s in samples if s.group_id in chosen])
        # Under FSDP every rank takes every optimizer step, even with nothing of its own.
        return parts if self.dist.enabled else [p for p in parts if p]

    def _update(self, samples: list[Sample]) -> dict:
        """One optimizer step per mini-batch; returns the step's loss metrics.

        Metrics stay on the device until the end of the step (one transfer), each a mean
        over the mini-batches, the per-token ones weighted by the loss weights.
        """
        a = self.cfg.algorithm
        parts = self._mini_batches(samples)
        totals: dict[str, torch.Tensor] = {}
        grad_norms = []

        def add(name, value):
            totals[name] = totals.get(name, 0.0) + value.detach()

        self.model.train()
        steps = 0
        for part in parts:
            local, total = distributed.global_normaliser(part, a.loss_agg, self.cfg.reward.mask_truncated, self.dist)
            if total == 0:
                # Nothing scored on any rank (every sample masked or empty). AdamW on zero
                # gradients would still move the weights (momentum, weight decay), so every
                # rank skips this optimizer step together.
                continue
            batches = distributed.globalise_weights(self._pack(part), part, local, total, self.dist)
            for batch in batches:
                batch = batch.to(self.device)
                with self.compute():
                    out = packed_policy_loss(
                        self.model, batch, fused_linear=a.fused_linear,
                        temperature=self.cfg.rollout.temperature, clip_low=a.clip_low, clip_high=a.clip_high,
                        dual_clip=a.dual_clip, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                        entropy_coef=a.entropy_coef, tis_cap=a.tis_cap, backend=a.kernel_backend,
                    )
                (out.loss * distributed.loss_scale(self.dist)).backward()
                weight = batch.weights.sum()
                add("loss", out.loss)
                add("weight", weight)
                for name, value in out.metrics.items():
                    add(name, value * weight)
            grad_norms.append(distributed.clip_grad_norm(self.model, self.cfg.optim.grad_clip))
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            steps += 1
        # Weights are globally normalised, so sums over ranks are the mini-batch figures.
        names = list(totals)  # one device-to-host transfer for all of them
        host = torch.stack([totals[n].double() for n in names]).tolist() if names else []
        values = distributed.sum_metrics(dict(zip(names, host)), self.dist)
        weight = values.pop("weight", 0.0)
        metrics = {name: value / weight if weight > 0 else 0.0 for name, value in values.items() if name != "loss"}
        metrics["loss"] = values.get("loss", 0.0) / max(steps, 1)
        metrics["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
        return metrics

    def train_step(self, step: int) -> StepResult:
        cfg = self.cfg
        budget, phase = self.schedule(step), self.schedule.phase(step)
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step's updates use
        started = time.perf_counter()
        problems, draws = self._prompts_of_step()
        self.engine.sync_weights(self.model)
        rollouts = self._rollouts(problems, budget, step)
        rollout_s = time.perf_counter() - started

        rewards, accuracy = self._score(problems, rollouts, budget)
        group_ids = [draws[r.prompt_index] for r in rollouts]
        advantages = compute_advantages(rewards, group_ids, cfg.algorithm.advantage)
        if cfg.algorithm.dynamic_sampling:
            keep = dynamic_sampling_mask(rewards, group_ids)
        else:
            keep = torch.ones_like(rewards, dtype=torch.bool)
        samples = self._samples(group_ids, rollouts, advantages, keep)

        update_started = time.perf_counter()
        active = bool(samples) or self.dist.enabled  # ranks stay in step for FSDP's collectives
        old = self._score_logprobs(self.model, samples) if cfg.algorithm.mini_batches > 1 and active else None
        ref = self._score_logprobs(self.ref_model, samples) if self.ref_model is not None and active else None
        samples = self._with_logprobs(samples, old, ref)
        update = self._update(samples) if active else {}
        update_s = time.perf_counter() - update_started

        lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float32)
        tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
        local = {
            "response_len_sum": float(lengths.sum()), "response_len_max": float(lengths.max()) if len(lengths) else 0.0,
            "truncated": float(sum(r.truncated for r in rollouts)), "accuracy": float(accuracy.sum()),
            "reward": float(rewards.sum()), "responses": float(len(rollouts)), "kept": float(keep.sum()),
            "tokens": float(tokens),
        }
        total = distributed.sum_metrics(local, self.dist)
        elapsed = time.perf_counter() - started
        responses = max(total["responses"], 1.0)
        metrics = {
            "budget": budget, "phase": phase, "lr": lr,
            "response_len_mean": total["response_len_sum"] / responses,
            "response_len_max": distributed.max_value(local["response_len_max"], self.dist),
            "truncation_rate": total["truncated"] / responses, "accuracy": total["accuracy"] / responses,
            "reward": total["reward"] / responses, "kept_frac": total["kept"] / responses,
            "tokens_per_s": total["tokens"] / max(elapsed, 1e-9), "rollout_s": rollout_s, "update_s": update_s,
            **update,
        }
        return StepResult(step, metrics)

    def fit(self) -> list[StepResult]:
        """Train from the start (or the resumed) step to `total_steps`; returns each step's result."""
        results = []
        try:
            for step in range(self.start_step, self.cfg.total_steps):
                result = self.train_step(step)
                self.tracker.log(step, result.metrics)
                results.append(result)
                tag = self.schedule.checkpoint_tag(step)
                last = step == self.cfg.total_steps - 1
                if tag is not None or last or (step + 1) % self.cfg.checkpoint.every == 0:
                    self.save(step, tag if tag is not None else ("final" if last else None))
        finally:
            self.tracker.close()
        return results

    def close(self) -> None:
        self.engine.close()
        distributed.teardown(self.dist)


def train(cfg: TrainConfig, **kwargs) -> list[StepResult]:
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()

