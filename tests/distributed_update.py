"""The gradients of one optimizer step on fixed samples, one process or under torchrun.

    python tests/distributed_update.py OUT.pt CONFIG.json          # one process, every sample
    torchrun --nproc_per_node 2 tests/distributed_update.py ...    # each rank its share of groups
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trainer_fixtures import make_model, make_tokenizer  # noqa: E402

from siri.config import load_config  # noqa: E402
from siri.packing import Sample  # noqa: E402
from siri.trainer import Trainer  # noqa: E402


def fixed_samples() -> list[Sample]:
    """8 groups of 2 responses of mixed lengths, one truncated, deterministic."""
    gen = torch.Generator().manual_seed(7)
    samples = []
    for group in range(8):
        for k in range(2):
            prompt = torch.randint(2, 20, (3 + group % 3,), generator=gen).tolist()
            response = torch.randint(2, 20, (1 + (group * 3 + k) % 6,), generator=gen).tolist()
            samples.append(Sample(prompt_ids=prompt, response_ids=response, advantage=1.0 if k == 0 else -1.0,
                                  truncated=group == 5 and k == 1, group_id=group))
    return samples


def main(out_path: str, overrides_path: str) -> None:
    with open(overrides_path) as handle:
        cfg = load_config(None, json.load(handle))
    tokenizer = make_tokenizer()
    trainer = Trainer(cfg, model=make_model(tokenizer), tokenizer=tokenizer, resume=False)
    rank, world = trainer.dist.rank, trainer.dist.world_size
    mine = [s for s in fixed_samples() if s.group_id % world == rank]
    grads = {}
    step = trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        # Under FSDP2 each rank holds a shard of each (already reduced) gradient.
        for name, parameter in trainer.model.named_parameters():
            grad = parameter.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    metrics = trainer._update(mine)
    if trainer.dist.is_main:
        torch.save({"grads": grads, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}, out_path)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from siri.distributed import exit_process

        exit_process(0)
