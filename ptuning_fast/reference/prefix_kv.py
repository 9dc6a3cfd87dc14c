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
    return encode_prefix_with_hidden_reference(embedding, w1, b1, w2, b2)[0]


def stack_prefixes(prefixes: Sequence[torch.Tensor]) -> torch.Tensor:
    """The adapters' encoded prefixes ``(T_n, J)`` as one ``(N, P, J)`` tensor, ``P = max T_n``:
    each adapter's tokens right-aligned in the P columns, the columns before them zero."""
    P = max(p.shape[0] for p in prefixes)
    return torch.stack([F.pad(p, (0, 0, P - p.shape[0], 0)) for p in prefixes])


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
    padded = stack_prefixes(prefixes)  # (N, P, J)
    P = padded.shape[1]
    rows = padded[adapter_index.long()]  # (B, P, J)
    if dtype is not None:
        rows = rows.to(dtype)
    batch = rows.shape[0]
    rows = rows.view(batch, P, num_layers, 2, num_kv_heads, head_dim)
    return rows.permute(2, 3, 0, 4, 1, 5)


def prefix_layer_views(encoded: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple:
    """One adapter's encoded prefix ``(T, J)`` as ``2L`` views ``(Hkv, T, Dh)``: entry ``2l + s`` is
    layer ``l``'s keys (``s = 0``) or values (``s = 1``), in the layout the attention reads (one
    row of it). Leading dimensions are kept: ``(N, T, J)`` (:func:`stack_prefixes`) gives views
    ``(N, Hkv, T, Dh)``. Differentiable: the gradients of all the views meet in ``encoded``."""
    return _head_major_views(encoded, num_kv_heads, head_dim)


def prefix_layer_kv(encoded: torch.Tensor, layer: int, num_kv_heads: int, head_dim: int) -> tuple:
    """Layer ``layer``'s (keys, values): entries ``2l`` and ``2l + 1`` of :func:`prefix_layer_views`,
    without making the other layers' views."""
    return _head_major_views(encoded, num_kv_heads, head_dim, layer)


def _head_major_views(encoded: torch.Tensor, num_kv_heads: int, head_dim: int, layer: Optional[int] = None) -> tuple:
    *lead, T, J = encoded.shape
    n = len(lead)
    views = encoded.view(*lead, T, J // (num_kv_heads * head_dim), num_kv_heads, head_dim)
    if layer is not None:
        views = views.narrow(n + 1, 2 * layer, 2)
    return views.permute(n + 1, *range(n), n + 2, n, n + 3).unbind(0)


def write_prefix_reference(out: torch.Tensor, encoded: Sequence[torch.Tensor],
                           adapter_index: Optional[torch.Tensor]) -> None:
    """Write every row's prefix into the first ``P`` positions of a cache buffer
    ``out`` ``(L, 2, B, Hkv, C, Dh)`` (what the write kernel does): ``encoded[n]`` is adapter ``n``'s
    ``(T_n, J)`` prefix and ``adapter_index`` ``(B,)`` each row's adapter (None: one adapter, every
    row). With one adapter the prefix is broadcast over the rows, with no ``(B, T, J)`` temporary."""
    L, _, _, heads, _, head_dim = out.shape
    P = max(e.shape[0] for e in encoded)
    if adapter_index is None:  # cast the (T, J) prefix once, not in the broadcast copy (once per row)
        x = encoded[0].to(out.dtype).view(P, L, 2, heads, head_dim)
        out.narrow(-2, 0, P).copy_(x.permute(1, 2, 3, 0, 4).unsqueeze(2))
    else:
        out[..., :P, :] = prefix_kv_reference(encoded, adapter_index, L, heads, head_dim, dtype=out.dtype)


def reduce_prefix_grad_reference(grad: torch.Tensor, g: torch.Tensor, adapter_index: Optional[torch.Tensor],
                                 starts: Sequence[int], col0: int = 0) -> None:
    """The backward of the write (what the reduction kernel does): ``g[n, p, col0 + j]`` = the sum
    over adapter ``n``'s rows of the prefix gradient, 0 before the adapter's first column ``starts[n]``.

    ``grad``: the whole cache gradient ``(L, 2, B, Hkv, C, Dh)``, or one layer's key or value
    gradient ``(B, Hkv, C, Dh)`` whose columns start at ``col0``; only its first ``P`` positions
    are read. ``g``: ``(N, P, J)``, accumulated in its own dtype."""
    N, P, _ = g.shape
    part = grad[..., :P, :]
    if part.dim() == 6:  # (L, 2, B, Hkv, P, Dh): g[n] viewed as (L, 2, Hkv, P, Dh)
        L, _, _, heads, _, head_dim = part.shape
        target = g.view(N, P, L, 2, heads, head_dim).permute(0, 2, 3, 4, 1, 5)
        batch_dim = 2
    else:  # (B, Hkv, P, Dh): g[n]'s columns col0.. viewed as (Hkv, P, Dh)
        _, heads, _, head_dim = part.shape
        target = g[:, :, col0: col0 + heads * head_dim].view(N, P, heads, head_dim).transpose(1, 2)
        batch_dim = 0
    if adapter_index is None:  # one adapter: one reduction, written straight into g
        torch.sum(part, batch_dim, dtype=g.dtype, out=target[0])
        return
    target.zero_()
    target.index_add_(0, adapter_index, part.movedim(batch_dim, 0).to(g.dtype))
    for n, start in enumerate(starts):
        if start:
            target[n].narrow(-2, 0, start).zero_()


def encode_prefix_with_hidden_reference(embedding, w1=None, b1=None, w2=None, b2=None):
    """(encoded prefix (T, J), tanh hidden (T, Hh) or None): :func:`encode_prefix_reference` keeping
    what the backward of the projection needs."""
    if w2 is None:
        return embedding, None
    hidden = torch.tanh(F.linear(embedding, w1, b1))
    return F.linear(hidden, w2, b2), hidden


__all__ = ["encode_prefix_reference", "encode_prefix_with_hidden_reference", "prefix_kv_reference",
           "prefix_layer_kv", "prefix_layer_views", "reduce_prefix_grad_reference", "stack_prefixes",
           "write_prefix_reference"]
