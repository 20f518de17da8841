"""Checkpoints: exact save/load, atomicity under a crash, pruning, loadable policy dirs."""

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import char_tokenizer, tiny_model

from siri import checkpoint as ckpt
from siri.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from siri.distributed import exit_process


def make_tokenizer():
    return char_tokenizer("0123456789+=? ")


def make_model(seed=0):
    return tiny_model(64, seed=seed, num_hidden_layers=1)


def make_training(seed=0, warmup=5):
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps):
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 6))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def draw_all_rngs():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def save(tmp_path, step, model, optimizer, scheduler, tag=None, keep_last=3, **state):
    return save_checkpoint(tmp_path, step, model=model, tokenizer=make_tokenizer(), optimizer=optimizer,
                           lr_scheduler=scheduler, trainer_state={"cursor": {"epoch": 0}, **state}, tag=tag,
                           keep_last=keep_last)


def test_save_load_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = make_training()
    train_steps(model, optimizer, scheduler, 2)
    path = save(tmp_path, 1, model, optimizer, scheduler, metrics=[{"loss": 1.5}])
    assert os.path.basename(path) == "step-0000001"
    assert latest_checkpoint(tmp_path) == path
    expected_rng = draw_all_rngs()  # what the uninterrupted run draws next
    train_steps(model, optimizer, scheduler, 2)
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = scheduler.get_last_lr()

    # A fresh process: other weights, fresh optimizer, other RNG streams.
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    fresh, fresh_optimizer, fresh_scheduler = make_training(seed=1)
    state = load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, lr_scheduler=fresh_scheduler)
    assert state["step"] == 1 and state["metrics"] == [{"loss": 1.5}] and state["cursor"] == {"epoch": 0}
    assert draw_all_rngs() == expected_rng
    assert fresh_scheduler.last_epoch == 2
    # Restoring the RNG again makes the continued training bitwise identical.
    load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, lr_scheduler=fresh_scheduler)
    draw_all_rngs()
    train_steps(fresh, fresh_optimizer, fresh_scheduler, 2)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected_weights[name]), name
    assert fresh_scheduler.get_last_lr() == expected_lr


def test_optimizer_state_is_restored_exactly(tmp_path):
    model, optimizer, scheduler = make_training()
    train_steps(model, optimizer, scheduler, 3)
    path = save(tmp_path, 2, model, optimizer, scheduler)
    fresh, fresh_optimizer, fresh_scheduler = make_training(seed=1)
    load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, lr_scheduler=fresh_scheduler)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys()
    for index, slots in saved["state"].items():
        for slot, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded["state"][index][slot])), (index, slot)


def test_policy_dir_is_a_plain_model_directory(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, optimizer, scheduler = make_training()
    path = save(tmp_path, 0, model, optimizer, scheduler, tag="low")
    policy = os.path.join(path, "policy")
    assert os.path.isfile(os.path.join(policy, "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(policy)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert AutoTokenizer.from_pretrained(policy)("1+1")["input_ids"] == make_tokenizer()("1+1")["input_ids"]
    files = set(os.listdir(path))
    assert {"COMPLETE", "trainer_state.json", "optimizer-rank0.pt", "rng-rank0.pt", "lr_scheduler.pt"} <= files


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = make_training()
    good = save(tmp_path, 4, model, optimizer, scheduler)

    def killed(*args, **kwargs):  # dies after the policy and scheduler files are written
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt, "_rng_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 9, model, optimizer, scheduler)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    leftovers = [n for n in os.listdir(root) if n.startswith(".tmp-")]
    assert leftovers and not (root / leftovers[0] / "COMPLETE").exists()  # partial, and not marked complete
    assert (root / leftovers[0] / "policy").is_dir()
    assert latest_checkpoint(tmp_path) == good
    # A directory under a checkpoint name but without COMPLETE (written by hand, or by an
    # older writer) is not a checkpoint either.
    (root / "step-0000010").mkdir()
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(root / "step-0000010", model=model, optimizer=optimizer, lr_scheduler=scheduler)

    # The next save cleans the leftovers up.
    after = save(tmp_path, 11, model, optimizer, scheduler)
    assert latest_checkpoint(tmp_path) == after
    assert not [n for n in os.listdir(root) if n.startswith(".")]


def test_pruning_keeps_the_newest_untagged_and_every_tagged(tmp_path):
    model, optimizer, scheduler = make_training()
    tags = {1: "low", 3: "high", 6: "final"}
    for step in range(7):
        save(tmp_path, step, model, optimizer, scheduler, tag=tags.get(step), keep_last=2)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["step-0000001-low", "step-0000003-high", "step-0000004", "step-0000005", "step-0000006-final"]
    assert latest_checkpoint(tmp_path).endswith("step-0000006-final")
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path)] == names


def test_resaving_a_step_replaces_it(tmp_path):
    model, optimizer, scheduler = make_training()
    save(tmp_path, 3, model, optimizer, scheduler, note="first")
    path = save(tmp_path, 3, model, optimizer, scheduler, note="second")
    with open(os.path.join(path, "trainer_state.json")) as handle:
        assert json.load(handle)["note"] == "second"
    assert os.listdir(tmp_path / "checkpoints") == ["step-0000003"]


def test_bad_arguments_name_themselves(tmp_path):
    model, optimizer, scheduler = make_training()
    with pytest.raises(ValueError, match="tag"):
        save(tmp_path, 0, model, optimizer, scheduler, tag="mid")
    with pytest.raises(ValueError, match="keep_last"):
        save(tmp_path, 0, model, optimizer, scheduler, keep_last=0)
    with pytest.raises(ValueError, match="step"):
        save(tmp_path, -1, model, optimizer, scheduler)
    with pytest.raises(ValueError, match="trainer_state"):
        save(tmp_path, 0, model, optimizer, scheduler, bad=object())
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="path"):
        load_checkpoint(tmp_path / "nowhere", model=model, optimizer=optimizer, lr_scheduler=scheduler)


