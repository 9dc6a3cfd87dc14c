"""Questions asked of a transformers model, each answered in one place: its prefix geometry and
dtype, whether it is a causal decoder, which arguments its ``forward`` names, its PEFT task type,
and how many positions its learned position embeddings cover."""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Optional

import torch
from peft import TaskType

from ..ops.prefix_kv import PrefixGeometry


def text_config(model_or_config):
    """The (text) config of a model or config."""
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


def _layers_and_heads(config) -> tuple:
    num_layers = _first_attr(config, ("num_hidden_layers", "num_layers", "n_layer"), "number of layers")
    heads = _first_attr(config, ("num_attention_heads", "n_head", "num_heads"), "number of attention heads")
    return int(num_layers), int(heads)


_MISSING = object()


def _once_per_model(cache: weakref.WeakKeyDictionary, model, compute):
    """``compute(model)``, kept in ``cache`` for later calls. While torch.compile traces, computed
    afresh (reads of the model's structure, folded into the graph): a lookup in a weak dict would
    guard on its entries, which change as other models come and go (a recompile each time)."""
    if torch.compiler.is_compiling():
        return compute(model)
    known = cache.get(model, _MISSING)
    if known is _MISSING:
        known = cache[model] = compute(model)
    return known


_GEOMETRY = weakref.WeakKeyDictionary()  # model -> PrefixGeometry, read off its config once


def prefix_geometry(model_or_config) -> PrefixGeometry:
    """(num_layers, num_kv_heads, head_dim) of the attention layers a prefix cache feeds, read as
    PEFT reads them (GQA/MQA: ``num_key_value_heads``; ``head_dim`` from the config when set).
    Decoder-only and encoder-only models; see :func:`seq2seq_prefix_geometry` for the others.
    For a model, read once (the shape of its attention, not a value of its weights)."""
    if isinstance(model_or_config, torch.nn.Module):
        if torch.compiler.is_compiling():
            return _geometry_of_config(model_or_config.config)
        return _once_per_model(_GEOMETRY, model_or_config, _prefix_geometry)
    return _prefix_geometry(model_or_config)


_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])


def _structural(fn):
    """Mark ``fn``, a structural fact of a model (its config's attention shape and architecture,
    its class's signature: nothing that changes while the model lives), as a constant for
    torch.compile, guarded by its arguments' identity: traced instead, each attribute it reads is
    a guard, one that calls the config's Python ``__getattribute__`` on every call. Dynamo takes an
    object argument of such a constant from torch 2.13 on; before, the reads are traced (the same
    results, more guards)."""
    return torch.compiler.assume_constant_result(fn) if _TORCH_VERSION >= (2, 13) else fn


@_structural
def _geometry_of_config(config) -> PrefixGeometry:
    return _prefix_geometry(config)


