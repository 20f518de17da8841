"""Rollouts from the training model's own `generate` (transformers), on CPU or GPU.

No second copy of the weights and no synchronisation: the engine samples from exactly the
parameters the optimizer just updated. It is the reference engine of the tests and the one
to use without CUDA or for small models; vLLM is much faster for long rollouts.

Sampling. `generate` runs with `do_sample=True` and a single logits processor of ours,
`_TemperedSampler`, which divides the logits by the temperature, records the
log-probabilities, and applies top-k then top-p with transformers' own warpers; the
multinomial draw over the result is transformers'. The order (temperature, top-k, top-p)
is transformers' and vLLM's. Doing the scaling ourselves instead of through
`GenerationConfig(temperature=...)` lets us record the log-probs from the tempered logits
before the top-k/top-p masking, one step at a time: asking `generate` for
`output_logits=True` would keep `[batch·n, V]` floats per generated token, 300 MB per step
for Qwen's 151,936-token vocabulary at 512 sequences, for thousands of steps.

Log-probs. `logprobs[i] = log_softmax(logits / temperature)[response_ids[i]]` over the full
vocabulary, before top-k/top-p: the `logp_t` of docs/design.md, the quantity the trainer
recomputes. vLLM reports, with the `processed_logprobs` mode VLLMEngine selects, the
log-prob after top-k/top-p renormalisation instead; the two agree exactly when top-k and
top-p are off (SIRI's setting), and differ by log(kept probability mass) otherwise.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from siri.rollout.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Rollout,
    RolloutEngine,
    SamplingSettings,
    check_prompts,
    cut_at_eos,
    derive_seed,
)


class _TemperedSampler(LogitsProcessor):
    """Turns raw logits into the sampling distribution and records sampled-token log-probs.

    `generate` calls it once per decoding step with the float32 logits of the last position
    and the sequences so far. The token sampled at step k is only known at step k+1 (it is
    the last column of `input_ids` then), so each call first scores the previous step's
    token against the previous step's tempered logits; `finish` scores the last one.
    """

    def __init__(self, settings: SamplingSettings):
        self.temperature = settings.temperature
        self.warpers = []
        if settings.top_k_enabled:
            self.warpers.append(TopKLogitsWarper(top_k=settings.top_k))
        if settings.top_p_enabled:
            self.warpers.append(TopPLogitsWarper(top_p=settings.top_p))
        self._tempered: torch.Tensor | None = None  # [rows, V] of the previous step
        self._log_normaliser: torch.Tensor | None = None  # [rows]
        self.step_logprobs: list[torch.Tensor] = []  # one [rows] tensor per sampled token

    def _score(self, tokens: torch.Tensor) -> None:
        picked = self._tempered.gather(1, tokens.view(-1, 1).to(self._tempered.device)).squeeze(1)
        self.step_logprobs.append(picked - self._log_normaliser)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._tempered is not None:
            self._score(input_ids[:, -1])
        tempered = scores.float() / self.temperature
        self._tempered = tempered
        self._log_normaliser = torch.logsumexp(tempered, dim=-1)
        # The warpers mask by masked_fill, out of place; and a sampled token is never a
        # masked one, so even an in-place mask would leave the values we gather intact.
        for warper in self.warpers:
            tempered = warper(input_ids, tempered)
        return tempered

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """`[rows, L]` log-probs of the `L` generated tokens of each row."""
        rows, length = generated.shape
        if length > len(self.step_logprobs):
            self._score(generated[:, -1])
        if len(self.step_logprobs) != length:
            raise RuntimeError(
                f"recorded {len(self.step_logprobs)} sampling steps for {length} generated tokens: the logits "
                "processor was not called once per token"
            )
        if length == 0:
            return torch.empty(rows, 0)
        return torch.stack(self.step_logprobs, dim=1).float().cpu()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that has `generate`: through DistributedDataParallel and torch.compile."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and not hasattr(model, "generate"):
            model = model._orig_mod
        else:
            return model


def _is_sharded(model: torch.nn.Module) -> bool:
    """True when parameters are DTensor shards (FSDP2's fully_shard) across ranks."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _device_of(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed the RNG that `generate`'s multinomial draws from, restoring the caller's after.

    transformers samples with torch's default generator of the logits' device; forking it
    keeps the trainer's own random stream (dropout, data order) untouched by rollouts.
    """
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _generation_mode(model: torch.nn.Module, generation_config: GenerationConfig):
    """Eval mode (no dropout) and our generation config in place of the model's, restored after.

    transformers >= 5 fills every field a passed GenerationConfig leaves unset from
    `model.generation_config`: a checkpoint's `generation_config.json` (Qwen2.5-Instruct
    ships top_p 0.8, top_k 20, repetition_penalty 1.05) would silently change the sampling
    distribution the RL loss assumes. With ours installed there is nothing to inherit.
    """
    was_training = model.training
    saved = getattr(model, "generation_config", None)
    model.eval()
    model.generation_config = generation_config
    try:
        yield
    finally:
        model.generation_config = saved
        model.train(was_training)


class HFEngine(RolloutEngine):
    """Samples with `model.generate`, the training model itself.

    `generation_batch_size` prompts are decoded together (each expanded to `n` rows), left
    padded with the tokenizer's pad token, or the first EOS id when it has none (the pad
    value never matters: the attention mask hides it and rows are cut at their first EOS).

    Reproducibility: with the same seed, weights, prompts, `generation_batch_size`, device,
    dtype and library versions, `generate` returns the same rollouts. A batch's random
    stream is seeded from (seed, batch index), so changing the batch size changes the
    samples; GPU kernels may add run-to-run float noise that can flip a near-tie draw.

    Under FSDP2 (parameters sharded across ranks) every forward is a collective: all ranks
    run `generate` in lock-step (`synced_gpus`) and as many times, padding with a dummy
    batch where a rank has fewer prompts.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, generation_batch_size: int, eos_token_ids: list[int]):
        if generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1, got {generation_batch_size!r}")
        if not eos_token_ids:
            raise ValueError("eos_token_ids must hold at least one token id")
        self.model = model
        self.generation_batch_size = int(generation_batch_size)
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]

    # -- RolloutEngine -----------------------------------------------------------------

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        check_prompts(prompts)
        module = _unwrap(self.model)
        device = _device_of(module)
        synced = _is_sharded(module)
        starts = list(range(0, len(prompts), self.generation_batch_size))
        batches = len(starts)
        if synced:
            # Every rank must run the same number of generate calls, or the all-gathers of the
            # ranks with more prompts wait forever for the others.
            count = torch.tensor([batches], device=device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            batches = int(count.item())

        rollouts: list[Rollout] = []
        for b in range(batches):
            seed = None if settings.seed is None else derive_seed(settings.seed, b)
            if b < len(starts):
                start = starts[b]
                chunk = prompts[start:start + self.generation_batch_size]
                rollouts += self._generate_batch(module, chunk, start, settings, seed, device, synced)
            else:  # a rank with fewer prompts keeps its peers' collectives company
                self._generate_batch(module, [prompts[0] if prompts else [self.pad_token_id]], 0, settings, seed,
                                     device, synced)
        return rollouts

    def sync_weights(self, model) -> None:
        """Nothing to copy: the engine generates with the training model itself."""
        if _unwrap(model) is not _unwrap(self.model):
            raise ValueError("HFEngine generates with the model it was built with; got a different model")

    def sleep(self) -> None:
        """Nothing to free: there is no engine state beyond the training model."""

    def wake_up(self) -> None:
        """Nothing to restore (see `sleep`)."""

    def close(self) -> None:
        """Drop the reference to the model; the trainer owns it."""
        self.model = None

    # -- one padded batch --------------------------------------------------------------

    def _generation_config(self, settings: SamplingSettings) -> GenerationConfig:
        # temperature / top-k / top-p are neutral here: _TemperedSampler applies them, so that
        # it sees the tempered logits before truncation (see the module docstring).
        return GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1,
            max_new_tokens=settings.max_tokens, min_new_tokens=0, num_return_sequences=settings.n,
            eos_token_id=list(self.eos_token_ids), pad_token_id=self.pad_token_id,
            use_cache=True, return_dict_in_generate=True,
        )

    @torch.no_grad()
    def _generate_batch(self, module, chunk: list[list[int]], first_index: int, settings: SamplingSettings,
                        seed: int | None, device: torch.device, synced: bool) -> list[Rollout]:
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1

        sampler = _TemperedSampler(settings)
        generation_config = self._generation_config(settings)
        with _generation_mode(module, generation_config), _seeded(seed, device):
            output = module.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                generation_config=generation_config, logits_processor=LogitsProcessorList([sampler]),
                synced_gpus=synced,
            )
        generated = output.sequences[:, width:]
        logprobs = sampler.finish(generated)
        generated = generated.cpu().tolist()

        rollouts = []
        for row, tokens in enumerate(generated):
            # generate repeats each prompt n times in place (repeat_interleave): row // n.
            index = first_index + row // settings.n
            response, stopped = cut_at_eos(tokens, self.eos_token_ids)
            if not stopped and len(response) != settings.max_tokens:
                raise RuntimeError(
                    f"a response without EOS stopped after {len(response)} of {settings.max_tokens} tokens"
                )
            values = logprobs[row, : len(response)].tolist()
            if not all(math.isfinite(v) for v in values):
                raise RuntimeError("a sampled token has a non-finite log-probability: the logits hold inf or NaN")
            rollouts.append(Rollout(
                prompt_index=index, prompt_ids=list(chunk[row // settings.n]), response_ids=response,
                logprobs=values, truncated=not stopped, finish_reason=FINISH_STOP if stopped else FINISH_LENGTH,
            ))
        return rollouts
