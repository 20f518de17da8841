"""Atomic, resumable training checkpoints.

Layout of one checkpoint, `<output_dir>/checkpoints/step-0000123[-low|-high|-final]/`:

    policy/                 the model and tokenizer as a plain Hugging Face model directory
                            (safetensors), loadable by transformers and vLLM as it is
    optimizer-rank{r}.pt    each rank's optimizer state (sharded under FSDP)
    lr_scheduler.pt         the learning-rate scheduler state
    rng-rank{r}.pt          each rank's python `random`, numpy, torch CPU and CUDA RNG states
    trainer_state.json      step, schedule, data cursor, ... (what the trainer passes)
    COMPLETE                written last: a directory without it is not a checkpoint

Atomicity: everything is written into a hidden sibling `checkpoints/.tmp-step-...`, the
files are fsynced, `COMPLETE` is written, and the directory is renamed into place with
`os.replace` (one atomic rename on POSIX). A process killed at any point leaves either the
old set of checkpoints or the old set plus the new complete one; stale temporary
directories are removed by the next save.

Damage: a complete checkpoint whose files cannot be read (a truncated weights, optimizer
or RNG file, a missing scheduler file, an empty `trainer_state.json`: a disk that filled
up, a copy cut short) is found by `checkpoint_problem` without loading it. `resume_point`
passes over such checkpoints to the newest intact one and returns what it skipped and why;
`set_aside` renames a damaged one to `checkpoints/damaged-step-...`, where nothing prunes,
overwrites or resumes from it, and nothing deletes it.

Under torch.distributed (initialised process group) rank 0 writes the policy, tokenizer,
scheduler and trainer state, every rank writes its own optimizer and RNG files, and
barriers order the phases; the checkpoint directory must be on a file system all ranks
share. Without torch.distributed everything runs in the one process.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch

from siri.checks import as_int
from siri.errors import UserError
from siri.files import fsync_path

CHECKPOINTS_DIR = "checkpoints"
POLICY_DIR = "policy"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
LR_SCHEDULER = "lr_scheduler.pt"
TAGS = ("low", "high", "final")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
DAMAGED_PREFIX = "damaged-"
_NAME = re.compile(r"^step-(\d{7,})(?:-(" + "|".join(TAGS) + r"))?$")


_OPTIMIZER_NAME = re.compile(r"^optimizer-rank\d+\.pt$")


def _optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank}.pt"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def checkpoint_name(step: int, tag: str | None = None) -> str:
    """`step-0000123` or `step-0000123-low`: zero-padded so names sort by step."""
    return f"step-{step:07d}" + (f"-{tag}" if tag else "")


def parse_checkpoint_name(name: str) -> tuple[int, str | None] | None:
    """(step, tag) of a checkpoint directory name, None for any other name."""
    match = _NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


# -- distributed helpers: the identity without an initialised process group ------------

def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _save_policy(model, tokenizer, path: str, state_dict) -> None:
    """`save_pretrained` of the policy and its tokenizer, without transformers' per-shard
    progress bar, which would break into the trainer's own bar at every checkpoint."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, state_dict=state_dict or None, safe_serialization=True)
        tokenizer.save_pretrained(path)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _all_ok(ok: bool) -> bool:
    """True when `ok` holds on every rank, so that all ranks raise together instead of some
    waiting forever at a barrier for a rank that failed."""
    if not _distributed():
        return ok
    flags = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, ok)
    return all(flags)


# -- file helpers ----------------------------------------------------------------------

def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def _torch_save(obj, path: str) -> None:
    torch.save(obj, path)
    fsync_path(path)


# -- RNG ---------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG stream the trainer draws from, in a form `torch.load(weights_only=True)` reads."""
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            warnings.warn(f"the checkpoint holds the RNG states of {len(cuda)} CUDA devices, this process sees "
                          f"{count}: restoring the first {min(len(cuda), count)}; sampling will not repeat exactly",
                          stacklevel=2)
        for device, device_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(device_state, device)


# -- save --------------------------------------------------------------------------------

