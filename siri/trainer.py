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

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from siri import distributed
from siri.advantages import compute_advantages, dynamic_sampling_mask
from siri.attention import use_packed_attention
from siri.checkpoint import (
    CHECKPOINTS_DIR,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resume_point,
    save_checkpoint,
    set_aside,
)
from siri.config import TrainConfig, build_schedule, check_micro_batch_fits, loss_config, resume_changes, to_dict
from siri.data import DataCursor, PromptDataset
from siri.errors import UserError
from siri.model_forward import enable_activation_checkpointing, packed_logprobs, packed_policy_loss
from siri.models import check_model_dir, load_model, load_tokenizer, resolve_device
from siri.packing import Sample, pack, unpack
from siri.precision import TORCH_DTYPES, compute_context, parameter_dtype
from siri.rewards import load_reward_fn, score_rollouts
from siri.rollout import SamplingSettings, make_engine
from siri.tracking import Tracker

logger = logging.getLogger(__name__)


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
        # Everything the config and the output directory can get wrong is found before the
        # model loads: the schedule, the loss settings, the reward, what to resume, the data.
        self.schedule = build_schedule(cfg)
        self.loss_settings = dataclasses.asdict(loss_config(cfg))  # policy_loss's keywords
        answer_rule = {"think_end": cfg.reward.think_end, "timeout_s": cfg.reward.timeout_s}
        try:
            self.reward_fn = load_reward_fn(cfg.reward.fn, overlong_buffer=cfg.reward.overlong_buffer, **answer_rule)
        except ValueError as error:
            raise UserError(f"reward.fn: {error}") from error
        # Accuracy is always the paper's: a correct answer within the budget.
        self.reward_is_accuracy = cfg.reward.fn == "length_capped" and cfg.reward.overlong_buffer is None
        self.accuracy_fn = self.reward_fn if self.reward_is_accuracy else load_reward_fn("length_capped", **answer_rule)
        resume_from = self._resume_point(resume)
        if model is None:
            check_model_dir("model.path", cfg.model.path)
            tokenizer = load_tokenizer(cfg.model.path)
        elif tokenizer is None:
            raise ValueError("tokenizer must be given along with model")
        if train_problems is None:
            if not cfg.data.train_files:
                raise UserError("data.train_files: give at least one .jsonl or .parquet file")
            train_problems = PromptDataset(cfg.data.train_files, tokenizer, cfg.data)
        self.dataset = train_problems
        if len(self.dataset) == 0:
            raise UserError("data.train_files hold no usable problem")
        max_prompt = max(len(self.dataset[i].prompt_ids) for i in range(len(self.dataset)))
        check_micro_batch_fits(cfg, max_prompt + self.schedule.max_budget(), f"the longest prompt, {max_prompt}")
        if model is None:
            model, _ = load_model(cfg.model.path, self.device, cfg.model.param_dtype,
                                  attn_implementation=cfg.model.attn_implementation, tokenizer=tokenizer)

        self.tokenizer = tokenizer
        self.model = model.to(self.device)
        # A given model too: its packed micro-batches must not get a dense [N, N] mask.
        use_packed_attention(self.model, cfg.model.attn_implementation, self.device)
        # A given model keeps its own dtype; autocast engages when it differs from model.dtype.
        self.compute = compute_context(self.device, TORCH_DTYPES[cfg.model.dtype], parameter_dtype(self.model))
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self.ref_model = distributed.frozen_copy(self.model) if cfg.algorithm.kl_coef != 0 else None
        self.model = distributed.shard(self.model, self.dist)
        if self.ref_model is not None:
            self.ref_model = distributed.shard(self.ref_model, self.dist)

        self.cursor = DataCursor(len(self.dataset), seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.engine = make_engine(
            cfg.rollout, model=self.model, tokenizer=tokenizer, model_path=cfg.model.path,
            max_budget=max_prompt + self.schedule.max_budget(), dtype=cfg.model.dtype, seed=cfg.seed,
        )
        betas = tuple(cfg.optim.betas)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=betas,
                                           weight_decay=cfg.optim.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim.warmup_steps))
        self.start_step = 0
        if resume_from is not None:
            self._restore(resume_from)
        self.tracker = Tracker(cfg.output_dir, cfg.logging, to_dict(cfg), cfg.total_steps,
                               start_step=self.start_step, is_main=self.dist.is_main)

    # -- checkpoints -------------------------------------------------------------------

    def _resume_point(self, resume: bool) -> str | None:
        """The checkpoint to resume from, or None to start at step 0; UserError for a run
        that cannot start here.

        Without `resume`, a directory that holds checkpoints is refused: the new run would
        prune the old run's checkpoints as it saves and interleave its metrics.jsonl rows,
        and the next plain resume would continue from whichever is newest. With `resume`,
        damaged checkpoints newer than the newest intact one are set aside (renamed
        `damaged-...`, never deleted) and named, and a changed config key that cannot apply
        on resume is refused (`siri.config.resume_changes`).
        """
        output_dir = self.cfg.output_dir
        if not resume:
            saved = list_checkpoints(output_dir)
            if saved:
                raise UserError(
                    f"output_dir {output_dir!r} holds the checkpoints of an earlier run (newest: "
                    f"{os.path.basename(saved[-1])}); starting over there would prune them and mix the two runs' "
                    f"metrics. Resume it (leave out --no-resume), choose another output_dir, or move "
                    f"{os.path.join(output_dir, CHECKPOINTS_DIR)!r} away first")
            return None
        path, skipped = resume_point(output_dir, self.dist.rank)
        if path is None and skipped:
            details = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
            raise UserError(f"output_dir {output_dir!r}: no checkpoint can be resumed, every one is damaged "
                            f"({details}). Nothing was changed; repair or move them away to start afresh")
        if path is not None:
            changes = resume_changes(read_trainer_state(path).get("config", {}), self.cfg, path)
            if changes and self.dist.is_main:
                logger.warning("resuming %s with changed settings, in effect from the resumed step on: %s",
                               path, "; ".join(changes))
        for damaged, why in skipped:
            kept_as = set_aside(damaged, is_main=self.dist.is_main)
            if self.dist.is_main:
                logger.warning("checkpoint %s is damaged (%s): skipped it and resume from %s; it is kept, renamed %s",
                               damaged, why, os.path.basename(path), kept_as)
        return path

    def _trainer_state(self, step: int) -> dict:
        return {"step": step, "schedule": self.schedule.state_dict(), "cursor": self.cursor.state_dict(),
                "config": to_dict(self.cfg)}

    def _restore(self, path: str) -> None:
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                lr_scheduler=self.lr_scheduler, rank=self.dist.rank)
        try:
            self.schedule.load_state_dict(state["schedule"])
            self.cursor.load_state_dict(state["cursor"])  # e.g. a data file edited since
        except ValueError as error:
            raise UserError(f"cannot resume {path!r}: {error}") from error
        self._reapply_optimizer_settings()
        self.start_step = state["step"] + 1  # train_step syncs the restored weights into the engine

    def _reapply_optimizer_settings(self) -> None:
        """Write this config's `RESUME_REAPPLIED` values over those the restored optimizer
        and scheduler state carry, so that a changed one takes effect (an unchanged one is
        written back as it was)."""
        optim = self.cfg.optim
        # The scheduler's warm-up function is this config's already (functions are not saved).
        self.lr_scheduler.base_lrs = [optim.lr] * len(self.optimizer.param_groups)
        factor = self.lr_scheduler.lr_lambdas[0](self.lr_scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(lr=optim.lr * factor, initial_lr=optim.lr, betas=tuple(optim.betas),
                         weight_decay=optim.weight_decay)
        self.lr_scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

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
        golds = [p.answer for p in problems]
        rewards = score_rollouts(self.reward_fn, rollouts, golds, self.tokenizer, budget=budget)
        accuracy = (rewards if self.reward_is_accuracy
                    else score_rollouts(self.accuracy_fn, rollouts, golds, self.tokenizer, budget=budget))
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
                values.append(packed_logprobs(
                    model, batch.to(self.device), temperature=self.loss_settings["temperature"],
                    backend=self.cfg.algorithm.kernel_backend, fused_linear=self.cfg.algorithm.fused_linear).cpu())
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

        Metrics and gradient norms stay on the device until the end of the step (one
        device-to-host transfer for all of them), each a mean over the mini-batches, the
        per-token ones weighted by the loss weights.
        """
        a = self.cfg.algorithm
        parts = self._mini_batches(samples)
        totals: dict[str, torch.Tensor] = {}
        grad_norms: list[torch.Tensor] = []

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
                    out = packed_policy_loss(self.model, batch, fused_linear=a.fused_linear,
                                             backend=a.kernel_backend, **self.loss_settings)
                out.loss.backward()
                weight = batch.weights.sum()
                # The weights carry the world size (globalise_weights): the ranks' sum is the loss.
                add("loss", out.loss / self.dist.world_size)
                add("weight", weight)
                for name, value in out.metrics.items():
                    add(name, value * weight)
            grad_norms.append(distributed.clip_grad_norm(self.model, self.cfg.optim.grad_clip))
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            steps += 1
        names = list(totals)
        on_device = [totals[n].double() for n in names] + [norm.double() for norm in grad_norms]
        host = torch.stack(on_device).tolist() if on_device else []  # the step's one transfer
        # Weights are globally normalised, so sums over ranks are the mini-batch figures (the
        # gradient norms are global already).
        values = distributed.sum_metrics(dict(zip(names, host)), self.dist)
        norms = host[len(names):]
        weight = values.pop("weight", 0.0)
        metrics = {name: value / weight if weight > 0 else 0.0 for name, value in values.items() if name != "loss"}
        metrics["loss"] = values.get("loss", 0.0) / max(steps, 1)
        metrics["grad_norm"] = sum(norms) / max(len(norms), 1)
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
