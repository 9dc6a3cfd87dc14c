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
    For T > 128 the same math runs as two launches per layer through ``_linear_kernel``
    (``dW, db`` with a row-sum epilogue; ``dA`` with a ReLU-gate epilogue).

Numerics: loads are cast to the compute dtype (the autocast dtype, else the parameter dtype), as
``F.linear`` under autocast casts its inputs; products accumulate in fp32; activations are
rounded to the compute dtype between layers, as the reference does; weight and bias gradients are
accumulated in fp32 and rounded once to the parameter dtype. fp32 matmuls follow
``torch.backends.cuda.matmul.allow_tf32`` (off by default: exact fp32, as PyTorch).

Entry points: the launchers :func:`mlp_forward` / :func:`mlp_backward`; the autograd Function and
the ``torch.compile`` custom ops around them are in :mod:`ptuning_fast.ops.prompt_mlp`. Nothing
here synchronises with the host, so a step can be captured in a CUDA graph (launch
configurations are tuned on the first eager call per shape and fall back to fixed heuristics
while a stream is being captured).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, DotNumerics, cast_rtne, cdiv, dot_numerics, pow2_block

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
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tile_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_GATE:
        gate = tl.load(gate_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                       mask=tile_mask, other=0.0)
        acc = tl.where(gate > 0, acc, 0.0)
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
    stride_dwn, stride_dwk, stride_dim, stride_dik,
    NEED_GRAD_WEIGHT: tl.constexpr, NEED_GRAD_BIAS: tl.constexpr, NEED_GRAD_INPUT: tl.constexpr,
    GATE_GRAD_INPUT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of one layer ``z = inp @ W^T + b`` for all M (<= BLOCK_M) rows, given g = dL/dz.

    A program owns input features [k0, k0 + BLOCK_K): the stripe dW[:, k-block] and the complete
    input gradient of that block, which is summed over every output feature n inside the program
    (no atomics, no second pass). GATE_GRAD_INPUT applies the ReLU that produced ``inp``.
    """
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mk_mask = mask_m[:, None] & mask_k[None, :]
    inp = cast_rtne(tl.load(inp_ptr + offs_m[:, None] * stride_im + offs_k[None, :] * stride_ik,
                  mask=mk_mask, other=0.0), COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)

    grad_inp = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
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
            # Every program sees all of g; only the first one writes the bias gradient.
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
            grad_inp = tl.where(inp > 0, grad_inp, 0.0)
        tl.store(grad_inp_ptr + offs_m[:, None] * stride_dim + offs_k[None, :] * stride_dik,
                 cast_rtne(grad_inp, grad_inp_ptr.dtype.element_ty, EMULATE_RTNE), mask=mk_mask)


# --------------------------------------------------------------------------------------------
# Launch configurations: a short list per kernel, tuned once per shape on the GPU
# --------------------------------------------------------------------------------------------
def _row_block(m: int) -> int:
    """Rows per program: all rows (padded to the 16-row minimum of tl.dot) up to 128."""
    return pow2_block(m, 16, FUSED_BACKWARD_MAX_ROWS)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# (block along the program dimension, block along the loop dimension, num_warps, num_stages)
_LINEAR_CANDIDATES = ((16, 128, 4, 4), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3))
_BACKWARD_CANDIDATES = ((16, 64, 4, 3), (32, 32, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2))
_INTERPRETER_CONFIG = (32, 32, 1, 1)  # small blocks: the tests' odd sizes cross block edges
_tuned: dict = {}


def _heuristic(kind: str, programs_along: int, other_programs: int, device: torch.device, wide: bool) -> tuple:
    """The widest program block that still gives every SM a program (weight streaming wants
    many programs in flight), and a loop block sized for the dtype's register budget."""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    block = 16
    for candidate in (64, 32):
        if cdiv(programs_along, candidate) * other_programs >= sms:
            block = candidate
            break
    if kind == "linear":
        return (block, 128 if wide else 64, 4, 3)
    return (block, 64, 4, 2)


