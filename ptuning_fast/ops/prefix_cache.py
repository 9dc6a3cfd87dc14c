"""The per-step storage of a KV cache with every layer's deep-prompt prefix written in, and the
autograd Functions that route the cache's gradients back to the prefix parameters.

- :class:`PrefixKVBuffer`: one buffer ``(L, 2, B, Hkv, P + capacity, Dh)``; the prefix is written
  once per cache element (:mod:`ptuning_fast.ops.prefix_kv`), positions ``P ..`` are free for the
  text that the cache appends. With one adapter and gradients in full precision the buffer holds
  the encoded prefix in autograd's graph instead (``encoded_prefix``; see :class:`PrefixKVBuffer`).
- ``_PrefixTokenFunction``: its output is a scalar token that every layer's append takes as
  input, so that its backward runs after every layer has folded its prefix gradient into the
  buffer, and turns that reduced gradient into parameter gradients.
- :class:`AppendKV`: a cache layer's append (used by
  :class:`~ptuning_fast.prefix_tuning.cache.PrefixKVLayer`).

On the buffer's path the gradients of the prefix columns travel outside autograd, one layer at a
time, reduced over each adapter's rows as soon as attention produces them; they never exist as
one (L, 2, B, ...) tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._deprecation import warn_deprecated
from .._validation import check_positive_int
from ..reference.prefix_kv import prefix_layer_kv, prefix_layer_views
from .prefix_kv import PrefixGeometry, WeightsArg, _flat, _PrefixPlan, _unflat, check_geometry, check_weights


class _PrefixTokenFunction(torch.autograd.Function):
    """Writes the prefix into the buffer; its output is a scalar token that every layer's
    append takes as input, so that this backward runs after all of them have folded their
    prefix gradient into ``buffer.grad`` (the gradients themselves travel outside autograd,
    one layer at a time, and never exist as one (L, 2, B, ...) tensor)."""

    @staticmethod
    def forward(ctx, plan: _PrefixPlan, storage: torch.Tensor, slot: "_GradSlot", *flat):
        # ctx holds the plan and the gradient slot, never the buffer (which holds the token):
        # a token -> graph -> ctx -> token cycle would keep the whole step alive.
        ctx.plan, ctx.slot, ctx.hidden = plan, slot, plan.write(storage)
        ctx.save_for_backward(*[t for t in flat if t is not None])
        return torch.zeros((), device=storage.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _grad_token):
        plan, slot = ctx.plan, ctx.slot
        weights = _unflat(plan, ctx.saved_tensors)
        acc, slot.grad = slot.grad, None  # consumed: a second backward starts from zero
        if acc is None:  # no layer's prefix received a gradient
            return (None,) * (3 + len(_flat(weights)))
        return (None, None, None, *plan.param_grads(acc, ctx.hidden, ctx.needs_input_grad[3:], weights))


class _GradSlot:
    """The reduced prefix gradient (N, P, J) fp32, filled layer by layer during the backward."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: Optional[torch.Tensor] = None


