"""Timing, bandwidth and peak-memory measurement shared by the benchmark sections."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run, setup, device: torch.device, *, warmup: int = 2, min_reps: int = 5, budget_s: float = 3.0) -> float:
    """Median wall time of `run(setup())` in milliseconds; setup is not timed."""
    for _ in range(warmup):
        run(setup())
    synchronize(device)
    times, started = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - started < budget_s and len(times) < 50):
        args = setup()
        synchronize(device)
        begin = time.perf_counter()
        run(args)
        synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth of a plain copy: it reads and writes `nbytes` each (GB/s)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda _: dst.copy_(src), lambda: None, device, min_reps=10, budget_s=2.0)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_cuda_extra_mb(run, setup, device: torch.device) -> float:
    """Peak CUDA memory allocated during one `run`, beyond what was allocated before it."""
    args = setup()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run(args)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_rss_extra_mb_in_child(module: str, spec: dict) -> float:
    """Run `python -m <module> --child '<spec>'` and read back the peak RSS it reports.

    The process high-water mark never goes down, so each CPU memory figure comes from a
    fresh process: it builds its inputs, notes its RSS, runs once and reports the growth.
    """
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)))
    result = subprocess.run(
        [sys.executable, "-m", module, "--child", json.dumps(spec)],
        capture_output=True, text=True, check=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return float(result.stdout.strip().splitlines()[-1])


def child_peak_report(build_inputs, run) -> None:
    """Body of a `--child` process: print the RSS growth of one run, in MiB."""
    args = build_inputs()
    before = current_rss_mb()
    run(args)
    print(max(0.0, max_rss_mb() - before))