def _prefix_geometry(model_or_config) -> PrefixGeometry:
    config = text_config(model_or_config)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("prefix caches cover decoder-only and encoder-only models; "
                         f"{type(config).__name__} is an encoder-decoder model")
    num_layers, heads = _layers_and_heads(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        hidden = _first_attr(config, ("hidden_size", "n_embd", "d_model"), "hidden size")
        head_dim = hidden // heads
    return PrefixGeometry(num_layers, int(kv_heads), int(head_dim))


def seq2seq_prefix_geometry(model_or_config) -> PrefixGeometry:
    """The geometry PEFT gives the prefix of an encoder-decoder model: ``num_layers`` of the
    config, its attention heads, and ``hidden_size // heads`` channels per head."""
    config = text_config(model_or_config)
    num_layers, heads = _layers_and_heads(config)
    hidden = _first_attr(config, ("hidden_size", "d_model", "n_embd"), "hidden size")
    return PrefixGeometry(num_layers, heads, int(hidden) // heads)


def model_dtype(model_or_config) -> Optional[torch.dtype]:
    """The floating dtype of a model (its parameters'), or of a config (its ``dtype``), else None."""
    dtype = getattr(model_or_config, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    config = getattr(model_or_config, "config", model_or_config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def is_decoder_only(model) -> bool:
    """True for causal decoder-only models (their heads read the last column; generation pads
    left), from the model's class and config: not an encoder-decoder config, and a causal-LM
    architecture in transformers' model mappings (BERT-like types, which are also masked-LM
    models, only with ``config.is_decoder``)."""
    return _config_is_decoder_only(type(model), model.config)


@_structural
def _config_is_decoder_only(cls, config) -> bool:
    return _is_decoder_only(cls, getattr(config, "model_type", None), bool(getattr(config, "is_encoder_decoder", False)),
                            bool(getattr(config, "is_decoder", False)))


@functools.lru_cache(maxsize=256)
def _is_decoder_only(cls, model_type, is_encoder_decoder: bool, is_decoder: bool) -> bool:
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    if is_encoder_decoder:
        return False
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # bidirectional unless configured as a decoder
        return is_decoder
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any(c.__name__ in causal_classes for c in cls.__mro__)


# Model types whose attention reads the mask only through transformers' mask builders, so that a
# 4D mask handed in replaces exactly what they would build: tests/models/test_fused_mask.py holds
# each against the model's own mask. Others read the 2D mask for more (OPT: its learned positions;
# Bloom: ALiBi; DeBERTa: its embeddings) and get the 2D mask, as PEFT gives it.
FUSED_MASK_MODEL_TYPES = frozenset({
    "bert", "codegen", "cohere", "electra", "falcon", "gemma", "gpt2", "gpt_bigcode", "gpt_neox", "gptj", "llama",
    "mixtral", "olmo2", "phi", "phi3", "qwen2", "qwen3", "qwen3_moe", "roberta", "stablelm", "starcoder2",
    "xlm-roberta",
})


def takes_fused_mask(model) -> bool:
    """Whether ``model`` can be handed this package's fused 4D mask instead of the 2D one: a type
    of :data:`FUSED_MASK_MODEL_TYPES`, an attention that reads a 4D mask (``sdpa``: boolean,
    ``eager``: additive), and one mask for every layer (no sliding windows, no per-layer types,
    no encoder-decoder masks)."""
    config = model.config  # the attention implementation may change (set_attn_implementation): read each call
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and _config_takes_fused_mask(config)


@_structural
def _config_takes_fused_mask(config) -> bool:
    return (getattr(config, "model_type", None) in FUSED_MASK_MODEL_TYPES
            and not getattr(config, "is_encoder_decoder", False)
            and getattr(config, "sliding_window", None) is None
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ()))


def supports_cache(model) -> bool:
    """Whether ``model`` (or its backbone, which PEFT runs for heads without one) takes a KV
    cache: deep prompts live there."""
    from .compat import CACHE_KWARG

    backbone = getattr(model, "base_model", model)
    return accepts(model, CACHE_KWARG) or accepts(backbone, CACHE_KWARG)


def check_supports_cache(model) -> None:
    """Refuse deep prompts (PREFIX_TUNING) on a model without a KV cache, naming its type."""
    if not supports_cache(model):
        raise ValueError(f"deep prompts (PREFIX_TUNING) live in the attention's KV cache, and "
                         f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) takes none: "
                         "the model does not support past key values; use P_TUNING for it")


_CHECKPOINTING_LAYERS = weakref.WeakKeyDictionary()  # model -> its GradientCheckpointingLayer modules


def checkpointing_layers(model) -> list:
    """The layers of ``model`` that gradient checkpointing wraps (transformers'
    ``GradientCheckpointingLayer``), found once per model: the model's structure, not its values."""
    return _once_per_model(_CHECKPOINTING_LAYERS, model, lambda model: [
        model.get_submodule(name) for name in _checkpointing_layer_names(model)])


# The model's structure; a constant under torch.compile (walking every module, traced, would guard
# on each one's submodules).
@_structural
def _checkpointing_layer_names(model) -> tuple:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return tuple(name for name, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer))


def is_checkpointing(model) -> bool:
    """Whether a training forward of ``model`` recomputes its layers (gradient checkpointing on)."""
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in checkpointing_layers(model))


