"""Timing, bandwidth and peak-memory measurement shared by the benchmark sections."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch


def compiled_on_first_call(fn):
    """`torch.compile(fn)`, compiled when first called, so importing a benchmark costs nothing."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)

    return call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(run, setup, device: torch.device, *, warmup: int = 2, min_reps: int = 5, budget_s: float = 3.0) -> float:
    """Median time of `run(setup())` in milliseconds; setup is not timed.

    On a GPU each repetition is timed by CUDA events recorded around `run`: the time the
    device took from the first launch to the end of the last, which includes any gap where it
    waited for the host (host overhead stays visible). On a CPU, wall time.
    """
    for _ in range(warmup):
        run(setup())
    synchronize(device)
    times, started = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - started < budget_s and len(times) < 50):
        args = setup()
        synchronize(device)
        times.append(_time_one_ms(run, args, device))
    return statistics.median(times)


def _time_one_ms(run, args, device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run(args)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    begin = time.perf_counter()
    run(args)
    return (time.perf_counter() - begin) * 1e3


def measured(row: dict, measure, device: torch.device) -> dict:
    """`row` with the figures `measure()` returns, or with the error that stopped it.

    A failing method (out of memory, a peer that needs CUDA, a kernel that does not compile)
    becomes a row naming its error, and the run goes on to the next one.
    """
    try:
        row.update(measure())
    except Exception as error:  # recorded in the results, never swallowed silently
        message = str(error).strip().splitlines()
        row["error"] = f"{type(error).__name__}: {message[0][:300] if message else ''}"
        print(f"  {row.get('method')}: {row['error']}", file=sys.stderr, flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


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


class RssSampler:
    """Highest resident set size seen while the block runs, sampled every `interval_s`.

    The kernel's own high-water mark (ru_maxrss) never goes down, so it would carry a
    warm-up's peak into the measurement; sampling from a thread (torch releases the GIL
    in its ops) sees only the block.
    """

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.peak_mb = current_rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


def peak_rss_extra_mb_in_child(module: str, spec: dict) -> float:
    """Run `python -m <module> --child '<spec>'` and read back the peak RSS growth it prints.

    Each CPU memory figure comes from a fresh process, so that no other method's buffers or
    caches are resident during the measurement.
    """
    # glibc serves blocks under its mmap threshold (up to 32 MiB) from a heap that keeps
    # freed pages resident, so a measured run would reuse the warm-up's pages unseen.
    # Mapping every block of 64 KiB or more makes the RSS follow what is live.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, "-m", module, "--child", json.dumps(spec)],
        capture_output=True, text=True, check=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return float(result.stdout.strip().splitlines()[-1])


def child_peak_report(setup, run) -> None:
    """Body of a `--child` process: print the RSS growth of one run, in MiB.

    One full run first, so that one-time costs (library initialisation, thread pools,
    compilation) are not counted as the method's memory; `setup` drops what a run left.
    """
    run(setup())
    gc.collect()
    args = setup()
    before = current_rss_mb()
    with RssSampler() as sampler:
        run(args)
    print(max(0.0, sampler.peak_mb - before))