def _remove_stale(root: str) -> None:
    """Temporary and trash directories that a killed save left behind."""
    for name in os.listdir(root):
        if name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _prune(output_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` untagged complete checkpoints; tagged ones stay."""
    untagged = [path for path in list_checkpoints(output_dir)
                if parse_checkpoint_name(os.path.basename(path))[1] is None]
    for path in untagged[:max(len(untagged) - keep_last, 0)]:
        # Rename first so a kill during the (slow) delete never leaves a half-deleted directory
        # under a checkpoint name; the next save removes the trash.
        trash = os.path.join(os.path.dirname(path), _TRASH_PREFIX + os.path.basename(path))
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _check_save_args(step, tag, keep_last, trainer_state, rank) -> str:
    step = as_int("step", step, minimum=0)
    if tag is not None and tag not in TAGS:
        raise ValueError(f"tag must be one of {list(TAGS)} or None, got {tag!r}")
    as_int("keep_last", keep_last, minimum=1)
    as_int("rank", rank, minimum=0)
    if not isinstance(trainer_state, dict):
        raise ValueError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    if "step" in trainer_state and trainer_state["step"] != step:
        raise ValueError(f"trainer_state['step'] is {trainer_state['step']!r} but step is {step}")
    try:
        return json.dumps({**trainer_state, "step": step}, indent=2, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"trainer_state must be JSON-serialisable: {error}") from None


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model, tokenizer, optimizer, lr_scheduler,
                    trainer_state: dict, tag: str | None = None, keep_last: int = 3, model_state_dict=None,
                    is_main: bool = True, rank: int = 0) -> str:
    """Write the checkpoint of `step` atomically; return its directory.

    Args:
        output_dir: the run directory; checkpoints go to `output_dir/checkpoints/`.
        step: the training step just finished (0-based).
        model: a Hugging Face `PreTrainedModel` (the unwrapped policy).
        tokenizer: saved beside the weights so `policy/` is a complete model directory.
        optimizer, lr_scheduler: anything with `state_dict()` / `load_state_dict()`.
        trainer_state: JSON-serialisable resume state (schedule, data cursor, metrics, ...);
            `step` is added.
        tag: "low" / "high" (end of a compression / expansion half), "final", or None for
            a periodic checkpoint. Tagged checkpoints are never pruned.
        keep_last: how many untagged checkpoints to keep, this one included.
        model_state_dict: the full state dict to save instead of `model.state_dict()` (the
            gathered weights under FSDP, on rank 0).
        is_main: whether this process writes the shared files (rank 0).
        rank: this process's rank; names its optimizer and RNG files.

    Under an initialised torch.distributed process group every rank must call this.
    """
    # The RNG streams as the training loop left them, before saving could touch any of them.
    rng = rng_state()
    state_json = _check_save_args(step, tag, keep_last, trainer_state, rank)
    root = os.path.join(os.fspath(output_dir), CHECKPOINTS_DIR)
    name = checkpoint_name(step, tag)
    final = os.path.join(root, name)
    tmp = os.path.join(root, _TMP_PREFIX + name)

    ok = False
    try:
        if is_main:
            os.makedirs(root, exist_ok=True)
            _remove_stale(root)
            os.makedirs(tmp)
        ok = True
    finally:
        # Doubles as the barrier after which the temporary directory exists for every rank.
        all_ok = _all_ok(ok)
    if not all_ok:
        raise RuntimeError(f"creating checkpoint {name!r} failed on the main rank; see its error")

    ok = False
    try:
        if is_main:
            policy = os.path.join(tmp, POLICY_DIR)
            _save_policy(model, tokenizer, policy, model_state_dict)
            _torch_save(lr_scheduler.state_dict(), os.path.join(tmp, LR_SCHEDULER))
            with open(os.path.join(tmp, TRAINER_STATE), "w") as handle:
                handle.write(state_json)
        _torch_save(optimizer.state_dict(), os.path.join(tmp, _optimizer_file(rank)))
        _torch_save(rng, os.path.join(tmp, _rng_file(rank)))
        ok = True
    finally:
        # Every rank learns whether all wrote their part; a failure anywhere stops them all
        # before COMPLETE, and the temporary directory is removed by the next save.
        all_ok = _all_ok(ok)
    if not all_ok:
        raise RuntimeError(f"saving checkpoint {name!r} failed on another rank; see its error")

    if is_main:
        _fsync_tree(tmp)
        with open(os.path.join(tmp, COMPLETE), "w") as handle:
            handle.write(f"{step}\n")
        fsync_path(os.path.join(tmp, COMPLETE))
        fsync_path(tmp)
        if os.path.exists(final):
            # Re-saving a step (a run restarted without resuming): rename the old one aside
            # first, since os.replace cannot overwrite a non-empty directory.
            os.replace(final, os.path.join(root, _TRASH_PREFIX + name))
        os.replace(tmp, final)
        fsync_path(root)  # make the rename itself durable
        _remove_stale(root)
        _prune(output_dir, keep_last)
    _barrier()  # no rank goes on (or loads) before the checkpoint is in place
    return final


# -- find and load ----------------------------------------------------------------------

def is_complete(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), COMPLETE))


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """The complete checkpoints of a run, oldest first (by step, then name)."""
    root = os.path.join(os.fspath(output_dir), CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        parsed = parse_checkpoint_name(name)
        if parsed is not None and is_complete(os.path.join(root, name)):
            found.append((parsed[0], name))
    return [os.path.join(root, name) for _, name in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint of the highest step under `output_dir/checkpoints`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _weight_files(policy: str) -> list[str]:
    index = os.path.join(policy, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        return [os.path.join(policy, shard) for shard in shards]
    single = os.path.join(policy, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"path {policy!r} holds no model.safetensors (nor a sharded index)")


def load_policy_weights(model: torch.nn.Module, policy_dir: str | os.PathLike) -> None:
    """Copy the safetensors weights of a saved `policy/` directory into `model` in place.

    Keys absent from the files are allowed only for parameters tied to one that is present
    (save_pretrained drops tied copies such as a tied LM head).
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(os.fspath(policy_dir)):
        state.update(load_file(path, device="cpu"))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"the checkpoint holds weights the model lacks, e.g. {unexpected[:3]}: "
                         "is it the same architecture?")
    # A tied parameter shares storage with another; loading its twin loads it too.
    loaded_ptrs = {own[key].data_ptr() for key in state}
    missing = sorted(k for k in set(own) - set(state) if own[k].data_ptr() not in loaded_ptrs)
    if missing:
        raise ValueError(f"the checkpoint lacks weights of the model, e.g. {missing[:3]}")

    parameters = list(model.parameters())
    if any(type(p).__name__ == "DTensor" for p in parameters):
        # FSDP2: every rank reads the full tensors and keeps its own shard of each.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(state, strict=False)


def _readable_json(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{os.path.basename(path)} is unreadable ({error})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{os.path.basename(path)} holds no trainer state (no integer 'step')"
    return None


def _readable_torch(path: str) -> str | None:
    try:
        # mmap: reading the index of the archive is enough to find a cut-short file, and a
        # multi-gigabyte optimizer state is not read twice.
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        return f"{os.path.basename(path)} is unreadable ({str(error).splitlines()[0]})"
    return None


def _readable_weights(policy: str) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        files = _weight_files(policy)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        return f"{POLICY_DIR}/ has no readable weights ({error})"
    for path in files:
        try:
            with safe_open(path, "pt") as handle:  # checks the header covers the whole file
                handle.keys()
        except (OSError, SafetensorError) as error:
            return f"{POLICY_DIR}/{os.path.basename(path)} is unreadable ({error})"
    return None


def checkpoint_problem(path: str | os.PathLike, rank: int = 0) -> str | None:
    """Why the complete checkpoint at `path` cannot be resumed by `rank`, naming the file;
    None when every file it needs is present and readable.

    Reads each file's structure (JSON, the archive index of the `.pt` files, the safetensors
    headers against the file sizes), not the tensors: a truncated or missing file is found,
    a bit flipped inside a tensor is not.
    """
    path = os.fspath(path)
    for file_name in (TRAINER_STATE, LR_SCHEDULER, _optimizer_file(rank), _rng_file(rank)):
        if not os.path.isfile(os.path.join(path, file_name)):
            return f"{file_name} is missing"
    problem = _readable_json(os.path.join(path, TRAINER_STATE)) or _readable_weights(os.path.join(path, POLICY_DIR))
    for file_name in (LR_SCHEDULER, _optimizer_file(rank), _rng_file(rank)):
        problem = problem or _readable_torch(os.path.join(path, file_name))
    return problem


def resume_point(output_dir: str | os.PathLike, rank: int = 0) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint every rank can read, and the newer ones passed over.

    Returns (path or None, [(path, why), ...] newest first). Under torch.distributed every
    rank must call this; they agree on the checkpoint (one damaged on any rank is skipped).
    A checkpoint saved by another number of ranks is a UserError, not damage.
    """
    world_size = torch.distributed.get_world_size() if _distributed() else 1
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        saved_ranks = len([n for n in os.listdir(path) if _OPTIMIZER_NAME.match(n)])
        if saved_ranks and saved_ranks != world_size:
            # Not damage: the run was saved by another number of processes.
            raise UserError(f"checkpoint {path!r} holds the optimizer state of {saved_ranks} rank(s), this run has "
                            f"{world_size}: resume it with the same number of processes")
        problem = checkpoint_problem(path, rank)
        if _all_ok(problem is None):
            return path, skipped
        skipped.append((path, problem or "a file of another rank is damaged"))
    return None, skipped


def set_aside(path: str | os.PathLike, is_main: bool = True) -> str:
    """Rename the damaged checkpoint `path` to `damaged-<name>` beside it (a numbered
    `damaged-<name>.2`, ... if taken) and return the new path. Nothing in siri deletes,
    prunes or resumes from it; the user may inspect or remove it. Under torch.distributed
    every rank calls this and rank 0 renames."""
    path = os.fspath(path)
    root, name = os.path.split(path)
    target = os.path.join(root, DAMAGED_PREFIX + name)
    number = 1
    while os.path.exists(target):
        number += 1
        target = os.path.join(root, f"{DAMAGED_PREFIX}{name}.{number}")
    _barrier()  # every rank named the target before it exists
    if is_main:
        os.replace(path, target)
        fsync_path(root)
    _barrier()
    return target


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state saved in the checkpoint at `path` (step, schedule, cursor, config)."""
    with open(os.path.join(os.fspath(path), TRAINER_STATE), encoding="utf-8") as handle:
        return json.load(handle)


def load_checkpoint(path: str | os.PathLike, *, model, optimizer, lr_scheduler, rank: int = 0) -> dict:
    """Restore a checkpoint written by `save_checkpoint`; return its trainer state.

    Loads the policy weights into `model` in place, the optimizer state of `rank`, the
    scheduler state and the RNG streams of `rank`. `optimizer` must hold the same parameters
    as when it was saved (same model, same world size under FSDP).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path {path!r} is not a directory")
    if not is_complete(path):
        raise ValueError(f"path {path!r} is not a complete checkpoint (no {COMPLETE} marker)")
    for file_name in (_optimizer_file(rank), _rng_file(rank)):
        if not os.path.isfile(os.path.join(path, file_name)):
            raise ValueError(f"path {path!r} has no {file_name}: was it saved with fewer ranks than this run?")

    load_policy_weights(model, os.path.join(path, POLICY_DIR))
    # weights_only=True: these files hold only tensors and plain containers, and loading
    # nothing else keeps a tampered checkpoint from running code.
    optimizer.load_state_dict(torch.load(os.path.join(path, _optimizer_file(rank)), map_location="cpu",
                                         weights_only=True))
    lr_scheduler.load_state_dict(torch.load(os.path.join(path, LR_SCHEDULER), map_location="cpu", weights_only=True))
    trainer_state = read_trainer_state(path)
    set_rng_state(torch.load(os.path.join(path, _rng_file(rank)), map_location="cpu", weights_only=True))
    return trainer_state
