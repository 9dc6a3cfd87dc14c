"""Reference of the deep-prompt (P-Tuning v2 / prefix tuning) prefix and its per-layer K/V layout.

PEFT's ``PrefixEncoder`` turns the T virtual tokens into one row of width ``J = L * 2 * Hkv * Dh``
per token: the embedding itself, or ``Linear(D, Hh) -> Tanh -> Linear(Hh, J)`` of it with
``prefix_projection``. Column ``j`` of that row is ``((l * 2 + s) * Hkv + h) * Dh + d``: layer
``l``, key (``s = 0``) or value (``s = 1``), KV head ``h``, channel ``d``. PEFT's
``get_prompt`` reaches the attention layout with ``view(B, T, 2L, Hkv, Dh).permute(2, 0, 3, 1, 4)``.

Layout produced here (and by the kernels): one tensor ``(L, 2, B, Hkv, P, Dh)``, so that
``out[l, 0]`` / ``out[l, 1]`` are layer ``l``'s keys / values in the ``(batch, kv_heads, seq,
head_dim)`` layout the attention reads. Several adapters may share a batch: row ``b`` takes its
prefix from adapter ``adapter_index[b]``; with prefixes of different lengths, ``P`` is the longest
and adapter ``n``'s ``T_n`` tokens fill the LAST ``T_n`` of the ``P`` columns (next to the text;
the same convention as :mod:`ptuning_fast.reference.mask`). The other columns hold zeros and must
be masked by the caller.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def encode_prefix_reference(
    embedding: torch.Tensor,
    w1: Optional[torch.Tensor] = None,
    b1: Optional[torch.Tensor] = None,
    w2: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The T virtual tokens encoded as PEFT does, ``(T, J)``: the embedding, or its projection.

    ``embedding``: ``(T, J)`` without projection, ``(T, D)`` with it; ``w1`` ``(Hh, D)``,
    ``b1`` ``(Hh,)``, ``w2`` ``(J, Hh)``, ``b2`` ``(J,)`` are ``transform[0]`` and ``transform[2]``.
    """
    if w2 is None:
        return embedding
    return F.linear(torch.tanh(F.linear(embedding, w1, b1)), w2, b2)


def prefix_kv_reference(
    prefixes: Sequence[torch.Tensor],
    adapter_index: torch.Tensor,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Every layer's key/value prefix of every row, ``(L, 2, B, Hkv, P, Dh)`` (differentiable).

    ``prefixes[n]``: adapter ``n``'s encoded prefix ``(T_n, J)``; ``adapter_index``: ``(B,)``
    adapter of each row. The result is cast to ``dtype`` (default: the prefixes' dtype) after the
    gather, as PEFT casts the encoder output to the model's dtype.
    """
    P = max(p.shape[0] for p in prefixes)
    # Right-align each adapter's tokens in the P columns; the columns before them stay zero.
    padded = torch.stack([F.pad(p, (0, 0, P - p.shape[0], 0)) for p in prefixes])  # (N, P, J)
    rows = padded[adapter_index.long()]  # (B, P, J)
    if dtype is not None:
        rows = rows.to(dtype)
    batch = rows.shape[0]
    rows = rows.view(batch, P, num_layers, 2, num_kv_heads, head_dim)
    return rows.permute(2, 3, 0, 4, 1, 5)


__all__ = ["encode_prefix_reference", "prefix_kv_reference"]
