"""Deep prompts (P-Tuning v2) on a transformers 5 model, as functions: the prefix cache, its mask
and positions, one forward, one ``generate()``.

Vocabulary (the same across the package): ``model`` comes first, then ``encoders``; ``encoders``
is one prefix encoder (ours, PEFT's ``PrefixEncoder``, or a
:class:`~ptuning_fast.ops.prefix_kv.PrefixWeights`) or a mapping ``{adapter name: encoder}``, and
``adapter_names`` (one name per row) says which adapter each row uses; ``prompt_lengths`` are
per-row prefix lengths; ``positions`` is one of :data:`~ptuning_fast.ops.mask.POSITIONS`.

``build_prefix_cache(model, encoders, batch_size=None, *, adapter_names=None, seq_len=0,
max_new_tokens=0, dtype=None)``
    The cache with every layer's prefix written in. Decoder-only and encoder-only models get a
    :class:`~ptuning_fast.prefix_tuning.cache.PrefixKVCache` (each adapter encoded once, every
    layer's prefix written once for all rows, room for ``seq_len + max_new_tokens`` text tokens
    after it; a shorter prefix fills the LAST of the ``P = max T_n`` columns); encoder-decoder
    models an ``EncoderDecoderCache`` with the prefix in the decoder's self-attention, laid out as
    PEFT lays it out. When gradients are enabled and the encoders' parameters require grad, the
    cache carries the gradient back to them: build one per training step.

``prefix_attention_mask(attention_mask, cache) -> (B, P + S)``
    The 2D mask to pass with the cache (always to ``generate()``: it tells generate that the cache
    holds P tokens the input lacks).

``prefix_position_ids(attention_mask, cache, *, positions="continue") -> (B, S)``
    Text positions after each row's prefix.

:func:`prefix_forward` (one forward with a fresh cache, mask and positions; works under gradient
checkpointing) and :func:`prefix_generate` build on these.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .._deprecation import renamed_keywords, warn_deprecated
from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_positive_int, check_tensor
from ..hf.compat import CACHE_KWARG
from ..hf.heads import check_per_token_inputs
from ..hf.introspection import (accepts, check_position_range, check_supports_cache, infer_task_type, model_dtype,
                                prefix_geometry, seq2seq_prefix_geometry)
from ..ops.mask import build_prompt_position_ids, check_positions, prompt_padding_mask
from ..ops.prefix_cache import PrefixKVBuffer
from ..ops.prefix_kv import PrefixWeights, check_adapter_index
from .cache import PrefixKVCache, keep_cache_under_checkpointing
from .encoder import prefix_weights_of

_TEXT_HINT = ": give the text's own (B, S), the prefix columns are added here"


# --------------------------------------------------------------------------------------------
# Encoders and rows
# --------------------------------------------------------------------------------------------
def _is_encoders(value) -> bool:
    return isinstance(value, (dict, list, tuple, PrefixWeights)) or isinstance(
        getattr(value, "embedding", None), torch.nn.Embedding)


def _model_first(model, encoders, function: str) -> tuple:
    """``(model, encoders)``; the old order ``(encoders, model)`` still works, with a warning."""
    if _is_encoders(model) and not _is_encoders(encoders):
        warn_deprecated(f"{function}(encoders, model, ...)", f"{function}(model, encoders, ...)", stacklevel=4)
        return encoders, model
    return model, encoders


def resolve_encoders(encoders, adapter_names=None, adapter_index=None, batch_size=None,
                     device=None) -> Tuple[List[PrefixWeights], Optional[torch.Tensor], Optional[int]]:
    """(one PrefixWeights per adapter, each row's adapter as a (B,) int64 tensor or None, batch size)
    from the public arguments: one encoder, or a mapping name -> encoder with ``adapter_names``
    (a list of encoders with a (B,) ``adapter_index`` is the deprecated form)."""
    if isinstance(encoders, dict):
        if not encoders:
            raise ValueError("`encoders` is empty: give at least one prefix encoder")
        names = list(encoders)
        weights = [prefix_weights_of(e, f"encoders[{n!r}]") for n, e in encoders.items()]
        if adapter_index is not None:
            raise ValueError("give `adapter_names` (one name per row) with a mapping of encoders, not `adapter_index`")
        if adapter_names is None:
            if len(names) != 1:
                raise ValueError(f"`adapter_names` is required with {len(names)} adapters {names}: give the adapter "
                                 "of each row")
            return weights, None, batch_size
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"`adapter_names` must be a list of adapter names (one per row), got "
                            f"{type(adapter_names).__name__}")
        lookup = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(n) for n in adapter_names if n not in lookup})
        if unknown:
            raise ValueError(f"`adapter_names`: unknown adapters {unknown}; known: {names}")
        if batch_size is not None and len(adapter_names) != batch_size:
            raise ValueError(f"`adapter_names` has {len(adapter_names)} names for a batch of {batch_size} rows")
        device = device if device is not None else weights[0].embedding.device
        index = torch.tensor([lookup[n] for n in adapter_names], dtype=torch.long, device=device)
        return weights, index, len(adapter_names)
    if adapter_names is not None:
        raise ValueError("`adapter_names` needs `encoders` as a mapping {adapter name: encoder}")
    if isinstance(encoders, (list, tuple)):
        if not encoders:
            raise ValueError("`encoders` is empty: give at least one prefix encoder")
        weights = [prefix_weights_of(e, f"encoders[{i}]") for i, e in enumerate(encoders)]
    else:
        weights = [prefix_weights_of(encoders, "encoders[0]")]
    if adapter_index is not None:
        warn_deprecated("adapter_index", "adapter_names (with encoders as a mapping)", stacklevel=4)
        index, batch_size = check_adapter_index(adapter_index, len(weights), batch_size,
                                                device if device is not None else weights[0].embedding.device)
        return weights, index, batch_size
    if len(weights) > 1:
        raise ValueError(f"{len(weights)} encoders: give them as a mapping {{name: encoder}} with `adapter_names`")
    return weights, None, batch_size


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------
def build_prefix_cache(model, encoders, batch_size: Optional[int] = None, *, adapter_names=None,
                       seq_len: int = 0, max_new_tokens: int = 0, dtype: Optional[torch.dtype] = None,
                       adapter_index: Optional[torch.Tensor] = None):
    """The KV cache of ``batch_size`` rows of ``model`` with every layer's prefix written in (see
    the module docstring). ``model``: the base ``PreTrainedModel`` (or its config); its dtype is
    the cache's unless ``dtype`` is given."""
    model, encoders = _model_first(model, encoders, "build_prefix_cache")
    weights, index, batch_size = resolve_encoders(encoders, adapter_names, adapter_index, batch_size)
    return prefix_cache_for(model, weights, index, batch_size, seq_len=seq_len, max_new_tokens=max_new_tokens,
                            dtype=dtype)