def _config(kind: str, key: tuple, launch, programs_along: int, other_programs: int,
            device: torch.device, wide: bool) -> tuple:
    """Launch config for ``launch(config)``: tuned on first use per (kind, shape, dtypes) key by
    timing each candidate with CUDA events (variants of a kernel that differ only in epilogue
    flags share the result), or the heuristic where tuning is off (PTUNING_FAST_AUTOTUNE=0) or
    impossible (while a CUDA graph is being captured)."""
    if INTERPRETING or device.type != "cuda":
        return _INTERPRETER_CONFIG
    config = _tuned.get(key)
    if config is not None:
        return config
    default = _heuristic(kind, programs_along, other_programs, device, wide)
    if os.environ.get("PTUNING_FAST_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return default
    candidates = _LINEAR_CANDIDATES if kind == "linear" else _BACKWARD_CANDIDATES
    timings = {}
    for config in dict.fromkeys((default,) + candidates):
        try:
            launch(config)  # compiles; raises if the config does not fit the chip
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                launch(config)
            end.record()
            end.synchronize()
            timings[config] = start.elapsed_time(end)
        except Exception:  # out of shared memory / registers for this config on this chip
            continue
    _tuned[key] = config = min(timings, key=timings.get) if timings else default
    return config


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

    def launch(config):
        block_n, block_k, num_warps, num_stages = config
        _linear_kernel[(cdiv(N, block_n), grid_m)](
            a, b, bias if bias is not None else c, gate if gate is not None else c, c,
            row_sum if row_sum is not None else c,
            M, N, K, *strides,
            HAS_BIAS=bias is not None, RELU=relu, HAS_GATE=gate is not None, ROW_SUM=row_sum is not None,
            COMPUTE_DTYPE=numerics.tl_dtype, DOT_DTYPE=numerics.dot_dtype, INPUT_PRECISION=numerics.precision,
            EMULATE_RTNE=INTERPRETING,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )

    key = ("linear", M, N, K, numerics.dtype, a.dtype, b.dtype, c.dtype, a.device)
    launch(_config("linear", key, launch, N, grid_m, a.device, numerics.dtype != torch.float32))


def _launch_linear_backward(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, numerics: DotNumerics, *,
                            grad_weight: Optional[torch.Tensor], grad_bias: Optional[torch.Tensor],
                            grad_inp: Optional[torch.Tensor], gate: bool) -> None:
    """All gradients of one layer in one launch (M <= FUSED_BACKWARD_MAX_ROWS rows)."""
    M, N = grad.shape
    K = inp.shape[1]
    unused = grad  # stands in for outputs that are not needed (never written)
    strides = (*grad.stride(), *inp.stride(), *weight.stride(),
               *(grad_weight.stride() if grad_weight is not None else (0, 0)),
               *(grad_inp.stride() if grad_inp is not None else (0, 0)))

    def launch(config):
        block_k, block_n, num_warps, num_stages = config
        _linear_backward_kernel[(cdiv(K, block_k),)](
            grad, inp, weight,
            grad_weight if grad_weight is not None else unused,
            grad_bias if grad_bias is not None else unused,
            grad_inp if grad_inp is not None else unused,
            M, N, K, *strides,
            NEED_GRAD_WEIGHT=grad_weight is not None, NEED_GRAD_BIAS=grad_bias is not None,
            NEED_GRAD_INPUT=grad_inp is not None, GATE_GRAD_INPUT=gate,
            COMPUTE_DTYPE=numerics.tl_dtype, DOT_DTYPE=numerics.dot_dtype, INPUT_PRECISION=numerics.precision,
            EMULATE_RTNE=INTERPRETING,
            BLOCK_M=_row_block(M), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )

    key = ("backward", M, N, K, numerics.dtype, grad.dtype, inp.dtype, weight.dtype, grad.device)
    launch(_config("backward", key, launch, K, 1, grad.device, numerics.dtype != torch.float32))


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
    One launch per layer for up to 128 rows, two beyond.
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


__all__ = ["FUSED_BACKWARD_MAX_ROWS", "mlp_backward", "mlp_forward"]
