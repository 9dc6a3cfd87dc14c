"""One timer for the demo, the training job and the benchmarks: warm-up, then CUDA events on GPU
(perf_counter on CPU), reported as median and 20th/80th percentiles in milliseconds, with the
host time per call (the CPU time of issuing the call, without waiting for the device: on CPU it
is the wall time itself)."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(times: list, host: list) -> dict:
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=5) if len(ordered) >= 5 else [ordered[0]] * 2 + [ordered[-1]] * 2
    return {"median_ms": statistics.median(ordered), "p20_ms": q[0], "p80_ms": q[-1], "reps": len(ordered),
            "host_ms": statistics.median(host), "samples_ms": list(times)}  # in the order of the rounds


def paired_ratios(summaries: Dict[str, dict], baseline: str, name: str) -> list:
    """``baseline``'s time / ``name``'s time in each round of :func:`time_interleaved`."""
    return [b / t for b, t in zip(summaries[baseline]["samples_ms"], summaries[name]["samples_ms"])]


def paired_speedup(summaries: Dict[str, dict], baseline: str, name: str) -> float:
    """How many times faster ``name`` is than ``baseline``, from :func:`time_interleaved`'s
    summaries: the median over rounds of the ratio of the two calls of each round. A slow phase of
    the machine slows both calls of its rounds, so it moves this less than the ratio of medians."""
    return statistics.median(paired_ratios(summaries, baseline, name))


def median_interval(values, confidence: float = 0.95) -> tuple:
    """A distribution-free confidence interval of the median of ``values`` (independent rounds):
    the order statistics ``k`` and ``n + 1 - k``, ``k`` the largest with
    ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``. Below 6 values no pair reaches 95%:
    (min, max)."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("`values` is empty")
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}")
    tail, below, k = (1 - confidence) / 2, 0, 0
    while k < n // 2:  # below = P(X <= k) * 2^n
        below += math.comb(n, k)
        if below > tail * 2 ** n:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def paired_speedup_interval(summaries: Dict[str, dict], baseline: str, name: str,
                            confidence: float = 0.95) -> tuple:
    """:func:`median_interval` of the per-round ratios of :func:`paired_speedup`: where the
    interval holds 1, the two are not told apart by this run."""
    return median_interval(paired_ratios(summaries, baseline, name), confidence)


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
    of the machine (load, clocks, caches). Each round starts one callable later than the last, so
    that none always runs first or last in its round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    names = list(fns)
    times = {name: ([], []) for name in names}
    for round_ in range(reps):
        for k in range(len(names)):
            name = names[(round_ + k) % len(names)]
            elapsed, host = _timed_call(fns[name], device)
            times[name][0].append(elapsed)
            times[name][1].append(host)
    return {name: _summary(*times[name]) for name in names}
