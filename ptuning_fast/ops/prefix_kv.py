"""Deep-prompt (P-Tuning v2) prefix -> every layer's key/value prefix, in the cache layout.

Two entry points, both differentiable with respect to the prefix parameters and both dispatched
through :func:`ptuning_fast.backend.resolve_backend` (Triton kernels of
:mod:`ptuning_fast.kernels.prefix_kv`, or the PyTorch reference):

- :func:`prefix_kv` returns ``(L, 2, B, Hkv, P + capacity, Dh)``: ``out[l, 0]`` / ``out[l, 1]``
  are layer ``l``'s key / value prefix of every row, as ``(batch, kv_heads, seq, head_dim)``.
- :class:`PrefixKVBuffer` is the same computation as the storage of a KV cache for one step:
  it writes the prefix into a buffer that also has room for the text tokens that follow, and
  takes the gradient of the prefix columns layer by layer (see
  :mod:`ptuning_fast.integrations.cache`), reducing each over the rows as it arrives.

Several adapters (issue: many tasks in one batch): ``weights`` is a list with one
:class:`PrefixWeights` per adapter and ``adapter_index`` ``(B,)`` says which adapter each row uses.
Each adapter's prefix is encoded once per call, whatever the number of rows using it, and the
backward sums each adapter's gradient over its own rows only. Adapters may have different numbers
of virtual tokens ``T_n``: ``P = max T_n`` and adapter ``n`` fills the LAST ``T_n`` of the ``P``
columns (the columns before hold zeros and must be masked; see ``prefix_lengths``).

The autograd Functions live here rather than in the kernels module because their structure is
the same on both backends; only the three primitives (write, reduce, and the dense products of
the parameter gradients) differ.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_positive_int, check_tensor
from ..backend import resolve_backend
from ..reference.prefix_kv import prefix_kv_reference


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
# The plan: one call's adapters, rows and backend, and the three primitives
# --------------------------------------------------------------------------------------------
class _PrefixPlan:
    """Validated inputs of one prefix build and the backend-specific primitives."""

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
        backend = resolve_backend(self.device)
        if backend == "triton":
            from ..kernels.prefix_kv import KERNEL_DTYPES

            tensors = [t for w in weights for t in w if t is not None]
            if self.dtype not in KERNEL_DTYPES or any(t.dtype not in KERNEL_DTYPES for t in tensors):
                backend = "reference"  # float64 runs on the reference path
        self.backend = backend
        # The reduced gradient accumulates in fp32 (fp64 when anything is fp64).
        self.grad_dtype = torch.float64 if torch.float64 in (self.dtype, *(t.dtype for w in weights for t in w
                                                                           if t is not None)) else torch.float32
        self._rows = None

    # -- rows of each adapter, grouped (kernels) --------------------------------------------
    def rows(self):
        """(order, row_ptr, starts) int32 device tensors: adapter n's rows are
        ``order[row_ptr[n]:row_ptr[n + 1]]``, its first prefix column ``starts[n]``."""
        if self._rows is None:
            dev, n = self.device, len(self.weights)
            if self.adapter_index is None:
                order = torch.arange(self.batch_size, dtype=torch.int32, device=dev)
                row_ptr = torch.arange(2, dtype=torch.int32, device=dev) * self.batch_size
            else:
                order = torch.argsort(self.adapter_index, stable=True).to(torch.int32)
                row_ptr = torch.zeros(n + 1, dtype=torch.int32, device=dev)
                row_ptr[1:] = torch.cumsum(torch.bincount(self.adapter_index, minlength=n), 0)
            starts = (torch.zeros(1, dtype=torch.int32, device=dev) if n == 1
                      else torch.tensor(self.starts, dtype=torch.int32, device=dev))
            self._rows = (order, row_ptr, starts)
        return self._rows

    def prefix_lengths(self) -> torch.Tensor:
        """(B,) int64: the number of prefix tokens of each row (its adapter's T_n)."""
        if self.adapter_index is None:
            return torch.full((self.batch_size,), self.P, dtype=torch.long, device=self.device)
        return torch.tensor(self.num_tokens, dtype=torch.long, device=self.device)[self.adapter_index]

    # -- forward: write the prefix --------------------------------------------------------
    def write(self, out: torch.Tensor) -> list:
        """Write every row's prefix into ``out[..., :P, :]``; return what the backward needs
        (each adapter's fp32 tanh hidden, or None)."""
        if self.backend == "triton":
            from ..kernels.prefix_kv import prefix_hidden_triton, prefix_write_triton

            order, row_ptr, _ = self.rows()
            if min(self.num_tokens) < self.P:  # columns a shorter prefix leaves empty: finite zeros
                out[..., : self.P - min(self.num_tokens), :].zero_()
            hidden = []
            for n, w in enumerate(self.weights):
                h = prefix_hidden_triton(w.embedding, w.w1, w.b1) if w.projected else None
                prefix_write_triton(out, h if w.projected else w.embedding, w.w2, w.b2,
                                    order, row_ptr, n, self.starts[n])
                hidden.append(h)
            return hidden

        hidden, encoded = [], []
        for w in self.weights:
            if w.projected:  # as encode_prefix_reference, keeping the hidden for the backward
                h = torch.tanh(F.linear(w.embedding, w.w1, w.b1))
                encoded.append(F.linear(h, w.w2, w.b2))
                hidden.append(h)
            else:
                encoded.append(w.embedding)
                hidden.append(None)
        g = self.geometry
        if len(self.weights) == 1:  # one adapter: broadcast over the rows, no (B, T, J) temporary
            x = encoded[0].to(out.dtype).view(self.P, g.num_layers, 2, g.num_kv_heads, g.head_dim)
            out[..., : self.P, :] = x.permute(1, 2, 3, 0, 4).unsqueeze(2)
        else:
            out[..., : self.P, :] = prefix_kv_reference(encoded, self.adapter_index, g.num_layers,
                                                        g.num_kv_heads, g.head_dim, dtype=out.dtype)
        return hidden

    # -- backward: reduce the cache gradient over each adapter's rows ----------------------
    def new_grad(self) -> torch.Tensor:
        """The accumulator of the reduced prefix gradient, (N, P, J) in ``grad_dtype``."""
        return torch.zeros((len(self.weights), self.P, self.geometry.width), dtype=self.grad_dtype,
                           device=self.device)

    def reduce(self, grad: torch.Tensor, g: torch.Tensor, col0: int = 0) -> None:
        """Fold ``grad`` (the whole (L, 2, B, Hkv, C, Dh) cache gradient, or one layer's key or
        value gradient (B, Hkv, C, Dh) starting at prefix column ``col0``) into ``g``."""
        if self.backend == "triton":
            from ..kernels.prefix_kv import prefix_grad_triton

            order, row_ptr, starts = self.rows()
            prefix_grad_triton(grad, g, order, row_ptr, starts, col0)
            return
        P = self.P
        part = grad[..., :P, :].to(g.dtype)
        if part.dim() == 6:  # (L, 2, B, Hkv, P, Dh) -> (B, P, J)
            rows = part.permute(2, 4, 0, 1, 3, 5).reshape(part.shape[2], P, -1)
        else:  # (B, Hkv, P, Dh) -> (B, P, Hkv * Dh)
            rows = part.permute(0, 2, 1, 3).reshape(part.shape[0], P, -1)
        if self.adapter_index is None:
            sums = rows.sum(0, keepdim=True)
        else:
            sums = torch.zeros((len(self.weights),) + rows.shape[1:], dtype=g.dtype, device=rows.device)
            sums.index_add_(0, self.adapter_index, rows)
        for n, start in enumerate(self.starts):
            sums[n, :start] = 0
        g[:, :, col0: col0 + rows.shape[-1]] = sums

    # -- parameter gradients from the reduced gradient --------------------------------------
    def param_grads(self, g: torch.Tensor, hidden: list, needs: Sequence[bool]) -> list:
        """Flat list of gradients, 5 per adapter (None where not needed or not a parameter)."""
        grads = []
        for n, w in enumerate(self.weights):
            gn = g[n, self.starts[n]:]  # (T_n, J)
            grads += _param_grads(w, hidden[n], gn, needs[5 * n: 5 * n + 5])
        return grads


def _param_grads(w: PrefixWeights, hidden, g: torch.Tensor, needs) -> list:
    """Gradients of one adapter's parameters given g = dL/d(encoded prefix) (T, J), fp32 or fp64."""
    if not w.projected:
        return [g.to(w.embedding.dtype) if needs[0] else None, None, None, None, None]
    # The two large products (J x T x Hh) run in W2's dtype (fp32 accumulation for half types);
    # the first layer is tiny and runs in g's dtype (fp32, or fp64).
    big, small = w.w2.dtype, g.dtype
    h_small = hidden.to(small)
    g_big = g.to(big)
    d_w2 = (g_big.t() @ hidden.to(big)) if needs[3] else None
    d_b2 = g.sum(0).to(w.b2.dtype) if needs[4] else None
    d_emb = d_w1 = d_b1 = None
    if needs[0] or needs[1] or needs[2]:
        d_hidden = (g_big @ w.w2).to(small)  # sums over every layer's key and value columns
        d_pre = d_hidden * (1.0 - h_small * h_small)  # tanh'
        if needs[1]:
            d_w1 = (d_pre.t() @ w.embedding.to(small)).to(w.w1.dtype)
        if needs[2]:
            d_b1 = d_pre.sum(0).to(w.b1.dtype)
        if needs[0]:
            d_emb = (d_pre @ w.w1.to(small)).to(w.embedding.dtype)
    return [d_emb, d_w1, d_b1, d_w2.to(w.w2.dtype) if d_w2 is not None else None, d_b2]


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
        plan.weights = _unflat(plan, ctx.saved_tensors)
        acc = plan.new_grad()
        plan.reduce(grad_out, acc)
        return (None, None, *plan.param_grads(acc, ctx.hidden, ctx.needs_input_grad[2:]))


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


# --------------------------------------------------------------------------------------------
# PrefixKVBuffer: the storage of one step's KV cache, prefix written in
# --------------------------------------------------------------------------------------------
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
        plan.weights = _unflat(plan, ctx.saved_tensors)
        acc, slot.grad = slot.grad, None  # consumed: a second backward starts from zero
        if acc is None:  # no layer's prefix received a gradient
            return (None,) * (3 + len(_flat(plan.weights)))
        return (None, None, None, *plan.param_grads(acc, ctx.hidden, ctx.needs_input_grad[3:]))


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
        self._slot = _GradSlot()
        g, P = geometry, self.plan.P
        self.storage = torch.empty((g.num_layers, 2, self.plan.batch_size, g.num_kv_heads, P + capacity, g.head_dim),
                                   dtype=self.plan.dtype, device=self.plan.device)
        flat = _flat(weights)
        track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in flat)
        if track:
            self.token: Optional[torch.Tensor] = _PrefixTokenFunction.apply(self.plan, self.storage, self._slot, *flat)
        else:
            with torch.no_grad():
                self.plan.write(self.storage)
            self.token = None

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
        return self.token is not None

    def prefix_lengths(self) -> torch.Tensor:
        """(B,) int64: each row's number of prefix tokens (in the last columns of the P)."""
        return self.plan.prefix_lengths()

    def accumulate_layer_grad(self, layer_idx: int, grad_keys: Optional[torch.Tensor],
                              grad_values: Optional[torch.Tensor]) -> None:
        """Fold layer ``layer_idx``'s key/value gradients (B, Hkv, >= P, Dh) into the reduced
        prefix gradient (only their first P positions are read)."""
        if not self.requires_grad:
            return
        if self._slot.grad is None:
            self._slot.grad = self.plan.new_grad()
        g = self.geometry
        block = g.num_kv_heads * g.head_dim
        for kv, grad in enumerate((grad_keys, grad_values)):
            if grad is not None:
                self.plan.reduce(grad, self._slot.grad, col0=(layer_idx * 2 + kv) * block)


__all__ = ["PrefixGeometry", "PrefixKVBuffer", "PrefixWeights", "prefix_kv"]
