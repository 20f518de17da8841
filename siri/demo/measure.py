"""Accuracy and response length of a demo model, sampled the way RL samples.

Rollouts are `model.generate(do_sample=True, max_new_tokens=budget)` at temperature 1.0,
and an answer counts only if the response, cut at the budget, boxes the correct answer
after the end of its thinking (`siri.demo.task.check_answer`): the paper's length-capped
accuracy, the trainer's reward.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from siri.demo.task import DemoDataset, check_answer

__all__ = ["Measurement", "measure", "sample_responses"]


@dataclass(frozen=True)
class Measurement:
    """Per-response results of `measure`, and their summaries."""

    budget: int
    correct: list[bool]
    lengths: list[int]  # response tokens, EOS included, as a rollout engine counts them
    truncated: list[bool]

    @property
    def acc(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def mean_len(self) -> float:
        return statistics.fmean(self.lengths)

    def quantile(self, q: float) -> float:
        """The q-quantile of the response lengths (nearest rank)."""
        ordered = sorted(self.lengths)
        return float(ordered[min(int(q * len(ordered)), len(ordered) - 1)])

    def summary(self) -> dict:
        return {"budget": self.budget, "n": len(self.correct), "acc": self.acc, "len": self.mean_len,
                "len_median": self.quantile(0.5), "len_p90": self.quantile(0.9),
                "truncation_rate": sum(self.truncated) / len(self.truncated)}


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[list[int]], budget: int, *, batch_size: int = 64,
                     seed: int = 0) -> list[list[int]]:
    """One temperature-1 sample per prompt, at most `budget` tokens each, cut after EOS."""
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    responses = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            # Left padding, so every prompt ends where generation starts.
            width = max(map(len, chunk))
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for i, ids in enumerate(chunk):
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                attention_mask[i, width - len(ids):] = 1
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=budget)
            for row in out[:, width:].tolist():
                # generate pads finished rows up to the longest one; keep up to EOS.
                end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
                responses.append(row[:end])
    finally:
        torch.random.set_rng_state(generator_state)
    return responses


def measure(model, tokenizer, problems: DemoDataset, budget: int, *, samples_per_problem: int = 1,
            batch_size: int = 64, seed: int = 0) -> Measurement:
    """Length-capped accuracy and response lengths of `model` on `problems` at `budget`."""
    items = [problems[i] for i in range(len(problems))] * samples_per_problem
    responses = sample_responses(model, tokenizer, [p.prompt_ids for p in items], budget, batch_size=batch_size,
                                 seed=seed)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    eos = tokenizer.eos_token_id
    truncated = [not r or r[-1] != eos for r in responses]
    correct = [check_answer(text, p.answer) for text, p in zip(texts, items)]
    return Measurement(budget=budget, correct=correct, lengths=[len(r) for r in responses], truncated=truncated)
