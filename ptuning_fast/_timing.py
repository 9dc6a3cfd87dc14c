"""One timer for the demo, the training job and the benchmarks: warm-up, then CUDA events on GPU
(perf_counter on CPU), reported as median and 20th/80th percentiles in milliseconds."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, reps: int = 20) -> dict:
    """Median / p20 / p80 milliseconds of ``fn()`` on ``device``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 2 + [times[-1]] * 2
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1], "reps": reps}
