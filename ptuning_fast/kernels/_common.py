"""What the Triton kernel families share: dtype mapping, rounding, the dot-product numerics,
host-side block-size helpers, the chips the launchers size their blocks for, and the record of one
kernel launch. Kernels and launchers live in one file per family beside this one."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

# Triton reads TRITON_INTERPRET when it is imported, so the mode is fixed for the process.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
KERNEL_DTYPES = tuple(TORCH_TO_TL)


@triton.jit
def cast_rtne(x, DTYPE: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """``x.to(DTYPE)`` with round-to-nearest-even. The GPU rounds that way for fp32 -> bf16;
    Triton's CPU interpreter truncates, so there (EMULATE_RTNE) the rounding is done on the bits."""
    if EMULATE_RTNE:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


class DotNumerics(NamedTuple):
    """How a kernel computes its products, decided once per launch from the compute dtype."""

    dtype: torch.dtype  # compute dtype (autocast's, else the parameters')
    tl_dtype: object  # the same, as a Triton dtype: loads are rounded to it
    dot_dtype: object  # tl.dot operand dtype
    precision: str  # tl.dot input_precision


def dot_numerics(compute_dtype: torch.dtype) -> DotNumerics:
    """fp32 products are exact unless the user allowed TF32 (as torch.matmul); fp16/bf16 run on
    tensor cores with fp32 accumulation. Triton's CPU interpreter multiplies bf16 operands as their
    raw bits, so there they are widened to fp32 first (exact: a product of two bf16 values fits)."""
    tf32 = compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    widen = compute_dtype == torch.bfloat16 and INTERPRETING
    tl_dtype = TORCH_TO_TL[compute_dtype]
    return DotNumerics(compute_dtype, tl_dtype, tl.float32 if widen else tl_dtype, "tf32" if tf32 else "ieee")


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """``torch.backends.cuda.matmul.allow_tf32 = allowed`` inside the block (what
    :func:`dot_numerics` reads), restored after it."""
    if not isinstance(allowed, bool):
        raise TypeError(f"`allowed` must be a bool, got {type(allowed).__name__}")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# Host-side integer helpers in plain Python (triton.cdiv & co. are slower constexpr functions).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The power of two covering ``n``, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


# --------------------------------------------------------------------------------------------
# Chips and launches
# --------------------------------------------------------------------------------------------
class Chip(NamedTuple):
    """What a launcher needs to know about the GPU it sizes blocks for."""

    capability: int  # compute capability as major * 10 + minor: 80 (A100), 90 (H100 / H200)
    shared_bytes: int  # shared memory one block may use (the opt-in limit Triton checks at load)
    sm_count: int


# The chips the ahead-of-time compile check builds for (tests/kernels/test_gpu_compile.py).
# Per-block opt-in shared memory: 163 KiB on sm_80 (of 164 KiB per SM), 227 KiB on sm_90.
CHIPS = {80: Chip(80, 166912, 108), 90: Chip(90, 232448, 132)}
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255


