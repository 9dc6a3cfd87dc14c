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

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, KERNEL_DTYPES, cast_rtne, cdiv, dot_numerics, pow2_block


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
def _num_warps(block_elems: int) -> int:
    return 8 if block_elems >= 128 * 64 else 4


def prefix_hidden_triton(embedding: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """``tanh(embedding @ w1^T + b1)`` in fp32, shape (T, Hh)."""
    T, D = embedding.shape
    HH = w1.shape[0]
    hidden = torch.empty((T, HH), dtype=torch.float32, device=embedding.device)
    numerics = dot_numerics(torch.promote_types(embedding.dtype, w1.dtype))
    interp = INTERPRETING
    BLOCK_T = pow2_block(T, 16, 64)
    # Narrow column blocks on the GPU: Hh is small (~512), so wide blocks would leave most SMs idle.
    BLOCK_H = pow2_block(HH, 16, 128 if interp else 32)
    BLOCK_D = pow2_block(D, 16, 64 if interp else 32)
    grid = (cdiv(HH, BLOCK_H), cdiv(T, BLOCK_T))
    _prefix_hidden_kernel[grid](
        embedding, w1, b1, hidden, T, D, HH,
        embedding.stride(0), embedding.stride(1), w1.stride(0), w1.stride(1),
        COMPUTE_DTYPE=numerics.tl_dtype, DOT_DTYPE=numerics.dot_dtype, INPUT_PRECISION=numerics.precision,
        EMULATE_RTNE=interp,
        BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        num_warps=_num_warps(BLOCK_T * BLOCK_H),
    )
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
    interp = INTERPRETING
    BLOCK_T = pow2_block(T, 16, 64)
    BLOCK_J = pow2_block(J, 16, 256 if interp else 128)
    BLOCK_K = pow2_block(HH, 16, 64 if (interp or numerics.dtype != torch.float32) else 32)
    grid = (cdiv(J, BLOCK_J), cdiv(T, BLOCK_T))
    _prefix_write_kernel[grid](
        source, w2, b2, out, order, row_ptr,
        adapter, T, J, HH, p_start,
        source.stride(0), source.stride(1), stride_wj, stride_wk,
        out.stride(2), _merged_layer_kv_stride(out, "out"), out.stride(3), out.stride(4), out.stride(5),
        HKV=HKV, DH=DH,
        PROJECT=project, COMPUTE_DTYPE=numerics.tl_dtype, DOT_DTYPE=numerics.dot_dtype,
        INPUT_PRECISION=numerics.precision,
        EMULATE_RTNE=interp,
        BLOCK_T=BLOCK_T, BLOCK_J=BLOCK_J, BLOCK_K=BLOCK_K,
        num_warps=_num_warps(BLOCK_T * BLOCK_J),
    )


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
    interp = INTERPRETING
    # One layer's slice is only Hkv * Dh columns wide: small position blocks keep enough programs.
    BLOCK_P = pow2_block(P, 16 if interp else 8, 64 if interp else 8)
    BLOCK_J = pow2_block(JL, 16, 256 if interp else 128)
    grid = (cdiv(JL, BLOCK_J), cdiv(P, BLOCK_P), N)
    _prefix_grad_kernel[grid](
        grad, g, order, row_ptr, starts,
        P, JL, J, col0,
        stride_b, stride_ls, stride_h, stride_p, stride_d,
        HKV=HKV, DH=DH, BLOCK_P=BLOCK_P, BLOCK_J=BLOCK_J,
        num_warps=_num_warps(BLOCK_P * BLOCK_J),
    )


__all__ = ["KERNEL_DTYPES", "prefix_grad_triton", "prefix_hidden_triton", "prefix_write_triton"]