# Whether a class's forward names an argument: a constant under torch.compile (the lookup itself,
# traced, would guard on the signature's internals), cached in eager.
@_structural
def _forward_takes(cls, argument: str) -> bool:
    return argument in inspect.signature(cls.forward).parameters


_forward_takes_cached = functools.lru_cache(maxsize=256)(_forward_takes)


def accepts(model, argument: str) -> bool:
    """Whether ``model.forward`` names ``argument`` (a ``**kwargs`` catch-all does not count: an
    argument it swallows may be dropped silently)."""
    lookup = _forward_takes if torch.compiler.is_compiling() else _forward_takes_cached
    return lookup(type(model), argument)


def infer_task_type(model) -> TaskType:
    """The PEFT task type of a transformers model, from its class (``...ForCausalLM`` -> CAUSAL_LM...)."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return TaskType.SEQ_2_SEQ_LM
    for suffix, task in (("ForCausalLM", TaskType.CAUSAL_LM), ("LMHeadModel", TaskType.CAUSAL_LM),
                         ("ForSequenceClassification", TaskType.SEQ_CLS),
                         ("ForTokenClassification", TaskType.TOKEN_CLS),
                         ("ForQuestionAnswering", TaskType.QUESTION_ANS)):
        if name.endswith(suffix):
            return task
    return TaskType.FEATURE_EXTRACTION


_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")
_POSITION_TABLE = weakref.WeakKeyDictionary()  # model -> (padding_idx, num_embeddings) of its position table, or None


# The model's structure; a constant under torch.compile (walking every module, traced, would guard
# on each one's submodules).
@_structural
def _position_table_of(model) -> Optional[tuple]:
    table = next((module for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES), None)
    return None if table is None else (table.padding_idx, table.num_embeddings)


def _position_table(model) -> Optional[tuple]:
    """(padding_idx, num_embeddings) of the model's learned position table, or None."""
    return _once_per_model(_POSITION_TABLE, model, _position_table_of)


def first_position(model) -> int:
    """The position id of a sequence's first token: 0, or ``padding_idx + 1`` for models whose
    learned position table reserves ``padding_idx`` for padding (RoBERTa, XLM-RoBERTa...)."""
    table = _position_table(model)
    return 0 if table is None or table[0] is None else table[0] + 1


def learned_position_limit(model) -> Optional[int]:
    """How many positions, counted from the first one, the model's learned absolute position
    embeddings cover (BERT's ``position_embeddings``, GPT-2's ``wpe``...), or None when it has none
    (rotary or relative positions extrapolate, so nothing is checked for them)."""
    table = _position_table(model)
    return None if table is None else table[1] - first_position(model)


def check_position_range(model, longest_position: int, num_virtual_tokens, seq_len: int) -> None:
    """A model with learned absolute positions (BERT, GPT-2...) must have a position for every
    token: refuse, before the forward, a prompt and text that do not fit (``longest_position`` is
    the bound ``P + S - 1``, known without reading any tensor)."""
    limit = learned_position_limit(model)
    if limit is not None and longest_position >= limit:
        raise ValueError(f"the prompt ({num_virtual_tokens} virtual tokens) and the text ({seq_len} tokens) need "
                         f"positions up to {longest_position}, but {type(model).__name__} has "
                         f"max_position_embeddings={limit}: use fewer virtual tokens or shorter text")


__all__ = ["FUSED_MASK_MODEL_TYPES", "accepts", "check_position_range", "check_supports_cache", "checkpointing_layers",
           "first_position", "infer_task_type", "is_checkpointing", "is_decoder_only", "learned_position_limit",
           "model_dtype", "prefix_geometry", "seq2seq_prefix_geometry", "supports_cache", "takes_fused_mask",
           "text_config"]
