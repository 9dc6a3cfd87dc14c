"""Triton kernels for the P-tuning MLP head: ``Linear -> ReLU -> ... -> Linear``, forward and backward.

The head runs on the T distinct virtual tokens (T = 1..512 rows) while its weights are D x H, up to
8192 x 8192: every layer is a skinny matrix product whose time is the time to stream its weight
through the chip once. So the kernels are built around one rule: each weight matrix is read once
per pass and each weight gradient written once, with everything else fused around that stream.

Forward, one launch per layer (a layer needs the whole previous layer, so no fewer launches
without a grid-wide barrier):
    ``_linear_kernel``: ``h = act(a @ W^T + b)``, a program owns a block of output features for
    all rows (T <= 128: one row block, so W is read exactly once), bias and ReLU in the epilogue.
    The post-ReLU activations are what the forward keeps for the backward.

Backward, one launch per layer (T <= 128):
    ``_linear_backward_kernel``: a program owns a block of the layer's *input* features k and walks
    over all output features n. For each n-block it writes ``dW[n, k] = g[:, n]^T @ a[:, k]``, adds
    ``g[:, n] @ W[n, k]`` to the input gradient, and (program 0) writes ``db[n] = sum_rows g[:, n]``.
    The input gradient of its k-block is then complete, so the ReLU of the layer below is applied
    right there (``a > 0`` from the saved activation) before the single store.
    Exact fp32 (no TF32) runs on the FMA units, where that loop over n is long serial work: there
    the loop is cut into chunks, a second grid dimension (split-K, ``_split_plan``), each program
    storing its gated share of the input gradient as fp32 partial sums, which ``_split_sum_kernel``
    adds up in a fixed order and rounds (two launches per layer).
    For T > 128 the same math runs as two launches per layer through ``_linear_kernel``
    (``dW, db`` with a row-sum epilogue; ``dA`` with a ReLU-gate epilogue).

Numerics: loads are cast to the compute dtype (the autocast dtype, else the parameter dtype), as
``F.linear`` under autocast casts its inputs; products accumulate in fp32; activations are
rounded to the compute dtype between layers, as the reference does; weight and bias gradients are
accumulated in fp32 and rounded once to the parameter dtype. fp32 matmuls follow
``torch.backends.cuda.matmul.allow_tf32`` (off by default: exact fp32, as PyTorch).

Entry points: the launchers :func:`mlp_forward` / :func:`mlp_backward`, and the same as the ops
``ptuning_fast::prompt_mlp_forward`` / ``_backward`` (:func:`mlp_forward_op` / :func:`mlp_backward_op`,
what ``torch.compile`` traces); the autograd Function is in :mod:`ptuning_fast.ops.prompt_mlp`. Nothing
here synchronises with the host, so a step can be captured in a CUDA graph (launch
configurations are tuned on the first eager call per shape and fall back to fixed heuristics
while a stream is being captured).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETING, Chip, DotNumerics, KernelCall, cast_rtne, cdiv, chip_of, dispatch, dot_numerics,
                      kernel_op, launches, planning, pow2_block, tf32_allowed, traced)

# Rows handled by one program of the fused backward; beyond it the backward takes the tiled path.
FUSED_BACKWARD_MAX_ROWS = 128


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _linear_kernel(
    a_ptr, b_ptr, bias_ptr, gate_ptr, c_ptr, row_sum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_bias,
    stride_gm, stride_gn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_GATE: tl.constexpr, ROW_SUM: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of ``c = epilogue(a @ b)``, reducing over all of K.

    Epilogue, in order: ``+ bias[n]`` (bias rounded to the compute dtype, as F.linear under
    autocast), ``relu``, ``* (gate > 0)`` (the ReLU backward), cast to c's dtype. With ROW_SUM
    the programs of the first column block also write ``sum_k a[m, k]`` (a bias gradient).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = cast_rtne(tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0), COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)
        b = cast_rtne(tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0), COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if ROW_SUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)

    if HAS_BIAS:
        bias = cast_rtne(tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0), COMPUTE_DTYPE, EMULATE_RTNE)
        acc += bias.to(tl.float32)[None, :]
    if RELU:  # as torch.relu: NaN stays NaN (tl.maximum may return the 0 instead)
        acc = tl.where(acc < 0, 0.0, acc)
    tile_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_GATE:
        gate = tl.load(gate_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                       mask=tile_mask, other=0.0)
        acc = tl.where(gate <= 0, 0.0, acc)  # as torch's ReLU backward: a NaN activation passes the gradient
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             cast_rtne(acc, c_ptr.dtype.element_ty, EMULATE_RTNE), mask=tile_mask)
    if ROW_SUM:
        row_limit = tl.where(pid_n == 0, M, 0)  # the first column block writes the row sums
        tl.store(row_sum_ptr + offs_m, cast_rtne(row_sum, row_sum_ptr.dtype.element_ty, EMULATE_RTNE),
                 mask=offs_m < row_limit)


@triton.jit
def _linear_backward_kernel(
    grad_ptr, inp_ptr, weight_ptr, grad_weight_ptr, grad_bias_ptr, grad_inp_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_im, stride_ik, stride_wn, stride_wk,
    stride_dwn, stride_dwk, stride_dis, stride_dim, stride_dik,
    NEED_GRAD_WEIGHT: tl.constexpr, NEED_GRAD_BIAS: tl.constexpr, NEED_GRAD_INPUT: tl.constexpr,
    GATE_GRAD_INPUT: tl.constexpr, SPLIT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of one layer ``z = inp @ W^T + b`` for all M (<= BLOCK_M) rows, given g = dL/dz.

    A program owns input features [k0, k0 + BLOCK_K): the stripe dW[:, k-block] and the complete
    input gradient of that block, which is summed over every output feature n inside the program
    (no atomics, no second pass). GATE_GRAD_INPUT applies the ReLU that produced ``inp``.

    SPLIT (split-K over n): the second grid dimension cuts the n-blocks into ``num_programs(1)``
    contiguous chunks (sizes differing by at most one block) and a program walks only its own.
    dW and db of its chunk are complete and stored as above; its share of the input gradient,
    gated, goes unrounded to the fp32 workspace ``grad_inp[split]`` (stride ``stride_dis``),
    which ``_split_sum_kernel`` reduces. The gate commutes with the sum (it zeroes whole
    columns), so the gated partials add up to the gated gradient, NaN and Inf included.
    """
    pid = tl.program_id(0)
    if SPLIT:
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        n_blocks = tl.cdiv(N, BLOCK_N)
        n_start = (split * n_blocks // n_splits) * BLOCK_N
        n_end = ((split + 1) * n_blocks // n_splits) * BLOCK_N
        grad_inp_ptr += split * stride_dis
    else:
        n_start = 0
        n_end = N
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mk_mask = mask_m[:, None] & mask_k[None, :]
    inp = cast_rtne(tl.load(inp_ptr + offs_m[:, None] * stride_im + offs_k[None, :] * stride_ik,
                  mask=mk_mask, other=0.0), COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)

    grad_inp = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = cast_rtne(tl.load(grad_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0), COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)
        nk_mask = mask_n[:, None] & mask_k[None, :]
        if NEED_GRAD_WEIGHT:
            grad_w = tl.dot(tl.trans(g), inp, input_precision=INPUT_PRECISION)
            tl.store(grad_weight_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
                     cast_rtne(grad_w, grad_weight_ptr.dtype.element_ty, EMULATE_RTNE), mask=nk_mask)
        if NEED_GRAD_BIAS:
            # Every program of a chunk sees all of its g; only the first one writes the bias gradient.
            grad_b = tl.sum(g.to(tl.float32), axis=0)
            bias_limit = tl.where(pid == 0, N, 0)
            tl.store(grad_bias_ptr + offs_n, cast_rtne(grad_b, grad_bias_ptr.dtype.element_ty, EMULATE_RTNE),
                     mask=offs_n < bias_limit)
        if NEED_GRAD_INPUT:
            w = cast_rtne(tl.load(weight_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=nk_mask, other=0.0), COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)
            grad_inp = tl.dot(g, w, grad_inp, input_precision=INPUT_PRECISION)

    if NEED_GRAD_INPUT:
        if GATE_GRAD_INPUT:
            grad_inp = tl.where(inp <= 0, 0.0, grad_inp)  # as torch's ReLU backward (NaN passes)
        if SPLIT:  # an fp32 partial sum: rounded once, after the reduction
            tl.store(grad_inp_ptr + offs_m[:, None] * stride_dim + offs_k[None, :] * stride_dik, grad_inp,
                     mask=mk_mask)
        else:
            tl.store(grad_inp_ptr + offs_m[:, None] * stride_dim + offs_k[None, :] * stride_dik,
                     cast_rtne(grad_inp, grad_inp_ptr.dtype.element_ty, EMULATE_RTNE), mask=mk_mask)


@triton.jit
def _split_sum_kernel(
    part_ptr, out_ptr, SPLITS, M, K,
    stride_ps, stride_pm, stride_pk, stride_om, stride_ok,
    EMULATE_RTNE: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
):
    """``out[m, k] = sum_s part[s, m, k]``, cast to out's dtype: the input gradient of a split
    backward. The partials are added in one fixed order (tiles of UNROLL consecutive splits, in
    split order, each tile summed by the same reduction; no atomics), so the result is
    deterministic. A tile's loads (of data just written, in L2) overlap instead of each waiting
    for the last."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    numel = M * K
    m = offs // K
    k = offs % K
    ptrs = part_ptr + m * stride_pm + k * stride_pk
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, SPLITS, UNROLL):
        offs_s = s0 + tl.arange(0, UNROLL)
        # Rows past the last split load 0.0, an exact no-op in the sum.
        parts = tl.load(ptrs[None, :] + offs_s[:, None] * stride_ps,
                        mask=(offs_s[:, None] < SPLITS) & (offs[None, :] < numel), other=0.0)
        acc += tl.sum(parts, axis=0)
    tl.store(out_ptr + m * stride_om + k * stride_ok, cast_rtne(acc, out_ptr.dtype.element_ty, EMULATE_RTNE),
             mask=offs < numel)


# --------------------------------------------------------------------------------------------
# Launch configurations: a short list per kernel, tuned once per shape on the GPU
# --------------------------------------------------------------------------------------------
def _row_block(m: int) -> int:
    """Rows per program: all rows (padded to the 16-row minimum of tl.dot) up to 128."""
    return pow2_block(m, 16, FUSED_BACKWARD_MAX_ROWS)


# A config is (block along the program dimension, block along the loop dimension, num_warps,
# num_stages): for "linear" (BLOCK_N, BLOCK_K, ...), for "backward" (BLOCK_K, BLOCK_N, ...).
#
# Which configs fit in registers depends on how a launch's products run ("path") and whether its
# operands load as 16-byte vectors. 16-bit operands ("mma16") and fp32 with TF32 ("tf32") run on
# the tensor cores; fp32 without TF32 ("fma", the default for fp32, as in PyTorch) runs on the
# FMA units, whose operand layouts hold several times the registers. Rows whose strides or widths
# are not multiples of 16 elements load element by element, with an address per element. Both
# take "narrow" configs: 8 warps and tiles of bounded volume. The rules keep every config a
# launcher may pick free of spills on sm_80 and sm_90, which the compile check
# (tests/kernels/test_gpu_compile.py) proves for every launch.
_LINEAR_CANDIDATES = ((16, 128, 4, 4), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3))
_BACKWARD_CANDIDATES = ((16, 64, 4, 3), (32, 32, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2))
_HEURISTIC_BLOCKS = (64, 32, 16)  # program blocks the heuristic picks from, widest first
# Tensor-core fused backward: live tile elements per thread (the input tile and its gradient,
# the grad tile, the dW tile). Measured on sm_80: 16-bit spilled at 224 (255 registers at 176),
# TF32 spilled at 144.
_BACKWARD_TILE_BUDGET = {"mma16": 160, "tf32": 128}
# Narrow configs: linear tiles up to 2^17 products per loop step (BLOCK_M x BLOCK_N x BLOCK_K),
# the fused backward on 16-wide loop blocks with BLOCK_M x BLOCK_K <= 4096.
_NARROW_LINEAR_VOLUME = 1 << 17
_NARROW_BACKWARD_AREA = 4096
_NARROW_BACKWARD_LOOP = 16
_INTERPRETER_CONFIG = (32, 32, 1, 1)  # small blocks: the tests' odd sizes cross block edges
_tuned: dict = {}


def _path(numerics: DotNumerics) -> str:
    if numerics.dtype != torch.float32:
        return "mma16"
    return "tf32" if numerics.precision == "tf32" else "fma"


def _aligned(*tensors: torch.Tensor) -> bool:
    """Every 2-D operand has a unit-stride dimension whose length, and the other dimension's
    stride, are multiples of 16 elements: what Triton needs to load it in 16-byte vectors."""
    for t in tensors:
        inner = 0 if t.stride(0) == 1 and t.shape[0] > 1 else 1
        if t.stride(inner) != 1 or t.shape[inner] % 16 or t.stride(1 - inner) % 16:
            return False
    return True


def _heuristic_config(kind: str, block: int, block_m: int, path: str, aligned: bool) -> Optional[tuple]:
    """The heuristic's config for a program block (None: that block does not fit)."""
    if path == "fma" or not aligned:
        if kind == "linear":
            return (block, min(64, _NARROW_LINEAR_VOLUME // (block_m * block)), 8, 3)
        return (block, _NARROW_BACKWARD_LOOP, 8, 2) if block_m * block <= _NARROW_BACKWARD_AREA else None
    if kind == "linear":  # a loop block sized for the operands: 16-bit ones take half the registers
        return (block, 128 if path == "mma16" else 64, 4, 3)
    return (block, 64, 4, 2)


def _shared_estimate(kind: str, config: tuple, block_m: int, operand_bytes: Tuple[int, int]) -> int:
    """Shared memory of a config, an upper bound of what Triton allocates (the compile check
    holds it against the compiler's number): ``num_stages`` pipelined operand tiles in the
    loaded dtypes, plus fp32 tiles for layout changes (linear: the epilogue's; backward: the
    input tile, the transposed grad tile and the dW tile)."""
    block, loop, _, stages = config
    pipelined = stages * loop * (block_m * operand_bytes[0] + block * operand_bytes[1])
    if kind == "linear":
        return pipelined + 4 * block_m * block
    return pipelined + 4 * (block_m * block + block_m * loop + loop * block)


def _fits_registers(kind: str, config: tuple, block_m: int, path: str) -> bool:
    """Held to the tensor-core fused backward's tile budget (no tensor-core config of the linear
    lists spilled; narrow configs are sized by construction)."""
    if kind == "linear" or config[2] == 8:
        return True
    block, loop, num_warps, _ = config
    live = (2 * block_m * block + block_m * loop + loop * block) / (32 * num_warps)
    return live <= _BACKWARD_TILE_BUDGET[path]


def launch_configs(kind: str, chip: Chip, block_m: int, operand_bytes: Tuple[int, int], path: str,
                   aligned: bool = True) -> tuple:
    """Every config the launcher may pick for one launch on ``chip``: the heuristic's picks and
    the tuning candidates, less those that would not fit the registers or the shared memory.
    Never empty.

    ``kind``: "linear" (``_linear_kernel``) or "backward" (``_linear_backward_kernel``);
    ``block_m``: rows per program; ``operand_bytes``: element sizes of the two operands streamed
    in the loop (linear: a, b; backward: grad, weight); ``path``: "mma16", "tf32" or "fma";
    ``aligned``: the operands load as 16-byte vectors (see ``_aligned``)."""
    if kind not in ("linear", "backward"):
        raise ValueError(f"`kind` must be 'linear' or 'backward', got {kind!r}")
    if path not in ("mma16", "tf32", "fma"):
        raise ValueError(f"`path` must be 'mma16', 'tf32' or 'fma', got {path!r}")
    picks = [_heuristic_config(kind, b, block_m, path, aligned) for b in _HEURISTIC_BLOCKS]
    if path == "fma" or not aligned:
        candidates = ()
    else:
        candidates = _LINEAR_CANDIDATES if kind == "linear" else _BACKWARD_CANDIDATES
    every = tuple(dict.fromkeys([c for c in picks if c is not None] + list(candidates)))
    fitting = tuple(c for c in every if _fits_registers(kind, c, block_m, path)
                    and _shared_estimate(kind, c, block_m, operand_bytes) <= chip.shared_bytes)
    # Nothing fits (a chip far smaller than sm_80): the smallest config, which then fails loudly.
    return fitting or (min(every, key=lambda c: _shared_estimate(kind, c, block_m, operand_bytes)),)


def _heuristic(kind: str, choices: Sequence[tuple], programs_along: int, other_programs: int, sms: int,
               block_m: int, path: str, aligned: bool) -> tuple:
    """The widest program block that still gives every SM a program (weight streaming wants
    many programs in flight), or the next narrower one that fits the chip."""
    preferred = next((b for b in _HEURISTIC_BLOCKS[:-1] if cdiv(programs_along, b) * other_programs >= sms),
                     _HEURISTIC_BLOCKS[-1])
    for block in _HEURISTIC_BLOCKS[_HEURISTIC_BLOCKS.index(preferred):]:
        config = _heuristic_config(kind, block, block_m, path, aligned)
        if config in choices:
            return config
    return choices[0]


def _config(kind: str, key: tuple, call: Callable[[tuple], KernelCall], configs: Callable[[Chip], tuple],
            operand: torch.Tensor) -> tuple:
    """Launch config of ``call``: tuned on first use per (kind, shape, dtypes) key by timing the
    heuristic's pick and the tuning candidates among ``configs(chip)`` with CUDA events (variants
    of a kernel that differ only in epilogue flags share the result), or the heuristic's pick
    where tuning is off (PTUNING_FAST_AUTOTUNE=0) or impossible (while a CUDA graph is being
    captured, or traced on fake tensors by torch.compile: ``operand``, an input of the launch,
    tells, and gives the device)."""
    device = operand.device
    if INTERPRETING or device.type != "cuda":
        return _INTERPRETER_CONFIG
    config = _tuned.get(key)
    if config is not None:
        return config
    choices = configs(chip_of(device))
    default = choices[0]
    if (os.environ.get("PTUNING_FAST_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing()
            or traced(operand)):  # traced by torch.compile: nothing to time
        return default
    timings = {}
    for config in choices:  # the heuristic's pick first
        def launch(calls=launches(call(config))):
            for kernel_call in calls:
                kernel_call.launch()
        try:
            launch()  # compiles; raises if the config does not fit the chip after all
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                launch()
            end.record()
            end.synchronize()
            timings[config] = start.elapsed_time(end)
        except Exception:  # out of shared memory / registers for this config on this chip
            continue
    _tuned[key] = config = min(timings, key=timings.get) if timings else default
    return config


def _choices(kind: str, chip: Chip, block_m: int, operand_bytes: Tuple[int, int], path: str, aligned: bool,
             programs_along: int, other_programs: int) -> tuple:
    """``launch_configs`` with the heuristic's pick for this launch first."""
    choices = launch_configs(kind, chip, block_m, operand_bytes, path, aligned)
    default = _heuristic(kind, choices, programs_along, other_programs, chip.sm_count, block_m, path, aligned)
    return (default,) + tuple(c for c in choices if c != default)


# --------------------------------------------------------------------------------------------
# Split-K of the fused backward
# --------------------------------------------------------------------------------------------
# Exact fp32 runs the fused backward on the FMA units, where one loop iteration over 16 output
# features is ~200 instructions per warp: a program per input-feature block that walks all d/16
# n-blocks is tens of microseconds of serial work at d = 768..4096 with at most one program per
# SM. Cutting the n-loop into chunks (a second grid dimension) shortens every program; the input
# gradient then comes as fp32 partial sums that ``_split_sum_kernel`` adds up. Tensor-core paths
# do an iteration in a few instructions and keep one launch.
_SPLIT_MAX_WAVES = 2  # programs per SM at most: more only trades loop iterations for waves


def _split_plan(path: str, k_programs: int, n_blocks: int, sms: int) -> int:
    """Chunks of the fused backward's loop over ``n_blocks`` output-feature blocks, for a launch
    of ``k_programs`` input-feature blocks on ``sms`` SMs: 1 unless ``path`` is "fma".

    Issue-bound model: a program's time is its loop iterations, ``cdiv(n_blocks, splits)``, and
    an SM runs ``cdiv(programs, sms)`` programs one after another; the split count minimises the
    product among those with at most two programs per SM, the largest among equals (more warps on
    an SM hide more load latency)."""
    if path != "fma":
        return 1
    most = max(1, min(n_blocks, _SPLIT_MAX_WAVES * sms // k_programs))
    return min(range(1, most + 1), key=lambda s: (cdiv(k_programs * s, sms) * cdiv(n_blocks, s), -s))


_FORCED_SPLITS: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("ptuning_fast_backward_splits",
                                                                               default=None)


@contextlib.contextmanager
def backward_splits(splits: int) -> Iterator[None]:
    """Inside the block the fused backward (up to 128 rows) cuts its loop over the output
    features into ``splits`` chunks (at most one per block of them) in every dtype and on every
    device, in place of :func:`_split_plan`'s choice, and picks its block for that many chunks;
    ``splits=1``: one launch, no workspace, the launch of the package before split-K. For tests
    and measurements; per context (thread, task), not process-wide."""
    if isinstance(splits, bool) or not isinstance(splits, int):
        raise TypeError(f"`splits` must be an int, got {type(splits).__name__}")
    if splits < 1:
        raise ValueError(f"`splits` must be >= 1, got {splits}")
    token = _FORCED_SPLITS.set(splits)
    try:
        yield
    finally:
        _FORCED_SPLITS.reset(token)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _launch_linear(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, numerics: DotNumerics, *,
                   bias: Optional[torch.Tensor] = None, relu: bool = False, gate: Optional[torch.Tensor] = None,
                   row_sum: Optional[torch.Tensor] = None) -> None:
    """``c[M, N] = epilogue(a[M, K] @ b[K, N])`` (any strides); see ``_linear_kernel``."""
    M, K = a.shape
    N = b.shape[1]
    block_m = _row_block(M)
    grid_m = cdiv(M, block_m)
    strides = (*a.stride(), *b.stride(), bias.stride(0) if bias is not None else 0,
               *(gate.stride() if gate is not None else (0, 0)), *c.stride())

    def call(config) -> KernelCall:
        block_n, block_k, num_warps, num_stages = config
        return KernelCall(_linear_kernel, (cdiv(N, block_n), grid_m), (
            a, b, bias if bias is not None else c, gate if gate is not None else c, c,
            row_sum if row_sum is not None else c,
            M, N, K, *strides), dict(
            HAS_BIAS=bias is not None, RELU=relu, HAS_GATE=gate is not None, ROW_SUM=row_sum is not None,
            COMPUTE_DTYPE=numerics.tl_dtype, DOT_DTYPE=numerics.dot_dtype, INPUT_PRECISION=numerics.precision,
            EMULATE_RTNE=INTERPRETING,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages))

    def configs(chip: Chip) -> tuple:
        return _choices("linear", chip, block_m, (a.element_size(), b.element_size()), _path(numerics),
                        _aligned(a, b), N, grid_m)

    key = ("linear", M, N, K, numerics.dtype, a.dtype, b.dtype, c.dtype, a.device)
    dispatch(call, configs, lambda: _config("linear", key, call, configs, a))


_SPLIT_SUM_BLOCK = 1024  # elements of the input gradient per program of the split sum
_SPLIT_SUM_UNROLL = 4  # partials in flight per element


def _launch_linear_backward(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, numerics: DotNumerics, *,
                            grad_weight: Optional[torch.Tensor], grad_bias: Optional[torch.Tensor],
                            grad_inp: Optional[torch.Tensor], gate: bool) -> None:
    """All gradients of one layer (M <= FUSED_BACKWARD_MAX_ROWS rows): one launch, or with a
    split loop (exact fp32, see ``_split_plan``) two: the split backward and the sum of its
    input-gradient partials."""
    M, N = grad.shape
    K = inp.shape[1]
    block_m = _row_block(M)
    path = _path(numerics)
    forced = _FORCED_SPLITS.get()
    unused = grad  # stands in for outputs that are not needed (never written)
    in_strides = (*grad.stride(), *inp.stride(), *weight.stride(),
                  *(grad_weight.stride() if grad_weight is not None else (0, 0)))

    def call(config) -> Tuple[KernelCall, ...]:
        # Configs are (BLOCK_K, BLOCK_N, num_warps, num_stages, splits); the interpreter's and
        # CPU's fixed config has no split count: one chunk.
        block_k, block_n, num_warps, num_stages = config[:4]
        n_blocks = cdiv(N, block_n)
        splits = min(forced, n_blocks) if forced is not None else (config[4] if len(config) > 4 else 1)
        partials = None
        if grad_inp is None:
            target, out_strides = unused, (0, 0, 0)
        elif splits > 1:  # the input gradient as fp32 partial sums, one (M, K) slice per chunk
            partials = target = torch.empty((splits, M, K), device=grad.device, dtype=torch.float32)
            out_strides = partials.stride()
        else:
            target, out_strides = grad_inp, (0, *grad_inp.stride())
        grid = (cdiv(K, block_k), splits) if splits > 1 else (cdiv(K, block_k),)
        backward = KernelCall(_linear_backward_kernel, grid, (
            grad, inp, weight,
            grad_weight if grad_weight is not None else unused,
            grad_bias if grad_bias is not None else unused,
            target, M, N, K, *in_strides, *out_strides), dict(
            NEED_GRAD_WEIGHT=grad_weight is not None, NEED_GRAD_BIAS=grad_bias is not None,
            NEED_GRAD_INPUT=grad_inp is not None, GATE_GRAD_INPUT=gate, SPLIT=splits > 1,
            COMPUTE_DTYPE=numerics.tl_dtype, DOT_DTYPE=numerics.dot_dtype, INPUT_PRECISION=numerics.precision,
            EMULATE_RTNE=INTERPRETING,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages))
        if partials is None:
            return (backward,)
        reduce = KernelCall(_split_sum_kernel, (cdiv(M * K, _SPLIT_SUM_BLOCK),), (
            partials, grad_inp, splits, M, K, *partials.stride(), *grad_inp.stride()), dict(
            EMULATE_RTNE=INTERPRETING, BLOCK=_SPLIT_SUM_BLOCK, UNROLL=_SPLIT_SUM_UNROLL, num_warps=4, num_stages=1))
        return (backward, reduce)

    def configs(chip: Chip) -> tuple:
        # An FMA launch may split its n-loop: count its n-blocks (or the forced chunks) as
        # programs when picking the widest block, then give each config its split count.
        n_programs = forced if forced is not None else cdiv(N, _NARROW_BACKWARD_LOOP) if path == "fma" else 1
        choices = _choices("backward", chip, block_m, (grad.element_size(), weight.element_size()), path,
                           _aligned(grad, inp, weight), K, n_programs)
        return tuple((*c, _split_plan(path, cdiv(K, c[0]), cdiv(N, c[1]), chip.sm_count)) for c in choices)

    key = ("backward", M, N, K, numerics.dtype, grad.dtype, inp.dtype, weight.dtype, grad.device, forced)
    dispatch(call, configs, lambda: _config("backward", key, call, configs, grad))


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device for the call."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def mlp_forward(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                compute_dtype: torch.dtype) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Forward of the head on 2-D ``x`` (M, D_in): returns (output, post-ReLU hidden activations).

    Output and activations are in ``compute_dtype``. One launch per layer.
    """
    numerics = dot_numerics(compute_dtype)
    hidden: List[torch.Tensor] = []
    h = x
    last = len(weights) - 1
    with _on_device(x.device):
        for i, (weight, bias) in enumerate(zip(weights, biases)):
            out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=compute_dtype)
            _launch_linear(h, weight.t(), out, numerics, bias=bias, relu=i < last)
            if i < last:
                hidden.append(out)
            h = out
    return h, hidden


def mlp_backward(grad_out: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[Optional[torch.Tensor]], hidden: Sequence[torch.Tensor], compute_dtype: torch.dtype,
                 need_grad_x: bool, need_grad_weights: Sequence[bool], need_grad_biases: Sequence[bool],
                 ) -> Tuple[Optional[torch.Tensor], List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]:
    """Gradients of the head given ``grad_out`` (M, D_out): (dx, [dW], [db]); None where not needed.

    ``hidden`` are the activations :func:`mlp_forward` returned. Weight and bias gradients are
    accumulated in fp32 and come back in their parameter's dtype; dx in x's dtype.
    One launch per layer for up to 128 rows (two in exact fp32 on a GPU, where the loop is split),
    two beyond.
    """
    with _on_device(x.device):
        return _backward_layers(grad_out, x, weights, biases, hidden, compute_dtype, need_grad_x, need_grad_weights,
                                need_grad_biases)


def _backward_layers(grad_out, x, weights, biases, hidden, compute_dtype, need_grad_x, need_grad_weights,
                     need_grad_biases):
    """The body of :func:`mlp_backward`: the layers from the last to the first one needed."""
    numerics = dot_numerics(compute_dtype)
    n_layers = len(weights)
    has_bias = [b is not None for b in biases]
    grad_weights: List[Optional[torch.Tensor]] = [None] * n_layers
    grad_biases: List[Optional[torch.Tensor]] = [None] * n_layers
    grad_x = None
    # The first layer that needs anything bounds how far the input gradient must travel.
    first_needed = 0 if need_grad_x else next(
        (i for i in range(n_layers) if need_grad_weights[i] or (has_bias[i] and need_grad_biases[i])), n_layers)
    fused = x.shape[0] <= FUSED_BACKWARD_MAX_ROWS
    g = grad_out
    for i in range(n_layers - 1, first_needed - 1, -1):
        weight = weights[i]
        inp = hidden[i - 1] if i > 0 else x
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_grad_weights[i] else None
        db = torch.empty_like(biases[i], memory_format=torch.contiguous_format) if (
            has_bias[i] and need_grad_biases[i]) else None
        need_inp = i > first_needed or (i == 0 and need_grad_x)
        d_inp = (torch.empty(inp.shape, device=inp.device, dtype=compute_dtype if i > 0 else x.dtype)
                 if need_inp else None)
        if fused:
            _launch_linear_backward(g, inp, weight, numerics, grad_weight=dw, grad_bias=db, grad_inp=d_inp,
                                    gate=i > 0)
        else:
            if dw is not None or db is not None:
                if dw is None:  # only the bias gradient: a row sum of g^T, into a scratch dW
                    dw_out = torch.empty_like(weight, memory_format=torch.contiguous_format)
                else:
                    dw_out = dw
                _launch_linear(g.t(), inp, dw_out, numerics, row_sum=db)
            if d_inp is not None:
                _launch_linear(g, weight, d_inp, numerics, gate=inp if i > 0 else None)
        grad_weights[i], grad_biases[i] = dw, db
        if i == 0:
            grad_x = d_inp
        g = d_inp
    return grad_x, grad_weights, grad_biases


# --------------------------------------------------------------------------------------------
# torch.compile: the launchers as two kernel ops (the autograd Function in ptuning_fast.ops)
# --------------------------------------------------------------------------------------------
_EMPTY = (0,)  # shape of the placeholder an op returns for a gradient that is not needed


def _forward_fake(x, weights, biases, compute_dtype):
    rows = x.shape[0]
    out = x.new_empty((rows, weights[-1].shape[0]), dtype=compute_dtype)
    hidden = [x.new_empty((rows, w.shape[0]), dtype=compute_dtype) for w in weights[:-1]]
    return [out, *hidden]


@kernel_op("ptuning_fast::prompt_mlp_forward", mutates_args=(), fake=_forward_fake)
def mlp_forward_op(x: torch.Tensor, weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
                   compute_dtype: torch.dtype) -> List[torch.Tensor]:
    """:func:`mlp_forward` as one op: ``[output, *hidden]``."""
    out, hidden = mlp_forward(x, weights, biases, compute_dtype)
    return [out, *hidden]


def _backward_fake(grad_out, x, weights, biases, hidden, compute_dtype, need_grad_x, need_grad_weights,
                   need_grad_biases):
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty(_EMPTY)
    grad_weights = [w.new_empty(w.shape if need else _EMPTY) for w, need in zip(weights, need_grad_weights)]
    grad_biases = [b.new_empty(b.shape) if need and b is not None else x.new_empty(_EMPTY)
                   for b, need in zip(biases, need_grad_biases)]
    return [grad_x, *grad_weights, *grad_biases]


@kernel_op("ptuning_fast::prompt_mlp_backward", mutates_args=(), fake=_backward_fake)
def mlp_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor],
                    biases: List[Optional[torch.Tensor]], hidden: List[torch.Tensor], compute_dtype: torch.dtype,
                    need_grad_x: bool, need_grad_weights: List[bool],
                    need_grad_biases: List[bool]) -> List[torch.Tensor]:
    """:func:`mlp_backward` as one op: ``[dx, *dW, *db]``, an empty (0,) tensor for each gradient
    not needed."""
    grad_x, grad_weights, grad_biases = mlp_backward(grad_out, x, weights, biases, hidden, compute_dtype,
                                                     need_grad_x, need_grad_weights, need_grad_biases)
    # Placeholders for gradients not needed: a fresh one each (outputs of an op must not
    # alias one another), with the dtype the fake implementation gives them.
    return ([x.new_empty(_EMPTY) if grad_x is None else grad_x]
            + [w.new_empty(_EMPTY) if g is None else g for w, g in zip(weights, grad_weights)]
            + [x.new_empty(_EMPTY) if g is None else g for g in grad_biases])


# --------------------------------------------------------------------------------------------
# Every launch, for the ahead-of-time compile check (ptuning_fast.kernels.aot)
# --------------------------------------------------------------------------------------------
# (compute dtype, dtype of the parameters and input, TF32 allowed): one dtype throughout, or fp32
# parameters and input under bf16 / fp16 autocast.
_FP32, _TF32 = (torch.float32, torch.float32, False), (torch.float32, torch.float32, True)
_BF16, _FP16 = (torch.bfloat16, torch.bfloat16, False), (torch.float16, torch.float16, False)
_BF16_AUTOCAST, _FP16_AUTOCAST = (torch.bfloat16, torch.float32, False), (torch.float16, torch.float32, False)
# fp16 takes bf16's tiles, layouts and instruction shapes (both 16-bit, same configs): every
# config is compiled for bf16; fp16 at the heuristic's pick.
_CONFIG_NUMERICS = (_FP32, _TF32, _BF16, _BF16_AUTOCAST)
_TWIN_NUMERICS = (_FP16, _FP16_AUTOCAST)
# The flag combinations: on each product path (FMA; TF32; tensor cores with 16-bit loads, and
# with fp32 loads of 16-bit products).
_FLAG_NUMERICS = (_FP32, _TF32, _BF16, _FP16_AUTOCAST)
# Rows T: one per row block of the fused backward (16, 32, 64, 128), and T > 128 (tiled backward).
# At T = 8 the heuristic's pick alone: a config's tiles at 16 rows are half its tiles at 32.
_FUSED_ROWS = (8, 20, 64, 100)
_TILED_ROWS = 200
_DEFAULT_ONLY_ROWS = (8,)
_FLAG_ROWS = (20, _TILED_ROWS)  # the flag combinations: at T = 20 (PEFT's usual) and tiled
_WIDTH = 1024  # a multiple of 16, as every model width; _ODD_WIDTH exercises unaligned rows
_ODD_WIDTH = 1000


class _Head(NamedTuple):
    """One input class of the head: widths, biases, which gradients are wanted, x's layout."""

    dims: Tuple[int, ...]
    bias: bool = True
    need_x: bool = True
    frozen: Tuple[int, ...] = ()  # layers whose weight and bias need no gradient
    frozen_weights: Tuple[int, ...] = ()  # layers whose weight alone needs no gradient
    strided_x: bool = False


# The heaviest launches (every flag set): compiled in every config the launcher may pick, on
# aligned rows and (at 128 rows, the most registers) on unaligned ones with fp32 loads.
_HEAVY_HEAD = _Head((_WIDTH,) * 4)
# Exact fp32 splits the fused backward's loop on the heavy head; a 16-wide output layer (one
# n-block) keeps the single launch: both compiled in every config.
_ONE_CHUNK_HEAD = _Head((_WIDTH, _WIDTH, 16))
_UNALIGNED_HEAD = _Head((_ODD_WIDTH,) * 4, strided_x=True)
_UNALIGNED_ROWS = (100, _TILED_ROWS)
_UNALIGNED_NUMERICS = (_FP32, _TF32, _BF16_AUTOCAST)
# Every other reachable combination of the kernels' flags, at the heuristic's pick: a flag only
# removes loads, products and stores, but the compiler may still allocate differently.
_FLAG_HEADS = (
    _Head((_WIDTH,) * 3, bias=False),  # no bias: forward without bias, backward without db
    _Head((_WIDTH,) * 3, bias=False, need_x=False),  # first layer: dW only
    _Head((_WIDTH,) * 4, need_x=False, frozen=(1,)),  # a frozen middle layer: dA only
    _Head((_WIDTH,) * 3, frozen=(0,)),  # frozen first layer under a trained x
    _Head((_WIDTH,) * 3, frozen_weights=(0, 1)),  # biases alone: db (tiled: a row sum into scratch)
    _Head((_WIDTH,) * 3, need_x=False, frozen_weights=(0, 1)),
    _Head((_WIDTH,), need_x=True),  # one layer: no ReLU anywhere
    _Head((_ODD_WIDTH,) * 3, strided_x=True),  # unaligned rows and a strided input, every flag
)


def _plan_head(chip: Chip, head: _Head, numerics: tuple, rows: int, defaults_only: bool) -> List[KernelCall]:
    """The launches of one forward and backward of ``head`` (on meta tensors) on ``chip``."""
    compute, dtype, tf32 = numerics
    meta = dict(device="meta", dtype=dtype)
    x = (torch.empty(rows, 2 * head.dims[0], **meta)[:, ::2] if head.strided_x
         else torch.empty(rows, head.dims[0], **meta))
    weights = [torch.empty(d_out, d_in, **meta) for d_in, d_out in zip(head.dims[:-1], head.dims[1:])]
    biases = [torch.empty(w.shape[0], **meta) if head.bias else None for w in weights]
    need_w = [i not in head.frozen and i not in head.frozen_weights for i in range(len(weights))]
    need_b = [i not in head.frozen for i in range(len(weights))]
    with tf32_allowed(tf32), planning(chip, defaults_only=defaults_only) as calls:
        out, hidden = mlp_forward(x, weights, biases, compute)
        mlp_backward(torch.empty_like(out), x, weights, biases, hidden, compute, head.need_x, need_w, need_b)
    return calls


def _is_heavy(call: KernelCall) -> bool:
    """Every flag of its call site set: forward with bias and ReLU, the tiled dW with the bias
    row sum, the tiled dA with the ReLU gate, the fused backward with all four; the split sum
    (it has no flags)."""
    k = call.kwargs
    if call.kernel is _split_sum_kernel:
        return True
    if call.kernel is _linear_kernel:
        return (k["HAS_BIAS"] and k["RELU"]) or k["ROW_SUM"] or k["HAS_GATE"]
    return k["NEED_GRAD_WEIGHT"] and k["NEED_GRAD_BIAS"] and k["NEED_GRAD_INPUT"] and k["GATE_GRAD_INPUT"]


def launch_variants(chip: Chip, *, defaults_only: bool = False) -> List[KernelCall]:
    """The launches :func:`mlp_forward` and :func:`mlp_backward` can make on ``chip``, for the
    ahead-of-time compile check (:mod:`ptuning_fast.kernels.aot`); duplicates included.

    Covered, on a head 1024 -> 1024 -> 1024 -> 1024 with every flag of each call site set
    (forward with bias and ReLU; fused backward with dW, db, dx and the ReLU gate; tiled dW with
    the bias row sum, tiled dA with the gate), at each row block (T = 8, 20, 64, 100: the fused
    backward; T = 200: the tiled one):
    every config the launcher may pick on the chip in fp32, fp32 with TF32, bf16 and fp32
    parameters under bf16 autocast (at T = 8 the heuristic's pick: the same configs at 16 rows
    hold half the tiles of T = 20's); the heuristic's pick in fp16 and under fp16 autocast. In
    exact fp32 the fused backward splits its loop there (with the split sum of its input
    gradient); its one-launch form is covered in every config on a 1024 -> 1024 -> 16 head. The
    same on a 1000-wide head with a strided input (rows load element by element), at T = 100 and
    200 in fp32, TF32 and fp32 parameters under bf16 autocast.
    Every other reachable flag combination (no bias, frozen layers, no input gradient, a single
    layer, biases alone; a 1000-wide head with a strided input), at the heuristic's pick, at
    T = 20 and T = 200, in fp32, fp32 with TF32, bf16 and fp32 parameters under fp16 autocast
    (each product path and load width). ``defaults_only``: the heuristic's picks alone."""
    if not isinstance(chip, Chip):
        raise TypeError(f"`chip` must be a Chip, got {type(chip).__name__}")
    calls = []
    for rows in _FUSED_ROWS + (_TILED_ROWS,):
        for numerics in _CONFIG_NUMERICS + _TWIN_NUMERICS:
            every_config = numerics in _CONFIG_NUMERICS and rows not in _DEFAULT_ONLY_ROWS and not defaults_only
            calls += [c for c in _plan_head(chip, _HEAVY_HEAD, numerics, rows, not every_config) if _is_heavy(c)]
            if numerics == _FP32 and rows != _TILED_ROWS:
                calls += [c for c in _plan_head(chip, _ONE_CHUNK_HEAD, numerics, rows, not every_config)
                          if c.kernel is _linear_backward_kernel and _is_heavy(c)]
            if rows in _UNALIGNED_ROWS and numerics in _UNALIGNED_NUMERICS:
                calls += [c for c in _plan_head(chip, _UNALIGNED_HEAD, numerics, rows, defaults_only) if _is_heavy(c)]
            if rows in _FLAG_ROWS and numerics in _FLAG_NUMERICS:
                for head in _FLAG_HEADS:
                    calls += _plan_head(chip, head, numerics, rows, True)
    return calls


__all__ = ["FUSED_BACKWARD_MAX_ROWS", "backward_splits", "launch_configs", "launch_variants", "mlp_backward",
           "mlp_backward_op", "mlp_forward", "mlp_forward_op"]
