"""Deep-prompt (P-Tuning v2) prefix -> every layer's key/value prefix, in the cache layout.

Two entry points, both differentiable with respect to the prefix parameters and both dispatched
through :func:`ptuning_fast.backend.resolve_backend` (Triton kernels of
:mod:`ptuning_fast.kernels.prefix_kv`, or the PyTorch reference):

- :func:`prefix_kv` returns ``(L, 2, B, Hkv, P + capacity, Dh)``: ``out[l, 0]`` / ``out[l, 1]``
  are layer ``l``'s key / value prefix of every row, as ``(batch, kv_heads, seq, head_dim)``.
- :class:`~ptuning_fast.ops.prefix_cache.PrefixKVBuffer` is the same computation as the storage
  of a KV cache for one step (see :mod:`ptuning_fast.ops.prefix_cache`).

Several adapters (issue: many tasks in one batch): ``weights`` is a list with one
:class:`PrefixWeights` per adapter and ``adapter_index`` ``(B,)`` says which adapter each row uses.
Each adapter's prefix is encoded once per call, whatever the number of rows using it, and the
backward sums each adapter's gradient over its own rows only. Adapters may have different numbers
of virtual tokens ``T_n``: ``P = max T_n`` and adapter ``n`` fills the LAST ``T_n`` of the ``P``
columns (the columns before hold zeros and must be masked; see ``prompt_lengths``).

The autograd Function is the same on both backends; only two primitives differ, the write and
the reduction of the cache gradient over each adapter's rows (``_ReferencePrimitives`` /
``_TritonPrimitives``). The parameter gradients are small dense products on the reduced gradient.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_positive_int, check_tensor
from ..backend import resolve_backend
from ..reference.prefix_kv import (encode_prefix_reference, encode_prefix_with_hidden_reference,
                                   reduce_prefix_grad_reference, stack_prefixes, write_prefix_reference)


class PrefixWeights(NamedTuple):
    """One adapter's prefix parameters, as PEFT's ``PrefixEncoder`` holds them.

    Without projection: ``embedding`` ``(T, J)`` is the prefix. With ``prefix_projection``:
    ``embedding`` ``(T, D)``, ``w1`` ``(Hh, D)``, ``b1`` ``(Hh,)``, ``w2`` ``(J, Hh)``, ``b2``
    ``(J,)`` (``transform[0]`` and ``transform[2]``); the prefix is ``tanh(E W1^T + b1) W2^T + b2``.
    """

    embedding: torch.Tensor
    w1: Optional[torch.Tensor] = None
    b1: Optional[torch.Tensor] = None
    w2: Optional[torch.Tensor] = None
    b2: Optional[torch.Tensor] = None

    @property
    def projected(self) -> bool:
        return self.w2 is not None

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    @property
    def width(self) -> int:
        return self.w2.shape[0] if self.projected else self.embedding.shape[1]


class PrefixGeometry(NamedTuple):
    """Where the prefix goes: ``num_layers`` x (key, value) x ``num_kv_heads`` x ``head_dim``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """J, the width of one encoded prefix token: ``L * 2 * Hkv * Dh``."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


WeightsArg = Union[PrefixWeights, torch.Tensor, Sequence]
_FIELDS = PrefixWeights._fields


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _as_weights(item, i: int) -> PrefixWeights:
    if isinstance(item, PrefixWeights):
        return item
    if isinstance(item, torch.Tensor):
        return PrefixWeights(item)
    if isinstance(item, (list, tuple)) and len(item) in (1, 5):
        return PrefixWeights(*item)
    raise TypeError(f"`weights[{i}]` must be a PrefixWeights, an embedding tensor, or an "
                    f"(embedding, w1, b1, w2, b2) tuple; got {type(item).__name__}")


def check_weights(weights: WeightsArg, geometry: PrefixGeometry) -> List[PrefixWeights]:
    """Normalise ``weights`` to a non-empty list of :class:`PrefixWeights` and check every shape."""
    if isinstance(weights, (PrefixWeights, torch.Tensor)):
        weights = [weights]
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError("`weights` must be a PrefixWeights or a non-empty list of them (one per adapter)")
    out = [_as_weights(w, i) for i, w in enumerate(weights)]
    device = out[0].embedding.device if isinstance(out[0].embedding, torch.Tensor) else None
    for i, w in enumerate(out):
        name = f"weights[{i}]"
        check_tensor(w.embedding, f"{name}.embedding", ndim=2, dtypes=FLOAT_DTYPES, device=device)
        if w.embedding.shape[0] == 0:
            raise ValueError(f"`{name}.embedding` has no virtual tokens (shape {tuple(w.embedding.shape)})")
        given = [f for f in _FIELDS[1:] if getattr(w, f) is not None]
        if given and len(given) != 4:
            missing = [f for f in _FIELDS[1:] if getattr(w, f) is None]
            raise ValueError(f"`{name}`: a projection needs w1, b1, w2 and b2; missing {missing}")
        if w.projected:
            check_tensor(w.w1, f"{name}.w1", ndim=2, dtypes=FLOAT_DTYPES, device=device)
            check_tensor(w.b1, f"{name}.b1", ndim=1, dtypes=FLOAT_DTYPES, device=device)
            check_tensor(w.w2, f"{name}.w2", ndim=2, dtypes=FLOAT_DTYPES, device=device)
            check_tensor(w.b2, f"{name}.b2", ndim=1, dtypes=FLOAT_DTYPES, device=device)
            hidden, dim = w.w1.shape
            if dim != w.embedding.shape[1]:
                raise ValueError(f"`{name}.w1` has in_features {dim}, expected {w.embedding.shape[1]} "
                                 "(the embedding width)")
            if w.b1.shape[0] != hidden:
                raise ValueError(f"`{name}.b1` has {w.b1.shape[0]} elements, expected {hidden}")
            if w.w2.shape[1] != hidden:
                raise ValueError(f"`{name}.w2` has in_features {w.w2.shape[1]}, expected {hidden}")
            if w.b2.shape[0] != w.w2.shape[0]:
                raise ValueError(f"`{name}.b2` has {w.b2.shape[0]} elements, expected {w.w2.shape[0]}")
        if w.width != geometry.width:
            raise ValueError(
                f"`{name}` encodes {w.width} values per virtual token, but num_layers * 2 * num_kv_heads * "
                f"head_dim = {geometry.num_layers} * 2 * {geometry.num_kv_heads} * {geometry.head_dim} = "
                f"{geometry.width}")
    return out


def check_geometry(num_layers, num_kv_heads, head_dim) -> PrefixGeometry:
    return PrefixGeometry(check_positive_int(num_layers, "num_layers"),
                          check_positive_int(num_kv_heads, "num_kv_heads"),
                          check_positive_int(head_dim, "head_dim"))


def check_adapter_index(adapter_index, num_adapters: int, batch_size, device) -> tuple:
    """(adapter_index as int64 or None, batch size)."""
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    if adapter_index is None:
        if num_adapters != 1:
            raise ValueError(f"`adapter_index` is required with {num_adapters} adapters: give the adapter of each row")
        if batch_size is None:
            raise ValueError("give `batch_size` (or `adapter_index`, which sets it)")
        return None, batch_size
    check_tensor(adapter_index, "adapter_index", ndim=1, dtypes=INDEX_DTYPES, device=device)
    if batch_size is not None and adapter_index.shape[0] != batch_size:
        raise ValueError(f"`adapter_index` has {adapter_index.shape[0]} entries but batch_size is {batch_size}")
    if adapter_index.shape[0] == 0:
        raise ValueError("`adapter_index` is empty: the batch needs at least one row")
    check_index_range(adapter_index, num_adapters, "adapter_index")
    return adapter_index.long(), adapter_index.shape[0]


def _check_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"`dtype` must be a floating torch.dtype (float16, bfloat16, float32, float64), got {dtype!r}")
    return dtype


# --------------------------------------------------------------------------------------------
# The plan: one call's adapters, rows and backend
# --------------------------------------------------------------------------------------------
class _ReferencePrimitives:
    """The write and the reduction in PyTorch (:mod:`ptuning_fast.reference.prefix_kv`)."""

    @staticmethod
    def write(plan: "_PrefixPlan", out: torch.Tensor) -> list:
        encoded, hidden = zip(*(encode_prefix_with_hidden_reference(*w) for w in plan.weights))
        write_prefix_reference(out, encoded, plan.adapter_index)
        return list(hidden)

    @staticmethod
    def reduce(plan: "_PrefixPlan", grad: torch.Tensor, g: torch.Tensor, col0: int) -> None:
        reduce_prefix_grad_reference(grad, g, plan.adapter_index, plan.starts, col0)


class _TritonPrimitives:
    """The write and the reduction as Triton kernels (:mod:`ptuning_fast.kernels.prefix_kv`)."""

    @staticmethod
    def write(plan: "_PrefixPlan", out: torch.Tensor) -> list:
        from ..kernels import prefix_kv as kernels

        # Under torch.compile through the kernel ops (their kernels go into the graph).
        compiling = torch.compiler.is_compiling()
        prefix_hidden = kernels.prefix_hidden_op if compiling else kernels.prefix_hidden_triton
        prefix_write = kernels.prefix_write_op if compiling else kernels.prefix_write_triton
        order, row_ptr, _ = plan.rows()
        if min(plan.num_tokens) < plan.P:  # columns a shorter prefix leaves empty: finite zeros
            out[..., : plan.P - min(plan.num_tokens), :].zero_()
        hidden = []
        for n, w in enumerate(plan.weights):
            h = prefix_hidden(w.embedding, w.w1, w.b1) if w.projected else None
            prefix_write(out, h if w.projected else w.embedding, w.w2, w.b2, order, row_ptr, n,
                         plan.starts[n])
            hidden.append(h)
        return hidden

    @staticmethod
    def reduce(plan: "_PrefixPlan", grad: torch.Tensor, g: torch.Tensor, col0: int) -> None:
        from ..kernels import prefix_kv as kernels

        prefix_grad = kernels.prefix_grad_op if torch.compiler.is_compiling() else kernels.prefix_grad_triton
        order, row_ptr, starts = plan.rows()
        prefix_grad(grad, g, order, row_ptr, starts, col0)


_ONE_ADAPTER_ROWS: dict = {}  # (batch size, device) -> (order, row_ptr, starts): constants, read only


def _one_adapter_rows(batch_size: int, device: torch.device) -> tuple:
    """(order, row_ptr, starts) of one adapter over ``batch_size`` rows: 0..B-1, [0, B], [0]."""
    if torch.compiler.is_compiling():
        key = None
    else:
        key = (batch_size, device)
        if key in _ONE_ADAPTER_ROWS:
            return _ONE_ADAPTER_ROWS[key]
    rows = (torch.arange(batch_size, dtype=torch.int32, device=device),
            torch.arange(2, dtype=torch.int32, device=device) * batch_size,
            torch.zeros(1, dtype=torch.int32, device=device))
    if key is not None:
        _ONE_ADAPTER_ROWS[key] = rows
    return rows


class _PrefixRows(NamedTuple):
    """What a cache reads of a :class:`_PrefixPlan` once the prefix is built: its rows and columns."""

    P: int
    batch_size: int
    adapter_index: Optional[torch.Tensor]
    dtype: torch.dtype
    num_tokens: List[int]
    device: torch.device

    def prompt_lengths(self) -> torch.Tensor:
        """(B,) int64: the number of prefix tokens of each row (its adapter's T_n)."""
        if self.adapter_index is None:
            return torch.full((self.batch_size,), self.P, dtype=torch.long, device=self.device)
        return torch.tensor(self.num_tokens, dtype=torch.long, device=self.device)[self.adapter_index]


class _PrefixPlan:
    """Validated inputs of one prefix build, and the backend's two primitives."""

    def __init__(self, weights, geometry: PrefixGeometry, adapter_index, batch_size, dtype):
        self.weights = weights
        self.geometry = geometry
        self.device = weights[0].embedding.device
        self.adapter_index, self.batch_size = check_adapter_index(
            adapter_index, len(weights), batch_size, self.device)
        self.dtype = _check_dtype(dtype, (weights[0].w2 if weights[0].projected else weights[0].embedding).dtype)
        self.num_tokens = [w.num_tokens for w in weights]
        self.P = max(self.num_tokens)
        self.starts = [self.P - t for t in self.num_tokens]
        tensors = [t for w in weights for t in w if t is not None]
        use_kernels = resolve_backend(self.device) == "triton"
        if use_kernels:
            from ..kernels.prefix_kv import KERNEL_DTYPES

            # float64 (the oracle dtype) runs on the reference path
            use_kernels = self.dtype in KERNEL_DTYPES and all(t.dtype in KERNEL_DTYPES for t in tensors)
        self.primitives = _TritonPrimitives if use_kernels else _ReferencePrimitives
        # The reduced gradient accumulates in fp32 (fp64 when anything is fp64).
        self.grad_dtype = torch.float64 if torch.float64 in (self.dtype, *(t.dtype for t in tensors)) \
            else torch.float32
        self._rows = None

    def rows(self):
        """(order, row_ptr, starts) int32 device tensors for the kernels: adapter n's rows are
        ``order[row_ptr[n]:row_ptr[n + 1]]``, its first prefix column ``starts[n]``."""
        if self._rows is None:
            dev, n = self.device, len(self.weights)
            if self.adapter_index is None:  # one adapter: the same constants every step, made once
                self._rows = _one_adapter_rows(self.batch_size, dev)
                return self._rows
            order = torch.argsort(self.adapter_index, stable=True).to(torch.int32)
            row_ptr = torch.zeros(n + 1, dtype=torch.int32, device=dev)
            row_ptr[1:] = torch.cumsum(torch.bincount(self.adapter_index, minlength=n), 0)
            starts = (torch.zeros(1, dtype=torch.int32, device=dev) if n == 1
                      else torch.tensor(self.starts, dtype=torch.int32, device=dev))
            self._rows = (order, row_ptr, starts)
        return self._rows

    def rows_only(self) -> _PrefixRows:
        """The plan's rows and columns, without its weights."""
        return _PrefixRows(self.P, self.batch_size, self.adapter_index, self.dtype, self.num_tokens, self.device)

    def prompt_lengths(self) -> torch.Tensor:
        return self.rows_only().prompt_lengths()

    def full_precision(self) -> bool:
        """The cache and every parameter share one dtype, fp32 or fp64 (no rounding to a half type)."""
        return self.dtype in (torch.float32, torch.float64) and all(
            t.dtype == self.dtype for w in self.weights for t in w if t is not None)

    def encoded_prefix(self) -> torch.Tensor:
        """Every adapter's prefix encoded once with autograd's own ops: ``(P, J)`` with one adapter
        (broadcast over the rows by the caller), ``(N, P, J)`` with several (gathered by
        ``adapter_index``; a shorter prefix is zero in the first columns, as the kernels write it).
        Layer ``l``'s keys and values are views of it (:func:`prefix_layer_kv`).

        Values are rounded to the cache's dtype, as PEFT casts the prefix to the model's (under
        autocast the encoder computes in the autocast dtype). Held in the cache's dtype where the
        rows' gradients may sum in it (:meth:`full_precision`), else in ``grad_dtype`` (fp32), so
        that the broadcast's backward sums the rows in fp32 as the buffer's reduction (and PEFT)
        do; the caller casts to the cache's dtype after broadcasting (exact)."""
        keep = self.dtype if self.full_precision() else self.grad_dtype
        encoded = [_cast(_rounded(encode_prefix_reference(*w), self.dtype), keep) for w in self.weights]
        return encoded[0] if len(encoded) == 1 else stack_prefixes(encoded)

    def write(self, out: torch.Tensor) -> list:
        """Write every row's prefix into ``out[..., :P, :]``; return what the backward needs
        (each adapter's tanh hidden, or None)."""
        return self.primitives.write(self, out)

    def new_grad(self) -> torch.Tensor:
        """The accumulator of the reduced prefix gradient, (N, P, J) in ``grad_dtype``."""
        return torch.zeros((len(self.weights), self.P, self.geometry.width), dtype=self.grad_dtype,
                           device=self.device)

    def reduce(self, grad: torch.Tensor, g: torch.Tensor, col0: int = 0) -> None:
        """Fold ``grad`` (the whole (L, 2, B, Hkv, C, Dh) cache gradient, or one layer's key or
        value gradient (B, Hkv, C, Dh) starting at prefix column ``col0``) into ``g``."""
        self.primitives.reduce(self, grad, g, col0)

    def param_grads(self, g: torch.Tensor, hidden: list, needs: Sequence[bool],
                    weights: Sequence[PrefixWeights]) -> list:
        """Flat list of gradients, 5 per adapter (None where not needed or not a parameter), of
        ``weights`` (the plan's, as saved for backward)."""
        grads = []
        for n, w in enumerate(weights):
            gn = g[n].narrow(0, self.starts[n], w.num_tokens) if self.starts[n] else g[n]  # (T_n, J)
            grads += _param_grads(w, hidden[n], gn, needs[5 * n: 5 * n + 5])
        return grads


def _param_grads(w: PrefixWeights, hidden, g: torch.Tensor, needs) -> list:
    """Gradients of one adapter's parameters given g = dL/d(encoded prefix) (T, J), fp32 or fp64."""
    if not w.projected:
        return [_cast(g, w.embedding.dtype) if needs[0] else None, None, None, None, None]
    # The two large products (J x T x Hh) run in W2's dtype (fp32 accumulation for half types);
    # the first layer is tiny and runs in g's dtype (fp32, or fp64).
    big, small = w.w2.dtype, g.dtype
    g_big = _cast(g, big)
    d_w2 = torch.mm(g_big.t(), _cast(hidden, big)) if needs[3] else None
    d_b2 = _cast(g.sum(0), w.b2.dtype) if needs[4] else None
    d_emb = d_w1 = d_b1 = None
    if needs[0] or needs[1] or needs[2]:
        d_hidden = _cast(torch.mm(g_big, w.w2), small)  # sums over every layer's key and value columns
        d_pre = _tanh_backward(d_hidden, _cast(hidden, small))
        if needs[1]:
            d_w1 = _cast(torch.mm(d_pre.t(), _cast(w.embedding, small)), w.w1.dtype)
        if needs[2]:
            d_b1 = _cast(d_pre.sum(0), w.b1.dtype)
        if needs[0]:
            d_emb = _cast(torch.mm(d_pre, _cast(w.w1, small)), w.embedding.dtype)
    return [d_emb, d_w1, d_b1, d_w2, d_b2]


# d_out * (1 - tanh^2) in one op (the backward of torch.tanh, given its output).
_tanh_backward = torch.ops.aten.tanh_backward.default


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when it is already ``dtype`` (the common case)."""
    return t if t.dtype == dtype else t.to(dtype)


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype``'s precision but kept in ``t``'s dtype, its gradient passed
    unchanged (a wider gradient is not rounded on its way back)."""
    if torch.promote_types(t.dtype, dtype) == dtype:  # dtype holds every value of t
        return t
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def _flat(weights: Sequence[PrefixWeights]) -> list:
    return [t for w in weights for t in w]


def _unflat(plan: _PrefixPlan, tensors: Sequence) -> List[PrefixWeights]:
    """Rebuild the PrefixWeights from tensors saved for backward (same None pattern as the plan)."""
    it = iter(tensors)
    return [PrefixWeights(*[next(it) if t is not None else None for t in w]) for w in plan.weights]


# --------------------------------------------------------------------------------------------
# prefix_kv: the differentiable op
# --------------------------------------------------------------------------------------------
class _PrefixKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _PrefixPlan, capacity: int, *flat):
        g = plan.geometry
        out = torch.zeros((g.num_layers, 2, plan.batch_size, g.num_kv_heads, plan.P + capacity, g.head_dim),
                          dtype=plan.dtype, device=plan.device)
        hidden = plan.write(out)
        ctx.plan, ctx.hidden = plan, hidden
        ctx.save_for_backward(*[t for t in flat if t is not None])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        plan = ctx.plan
        acc = plan.new_grad()
        plan.reduce(grad_out, acc)
        weights = _unflat(plan, ctx.saved_tensors)
        return (None, None, *plan.param_grads(acc, ctx.hidden, ctx.needs_input_grad[2:], weights))