@functools.lru_cache(maxsize=None)
def device_chip(device_index: int) -> Chip:
    """The :class:`Chip` of CUDA device ``device_index``, read from the device."""
    if not isinstance(device_index, int) or device_index < 0:
        raise ValueError(f"`device_index` must be an int >= 0, got {device_index!r}")
    props = torch.cuda.get_device_properties(device_index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block
    return Chip(props.major * 10 + props.minor, int(shared), props.multi_processor_count)


def chip_of(device: torch.device) -> Chip:
    """The :class:`Chip` of a CUDA ``device`` (the current one when it has no index)."""
    if not isinstance(device, torch.device) or device.type != "cuda":
        raise ValueError(f"`device` must be a CUDA torch.device, got {device!r}")
    return device_chip(device.index if device.index is not None else torch.cuda.current_device())


class KernelCall(NamedTuple):
    """One launch, fully described: what a launcher runs, and what the ahead-of-time compile
    check (:mod:`ptuning_fast.kernels.aot`) compiles in its place."""

    kernel: Any  # a triton.JITFunction
    grid: tuple
    args: tuple  # the runtime arguments (tensors and ints), as the launcher passes them
    kwargs: dict  # constexpr arguments, num_warps and num_stages

    def launch(self) -> None:
        launch_kernel(self.kernel, self.grid, self.args, self.kwargs)


# --------------------------------------------------------------------------------------------
# Kernel ops: the launchers as torch.library ops that torch.compile can see into
# --------------------------------------------------------------------------------------------
try:  # torch >= 2.6
    from torch.library import triton_op as _triton_op, wrap_triton as _wrap_triton
except ImportError:  # older torch: opaque custom ops
    _triton_op = _wrap_triton = None

# The launchers run as ``torch.library.triton_op``s whose kernels torch.compile traces as
# ``triton_kernel_wrapper`` nodes (inductor schedules them with its own kernels). Under
# TRITON_INTERPRET the kernels are Python functions that cannot be traced: the ops stay opaque.
TRITON_OPS = _triton_op is not None
KERNELS_TRACEABLE = TRITON_OPS and not INTERPRETING


def traced(t: Any) -> bool:
    """``t`` is a fake (or functional wrapper of a fake) tensor: shapes only, no data."""
    return isinstance(t, torch.Tensor) and type(t) is not torch.Tensor and is_fake(t)


def launch_kernel(kernel: Any, grid: tuple, args: Sequence[Any], kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``; while the body of a kernel op is traced (fake tensors)
    through ``wrap_triton``, which records the launch in the graph instead of running it."""
    if KERNELS_TRACEABLE and any(traced(a) for a in args):
        _wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _keep_opaque(mode, op, types, args, kwargs):
    """Under functionalization (AOT autograd) hand the op on whole rather than tracing its body."""
    return mode.__torch_dispatch__(op, types, args, kwargs)


def kernel_op(name: str, *, mutates_args: tuple, fake: Callable) -> Callable:
    """Decorator: register a launcher as the op ``name`` with the fake implementation ``fake``.

    ``torch.library.triton_op`` where torch has it (torch.compile traces the body, whose launches
    go through ``launch_kernel``, so the graph holds the kernels themselves), else
    ``torch.library.custom_op`` (one opaque call in the graph). Under TRITON_INTERPRET the body
    is not traced (see ``KERNELS_TRACEABLE``)."""
    def register(fn: Callable) -> Any:
        if TRITON_OPS:
            op = _triton_op(name, fn, mutates_args=mutates_args)
            if INTERPRETING:
                from torch._subclasses.functional_tensor import FunctionalTensorMode

                op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
        else:
            op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        # The explicit fake allocates the outputs only; triton_op's own (the body run on fake
        # tensors) would also walk the launchers.
        op.register_fake(fake)
        return op

    return register


class _Plan(NamedTuple):
    chip: Chip
    calls: List[KernelCall]
    defaults_only: bool


_PLAN: contextvars.ContextVar[Optional[_Plan]] = contextvars.ContextVar("ptuning_fast_kernel_plan", default=None)


@contextlib.contextmanager
def planning(chip: Chip, *, defaults_only: bool = False) -> Iterator[List[KernelCall]]:
    """Inside this block the launchers launch nothing: each records every :class:`KernelCall` it
    could make on ``chip`` (one per launch configuration it may pick there; with
    ``defaults_only``, the heuristic's pick alone) into the yielded list. Tensors may live on the
    ``meta`` device. GPU code paths only: not under TRITON_INTERPRET."""
    if not isinstance(chip, Chip):
        raise TypeError(f"`chip` must be a Chip, got {type(chip).__name__}")
    if INTERPRETING:
        raise RuntimeError("planning() lists GPU launches; it cannot run under TRITON_INTERPRET=1")
    plan = _Plan(chip, [], bool(defaults_only))
    token = _PLAN.set(plan)
    try:
        yield plan.calls
    finally:
        _PLAN.reset(token)


def launches(calls: Any) -> tuple:
    """A launcher's ``call(config)`` as a tuple of :class:`KernelCall`: one launch, or several
    run in order (a kernel and the one that reduces its partial results)."""
    return (calls,) if isinstance(calls, KernelCall) else tuple(calls)


def dispatch(call: Callable[[Any], Any], configs: Callable[[Chip], Sequence[Any]],
             choose: Callable[[], Any]) -> None:
    """Launch ``call(choose())`` (a :class:`KernelCall` or a sequence of them, run in order);
    while :func:`planning`, record instead the calls of every config the launcher may pick on the
    plan's chip, ``configs(chip)``, its default first."""
    if not (callable(call) and callable(configs) and callable(choose)):
        raise TypeError("`call`, `configs` and `choose` must be callables")
    plan = _PLAN.get()
    if plan is not None:
        choices = configs(plan.chip)
        for config in (choices[:1] if plan.defaults_only else choices):
            plan.calls.extend(launches(call(config)))
        return
    for kernel_call in launches(call(choose())):
        kernel_call.launch()


__all__ = ["CHIPS", "INTERPRETING", "KERNELS_TRACEABLE", "KERNEL_DTYPES", "MAX_REGISTERS_PER_THREAD",
           "REGISTERS_PER_SM", "TORCH_TO_TL", "TRITON_OPS", "Chip", "DotNumerics", "KernelCall", "cast_rtne", "cdiv",
           "chip_of", "device_chip", "dispatch", "dot_numerics", "kernel_op", "launch_kernel", "launches", "planning",
           "pow2_block", "tf32_allowed", "traced"]