def prefix_cache_for(model, weights: List[PrefixWeights], adapter_index: Optional[torch.Tensor],
                     batch_size: Optional[int], *, seq_len: int = 0, max_new_tokens: int = 0,
                     dtype: Optional[torch.dtype] = None):
    """:func:`build_prefix_cache` on resolved arguments (the form the native model uses)."""
    check_positive_int(seq_len, "seq_len", allow_zero=True)
    check_positive_int(max_new_tokens, "max_new_tokens", allow_zero=True)
    if dtype is None:
        dtype = model_dtype(model)
    if isinstance(model, torch.nn.Module):
        check_supports_cache(model)
    if getattr(getattr(model, "config", model), "is_encoder_decoder", False):
        return _seq2seq_prefix_cache(model, weights, adapter_index, batch_size, dtype)
    buffer = PrefixKVBuffer(weights, prefix_geometry(model), batch_size, adapter_index=adapter_index,
                            capacity=seq_len + max_new_tokens, dtype=dtype)
    return PrefixKVCache(buffer)


def _seq2seq_prefix_cache(model, weights: List[PrefixWeights], adapter_index, batch_size, dtype):
    """PEFT's layout for encoder-decoder models: per decoder layer, the prefix keys/values of the
    decoder's self-attention (the cross-attention keeps the encoder's). PEFT repeats the 2L
    encoded entries and reads four per layer (self k, v, then cross k, v, which it discards), so
    layer l reads entries 4l and 4l + 1 modulo 2L."""
    from transformers import DynamicCache, EncoderDecoderCache

    from ..reference.prefix_kv import encode_prefix_reference

    geometry = seq2seq_prefix_geometry(model)
    lengths = {w.num_tokens for w in weights}
    if len(lengths) > 1:
        raise ValueError(f"seq2seq deep prompts of one batch must have the same `num_virtual_tokens`, got "
                         f"{[w.num_tokens for w in weights]}")
    if adapter_index is None and batch_size is None:
        raise ValueError("give `batch_size` (or `adapter_names`, which sets it)")
    L, heads, head_dim = geometry
    entries = []
    for w in weights:  # (2L, 1, H, T, Dh) per adapter
        flat = encode_prefix_reference(*w)
        if dtype is not None:
            flat = flat.to(dtype)
        entries.append(flat.view(w.num_tokens, 2 * L, heads, head_dim).permute(1, 2, 0, 3).unsqueeze(1))
    stacked = entries[0] if len(entries) == 1 else torch.cat(entries, dim=1)  # (2L, N, H, T, Dh)
    rows = stacked.expand(-1, batch_size, -1, -1, -1) if adapter_index is None else stacked[:, adapter_index]
    layers = [(rows[(4 * layer) % (2 * L)], rows[(4 * layer + 1) % (2 * L)]) for layer in range(L)]
    cache = EncoderDecoderCache(DynamicCache(layers), DynamicCache())
    for key in list(cache.is_updated):
        cache.is_updated[key] = False
    return cache