def _sharded_training(seed):
    """The tiny model sharded with FSDP2 over the process group, as the trainer does."""
    from torch.distributed.fsdp import fully_shard

    model, _, _ = make_training(seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _distributed_worker(rank, world_size, init_file, output_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        model, optimizer, scheduler = _sharded_training(seed=0)
        torch.manual_seed(100 + rank)  # each rank its own data, hence its own RNG stream
        train_steps(model, optimizer, scheduler, 2)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = save_checkpoint(output_dir, 5, model=model, tokenizer=make_tokenizer(), optimizer=optimizer,
                               lr_scheduler=scheduler, trainer_state={}, model_state_dict=full if rank == 0 else None,
                               is_main=rank == 0, rank=rank)
        expected_rng = torch.rand(4)
        expected_weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
        expected_optimizer = optimizer.state_dict()["state"]

        fresh, fresh_optimizer, fresh_scheduler = _sharded_training(seed=7)
        load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, lr_scheduler=fresh_scheduler, rank=rank)
        assert torch.equal(torch.rand(4), expected_rng)
        for name, value in fresh.state_dict().items():
            assert torch.equal(value.full_tensor(), expected_weights[name]), name
        loaded_optimizer = fresh_optimizer.state_dict()["state"]
        for index, slots in expected_optimizer.items():  # this rank's shards of exp_avg, exp_avg_sq
            for slot, value in slots.items():
                assert torch.equal(torch.as_tensor(loaded_optimizer[index][slot]), torch.as_tensor(value))
    finally:
        torch.distributed.destroy_process_group()
    # Passed: skip the interpreter teardown, where gloo can abort a finished process.
    exit_process(0)


def test_fsdp_ranks_write_their_own_optimizer_and_rng(tmp_path):
    """Two CPU ranks (gloo) with the policy sharded by FSDP2: rank 0 writes the gathered
    policy, each rank its optimizer shard and RNG; loading restores every rank exactly."""
    import torch.multiprocessing as mp

    # spawn, not fork: a forked child can deadlock on the parent's OpenMP thread pool.
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "run")), nprocs=2, join=True)
    path = latest_checkpoint(tmp_path / "run")
    assert os.path.basename(path) == "step-0000005"
    files = set(os.listdir(path))
    assert {"optimizer-rank0.pt", "optimizer-rank1.pt", "rng-rank0.pt", "rng-rank1.pt", "policy"} <= files
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(path, "policy"))  # gathered, not a shard


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage, named", [
    (lambda c: _truncate(os.path.join(c, "policy", "model.safetensors")), "policy/model.safetensors is unreadable"),
    (lambda c: _truncate(os.path.join(c, "optimizer-rank0.pt")), "optimizer-rank0.pt is unreadable"),
    (lambda c: _truncate(os.path.join(c, "rng-rank0.pt")), "rng-rank0.pt is unreadable"),
    (lambda c: os.remove(os.path.join(c, "lr_scheduler.pt")), "lr_scheduler.pt is missing"),
    (lambda c: open(os.path.join(c, "trainer_state.json"), "w").close(), "trainer_state.json is unreadable"),
    (lambda c: os.remove(os.path.join(c, "policy", "model.safetensors")), "policy/ has no readable weights"),
])
def test_a_damaged_complete_checkpoint_is_found_and_passed_over(tmp_path, damage, named):
    model, optimizer, scheduler = make_training()
    older = save(tmp_path, 0, model, optimizer, scheduler)
    newer = save(tmp_path, 1, model, optimizer, scheduler)
    assert ckpt.checkpoint_problem(older) is None and ckpt.checkpoint_problem(newer) is None
    damage(newer)
    assert named in ckpt.checkpoint_problem(newer)
    path, skipped = ckpt.resume_point(tmp_path)
    assert path == older and [p for p, _ in skipped] == [newer] and named in skipped[0][1]
    kept = ckpt.set_aside(newer)
    assert os.path.basename(kept) == "damaged-step-0000001" and os.path.isdir(kept)
    assert list_checkpoints(tmp_path) == [older]
    # Saving that step again (the resumed run reaches it) keeps the damaged copy.
    save(tmp_path, 1, model, optimizer, scheduler)
    assert os.path.isdir(kept) and ckpt.checkpoint_problem(newer) is None


def test_set_aside_never_overwrites_an_earlier_damaged_copy(tmp_path):
    model, optimizer, scheduler = make_training()
    first = ckpt.set_aside(save(tmp_path, 1, model, optimizer, scheduler))
    second = ckpt.set_aside(save(tmp_path, 1, model, optimizer, scheduler))
    assert (os.path.basename(first), os.path.basename(second)) == ("damaged-step-0000001", "damaged-step-0000001.2")


def test_a_checkpoint_of_another_world_size_is_refused_not_taken_for_damage(tmp_path):
    model, optimizer, scheduler = make_training()
    path = save(tmp_path, 0, model, optimizer, scheduler)
    for kind in ("optimizer", "rng"):  # what a two-rank run leaves
        shutil.copy(os.path.join(path, f"{kind}-rank0.pt"), os.path.join(path, f"{kind}-rank1.pt"))
    with pytest.raises(ckpt.UserError, match="optimizer state of 2 rank.*this run has 1"):
        ckpt.resume_point(tmp_path)
    assert list_checkpoints(tmp_path) == [path]
