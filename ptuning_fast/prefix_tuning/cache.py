"""``PrefixKVCache``: a transformers ``DynamicCache`` whose layers hold a deep prompt (prefix) and
append the text after it in place.

Storage: one :class:`ptuning_fast.ops.prefix_cache.PrefixKVBuffer` per step, ``(L, 2, B, Hkv,
P + capacity, Dh)``, allocated once with the prefix written in by one kernel launch per adapter.
Layer ``l`` reads and writes ``storage[l]``: ``update`` copies the new keys/values to positions
``[length, length + S)`` and returns views ``[..., :length + S, :]`` in the ``(batch, kv_heads,
seq, head_dim)`` layout the attention reads. No ``torch.cat`` per layer per step, no copy of the
prefix per layer. Past the capacity (long generations) a layer grows its storage geometrically.

Autograd (training forward), two paths chosen by the buffer:

- one adapter in full precision (a training step of one task): the buffer holds no storage, only
  the prefix encoded once in autograd's graph; a layer's append is ``torch.cat`` of its prefix
  (broadcast over the rows with ``expand``) and the text, which then becomes the layer's storage.
  The backward is autograd's own C++ nodes (the cheapest on the host, and the same bytes as the
  buffer: attention reads a per-row copy of the prefix either way).
- several adapters, or a half-precision cache: the appends write into the shared buffer, so plain
  in-place copies would trip autograd's version checks (attention saves the returned views) and
  could not route gradients. Each append is instead :class:`ptuning_fast.ops.prefix_cache.AppendKV`,
  whose backward folds the prefix slice of the gradient into the buffer's reduced prefix gradient
  (each adapter's rows, accumulated in fp32).

Under ``torch.compile`` every buffer takes the first path, with or without gradients, for several
adapters (each row gathers its adapter's prefix) and half-precision caches (the prefix held in fp32
until broadcast, so the rows' gradients still sum in fp32): the compiler fuses each layer's
broadcast into the concatenation, as it does for PEFT's ``DynamicCache``, where in-place writes
into one buffer become scatters over it, and the Functions keep gradients outside autograd, which
it cannot trace.

One gradient-carrying forward per cache: build a new cache for each training step.

Gradient checkpointing (non-reentrant, transformers' default): :func:`keep_cache_under_checkpointing`
keeps the cache in checkpointed layers; a layer recomputed during the backward finds its earlier
write and returns the same keys/values (views, or the same concatenation) instead of appending again.

Also implemented for ``generate()``: ``get_seq_length``, ``get_mask_sizes``, ``crop``,
``reorder_cache`` (beam search), ``batch_repeat_interleave`` / ``batch_select_indices``.
``reset()`` returns every layer to the prefix alone.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import List, Optional

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .._deprecation import warn_deprecated
from ..hf.introspection import checkpointing_layers
from ..ops.prefix_cache import AppendKV, PrefixKVBuffer


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (where checkpointed layers are recomputed).
    Never while torch.compile traces a forward (the engine's state is not part of the graph)."""
    if torch.compiler.is_compiling():
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class PrefixKVLayer(DynamicLayer):
    """One layer of a :class:`PrefixKVCache`: the prefix followed by the text, in place."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, buffer: PrefixKVBuffer, layer_idx: int):
        self.buffer = buffer
        self.layer_idx = layer_idx
        self.prefix_length = buffer.num_virtual_tokens
        self.length = self.prefix_length
        self._set_storage(*buffer.layer_storage(layer_idx))  # views of the shared buffer (or of the prefix)
        self.dtype, self.device = self._k.dtype, self._k.device
        self.is_initialized = True
        self._segments: List[tuple] = []  # (start, length, with_grad) of each append
        self._checked = None  # (key shape, value shape) of the last states that passed _check_states

    # -- storage ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def _set_storage(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``keys``/``values`` (B, Hkv, capacity, Dh) become the layer's storage, held as aliases
        outside autograd (``.data``): appends write through them, and what is returned from them
        has its own version counter, so later appends to the shared storage do not invalidate what
        attention saved for the backward."""
        self._k, self._v = keys.data, values.data

    # ``keys``/``values`` (read by some models and by ``DynamicCache.__iter__``): the current
    # contents, sliced when asked for rather than after every append.
    @property
    def keys(self) -> torch.Tensor:
        return self._k.narrow(2, 0, self.length)

    @keys.setter
    def keys(self, value) -> None:
        raise AttributeError("PrefixKVLayer.keys is a view of its storage: append with update()")

    @property
    def values(self) -> torch.Tensor:
        return self._v.narrow(2, 0, self.length)

    @values.setter
    def values(self, value) -> None:
        raise AttributeError("PrefixKVLayer.values is a view of its storage: append with update()")

    def _alias(self, end: int) -> tuple:
        """(keys, values) of positions [0, end), through the aliases outside autograd."""
        return self._k.narrow(2, 0, end), self._v.narrow(2, 0, end)

    def _write(self, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # the aliases are outside autograd: record no copy
            key_states, value_states = key_states.detach(), value_states.detach()
        length = key_states.shape[-2]
        self._k.narrow(2, start, length).copy_(key_states)
        self._v.narrow(2, start, length).copy_(value_states)

    def _grow(self, needed: int) -> None:
        """Move to a larger storage (doubling), keeping the current contents. Views returned
        earlier keep the old storage alive as long as something holds them."""
        grown = []
        for old in (self._k, self._v):
            new = old.new_empty(old.shape[:2] + (max(needed, 2 * self.capacity),) + old.shape[3:])
            new.narrow(2, 0, self.length).copy_(old.narrow(2, 0, self.length))
            grown.append(new)
        self._set_storage(*grown)

    def _check_states(self, key_states, value_states) -> None:
        """Shapes, dtypes and device of one append. Checked in full for new shapes or dtypes (once
        per layer for the prompt, once for the one-token steps of generate()); the same again
        need only the device compared."""
        seen = (key_states.shape, value_states.shape, key_states.dtype, value_states.dtype) if isinstance(
            key_states, torch.Tensor) and isinstance(value_states, torch.Tensor) else None
        if seen is not None and seen == self._checked and key_states.device == self.device \
                and value_states.device == self.device:
            return
        self._check_states_in_full(key_states, value_states)
        if not torch.compiler.is_compiling():  # traced checks run once; a memo would be one more output to rebuild
            self._checked = seen

    def _check_states_in_full(self, key_states, value_states) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"PrefixKVCache layer {self.layer_idx}: `{name}` must be a 4D tensor "
                                 f"(batch, kv_heads, seq, head_dim), got {getattr(t, 'shape', type(t).__name__)}")
            expected = (self._k.shape[0], self._k.shape[1], t.shape[2], self._k.shape[3])
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"PrefixKVCache layer {self.layer_idx}: `{name}` has shape {tuple(t.shape)}, expected "
                    f"(batch={expected[0]}, kv_heads={expected[1]}, seq, head_dim={expected[3]}); was the cache "
                    "built for this model and batch size?")
            # Narrower states (bf16 keys under autocast, beside a prefix in the model's fp32) are
            # stored in the cache's dtype, as DynamicCache's torch.cat promotes them (PEFT's numbers).
            if t.dtype != self.dtype and not (t.dtype.is_floating_point
                                              and torch.promote_types(t.dtype, self.dtype) == self.dtype):
                raise ValueError(f"PrefixKVCache layer {self.layer_idx}: the model's {name} are {t.dtype} but the "
                                 f"cache holds {self.dtype}, a narrower type; build the cache with dtype={t.dtype}")
            if t.device != self.device:
                raise ValueError(f"PrefixKVCache layer {self.layer_idx}: `{name}` is on {t.device} but the cache "
                                 f"is on {self.device}")

    # -- the Cache layer API --------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:  # storage exists from the start
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``S`` new keys/values; return the layer's keys/values ``(B, Hkv, length, Dh)``."""
        self._check_states(key_states, value_states)
        S = key_states.shape[-2]
        start, end = self.length, self.length + S
        track = False
        if torch.is_grad_enabled():  # (generation runs without: one check, then the plain append)
            if _in_backward():
                replay = self._replay(key_states, value_states)
                if replay is not None:
                    return replay
            track = key_states.requires_grad or value_states.requires_grad or self.buffer.requires_grad
            if track and any(with_grad for _, _, with_grad in self._segments):
                raise ValueError(
                    "PrefixKVCache: this cache already took part in a forward that needs gradients; gradients "
                    "cannot flow through a second one. Build a new cache (build_prefix_cache) for each training "
                    "step.")
        if self.buffer.encoded_prefix is not None and (track or start == self.prefix_length):
            # autograd's own ops (see the module docstring); without gradients (compiled eval
            # forward) the first append only: later ones grow the storage and write in place
            keys, values = self._concat(start, key_states, value_states)
            self._set_storage(keys, values)  # full: a later append grows first
        else:
            if end > self.capacity:
                self._grow(end)
            if track:
                keys, values = AppendKV.apply(self.buffer.token, self, start, key_states, value_states)
            else:
                self._write(start, key_states, value_states)
                keys, values = self._alias(end)
        self._segments.append((start, S, track))
        self.length = end
        return keys, values

    def _replay(self, key_states, value_states):
        """A checkpointed layer recomputed in the backward: return what its forward returned, with
        autograd history again (the recompute must save the same tensors as the forward did)."""
        S = key_states.shape[-2]
        for start, length, with_grad in reversed(self._segments):
            if length == S:
                if not with_grad:
                    raise ValueError(
                        "PrefixKVCache: a layer was recomputed in the backward after a forward without autograd "
                        "(reentrant gradient checkpointing). Use non-reentrant checkpointing: "
                        "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")
                if self.buffer.encoded_prefix is not None:
                    return self._concat(start, key_states, value_states)
                return AppendKV.apply(self.buffer.token, self, start, key_states, value_states, False)
        return None

    def _concat(self, start: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple:
        """Autograd's path: the layer's prefix (in the graph, broadcast over the rows), the text it
        already holds (positions P .. start, outside autograd) and the new states, concatenated."""
        out = []
        for prefix, held, new in zip(self.buffer.layer_prefix(self.layer_idx), (self._k, self._v),
                                     (key_states, value_states)):
            pieces = [prefix, new] if start == self.prefix_length else \
                [prefix, held.narrow(2, self.prefix_length, start - self.prefix_length), new]
            out.append(torch.cat(pieces, 2))
        return tuple(out)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length) -> tuple:
        # transformers 5.23 passes the query length; earlier 5.x releases pass cache_position.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1  # grows past its capacity

    def reset(self) -> None:
        """Back to the prefix alone."""
        self.length = self.prefix_length
        self._segments = []

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                             "Please use a negative integer to remove that number of tokens from the cache instead.")
        new_length = self.length + tokens_to_remove
        if new_length < self.prefix_length:
            raise ValueError(f"PrefixKVCache: cannot remove {-tokens_to_remove} tokens from layer {self.layer_idx}: "
                             f"only {self.length - self.prefix_length} follow the {self.prefix_length}-token prefix")
        self.length = new_length
        self._segments = [s for s in self._segments if s[0] + s[1] <= new_length]

    def _reindex_batch(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._set_storage(keys, values)
        self._segments = [(s, n, False) for s, n, _ in self._segments]
        self._checked = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.to(self.device)
        self._reindex_batch(self._k.index_select(0, beam_idx), self._v.index_select(0, beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex_batch(self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reindex_batch(self._k[indices], self._v[indices])

    def offload(self):
        self._set_storage(self._k.to("cpu", non_blocking=True), self._v.to("cpu", non_blocking=True))

    def prefetch(self):
        if self._k.device != self.device:
            self._set_storage(self._k.to(self.device, non_blocking=True), self._v.to(self.device, non_blocking=True))


class PrefixKVCache(DynamicCache):
    """A ``DynamicCache`` (so models, PEFT and ``generate()`` accept it) whose layers start with
    the deep prompt and append the text in place; see the module docstring.

    Build it with :func:`ptuning_fast.prefix_tuning.functional.build_prefix_cache`, or from a
    :class:`PrefixKVBuffer` directly.
    """

    def __init__(self, buffer: PrefixKVBuffer):
        if not isinstance(buffer, PrefixKVBuffer):
            raise TypeError(f"`buffer` must be a PrefixKVBuffer, got {type(buffer).__name__}")
        layers = [PrefixKVLayer(buffer, i) for i in range(buffer.geometry.num_layers)]
        Cache.__init__(self, layers=layers)  # not DynamicCache.__init__: it would build its own layers
        self.buffer = buffer

    @property
    def num_virtual_tokens(self) -> int:
        """P, the number of prefix columns at the start of every layer."""
        return self.buffer.num_virtual_tokens

    @property
    def adapter_index(self) -> Optional[torch.Tensor]:
        return self.buffer.adapter_index

    def prompt_lengths(self) -> torch.Tensor:
        """(B,) int64: each row's prefix tokens (they fill the last of the P prefix columns)."""
        return self.buffer.prompt_lengths()

    def prefix_lengths(self) -> torch.Tensor:
        """Deprecated name of :meth:`prompt_lengths`."""
        warn_deprecated("PrefixKVCache.prefix_lengths()", "PrefixKVCache.prompt_lengths()")
        return self.prompt_lengths()

    def storage_bytes(self) -> int:
        """Bytes held by the cache's key/value storage (all layers)."""
        seen, total = set(), 0
        for layer in self.layers:
            for storage in (layer._k.untyped_storage(), layer._v.untyped_storage()):
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def updated_layers(self) -> List[int]:
        """Indices of the layers that received text (a model that dropped the cache updates none)."""
        return [layer.layer_idx for layer in self.layers if layer.length > layer.prefix_length]


# Whether the checkpointed layers keep a PrefixKVCache in the call running in this thread /
# asyncio task (see keep_cache_under_checkpointing).
_KEEP_CACHE_IN_CALL: contextvars.ContextVar = contextvars.ContextVar("ptuning_fast_keep_prefix_cache", default=False)


class _KeepCacheInCall:
    """A checkpointed layer's ``_can_checkpoint_with_cache``, installed once per layer: true inside
    :func:`keep_cache_under_checkpointing` in this thread / task, else the layer's own value.
    transformers reads it once per forward, when it decides which arguments the checkpointed call
    captures; the backward's recompute reuses those arguments, so it sees the cache too."""

    __slots__ = ("default",)

    def __init__(self, default):
        self.default = bool(default)

    def __bool__(self) -> bool:
        return self.default or _KEEP_CACHE_IN_CALL.get()


@contextlib.contextmanager
def keep_cache_under_checkpointing(model):
    """Within the block, the checkpointed layers of ``model`` keep a :class:`PrefixKVCache` under
    gradient checkpointing (transformers drops caches there). The switch is a context variable,
    so it holds for this thread / asyncio task only and ends with the block: a plain
    ``DynamicCache`` used elsewhere is dropped as transformers intends.

    Run the forward inside the block (the backward may run after it: the recomputed layers
    reuse the cache captured by the forward). Safe with this cache only: a recomputed layer finds
    its earlier write (see :meth:`PrefixKVLayer.update`). Models that drop the cache before their
    layers (GPT-2 passes ``None`` under checkpointing) still lose the prefix;
    :func:`ptuning_fast.prefix_tuning.functional.prefix_forward` detects that and raises.
    """
    layers = checkpointing_layers(model)
    if not any(layer.gradient_checkpointing and layer.training for layer in layers):
        # transformers reads the flag only in a checkpointed training forward; torch.compile cannot trace the set
        yield len(layers)
        return
    for layer in layers:
        if not isinstance(layer.__dict__.get("_can_checkpoint_with_cache"), _KeepCacheInCall):
            layer._can_checkpoint_with_cache = _KeepCacheInCall(layer._can_checkpoint_with_cache)
    token = _KEEP_CACHE_IN_CALL.set(True)
    try:
        yield len(layers)
    finally:
        _KEEP_CACHE_IN_CALL.reset(token)


__all__ = ["PrefixKVCache", "PrefixKVLayer", "keep_cache_under_checkpointing"]
