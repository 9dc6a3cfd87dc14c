"""Deep prompts (P-Tuning v2) on a transformers 5 model: the prefix cache, its mask and positions.

Contract (used by ``ptuning_fast.accelerate`` and the native API):

``build_prefix_cache(encoders, model, batch_size, *, adapter_index=None, seq_len=0,
max_new_tokens=0, dtype=None) -> PrefixKVCache``
    ``encoders``: one prefix encoder (ours, PEFT's ``PrefixEncoder``, or a
    :class:`~ptuning_fast.ops.prefix_kv.PrefixWeights`) or a list of them (several adapters);
    ``adapter_index`` ``(B,)`` picks each row's encoder (required with more than one).
    ``model``: the base ``PreTrainedModel`` (or its config) the cache is for; its layers, KV
    heads and head size (``num_key_value_heads``, ``head_dim`` when the config has it) fix the
    layout, and the model's dtype is the cache's unless ``dtype`` is given.
    ``seq_len + max_new_tokens``: text tokens to reserve after the prefix (the cache grows past
    that if needed). Every layer's K/V prefix is written once, for all rows, when the cache is
    built; each adapter is encoded once. When gradients are enabled and the encoders' parameters
    require grad, the cache carries the gradient back to them: build one per training step.

``prefix_attention_mask(attention_mask, cache) -> (B, P + S)`` (or None)
    The 2D mask to pass with the cache: ``P`` prefix columns (1 on each row's live prefix
    columns, 0 on the columns a shorter prefix leaves empty) followed by the text mask. Always
    pass it to ``generate()`` (it tells generate that the cache holds P tokens the input lacks).
    The 4D mask builder :func:`ptuning_fast.ops.mask.build_prompt_attention_mask` takes the same
    per-row lengths (``cache.prefix_lengths()``) and layout (prefix in the last columns).

``prefix_position_ids(attention_mask, cache, *, mode="mask") -> (B, S)``
    Text positions after the prefix: row ``b``'s first real token is at its prefix length
    (``mode="mask"``: left padding skipped, the same positions ``generate()`` uses) or text
    token ``i`` at ``prefix_length + i`` (``mode="peft"``: PEFT's training forward).

Conveniences on top: :func:`prefix_forward` (one forward with a fresh cache, mask and positions;
works under gradient checkpointing, which PEFT refuses) and :func:`prefix_generate`.
Seq2seq models (two transformer submodules) are not covered.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_positive_int, check_tensor, check_token_tensor
from ..ops.prefix_kv import PrefixGeometry, PrefixKVBuffer, PrefixWeights, check_adapter_index
from .cache import PrefixKVCache, keep_cache_under_checkpointing
from .compat import CACHE_KWARG

POSITION_MODES = ("mask", "peft")


# --------------------------------------------------------------------------------------------
# Model geometry and encoders
# --------------------------------------------------------------------------------------------
def _text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _first_attr(config, names, what: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ValueError(f"the model config has none of {names}: cannot tell the model's {what}")


def prefix_geometry(model_or_config) -> PrefixGeometry:
    """(num_layers, num_kv_heads, head_dim) of the attention layers the prefix feeds, read as
    PEFT reads them (GQA/MQA: ``num_key_value_heads``; ``head_dim`` from the config when set)."""
    config = _text_config(model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("prefix caches cover decoder-only and encoder-only models; "
                         f"{type(config).__name__} is an encoder-decoder model")
    num_layers = _first_attr(config, ("num_hidden_layers", "num_layers", "n_layer"), "number of layers")
    heads = _first_attr(config, ("num_attention_heads", "n_head", "num_heads"), "number of attention heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        hidden = _first_attr(config, ("hidden_size", "n_embd", "d_model"), "hidden size")
        head_dim = hidden // heads
    return PrefixGeometry(int(num_layers), int(kv_heads), int(head_dim))


def _weights_of(encoder, i: int) -> PrefixWeights:
    """PrefixWeights of one of our encoders, of a PEFT PrefixEncoder, or given directly."""
    if isinstance(encoder, PrefixWeights):
        return encoder
    if hasattr(encoder, "prefix_weights"):
        return encoder.prefix_weights()
    embedding = getattr(encoder, "embedding", None)
    if isinstance(embedding, torch.nn.Embedding):  # PEFT's PrefixEncoder
        transform = getattr(encoder, "transform", None)
        if getattr(encoder, "prefix_projection", False) and transform is not None:
            first, last = transform[0], transform[2]
            return PrefixWeights(embedding.weight, first.weight, first.bias, last.weight, last.bias)
        return PrefixWeights(embedding.weight)
    raise TypeError(f"`encoders[{i}]` must be a PrefixEncoder (ours or PEFT's) or a PrefixWeights, "
                    f"got {type(encoder).__name__}")


def _model_dtype(model_or_config) -> Optional[torch.dtype]:
    dtype = getattr(model_or_config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    config = getattr(model_or_config, "config", model_or_config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def build_prefix_cache(
    encoders,
    model,
    batch_size: int,
    *,
    adapter_index: Optional[torch.Tensor] = None,
    seq_len: int = 0,
    max_new_tokens: int = 0,
    dtype: Optional[torch.dtype] = None,
) -> PrefixKVCache:
    """A :class:`PrefixKVCache` for ``batch_size`` rows of ``model`` with every layer's prefix
    written in (see the module docstring for the contract)."""
    if isinstance(encoders, (list, tuple)):
        encoders = list(encoders)
    else:
        encoders = [encoders]
    if len(encoders) == 0:
        raise ValueError("`encoders` is empty: give at least one prefix encoder")
    check_positive_int(seq_len, "seq_len", allow_zero=True)
    check_positive_int(max_new_tokens, "max_new_tokens", allow_zero=True)
    geometry = prefix_geometry(model)
    weights = [_weights_of(e, i) for i, e in enumerate(encoders)]
    if dtype is None:
        dtype = _model_dtype(model)
    buffer = PrefixKVBuffer(weights, geometry, batch_size, adapter_index=adapter_index,
                            capacity=seq_len + max_new_tokens, dtype=dtype)
    return PrefixKVCache(buffer)


# --------------------------------------------------------------------------------------------
# Mask and positions
# --------------------------------------------------------------------------------------------
def _prefix_lengths(cache) -> tuple:
    if not isinstance(cache, PrefixKVCache):
        raise TypeError(f"`cache` must be a PrefixKVCache, got {type(cache).__name__}")
    return cache.prefix_lengths(), cache.num_virtual_tokens


def _check_text_mask(attention_mask, batch: int, device, name: str = "attention_mask") -> None:
    check_tensor(attention_mask, name, ndim=2, device=device)
    if attention_mask.shape[0] != batch:
        raise ValueError(f"`{name}` has {attention_mask.shape[0]} rows but the cache has {batch}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype == torch.bool:
        return
    if attention_mask.dtype not in INDEX_DTYPES:
        raise TypeError(f"`{name}` must be bool, integer or float (0/1), got {attention_mask.dtype}")


def prefix_attention_mask(attention_mask: Optional[torch.Tensor], cache: PrefixKVCache,
                          seq_len: Optional[int] = None) -> Optional[torch.Tensor]:
    """``(B, P + S)``: each row's live prefix columns, then ``attention_mask`` ``(B, S)``.

    Returns None when ``attention_mask`` is None and every row has the full prefix (nothing to
    mask); give ``seq_len`` to get an explicit all-ones text part instead.
    """
    lengths, P = _prefix_lengths(cache)
    if attention_mask is None:
        if seq_len is None and bool((lengths == P).all()):
            return None
        if seq_len is None:
            raise ValueError("rows have prefixes of different lengths: give `attention_mask` or `seq_len`")
        attention_mask = torch.ones((lengths.shape[0], seq_len), dtype=torch.long, device=lengths.device)
    return mask_with_prefix(attention_mask, lengths, P)


def mask_with_prefix(attention_mask: torch.Tensor, lengths: torch.Tensor, P: int) -> torch.Tensor:
    """``(B, P + S)``: row b's prefix live in the last ``lengths[b]`` of P columns, then its mask."""
    _check_text_mask(attention_mask, lengths.shape[0], lengths.device)
    columns = torch.arange(P, device=lengths.device)
    live = (columns[None, :] >= (P - lengths)[:, None]).to(attention_mask.dtype)
    return torch.cat([live, attention_mask], dim=1)


