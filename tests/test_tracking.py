"""The metrics tracker: jsonl rows, resume without duplicates, TensorBoard, the console line."""

import json
import os
import time

import numpy as np
import pytest
import torch

from siri.config import LoggingConfig
from siri.tracking import Tracker, to_host

QUIET = LoggingConfig(tensorboard=False, wandb=False, progress=False)


def read_rows(path):
    with open(os.path.join(path, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def step_metrics(step):
    return {"budget": 100 - step, "phase": "compress", "loss": torch.tensor(0.5 * step),
            "accuracy": torch.tensor(0.25, dtype=torch.float64), "kept": torch.tensor(3), "lr": 1e-6,
            "response_len_mean": np.float32(10.5), "tokens_per_s": 1234.5}


def test_rows_are_written_with_tensors_as_numbers(tmp_path):
    with Tracker(tmp_path, QUIET, {"seed": 0}, total_steps=3) as tracker:
        for step in range(3):
            tracker.log(step, step_metrics(step))
    rows = read_rows(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert rows[2] == {"step": 2, "budget": 98, "phase": "compress", "loss": 1.0, "accuracy": 0.25, "kept": 3,
                       "lr": 1e-6, "response_len_mean": 10.5, "tokens_per_s": 1234.5}
    assert isinstance(rows[2]["kept"], int)


def test_resume_drops_the_interrupted_runs_later_steps(tmp_path):
    with Tracker(tmp_path, QUIET, {}, total_steps=6) as tracker:
        for step in range(5):
            tracker.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a row torn by the kill
    # The run resumes from the checkpoint of step 2: steps 3.. are redone.
    with pytest.warns(UserWarning, match="unreadable"):
        tracker = Tracker(tmp_path, QUIET, {}, total_steps=6, start_step=3)
    with tracker:
        for step in range(3, 6):
            tracker.log(step, {"loss": 10.0 + step})
    rows = read_rows(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert [row["loss"] for row in rows] == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")


def test_a_fresh_run_in_the_same_directory_starts_the_file_over(tmp_path):
    for _ in range(2):
        with Tracker(tmp_path, QUIET, {}, total_steps=2) as tracker:
            tracker.log(0, {"loss": 1.0})
            tracker.log(1, {"loss": 2.0})
    assert [row["step"] for row in read_rows(tmp_path)] == [0, 1]


def test_tensorboard_event_file_appears(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = LoggingConfig(tensorboard=True, wandb=False, progress=False)
    with Tracker(tmp_path, cfg, {}, total_steps=2) as tracker:
        tracker.log(0, step_metrics(0))
        tracker.log(1, step_metrics(1))
    events = [n for n in os.listdir(tmp_path / "tensorboard") if n.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [e.value for e in accumulator.Scalars("loss")] == [0.0, 0.5]
    assert "phase" not in accumulator.Tags()["scalars"]  # strings go to the jsonl only


def test_console_line_without_tqdm(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    cfg = LoggingConfig(tensorboard=False, wandb=False, progress=True)
    with Tracker(tmp_path, cfg, {}, total_steps=4, start_step=1) as tracker:
        tracker.log(1, step_metrics(1))
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 2/4 | budget 99 | compress | acc 0.250 | len 10 | loss 0.5 | tok/s 1234")
    assert "ETA 0:00:0" in line


def test_progress_bar_with_tqdm(tmp_path, capsys):
    pytest.importorskip("tqdm")
    cfg = LoggingConfig(tensorboard=False, wandb=False, progress=True)
    with Tracker(tmp_path, cfg, {}, total_steps=4) as tracker:
        tracker.log(0, step_metrics(0))
    assert "acc 0.250" in capsys.readouterr().err


def test_non_main_ranks_write_nothing(tmp_path):
    with Tracker(tmp_path / "rank1", QUIET, {}, total_steps=2, is_main=False) as tracker:
        tracker.log(0, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "rank1")


def test_bad_input_names_the_argument(tmp_path):
    with Tracker(tmp_path, QUIET, {}, total_steps=2) as tracker:
        with pytest.raises(ValueError, match="step"):
            tracker.log(-1, {"loss": 1.0})
        with pytest.raises(ValueError, match="'loss'"):
            tracker.log(0, {"loss": torch.ones(2)})
        with pytest.raises(ValueError, match="'bad'"):
            tracker.log(0, {"bad": [1, 2]})
    with pytest.raises(RuntimeError, match="close"):
        tracker.log(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="total_steps"):
        Tracker(tmp_path, QUIET, {}, total_steps=-1)


def test_to_host_keeps_order_and_types():
    values = to_host({"b": torch.tensor(2.5), "a": 1, "c": torch.tensor(True), "d": np.int64(4)})
    assert list(values) == ["b", "a", "c", "d"]
    assert values == {"b": 2.5, "a": 1, "c": True, "d": 4}
    assert type(values["d"]) is int


def _wandb_records(path):
    """The records of a `.wandb` run file: a ":W&B" header, then a leveldb-style log of
    7-byte-headed chunks (checksum, length, kind) in 32 KiB blocks, each record a protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:4] == b":W&B"
    position, chunks = header, []
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + header])
        chunks.append(data[position + header:position + header + length])
        position += header + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _finished_wandb_records(path, timeout_s: float = 60.0) -> list:
    """The records of a run file once wandb has written its last ("exit") record: `finish()`
    returns before wandb's writer process has flushed the offline file, which on a loaded
    machine can take a second or more."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = list(_wandb_records(path))
        except (AssertionError, DecodeError):  # caught mid-write: no header yet, or half a record
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.2)


def test_wandb_resumes_the_same_run(tmp_path, monkeypatch):
    """A real wandb run, offline: the resumed tracker logs into the same run id, with the
    config and the numeric metrics (strings stay out of wandb's scalars)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggingConfig(tensorboard=False, wandb=True, wandb_project="proj", progress=False)
    with Tracker(tmp_path, cfg, {"seed": 7}, total_steps=2) as tracker:
        tracker.log(0, {"loss": torch.tensor(1.5), "phase": "expand"})
    # wandb names an offline run's folder by the second it started: two starts within one
    # second would share (and race on) one file, which a real resumed run never does.
    time.sleep(1.05 - time.time() % 1.0)
    with Tracker(tmp_path, cfg, {"seed": 7}, total_steps=2, start_step=1) as tracker:
        tracker.log(1, {"loss": 0.5})

    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # one per start, both under the same run id
    history, configs = [], []
    for path in files:
        for record in _finished_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id and record.run.project == "proj"
                configs.append({item.key: item.value_json for item in record.run.config.update})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                history.append({k: v for k, v in items.items() if not k.startswith("_")} | {"step": items["_step"]})
    assert len(configs) == 2 and all(config["seed"] == "7" for config in configs)
    assert sorted(history, key=lambda row: row["step"]) == [{"loss": "1.5", "step": "0"}, {"loss": "0.5", "step": "1"}]


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb gives
    cfg = LoggingConfig(tensorboard=False, wandb=True, progress=False)
    with pytest.raises(ImportError, match="pip install wandb"):
        Tracker(tmp_path, cfg, {}, total_steps=1)
