"""What the Triton kernel families share: dtype mapping, rounding, the dot-product numerics and
host-side block-size helpers. Kernels and launchers live in one file per family beside this one."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

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


# Host-side integer helpers in plain Python (triton.cdiv & co. are slower constexpr functions).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The power of two covering ``n``, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


__all__ = ["INTERPRETING", "KERNEL_DTYPES", "TORCH_TO_TL", "DotNumerics", "cast_rtne", "cdiv", "dot_numerics",
           "pow2_block"]
