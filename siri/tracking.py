"""Experiment tracking: a JSON Lines metrics file, TensorBoard, Weights & Biases, a console line.

`output_dir/metrics.jsonl` is always written, one object per step (`{"step": 12, "budget":
...}`); it is the record the tests, the plots and a resumed run rely on. TensorBoard and
wandb are optional and imported only when switched on. This is host-side logging: tensors
are brought to the host once per step, never inside the training hot path.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
import warnings

import numpy as np
import torch

from siri.checks import as_int
from siri.config import LoggingConfig
from siri.files import write_text_atomically

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"

# Console line: (metric name, label, format) in display order; absent metrics are skipped.
_CONSOLE_FIELDS = (
    ("budget", "budget", "{:.0f}"),
    ("phase", "", "{}"),
    ("accuracy", "acc", "{:.3f}"),
    ("response_len_mean", "len", "{:.0f}"),
    ("loss", "loss", "{:.4g}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
)


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def to_host(metrics: dict) -> dict[str, float | int | bool | str]:
    """The metrics as Python scalars; every tensor crosses to the host in one transfer per
    (device, dtype) group instead of one synchronising `.item()` per metric."""
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
    out: dict = {}
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise ValueError(f"metrics: names must be strings, got {name!r}")
        if name == "step":
            raise ValueError("metrics: 'step' is reserved (it is the step argument)")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metrics[{name!r}] must be a one-element tensor, got shape {tuple(value.shape)}")
            groups.setdefault((value.device, value.dtype), []).append((name, value.detach().reshape(())))
        elif isinstance(value, (bool, np.bool_)):
            out[name] = bool(value)
        elif isinstance(value, str):
            out[name] = value
        elif isinstance(value, numbers.Integral):  # numpy integers too
            out[name] = int(value)
        elif isinstance(value, numbers.Real):  # numpy floats too
            out[name] = float(value)
        else:
            raise ValueError(f"metrics[{name!r}] must be a number, a string or a tensor, got {type(value).__name__}")
    for tensors in groups.values():
        values = torch.stack([t for _, t in tensors]).tolist()
        out.update(zip((n for n, _ in tensors), values))
    return {name: out[name] for name in metrics}  # the caller's order


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _drop_steps_from(path: str, start_step: int) -> None:
    """Rewrite `path` without the lines of steps >= start_step (and without a line torn by a
    kill mid-write), atomically: a crash here leaves the old file or the new one."""
    kept, dropped_torn = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped_torn += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < start_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped_torn:
        warnings.warn(f"{path}: dropped {dropped_torn} unreadable line(s) left by an interrupted run", stacklevel=3)
    write_text_atomically(path, "".join(kept))


class Tracker:
    """Logs one row of metrics per training step.

    Args:
        output_dir: the run directory (`metrics.jsonl`, `tensorboard/`, the wandb run id).
        cfg: the `LoggingConfig`: which of TensorBoard, wandb and the console line to use.
        run_config: the run's configuration as a dict (sent to wandb).
        total_steps: the run's length, for the progress display and the ETA.
        start_step: the first step this process will log; rows of steps >= start_step left in
            `metrics.jsonl` by an interrupted run are dropped, so each step appears once.
        is_main: only the main process (rank 0) writes anything; on the others every method
            does nothing.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, output_dir: str | os.PathLike, cfg: LoggingConfig, run_config: dict, total_steps: int,
                 start_step: int = 0, is_main: bool = True) -> None:
        total_steps = as_int("total_steps", total_steps, minimum=0)
        start_step = as_int("start_step", start_step, minimum=0)
        if not isinstance(run_config, dict):
            raise ValueError(f"run_config must be a dict, got {type(run_config).__name__}")
        self.output_dir = os.fspath(output_dir)
        self.cfg = cfg
        self.total_steps = total_steps
        self.start_step = start_step
        self.is_main = is_main
        self.metrics_path = os.path.join(self.output_dir, METRICS_FILE)
        self._file = None
        self._tensorboard = None
        self._wandb_run = None
        self._bar = None
        self._closed = False
        self._started = time.perf_counter()
        self._logged = 0
        if not is_main:
            return

        os.makedirs(self.output_dir, exist_ok=True)
        if os.path.exists(self.metrics_path):
            _drop_steps_from(self.metrics_path, start_step)
        # Line-buffered: each row reaches the OS as it is written, so a killed run keeps
        # every row it logged.
        self._file = open(self.metrics_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in close())
        try:
            if cfg.tensorboard:
                self._tensorboard = self._open_tensorboard()
            if cfg.wandb:
                self._wandb_run = self._open_wandb(run_config)
            if cfg.progress:
                self._bar = self._open_progress_bar()
        except BaseException:
            self.close()
            raise

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "logging.tensorboard needs the 'tensorboard' package (pip install tensorboard)"
            ) from error
        # purge_step drops the events of steps >= start_step that an interrupted run wrote,
        # as the jsonl rewrite does for metrics.jsonl.
        return SummaryWriter(log_dir=os.path.join(self.output_dir, TENSORBOARD_DIR),
                             purge_step=self.start_step if self.start_step > 0 else None)

    def _open_wandb(self, run_config: dict):
        try:
            import wandb
        except ImportError as error:
            raise ImportError("logging.wandb needs the 'wandb' package (pip install wandb)") from error
        # resume="allow" continues a run only when given its id: keep the id beside the
        # metrics so a resumed training run logs into the same wandb run.
        id_path = os.path.join(self.output_dir, WANDB_ID_FILE)
        run_id = None
        if os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as handle:
                run_id = handle.read().strip() or None
        run = wandb.init(project=self.cfg.wandb_project, config=run_config, resume="allow", id=run_id,
                         dir=self.output_dir)
        if run_id is None:  # a kill mid-write must not leave an empty id, which would start a new run
            write_text_atomically(id_path, run.id + "\n")
        return run

    def _open_progress_bar(self):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None  # the plain one-line-per-step print is used instead
        return tqdm(total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        """Record the metrics of `step` (values: numbers, strings such as the phase, or
        one-element tensors on any device)."""
        if not self.is_main:
            return
        if self._closed:
            raise RuntimeError("Tracker.log after close()")
        step = as_int("step", step, minimum=0)
        values = to_host(metrics)
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        numeric = {name: value for name, value in values.items() if _is_number(value) or isinstance(value, bool)}
        if self._tensorboard is not None:
            for name, value in numeric.items():
                self._tensorboard.add_scalar(name, float(value), global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(numeric, step=step)
        self._logged += 1
        if self.cfg.progress:
            self._show(step, values)

    def _summary(self, values: dict) -> str:
        parts = []
        for name, label, fmt in _CONSOLE_FIELDS:
            value = values.get(name)
            if value is None or (isinstance(value, float) and not math.isfinite(value) and name != "loss"):
                continue
            text = fmt.format(value) if (_is_number(value) or isinstance(value, str)) else str(value)
            parts.append(f"{label} {text}" if label else text)
        return " | ".join(parts)

    def _show(self, step: int, values: dict) -> None:
        summary = self._summary(values)
        if self._bar is not None:
            self._bar.n = step + 1  # steps, not calls: right after a resume too
            self._bar.set_postfix_str(summary, refresh=False)
            self._bar.refresh()
            return
        elapsed = time.perf_counter() - self._started
        remaining = max(self.total_steps - (step + 1), 0)
        eta = _format_duration(elapsed / self._logged * remaining)
        print(f"step {step + 1}/{self.total_steps} | {summary} | ETA {eta}", file=sys.stdout, flush=True)

    def close(self) -> None:
        """Flush and close every sink; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