def prefix_position_ids(attention_mask: Optional[torch.Tensor], cache: PrefixKVCache, *,
                        seq_len: Optional[int] = None, mode: str = "mask") -> torch.Tensor:
    """``(B, S)`` int64 positions of the text tokens, continuing after each row's prefix.

    ``mode="mask"``: a real token's position is its row's prefix length plus the number of real
    tokens before it (left padding skipped, as ``generate()`` does); padding gets 0.
    ``mode="peft"``: token ``i`` is at ``prefix_length + i`` whatever the padding (PEFT's
    training forward).
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"`mode` must be one of {POSITION_MODES}, got {mode!r}")
    lengths, _ = _prefix_lengths(cache)
    if attention_mask is None:
        if seq_len is None:
            raise ValueError("give `attention_mask` or `seq_len`")
        check_positive_int(seq_len, "seq_len")
        return torch.arange(seq_len, device=lengths.device)[None, :] + lengths[:, None]
    _check_text_mask(attention_mask, lengths.shape[0], lengths.device)
    if mode == "peft":
        return torch.arange(attention_mask.shape[1], device=lengths.device)[None, :] + lengths[:, None]
    real = attention_mask != 0
    positions = real.long().cumsum(-1) - 1 + lengths[:, None]
    return positions.masked_fill(~real, 0)


# --------------------------------------------------------------------------------------------
# Forward and generate
# --------------------------------------------------------------------------------------------
def _batch_and_length(input_ids, inputs_embeds) -> tuple:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of `input_ids` and `inputs_embeds`")
    if input_ids is not None:
        x = check_tensor(input_ids, "input_ids", ndim=2, dtypes=INDEX_DTYPES)
    else:
        x = check_tensor(inputs_embeds, "inputs_embeds", ndim=3, dtypes=FLOAT_DTYPES)
    return x.shape[0], x.shape[1], x.device


def _check_text_inputs(batch: int, seq_len: int, device, attention_mask, position_ids) -> None:
    """The (B, S) mask and positions of the text must match its ids (or embeddings)."""
    for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if value is not None:
            check_token_tensor(value, name, (batch, seq_len), of="the text", device=device,
                               dtypes=INDEX_DTYPES if name == "position_ids" else None,
                               hint=": give the text's own (B, S), the prefix columns are added here")


def _accepts(model, name: str) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def prefix_forward(
    model,
    encoders,
    *,
    input_ids: Optional[torch.Tensor] = None,
    inputs_embeds: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    adapter_index: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    positions: str = "mask",
    **kwargs,
):
    """``model(...)`` with the deep prompt of ``encoders``: builds a fresh cache, the ``(B, P + S)``
    mask and the text positions (``positions``: ``"mask"`` or ``"peft"``, see
    :func:`prefix_position_ids`; an explicit ``position_ids`` is used as given), and runs the
    model. Extra keyword arguments (``labels``...) go to the model.

    Works with gradient checkpointing (non-reentrant) on models whose layers receive the cache;
    raises if the model dropped the cache (then no layer saw the prefix).
    """
    if positions not in POSITION_MODES:
        raise ValueError(f"`positions` must be one of {POSITION_MODES}, got {positions!r}")
    batch, seq_len, device = _batch_and_length(input_ids, inputs_embeds)
    _check_text_inputs(batch, seq_len, device, attention_mask, position_ids)
    cache = build_prefix_cache(encoders, model, batch, adapter_index=adapter_index, seq_len=seq_len)
    mask = prefix_attention_mask(attention_mask, cache)
    if position_ids is None:
        if _accepts(model, "position_ids"):
            position_ids = prefix_position_ids(attention_mask, cache, seq_len=seq_len, mode=positions)
        elif not bool((cache.prefix_lengths() == cache.num_virtual_tokens).all()):
            raise ValueError(f"{type(model).__name__} takes no `position_ids`, so rows with prefixes shorter than "
                             f"{cache.num_virtual_tokens} tokens would get wrong positions: use adapters of one length")
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


@torch.no_grad()
def prefix_generate(
    model,
    encoders,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    adapter_index: Optional[torch.Tensor] = None,
    max_new_tokens: int = 20,
    **generate_kwargs,
):
    """``model.generate(...)`` with the deep prompt of ``encoders``: the prefix is written once
    into a cache with room for the prompt and ``max_new_tokens``, and the ``(B, P + S)`` mask
    tells ``generate()`` the cache holds P tokens the input does not. Returns what generate
    returns (the input followed by the new tokens)."""
    batch, seq_len, device = _batch_and_length(input_ids, None)
    _check_text_inputs(batch, seq_len, device, attention_mask, None)
    check_positive_int(max_new_tokens, "max_new_tokens")
    if adapter_index is not None:  # checked here in full (before it is repeated for beams)
        check_adapter_index(adapter_index, len(encoders) if isinstance(encoders, (list, tuple)) else 1, batch, device)
    # generate() repeats every row for beams / returned sequences but not a cache passed in:
    # build the cache for the repeated rows (each row's prefix is written where it is needed).
    config = generate_kwargs.get("generation_config") or model.generation_config
    expand = max(int(generate_kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1),
                 int(generate_kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1))
    if expand > 1 and adapter_index is not None:
        adapter_index = adapter_index.repeat_interleave(expand)
    cache = build_prefix_cache(encoders, model, batch * expand, adapter_index=adapter_index, seq_len=seq_len,
                               max_new_tokens=max_new_tokens)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = mask_with_prefix(attention_mask, cache.prefix_lengths()[::expand], cache.num_virtual_tokens)
    return model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          **{CACHE_KWARG: cache}, **generate_kwargs)


__all__ = [
    "POSITION_MODES",
    "build_prefix_cache",
    "prefix_attention_mask",
    "prefix_forward",
    "prefix_generate",
    "prefix_geometry",
    "prefix_position_ids",
]