# --------------------------------------------------------------------------------------------
# Mask and positions
# --------------------------------------------------------------------------------------------
def _prompt_lengths(cache_or_lengths, longest: Optional[int] = None):
    """(per-row lengths (B,) tensor or int, P) from a PrefixKVCache, an int or a (B,) tensor
    (whose P is ``longest`` where the caller knows it, else read from it: one host sync)."""
    if isinstance(cache_or_lengths, PrefixKVCache):
        return cache_or_lengths.prompt_lengths(), cache_or_lengths.num_virtual_tokens
    if isinstance(cache_or_lengths, torch.Tensor):
        check_tensor(cache_or_lengths, "prompt_lengths", ndim=1, dtypes=INDEX_DTYPES)
        if longest is not None:
            return cache_or_lengths, longest
        return cache_or_lengths, (int(cache_or_lengths.max()) if cache_or_lengths.numel() else 0)
    if isinstance(cache_or_lengths, int) and not isinstance(cache_or_lengths, bool):
        return cache_or_lengths, cache_or_lengths
    raise TypeError(f"`cache` must be a PrefixKVCache (or the prompt lengths: an int or a (B,) tensor), got "
                    f"{type(cache_or_lengths).__name__}")


def _unpadded_mask(lengths, seq_len: int) -> torch.Tensor:
    """The text mask of ``seq_len`` real tokens in every row (one row per per-row length, else one)."""
    per_row = isinstance(lengths, torch.Tensor)
    return torch.ones((lengths.shape[0] if per_row else 1, seq_len), dtype=torch.long,
                      device=lengths.device if per_row else None)


def _check_text_mask(attention_mask, batch: int, device, name: str = "attention_mask") -> None:
    check_tensor(attention_mask, name, ndim=2, device=device)
    if attention_mask.shape[0] != batch:
        raise ValueError(f"`{name}` has {attention_mask.shape[0]} rows but the cache has {batch}")
    if not (attention_mask.dtype.is_floating_point or attention_mask.dtype == torch.bool
            or attention_mask.dtype in INDEX_DTYPES):
        raise TypeError(f"`{name}` must be bool, integer or float (0/1), got {attention_mask.dtype}")


def prefix_attention_mask(attention_mask: Optional[torch.Tensor], cache,
                          seq_len: Optional[int] = None, *,
                          num_prompt_columns: Optional[int] = None) -> Optional[torch.Tensor]:
    """``(B, P + S)``: each row's live prefix columns, then ``attention_mask`` ``(B, S)``.

    ``cache``: a :class:`PrefixKVCache`, or the prompt lengths (an int, or (B,) per-row lengths
    whose prefix fills the last ``n_b`` of ``P = max n_b`` columns; ``num_prompt_columns``: that
    P where the caller knows it, so that the lengths are not read). Returns None when
    ``attention_mask`` is None and every row has the full prefix (nothing to mask); give
    ``seq_len`` to get an explicit all-ones text part instead.
    """
    if num_prompt_columns is not None:
        check_positive_int(num_prompt_columns, "num_prompt_columns", allow_zero=True)
    lengths, P = _prompt_lengths(cache, num_prompt_columns if isinstance(cache, torch.Tensor) else None)
    if attention_mask is None:
        full = not isinstance(lengths, torch.Tensor) or bool((lengths == P).all())
        if seq_len is None and full:
            return None
        if seq_len is None:
            raise ValueError("rows have prefixes of different lengths: give `attention_mask` or `seq_len`")
        attention_mask = _unpadded_mask(lengths, seq_len)
    if isinstance(lengths, torch.Tensor):
        _check_text_mask(attention_mask, lengths.shape[0], lengths.device)
    return prompt_padding_mask(attention_mask, lengths, num_prompt_columns=P)