class PrefixKVBuffer:
    """The per-step KV storage of every layer, ``(L, 2, B, Hkv, P + capacity, Dh)``, with every
    row's prefix written in (one write per cache element), and the gradient path back to the
    prefix parameters.

    ``storage[l, 0]`` / ``storage[l, 1]`` are layer ``l``'s keys / values; positions ``P ..``
    are free for the text (the cache appends there). When gradients are enabled and a prefix
    parameter requires grad, ``token`` is a scalar in the autograd graph: every consumer of the
    prefix passes it through its autograd Function and calls :meth:`accumulate_layer_grad` from
    its backward; the token's backward then turns the reduced gradient into parameter gradients.
    The buffer is for one step: build a new one for each forward that needs gradients.

    One adapter with gradients in full precision (a training step of one task; the cache and
    the parameters all fp32, or all fp64) takes autograd's own ops instead: the prefix is encoded
    once (T rows, :meth:`_PrefixPlan.encoded_prefix`) and each layer's append concatenates its
    prefix, broadcast over the rows, with the text; there is no ``storage`` and no ``token``. It
    moves the same bytes as the buffer (attention reads a per-row copy of the prefix either way),
    and its backward is autograd's C++ nodes instead of a Python Function per layer, which is
    what decides a step at small shapes. Half-precision caches keep the buffer: autograd would sum
    the rows' gradients in bf16/fp16, where the buffer's reduction (and PEFT) accumulate in fp32.
    """

    def __init__(
        self,
        weights: WeightsArg,
        geometry: PrefixGeometry,
        batch_size: Optional[int] = None,
        *,
        adapter_index: Optional[torch.Tensor] = None,
        capacity: int = 0,
        dtype: Optional[torch.dtype] = None,
    ):
        geometry = check_geometry(*geometry)
        weights = check_weights(weights, geometry)
        check_positive_int(capacity, "capacity", allow_zero=True)
        self.plan = _PrefixPlan(weights, geometry, adapter_index, batch_size, dtype)
        self.geometry = geometry
        self._slot: Optional[_GradSlot] = None  # the reduced prefix gradient of the token's path
        g, P = geometry, self.plan.P
        flat = _flat(weights)
        track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in flat)
        self.token: Optional[torch.Tensor] = None
        # Autograd's path: every adapter's encoded prefix, (P, J) or (N, P, J), in autograd's graph;
        # each layer's keys and values are views of it.
        self.encoded_prefix: Optional[torch.Tensor] = None
        self._layer_views: Optional[tuple] = None  # every layer's views, made once (eager)
        self.storage: Optional[torch.Tensor] = None
        if torch.compiler.is_compiling() or (track and self.plan.adapter_index is None
                                             and self.plan.full_precision()):
            # Under torch.compile every buffer takes autograd's ops: the compiler fuses each layer's
            # broadcast (or gather) of the prefix into the concatenation with the text, and the
            # buffer's Functions below keep gradients outside autograd, which it cannot trace.
            self.encoded_prefix = self.plan.encoded_prefix()
            # the rows and columns are all the cache reads of the plan from here on (a compiled
            # forward rebuilds every object the cache holds after the graph: the fewer, the faster)
            self.plan = self.plan.rows_only()
            return
        self.storage = torch.empty((g.num_layers, 2, self.plan.batch_size, g.num_kv_heads, P + capacity, g.head_dim),
                                   dtype=self.plan.dtype, device=self.plan.device)
        if track:
            self._slot = _GradSlot()
            self.token = _PrefixTokenFunction.apply(self.plan, self.storage, self._slot, *flat)
        else:
            with torch.no_grad():
                self.plan.write(self.storage)

    @property
    def num_virtual_tokens(self) -> int:
        """P, the number of prefix columns (the longest adapter's prefix)."""
        return self.plan.P

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def adapter_index(self) -> Optional[torch.Tensor]:
        return self.plan.adapter_index

    @property
    def requires_grad(self) -> bool:
        return self.token is not None or (self.encoded_prefix is not None and self.encoded_prefix.requires_grad)

    def layer_storage(self, layer_idx: int) -> tuple:
        """Layer ``layer_idx``'s keys and values ``(B, Hkv, capacity, Dh)`` as a cache layer starts
        with them: views of ``storage``, or (autograd's path) the prefix broadcast over the rows,
        outside autograd and full (capacity P: a layer grows before it writes)."""
        if self.storage is not None:
            return self.storage[layer_idx, 0], self.storage[layer_idx, 1]
        return tuple(t.detach() for t in self.layer_prefix(layer_idx))

    def layer_prefix(self, layer_idx: int) -> tuple:
        """(keys, values) prefix of layer ``layer_idx``, ``(B, Hkv, P, Dh)`` in the cache's dtype, in
        autograd's graph (autograd's path only): one adapter's broadcast over the rows, or each
        row's adapter's."""
        out = []
        for prefix in self._prefix_views(layer_idx):
            prefix = prefix.expand(self.batch_size, -1, -1, -1) if prefix.dim() == 3 \
                else prefix.index_select(0, self.adapter_index)
            out.append(prefix.to(self.plan.dtype))
        return tuple(out)

    def _prefix_views(self, layer_idx: int) -> tuple:
        """Layer ``layer_idx``'s (keys, values) views of ``encoded_prefix``. Eager: every layer's made
        at once, on first use (one op). Compiled: the layer's own, kept nowhere: a tensor kept on
        the cache leaves the graph as an output, and a view output costs the host ~15 us a call."""
        g = self.geometry
        if torch.compiler.is_compiling():
            return prefix_layer_kv(self.encoded_prefix, layer_idx, g.num_kv_heads, g.head_dim)
        if self._layer_views is None:
            self._layer_views = prefix_layer_views(self.encoded_prefix, g.num_kv_heads, g.head_dim)
        return self._layer_views[2 * layer_idx], self._layer_views[2 * layer_idx + 1]

    def prompt_lengths(self) -> torch.Tensor:
        """(B,) int64: each row's number of prefix tokens (in the last columns of the P)."""
        return self.plan.prompt_lengths()

    def prefix_lengths(self) -> torch.Tensor:
        """Deprecated name of :meth:`prompt_lengths`."""
        warn_deprecated("PrefixKVBuffer.prefix_lengths()", "PrefixKVBuffer.prompt_lengths()")
        return self.prompt_lengths()

    def accumulate_layer_grad(self, layer_idx: int, grad_keys: Optional[torch.Tensor],
                              grad_values: Optional[torch.Tensor]) -> None:
        """Fold layer ``layer_idx``'s key/value gradients (B, Hkv, >= P, Dh) into the reduced
        prefix gradient (only their first P positions are read)."""
        if self.encoded_prefix is not None:
            raise ValueError("PrefixKVBuffer: this buffer (one adapter, with gradients) routes the prefix gradient "
                             "through autograd; read its prefix with layer_prefix() instead of accumulating by hand")
        if not self.requires_grad:
            return
        if self._slot.grad is None:
            self._slot.grad = self.plan.new_grad()
        g = self.geometry
        block = g.num_kv_heads * g.head_dim
        for kv, grad in enumerate((grad_keys, grad_values)):
            if grad is not None:
                self.plan.reduce(grad, self._slot.grad, col0=(layer_idx * 2 + kv) * block)


