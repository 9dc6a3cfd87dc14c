"""One timer for the demo, the training job and the benchmarks: warm-up, then CUDA events on GPU
(perf_counter on CPU), reported as median and 20th/80th percentiles in milliseconds, with the
host time per call (the CPU time of issuing the call, without waiting for the device: on CPU it
is the wall time itself)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(times: list, host: list) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 2 + [times[-1]] * 2
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1], "reps": len(times),
            "host_ms": statistics.median(host)}


def _timed_call(fn: Callable[[], object], device: torch.device) -> tuple:
    """(wall or device milliseconds, host milliseconds) of one call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host
    t0 = time.perf_counter()
    fn()
    elapsed = (time.perf_counter() - t0) * 1e3
    return elapsed, elapsed


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, reps: int = 20) -> dict:
    """Median / p20 / p80 milliseconds of ``fn()`` on ``device``, and its median host time."""
    return time_interleaved({"fn": fn}, device, warmup=warmup, reps=reps)["fn"]


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                     reps: int = 20) -> Dict[str, dict]:
    """:func:`time_fn` of several callables, run in alternation so that each sees the same state
    of the machine (load, clocks, caches)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: ([], []) for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            elapsed, host = _timed_call(fn, device)
            times[name][0].append(elapsed)
            times[name][1].append(host)
    return {name: _summary(*times[name]) for name in fns}