def _mode_to_positions(mode) -> str:
    modes = {"mask": "continue", "peft": "peft"}
    if mode not in modes:
        raise ValueError(f"`mode` must be one of {tuple(modes)}, got {mode!r}")
    return modes[mode]


def _positions(positions) -> str:
    if positions == "mask":  # the name before `positions` had one vocabulary
        warn_deprecated("positions='mask'", "positions='continue'", stacklevel=4)
        return "continue"
    return check_positions(positions)


@renamed_keywords(mode=("positions", _mode_to_positions))
def prefix_position_ids(attention_mask: Optional[torch.Tensor], cache, *, seq_len: Optional[int] = None,
                        positions: str = "continue") -> torch.Tensor:
    """``(B, S)`` int64 positions of the text tokens after each row's prefix (``cache``: a
    :class:`PrefixKVCache` or the prompt lengths). ``positions``: ``"continue"`` (a real token at
    its row's prefix length plus the real tokens before it; what ``generate()`` does),
    ``"restart"`` (from 0) or ``"peft"`` (token ``i`` at ``prefix length + i``, padding counted:
    PEFT's training forward). (``mode="mask"/"peft"`` is the deprecated form.)"""
    positions = _positions(positions)
    lengths, _ = _prompt_lengths(cache)
    if attention_mask is None:
        if seq_len is None:
            raise ValueError("give `attention_mask` or `seq_len`")
        check_positive_int(seq_len, "seq_len")
        attention_mask = _unpadded_mask(lengths, seq_len)
    elif isinstance(lengths, torch.Tensor):
        _check_text_mask(attention_mask, lengths.shape[0], lengths.device)
    return build_prompt_position_ids(attention_mask, lengths, positions=positions)


