"""Triton kernels of the deep prompt (P-Tuning v2): the prefix of the T distinct virtual tokens is
encoded once and every layer's key/value prefix is written straight into the cache layout, for
every batch row that uses it; the backward reduces the cache gradient over those rows.

Layout (see :mod:`ptuning_fast.reference.prefix_kv`): the cache buffer is
``(L, 2, B, Hkv, C, Dh)`` and prefix column ``j = ((l * 2 + s) * Hkv + h) * Dh + d`` of token ``t``
of adapter ``n`` lands at ``[l, s, b, h, P - T_n + t, d]`` for every row ``b`` of that adapter.

Forward, per adapter (the weights differ per adapter, and N is small):
    ``_prefix_hidden_kernel`` (projection only): ``hidden = tanh(E @ W1^T + b1)``, (T, Hh), fp32.
    ``_prefix_write_kernel``: a program owns a (T-block, J-block) tile of the encoded prefix:
    ``hidden @ W2^T + b2`` (projection; W2 is streamed once, it is the only large operand) or the
    embedding tile itself, then stores that tile to each of the adapter's rows. No (B, T, J)
    intermediate, no view/permute/split, no second copy: every cache byte is written once.

Backward (``_prefix_grad_kernel``): ``G[n, p, j] = sum over rows b of adapter n of
grad[l, s, b, h, p, d]``, accumulated in fp32; one launch covers all adapters, and can be run per
layer (the cache calls it from each layer's backward, so a layer's K/V gradient is folded in and
freed as soon as attention produces it). The parameter gradients are then small dense matrix
products on G (``ptuning_fast.ops.prefix_kv``).

Numerics: products accumulate in fp32 and the prefix is rounded once to the cache dtype; fp32
matmuls follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default: exact fp32, as PyTorch).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (INTERPRETING, KERNEL_DTYPES, Chip, DotNumerics, KernelCall, cast_rtne, cdiv, dispatch,
                      dot_numerics, kernel_op, planning, pow2_block, tf32_allowed)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """tanh in fp32. No tanh exists in every Triton version (nor in the interpreter): the closed
    form ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``, and a short odd series near 0, where
    ``1 - e`` would cancel (series error < 1e-10 for |x| < 0.1)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    near = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    t = tl.where(ax < 0.1, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _prefix_hidden_kernel(
    emb_ptr, w1_ptr, b1_ptr, hidden_ptr,
    T, D, HH,
    stride_et, stride_ed, stride_wh, stride_wd,
    COMPUTE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_T, BLOCK_H) tile of ``hidden = tanh(E @ W1^T + b1)``, stored in fp32 (T, HH)."""
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_t = offs_t < T
    mask_h = offs_h < HH
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        e = tl.load(emb_ptr + offs_t[:, None] * stride_et + offs_d[None, :] * stride_ed,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        # W1 is (HH, D): load its transpose tile (BLOCK_D, BLOCK_H) for the product.
        w = tl.load(w1_ptr + offs_d[:, None] * stride_wd + offs_h[None, :] * stride_wh,
                    mask=mask_d[:, None] & mask_h[None, :], other=0.0)
        e = cast_rtne(e, COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)
        w = cast_rtne(w, COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)
        acc = tl.dot(e, w, acc, input_precision=INPUT_PRECISION)
    acc += tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    tl.store(hidden_ptr + offs_t[:, None] * HH + offs_h[None, :], _tanh(acc),
             mask=mask_t[:, None] & mask_h[None, :])


@triton.jit
def _prefix_write_kernel(
    src_ptr, w2_ptr, b2_ptr, out_ptr, order_ptr, row_ptr_ptr,
    adapter, T, J, HH, p_start,
    stride_st, stride_sj, stride_wj, stride_wk,
    stride_ob, stride_ols, stride_oh, stride_op, stride_od,
    HKV: tl.constexpr, DH: tl.constexpr,
    PROJECT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A (BLOCK_T, BLOCK_J) tile of one adapter's encoded prefix, stored to each of its rows.

    PROJECT: ``src`` is the fp32 hidden (T, HH) and the tile is ``hidden @ W2^T + b2``.
    Otherwise ``src`` is the embedding (T, J) and the tile is a copy of it.
    The adapter's rows are ``order[row_ptr[adapter]:row_ptr[adapter + 1]]``.
    """
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_t = offs_t < T
    mask_j = offs_j < J
    tile_mask = mask_t[:, None] & mask_j[None, :]

    if PROJECT:
        acc = tl.zeros((BLOCK_T, BLOCK_J), dtype=tl.float32)
        for k0 in range(0, HH, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < HH
            h = tl.load(src_ptr + offs_t[:, None] * stride_st + offs_k[None, :] * stride_sj,
                        mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            # W2 is (J, HH): load its transpose tile (BLOCK_K, BLOCK_J).
            w = tl.load(w2_ptr + offs_k[:, None] * stride_wk + offs_j[None, :] * stride_wj,
                        mask=mask_k[:, None] & mask_j[None, :], other=0.0)
            # The fp32 hidden is rounded to W2's dtype, as F.linear in that dtype would.
            h = cast_rtne(h, COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)
            w = cast_rtne(w, COMPUTE_DTYPE, EMULATE_RTNE).to(DOT_DTYPE)
            acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
        acc += tl.load(b2_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.load(src_ptr + offs_t[:, None] * stride_st + offs_j[None, :] * stride_sj,
                      mask=tile_mask, other=0.0)
    value = cast_rtne(acc, out_ptr.dtype.element_ty, EMULATE_RTNE)

    # Column j -> (layer*2 + k/v, kv head, channel); token t -> cache position p_start + t.
    # int64 offsets: a cache of a large model holds more than 2^31 elements.
    d = offs_j % DH
    head = (offs_j // DH) % HKV
    layer_kv = offs_j // (DH * HKV)
    col = layer_kv.to(tl.int64) * stride_ols + head.to(tl.int64) * stride_oh + d.to(tl.int64) * stride_od
    offs = (p_start + offs_t).to(tl.int64)[:, None] * stride_op + col[None, :]

    first = tl.load(row_ptr_ptr + adapter)
    last = tl.load(row_ptr_ptr + adapter + 1)
    for r in range(first, last):
        row = tl.load(order_ptr + r).to(tl.int64)
        tl.store(out_ptr + row * stride_ob + offs, value, mask=tile_mask)


@triton.jit
def _prefix_grad_kernel(
    grad_ptr, g_ptr, order_ptr, row_ptr_ptr, start_ptr,
    P, JL, J, col0,
    stride_gb, stride_gls, stride_gh, stride_gp, stride_gd,
    HKV: tl.constexpr, DH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """``G[n, p, col0 + j] = sum_{rows b of adapter n} grad[b, p, j]`` for a (BLOCK_P, BLOCK_J)
    tile, where ``grad`` covers the JL prefix columns from ``col0`` on (all layers, or one layer's
    keys or values). Columns before the adapter's first token (``p < start[n]``) get 0."""
    adapter = tl.program_id(2)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < JL
    live_p = (offs_p >= tl.load(start_ptr + adapter)) & (offs_p < P)
    load_mask = live_p[:, None] & mask_j[None, :]

    d = offs_j % DH
    head = (offs_j // DH) % HKV
    layer_kv = offs_j // (DH * HKV)
    col = layer_kv.to(tl.int64) * stride_gls + head.to(tl.int64) * stride_gh + d.to(tl.int64) * stride_gd
    offs = offs_p.to(tl.int64)[:, None] * stride_gp + col[None, :]

    acc = tl.zeros((BLOCK_P, BLOCK_J), dtype=tl.float32)
    first = tl.load(row_ptr_ptr + adapter)
    last = tl.load(row_ptr_ptr + adapter + 1)
    for r in range(first, last):
        row = tl.load(order_ptr + r).to(tl.int64)
        acc += tl.load(grad_ptr + row * stride_gb + offs, mask=load_mask, other=0.0).to(tl.float32)

    g_offs = (adapter.to(tl.int64) * P + offs_p.to(tl.int64))[:, None] * J + (col0 + offs_j)[None, :]
    tl.store(g_ptr + g_offs, acc, mask=(offs_p < P)[:, None] & mask_j[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# Block sizes follow the shapes (no tuning): one config per launch, the same on every chip; the
# compile check (tests/kernels/test_gpu_compile.py) holds each against sm_80 and sm_90.
def _num_warps(block_elems: int, fma: bool = False) -> int:
    """8 warps for large tiles; fp32 products without TF32 (FMA units, whose operand layouts
    take more registers) from half the size: 32 x 128 spilled on sm_80 with 4."""
    return 8 if block_elems >= (64 * 64 if fma else 128 * 64) else 4


def _hidden_blocks(T: int, D: int, HH: int) -> tuple:
    """(BLOCK_T, BLOCK_H, BLOCK_D, num_warps) of ``_prefix_hidden_kernel``."""
    interp = INTERPRETING
    block_t = pow2_block(T, 16, 64)
    # Narrow column blocks on the GPU: Hh is small (~512), so wide blocks would leave most SMs idle.
    block_h = pow2_block(HH, 16, 128 if interp else 32)
    block_d = pow2_block(D, 16, 64 if interp else 32)
    return block_t, block_h, block_d, _num_warps(block_t * block_h)


def _write_blocks(T: int, J: int, HH: int, numerics: DotNumerics, project: bool) -> tuple:
    """(BLOCK_T, BLOCK_J, BLOCK_K, num_warps) of ``_prefix_write_kernel``."""
    interp = INTERPRETING
    block_t = pow2_block(T, 16, 64)
    block_j = pow2_block(J, 16, 256 if interp else 128)
    block_k = pow2_block(HH, 16, 64 if (interp or numerics.dtype != torch.float32) else 32)
    fma = project and numerics.dtype == torch.float32 and numerics.precision == "ieee"
    return block_t, block_j, block_k, _num_warps(block_t * block_j, fma)


def _grad_blocks(P: int, JL: int) -> tuple:
    """(BLOCK_P, BLOCK_J, num_warps) of ``_prefix_grad_kernel``."""
    interp = INTERPRETING
    # One layer's slice is only Hkv * Dh columns wide: small position blocks keep enough programs.
    block_p = pow2_block(P, 16 if interp else 8, 64 if interp else 8)
    block_j = pow2_block(JL, 16, 256 if interp else 128)
    return block_p, block_j, _num_warps(block_p * block_j)


def _launch(call, config) -> None:
    """Launch ``call(config)``, or list it while planning (one config on every chip)."""
    dispatch(call, lambda chip: (config,), lambda: config)


def prefix_hidden_triton(embedding: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """``tanh(embedding @ w1^T + b1)`` in fp32, shape (T, Hh)."""
    T, D = embedding.shape
    HH = w1.shape[0]
    hidden = torch.empty((T, HH), dtype=torch.float32, device=embedding.device)
    numerics = dot_numerics(torch.promote_types(embedding.dtype, w1.dtype))

    def call(config) -> KernelCall:
        block_t, block_h, block_d, num_warps = config
        return KernelCall(_prefix_hidden_kernel, (cdiv(HH, block_h), cdiv(T, block_t)), (
            embedding, w1, b1, hidden, T, D, HH,
            embedding.stride(0), embedding.stride(1), w1.stride(0), w1.stride(1)), dict(
            COMPUTE_DTYPE=numerics.tl_dtype, DOT_DTYPE=numerics.dot_dtype, INPUT_PRECISION=numerics.precision,
            EMULATE_RTNE=INTERPRETING,
            BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps))

    _launch(call, _hidden_blocks(T, D, HH))
    return hidden


def _merged_layer_kv_stride(t: torch.Tensor, what: str) -> int:
    """Stride between consecutive (layer, k/v) blocks of an (L, 2, ...) tensor: the two leading
    dims must merge into one (true for the cache buffer and for any contiguous gradient)."""
    if t.shape[0] > 1 and t.shape[1] > 1 and t.stride(0) != 2 * t.stride(1):
        raise ValueError(f"`{what}` must have stride(0) == 2 * stride(1) (its (layer, k/v) dims merged); "
                         f"got strides {t.stride()}")
    return t.stride(1) if t.shape[1] > 1 else t.stride(0) // 2


def prefix_write_triton(
    out: torch.Tensor,
    source: torch.Tensor,
    w2,
    b2,
    order: torch.Tensor,
    row_ptr: torch.Tensor,
    adapter: int,
    p_start: int,
) -> None:
    """Write one adapter's prefix into ``out`` (L, 2, B, Hkv, C, Dh) at positions
    ``p_start .. p_start + T - 1`` of each of its rows.

    ``source``: the fp32 hidden (T, Hh) when ``w2`` is given (projection), else the encoded
    prefix itself (T, J) in any float dtype.
    """
    L, _, _, HKV, _, DH = out.shape
    J = L * 2 * HKV * DH
    T = source.shape[0]
    project = w2 is not None
    HH = source.shape[1] if project else 0
    if project:
        numerics = dot_numerics(w2.dtype)
        stride_wj, stride_wk = w2.stride(0), w2.stride(1)
    else:
        numerics = dot_numerics(torch.float32)  # no product: a copy, rounded once to the cache dtype
        w2 = b2 = source  # unused by the kernel
        stride_wj = stride_wk = 0
    out_strides = (out.stride(2), _merged_layer_kv_stride(out, "out"), out.stride(3), out.stride(4), out.stride(5))

    def call(config) -> KernelCall:
        block_t, block_j, block_k, num_warps = config
        return KernelCall(_prefix_write_kernel, (cdiv(J, block_j), cdiv(T, block_t)), (
            source, w2, b2, out, order, row_ptr,
            adapter, T, J, HH, p_start,
            source.stride(0), source.stride(1), stride_wj, stride_wk, *out_strides), dict(
            HKV=HKV, DH=DH,
            PROJECT=project, COMPUTE_DTYPE=numerics.tl_dtype, DOT_DTYPE=numerics.dot_dtype,
            INPUT_PRECISION=numerics.precision,
            EMULATE_RTNE=INTERPRETING,
            BLOCK_T=block_t, BLOCK_J=block_j, BLOCK_K=block_k, num_warps=num_warps))

    _launch(call, _write_blocks(T, J, HH, numerics, project))


def prefix_grad_triton(
    grad: torch.Tensor,
    g: torch.Tensor,
    order: torch.Tensor,
    row_ptr: torch.Tensor,
    starts: torch.Tensor,
    col0: int,
) -> None:
    """Fold ``grad`` into ``g`` (N, P, J) fp32: ``g[n, p, col0:col0 + JL] = sum over adapter n's
    rows``. ``grad`` is the whole cache gradient (L, 2, B, Hkv, C, Dh) (then ``col0 = 0``) or one
    layer's key or value gradient (B, Hkv, C, Dh); only its first P positions are read."""
    N, P, J = g.shape
    if grad.dim() == 6:
        L, _, _, HKV, _, DH = grad.shape
        stride_ls = _merged_layer_kv_stride(grad, "grad")
        stride_b, stride_h, stride_p, stride_d = grad.stride(2), grad.stride(3), grad.stride(4), grad.stride(5)
        JL = L * 2 * HKV * DH
    else:
        _, HKV, _, DH = grad.shape
        stride_ls = 0
        stride_b, stride_h, stride_p, stride_d = grad.stride()
        JL = HKV * DH

    def call(config) -> KernelCall:
        block_p, block_j, num_warps = config
        return KernelCall(_prefix_grad_kernel, (cdiv(JL, block_j), cdiv(P, block_p), N), (
            grad, g, order, row_ptr, starts,
            P, JL, J, col0,
            stride_b, stride_ls, stride_h, stride_p, stride_d), dict(
            HKV=HKV, DH=DH, BLOCK_P=block_p, BLOCK_J=block_j, num_warps=num_warps))

    _launch(call, _grad_blocks(P, JL))


# --------------------------------------------------------------------------------------------
# torch.compile: the launchers as kernel ops (called from ptuning_fast.ops.prefix_kv when compiling)
# --------------------------------------------------------------------------------------------
def _hidden_fake(embedding, w1, b1):
    return embedding.new_empty((embedding.shape[0], w1.shape[0]), dtype=torch.float32)


@kernel_op("ptuning_fast::prefix_hidden", mutates_args=(), fake=_hidden_fake)
def prefix_hidden_op(embedding: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """:func:`prefix_hidden_triton` as an op."""
    return prefix_hidden_triton(embedding, w1, b1)


def _writes_in_place(*args) -> None:
    """Fake implementation of an op that only writes into one of its arguments."""


@kernel_op("ptuning_fast::prefix_write", mutates_args=("out",), fake=_writes_in_place)
def prefix_write_op(out: torch.Tensor, source: torch.Tensor, w2: Optional[torch.Tensor], b2: Optional[torch.Tensor],
                    order: torch.Tensor, row_ptr: torch.Tensor, adapter: int, p_start: int) -> None:
    """:func:`prefix_write_triton` as an op (writes into ``out``)."""
    prefix_write_triton(out, source, w2, b2, order, row_ptr, adapter, p_start)


@kernel_op("ptuning_fast::prefix_grad", mutates_args=("g",), fake=_writes_in_place)
def prefix_grad_op(grad: torch.Tensor, g: torch.Tensor, order: torch.Tensor, row_ptr: torch.Tensor,
                   starts: torch.Tensor, col0: int) -> None:
    """:func:`prefix_grad_triton` as an op (writes into ``g``)."""
    prefix_grad_triton(grad, g, order, row_ptr, starts, col0)


# --------------------------------------------------------------------------------------------
# Every launch, for the ahead-of-time compile check (ptuning_fast.kernels.aot)
# --------------------------------------------------------------------------------------------
class _Geometry(NamedTuple):
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int  # Hh of the projection

    @property
    def width(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim


_LLAMA_7B = _Geometry(32, 32, 128, 512)
# Other head layouts and a tiny one (every block below its cap): covered at bf16 alone, since
# they change only the constant divisors of the column index and the edge blocks.
_OTHER_GEOMETRIES = (_Geometry(32, 8, 128, 512), _Geometry(12, 12, 64, 512), _Geometry(2, 3, 5, 11))
# (parameter dtype, TF32 allowed, cache dtype): fp32 parameters under a model of each dtype, and
# parameters in the model's dtype.
_NUMERICS = ((torch.float32, False, torch.float32), (torch.float32, True, torch.float32),
             (torch.float32, False, torch.bfloat16), (torch.float32, False, torch.float16),
             (torch.bfloat16, False, torch.bfloat16), (torch.float16, False, torch.float16))
_TOKENS = (8, 20, 64)  # one per token block (16, 32, 64)
_BATCH = 8


def _plan_prefix(chip: Chip, geometry: _Geometry, tokens: int, param_dtype: torch.dtype, tf32: bool,
                 cache_dtype: torch.dtype, adapter: int) -> List[KernelCall]:
    """The launches of one prefix build (with and without projection) and its backward (whole
    cache gradient and one layer's), on meta tensors, as ``ptuning_fast.ops.prefix_kv`` makes them."""
    L, HKV, DH, HH = geometry
    J, D = geometry.width, HKV * DH
    params = dict(device="meta", dtype=param_dtype)
    index = dict(device="meta", dtype=torch.int32)
    out = torch.empty(L, 2, _BATCH, HKV, tokens + 16, DH, device="meta", dtype=cache_dtype)
    order, row_ptr, starts = (torch.empty(_BATCH, **index), torch.empty(adapter + 2, **index),
                              torch.empty(adapter + 1, **index))
    g = torch.empty(adapter + 1, tokens, J, device="meta", dtype=torch.float32)
    with tf32_allowed(tf32), planning(chip) as calls:
        hidden = prefix_hidden_triton(torch.empty(tokens, D, **params), torch.empty(HH, D, **params),
                                      torch.empty(HH, **params))
        prefix_write_triton(out, hidden, torch.empty(J, HH, **params), torch.empty(J, **params), order, row_ptr,
                            adapter, 0)
        prefix_write_triton(out, torch.empty(tokens, J, **params), None, None, order, row_ptr, adapter, 0)
        prefix_grad_triton(torch.empty_like(out), g, order, row_ptr, starts, 0)
        prefix_grad_triton(torch.empty(_BATCH, HKV, tokens + 16, DH, device="meta", dtype=cache_dtype), g, order,
                           row_ptr, starts, 2 * HKV * DH)
    return calls


def launch_variants(chip: Chip, *, defaults_only: bool = False) -> List[KernelCall]:
    """The launches :func:`prefix_hidden_triton`, :func:`prefix_write_triton` and
    :func:`prefix_grad_triton` can make on ``chip``, for the ahead-of-time compile check
    (:mod:`ptuning_fast.kernels.aot`); duplicates included. Each launch has one config (block
    sizes follow the shapes), so ``defaults_only`` changes nothing.

    Covered: Llama-7B's layout (32 layers, 32 KV heads of 128, Hh = 512) x (parameters, cache) in
    (fp32, fp32), (fp32 with TF32, fp32), (fp32, bf16), (fp32, fp16), (bf16, bf16), (fp16, fp16)
    x T = 8, 20, 64 (each token block) x projection or not x the whole or one layer's gradient,
    for the first adapter; at T = 20 with bf16 parameters and cache, the second adapter (its index
    a JIT constant) and three other layouts (8 KV heads; 12 heads of 64; a tiny one below every
    block cap).
    Other pairs combine loads and stores of widths covered here."""
    if not isinstance(chip, Chip):
        raise TypeError(f"`chip` must be a Chip, got {type(chip).__name__}")
    calls = []
    for param_dtype, tf32, cache_dtype in _NUMERICS:
        for tokens in _TOKENS:
            calls += _plan_prefix(chip, _LLAMA_7B, tokens, param_dtype, tf32, cache_dtype, 0)
    calls += _plan_prefix(chip, _LLAMA_7B, 20, torch.bfloat16, False, torch.bfloat16, 1)
    for geometry in _OTHER_GEOMETRIES:
        calls += _plan_prefix(chip, geometry, 20, torch.bfloat16, False, torch.bfloat16, 0)
    return calls


__all__ = ["KERNEL_DTYPES", "launch_variants", "prefix_grad_op", "prefix_grad_triton", "prefix_hidden_op",
           "prefix_hidden_triton", "prefix_write_op", "prefix_write_triton"]
