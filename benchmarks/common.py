"""Shared measurement helpers for every benchmark: one way to time, one way to state the floor.

Timing: warm-up, then `reps` timed calls, CUDA events on GPU (perf_counter on CPU), reported as
median and 20th/80th percentiles in milliseconds. Floors: bytes that must move over measured
copy bandwidth, FLOPs over measured matmul throughput, and the measured latency of one empty
kernel launch; the floor of a case is the largest of those that apply.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ptuning_fast._timing import (paired_speedup, paired_speedup_interval, synchronize, time_fn,  # one timer for all
                                  time_interleaved)


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one call of ``fn`` (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device_str: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted)."""
    device = torch.device(device_str)
    n = (256 << 20) if device.type == "cuda" else (32 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=10)["median_ms"]
    return 2 * n / (t * 1e-3)


@functools.lru_cache(maxsize=None)
def matmul_throughput(device_str: str, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput in FLOP/s for ``dtype``."""
    device = torch.device(device_str)
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=2, reps=5)["median_ms"]
    return 2 * n**3 / (t * 1e-3)


@functools.lru_cache(maxsize=None)
def launch_latency_ms(device_str: str) -> float:
    """Time of one tiny kernel (a 1-element add) as seen by the timer: the per-launch floor."""
    device = torch.device(device_str)
    x = torch.zeros(1, device=device)
    return time_fn(lambda: x.add_(1), device, warmup=10, reps=50)["median_ms"]


def floor_ms(device: torch.device, *, bytes_moved: float = 0.0, flops: float = 0.0,
             dtype: torch.dtype = torch.float32, launches: int = 1) -> dict:
    """The time no implementation can beat for this work on this device, and its parts."""
    dev = str(device)
    parts = {
        "memory_ms": bytes_moved / copy_bandwidth(dev) * 1e3,
        "compute_ms": flops / matmul_throughput(dev, dtype) * 1e3 if flops else 0.0,
        "launch_ms": launches * launch_latency_ms(dev),
    }
    parts["floor_ms"] = max(parts.values())
    return parts


@dataclass
class Row:
    """One timed implementation of one case; the runner turns rows into tables, JSON and plots."""

    component: str
    case: str
    impl: str  # "ptuning_fast", "peft_eager", "peft_compile", ...
    median_ms: float
    p20_ms: float
    p80_ms: float
    floor_ms: float
    peak_bytes: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def make_rows(component: str, case: str, fns: Dict[str, Callable[[], object]], device: torch.device,
              floor: dict, *, warmup: int = 5, reps: int = 20, per: int = 1, paired_with: Optional[str] = None,
              **extra) -> List[Row]:
    """One Row per implementation (``fns``: impl -> callable) of one case, timed in alternation so
    that every implementation sees the same state of the machine; each row also gets its median
    host time and its peak memory. A call that does ``per`` units of work (e.g. new tokens) is
    reported per unit. ``paired_with``: an impl; each row also gets ``x_vs_<impl>_paired``
    (:func:`ptuning_fast._timing.paired_speedup`) and its 95% interval ``x_vs_<impl>_paired_ci``."""
    times = time_interleaved(fns, device, warmup=warmup, reps=reps)
    rows = []
    for impl, t in times.items():
        paired = {} if paired_with is None else {
            f"x_vs_{paired_with}_paired": paired_speedup(times, paired_with, impl),
            f"x_vs_{paired_with}_paired_ci": list(paired_speedup_interval(times, paired_with, impl))}
        rows.append(Row(component, case, impl, t["median_ms"] / per, t["p20_ms"] / per, t["p80_ms"] / per,
                        floor["floor_ms"], peak_memory(fns[impl], device),
                        {**floor, "host_ms": t["host_ms"] / per, **paired, **extra}))
    return rows


def cuda_graph_replay(fn: Callable[[], object], device: torch.device) -> Optional[Callable[[], object]]:
    """``fn`` captured once in a CUDA graph, as a callable that replays it (what a host-bound
    component costs without Python and launch overhead); None off CUDA or where capture fails
    (the reason is printed). ``fn`` must not synchronise with the host."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        synchronize(device)
    except Exception as exc:  # a sync inside fn, an op capture does not support, ...
        print(f"   CUDA graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None
    return graph.replay


# The shapes a run measures: ``tiny`` (``--quick``, and CI's pytest-benchmark tests), ``cpu``
# (realistic model sizes that a CPU runs in minutes: the default on a machine without a GPU) and
# ``gpu`` (the full sizes of the speed targets).
SIZES = ("tiny", "cpu", "gpu")


def size_of(device: torch.device, quick: bool) -> str:
    return "tiny" if quick else ("gpu" if device.type == "cuda" else "cpu")