# --------------------------------------------------------------------------------------------
# Forward and generate
# --------------------------------------------------------------------------------------------
def _check_text(model, input_ids, inputs_embeds) -> tuple:
    """(B, S, device) of the text; ``input_ids`` checked against the vocabulary."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of `input_ids` and `inputs_embeds`")
    if input_ids is not None:
        x = check_tensor(input_ids, "input_ids", ndim=2, dtypes=INDEX_DTYPES)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None:
            check_index_range(input_ids, embeddings.weight.shape[0], "input_ids")
    else:
        x = check_tensor(inputs_embeds, "inputs_embeds", ndim=3, dtypes=FLOAT_DTYPES)
    return x.shape[0], x.shape[1], x.device


def prefix_forward(
    model,
    encoders,
    input_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    inputs_embeds: Optional[torch.Tensor] = None,
    adapter_names: Optional[Sequence[str]] = None,
    position_ids: Optional[torch.Tensor] = None,
    positions: str = "continue",
    adapter_index: Optional[torch.Tensor] = None,
    **kwargs,
):
    """``model(...)`` with the deep prompt of ``encoders``: builds a fresh cache, the ``(B, P + S)``
    mask and the text positions (``positions``: see :func:`prefix_position_ids`; an explicit
    ``position_ids`` is used as given), and runs the model. Extra keyword arguments (``labels``...)
    go to the model.

    Works with gradient checkpointing (non-reentrant) on models whose layers receive the cache;
    raises if the model dropped the cache (then no layer saw the prefix).
    """
    model, encoders = _model_first(model, encoders, "prefix_forward")
    positions = _positions(positions)
    batch, seq_len, device = _check_text(model, input_ids, inputs_embeds)
    check_per_token_inputs(infer_task_type(model), (batch, seq_len), device,
                           {"attention_mask": attention_mask, "position_ids": position_ids,
                            "token_type_ids": kwargs.get("token_type_ids"), "labels": kwargs.get("labels")},
                           of="the text", hint=_TEXT_HINT)
    weights, index, batch = resolve_encoders(encoders, adapter_names, adapter_index, batch, device)
    cache = prefix_cache_for(model, weights, index, batch, seq_len=seq_len)
    lengths = cache.prompt_lengths()
    mask = prefix_attention_mask(attention_mask, cache)
    if position_ids is None:
        if accepts(model, "position_ids"):
            position_ids = prefix_position_ids(attention_mask, cache, seq_len=seq_len, positions=positions)
        elif not bool((lengths == cache.num_virtual_tokens).all()):
            raise ValueError(f"{type(model).__name__} takes no `position_ids`, so rows with prefixes shorter than "
                             f"{cache.num_virtual_tokens} tokens would get wrong positions: use adapters of one length")
    if positions != "restart":
        check_position_range(model, cache.num_virtual_tokens + seq_len - 1, cache.num_virtual_tokens, seq_len)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return run_over_prefix_cache(model, cache, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                 attention_mask=mask, **kwargs)


def run_over_prefix_cache(model, cache: PrefixKVCache, **kwargs):
    """``model(**kwargs)`` with ``cache`` as its KV cache, the checkpointed layers keeping it under
    gradient checkpointing; raises if some layer never saw the prefix."""
    try:
        with keep_cache_under_checkpointing(model):
            out = model(**{CACHE_KWARG: cache}, **kwargs)
    except (RuntimeError, ValueError) as exc:
        if not cache.updated_layers():  # the (B, P + S) mask met layers without the prefix
            raise _dropped_cache_error(model, cache) from exc
        raise
    if len(cache.updated_layers()) != len(cache.layers):
        raise _dropped_cache_error(model, cache)
    return out


def _dropped_cache_error(model, cache) -> RuntimeError:
    missing = sorted(set(range(len(cache.layers))) - set(cache.updated_layers()))
    return RuntimeError(
        f"{type(model).__name__} did not pass the prefix cache to layers {missing}, so they never saw the "
        "prefix: the model drops the cache under gradient checkpointing (GPT-2 does) or does not accept "
        "a cache. Disable gradient checkpointing for this model.")


def check_cache_implementation(model, generate_kwargs: dict) -> None:
    """Deep prompts generate over a :class:`PrefixKVCache`, which grows as a dynamic cache does:
    refuse ``cache_implementation`` asking for another kind (e.g. ``"static"``) rather than
    replacing the cache ``generate()`` would build with it."""
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    implementation = generate_kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation not in (None, "dynamic"):
        raise ValueError(
            f"generate(cache_implementation={implementation!r}) is not supported with deep prompts (PREFIX_TUNING): "
            "their prefix lives in a PrefixKVCache, a dynamic cache written in place, not in a "
            f"{implementation} cache; leave `cache_implementation` unset (or 'dynamic')")


@torch.no_grad()
def prefix_generate(
    model,
    encoders,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    adapter_names: Optional[Sequence[str]] = None,
    max_new_tokens: int = 20,
    adapter_index: Optional[torch.Tensor] = None,
    **generate_kwargs,
):
    """``model.generate(...)`` with the deep prompt of ``encoders``: the prefix is written once
    into a cache with room for the prompt and ``max_new_tokens``, and the ``(B, P + S)`` mask
    tells ``generate()`` the cache holds P tokens the input does not. Returns what generate
    returns (the input followed by the new tokens)."""
    model, encoders = _model_first(model, encoders, "prefix_generate")
    check_cache_implementation(model, generate_kwargs)
    batch, seq_len, device = _check_text(model, input_ids, None)
    check_per_token_inputs(None, (batch, seq_len), device, {"attention_mask": attention_mask}, of="the text",
                           hint=_TEXT_HINT)
    check_positive_int(max_new_tokens, "max_new_tokens")
    weights, index, batch = resolve_encoders(encoders, adapter_names, adapter_index, batch, device)
    # generate() repeats every row for beams / returned sequences but not a cache passed in:
    # build the cache for the repeated rows (each row's prefix is written where it is needed).
    config = generate_kwargs.get("generation_config") or model.generation_config
    expand = max(int(generate_kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1),
                 int(generate_kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1))
    if expand > 1 and index is not None:
        index = index.repeat_interleave(expand)
    cache = prefix_cache_for(model, weights, index, batch * expand, seq_len=seq_len, max_new_tokens=max_new_tokens)
    check_position_range(model, cache.num_virtual_tokens + seq_len + max_new_tokens - 1, cache.num_virtual_tokens,
                         seq_len + max_new_tokens)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = prefix_attention_mask(attention_mask, cache.prompt_lengths()[::expand],
                                 num_prompt_columns=cache.num_virtual_tokens)
    return model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          **{CACHE_KWARG: cache}, **generate_kwargs)


__all__ = [
    "build_prefix_cache",
    "prefix_attention_mask",
    "prefix_cache_for",
    "prefix_forward",
    "prefix_generate",
    "prefix_position_ids",
    "resolve_encoders",
    "run_over_prefix_cache",
]