def prefix_kv(
    weights: WeightsArg,
    adapter_index: Optional[torch.Tensor] = None,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    batch_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    capacity: int = 0,
) -> torch.Tensor:
    """Every layer's key/value prefix of every row, ``(L, 2, B, Hkv, P + capacity, Dh)``.

    Args:
        weights: one adapter's :class:`PrefixWeights` (or its embedding tensor), or a list of them.
        adapter_index: ``(B,)`` integer tensor, the adapter of each row; optional with one adapter
            (then give ``batch_size``).
        num_layers, num_kv_heads, head_dim: the model's layers, KV heads (GQA/MQA: fewer than
            the attention heads) and head size; each adapter must encode
            ``num_layers * 2 * num_kv_heads * head_dim`` values per virtual token.
        dtype: dtype of the result (the model's); default: the dtype of the prefix parameters.
            The prefix is accumulated in fp32 and rounded once to ``dtype``.
        capacity: extra zero columns after the prefix (room for the text that follows).

    Differentiable with respect to every tensor in ``weights``: the gradient of each adapter is
    summed over its rows and over all layers. Adapter ``n``'s ``T_n`` tokens occupy the last
    ``T_n`` of the ``P = max T_n`` prefix columns; the columns before them are zero.
    """
    geometry = check_geometry(num_layers, num_kv_heads, head_dim)
    weights = check_weights(weights, geometry)
    check_positive_int(capacity, "capacity", allow_zero=True)
    plan = _PrefixPlan(weights, geometry, adapter_index, batch_size, dtype)
    return _PrefixKVFunction.apply(plan, capacity, *_flat(weights))


__all__ = ["PrefixGeometry", "PrefixWeights", "check_adapter_index", "check_geometry", "check_weights",
           "prefix_kv"]