class AppendKV(torch.autograd.Function):
    """Append one step's keys/values to a cache layer and return the layer's full keys/values.

    ``layer`` is a :class:`~ptuning_fast.prefix_tuning.cache.PrefixKVLayer` (``_write``, ``_alias``,
    ``buffer`` and ``layer_idx``). The forward writes through an alias that does not share the
    storage's version counter (later appends must not invalidate what attention saved); the
    backward returns the text slice of the key/value gradient to the new keys/values and folds
    the prefix slice into the buffer's reduced prefix gradient."""

    @staticmethod
    def forward(ctx, token, layer: "PrefixKVLayer", start: int, key_states, value_states, write: bool = True):
        if write:  # False when a checkpointed layer is recomputed: the storage already holds it
            layer._write(start, key_states, value_states)
        end = start + key_states.shape[-2]
        ctx.layer, ctx.start, ctx.end = layer, start, end
        ctx.set_materialize_grads(False)
        return layer._alias(end)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_keys, grad_values):
        layer, start, end = ctx.layer, ctx.start, ctx.end
        layer.buffer.accumulate_layer_grad(layer.layer_idx, grad_keys, grad_values)
        # The token is a dependency edge only (the prefix gradient went to the buffer): no gradient
        # for it, so nothing is summed over the layers; its Function's backward still runs after
        # every layer's.
        grad_k = grad_keys[:, :, start:end] if grad_keys is not None and ctx.needs_input_grad[3] else None
        grad_v = grad_values[:, :, start:end] if grad_values is not None and ctx.needs_input_grad[4] else None
        return None, None, None, grad_k, grad_v, None


__all__ = ["AppendKV", "PrefixKVBuffer"]
