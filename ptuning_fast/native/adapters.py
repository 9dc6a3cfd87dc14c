"""A model's prompt adapters, and which one each row of a batch uses.

The native path works on any *holder* of adapters with PEFT's attribute names: ``base_model``
(the transformers model), ``prompt_encoder`` (``nn.ModuleDict`` name -> encoder),
``peft_config`` (name -> config), ``prompt_options`` (name -> :class:`PromptOptions`) and
``active_adapter``. :class:`~ptuning_fast.native.model.PTuningModel` is one; the PEFT route
(:mod:`ptuning_fast.peft_route`) wraps a ``PeftModel`` as another.

:func:`resolve_rows` is the one place where a batch's rows are resolved to adapters (and the
mixes that cannot share a batch are refused, saying why).
"""
from __future__ import annotations

import copy
import functools
import itertools
import re
from typing import List, Optional

import torch
from peft import PeftType, TaskType
from peft.utils.other import _prepare_prompt_learning_config

from ..config import PrefixTuningConfig, PromptEncoderConfig
from ..hf.introspection import accepts, infer_task_type
from ..p_tuning.encoder import PromptEncoder
from ..prefix_tuning.encoder import PrefixEncoder, prefix_weights_of
from .options import PromptOptions

PROMPT_TYPES = (PeftType.P_TUNING, PeftType.PREFIX_TUNING)


# ---------------------------------------------------------------------------------------------
# Building adapters
# ---------------------------------------------------------------------------------------------
def prepare_config(config, model, task_type=None):
    """A copy of ``config`` (ours or PEFT's) as PEFT fills it when it wraps ``model``."""
    if not hasattr(config, "peft_type"):
        raise TypeError(f"`config` must be a PEFT prompt-learning config (PromptEncoderConfig or "
                        f"PrefixTuningConfig), got {type(config).__name__}")
    if config.peft_type not in PROMPT_TYPES:
        raise ValueError(f"`config.peft_type` must be P_TUNING or PREFIX_TUNING, got {config.peft_type}")
    config = copy.deepcopy(config)
    if config.peft_type == PeftType.P_TUNING:
        config = PromptEncoderConfig.from_peft(config)
    else:
        config = PrefixTuningConfig.from_peft(config)
    if task_type is not None:
        config.task_type = TaskType(task_type)
    elif config.task_type is None:
        config.task_type = infer_task_type(model)
    else:
        config.task_type = TaskType(config.task_type)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    _prepare_prompt_learning_config(config, model.config)
    config.base_model_name_or_path = config.base_model_name_or_path or getattr(model, "name_or_path", None) or None
    return config


def check_config_fits_model(config, model, source: str) -> None:
    """Refuse an adapter config made for another model (hidden size, layers or heads differ),
    naming both: PEFT fills these fields from the model it wraps, and a config keeps them."""
    blank = copy.deepcopy(config)
    fields = ("token_dim",) if config.peft_type == PeftType.P_TUNING else ("token_dim", "num_layers",
                                                                           "num_attention_heads")
    for field in fields:
        setattr(blank, field, None)
    _prepare_prompt_learning_config(blank, model.config)
    saved = {f: getattr(config, f) for f in fields if getattr(config, f) is not None}
    wanted = {f: getattr(blank, f) for f in saved}
    if saved != wanted:
        raise ValueError(f"{source} was made for a model with {saved}, but {type(model).__name__} has {wanted}: the "
                         "adapter does not fit this model")


def make_encoder(config):
    """This package's encoder for ``config``: ``PromptEncoder`` (v1) or ``PrefixEncoder`` (v2)."""
    return PromptEncoder(config) if config.peft_type == PeftType.P_TUNING else PrefixEncoder(config)


def encoded_prompt_table(encoder, config) -> torch.Tensor:
    """The encoded virtual tokens of a v1 adapter, (T_total, D), as PEFT computes them: the
    embedding itself in inference mode, else the encoder over tokens 0..T_total-1."""
    if config.inference_mode:
        return encoder.embedding.weight
    if hasattr(encoder, "encoded_prompts"):
        return encoder.encoded_prompts()
    tokens = torch.arange(encoder.total_virtual_tokens, device=encoder.embedding.weight.device)
    return encoder(tokens[None])[0]  # PEFT's own encoder


# ---------------------------------------------------------------------------------------------
# Holders
# ---------------------------------------------------------------------------------------------
def check_not_other_peft_types(model) -> None:
    """A PeftModel of other adapter types (LoRA...) cannot hold prompt adapters: say so, naming them."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs and getattr(model, "_is_prompt_learning", True) is False:
        kinds = {name: getattr(c.peft_type, "value", str(c.peft_type)) for name, c in configs.items()}
        raise ValueError(f"`model` is a PeftModel holding {kinds} adapters, not prompt-learning ones (P_TUNING / "
                         "PREFIX_TUNING), which PEFT does not mix in one model: load the prompt adapter into the "
                         "base model instead (ptuning_fast.load_adapter(base_model, ...))")


def check_holder(model) -> None:
    """``model`` holds prompt adapters (a PTuningModel or a PeftModel of prompt adapters), or raise."""
    check_not_other_peft_types(model)
    if not isinstance(getattr(model, "prompt_encoder", None), torch.nn.ModuleDict) or not hasattr(model, "peft_config"):
        raise TypeError(f"`model` must be a PTuningModel or a peft.PeftModel, got {type(model).__name__}")


def adapter_parts(model, adapter_name: Optional[str]):
    """(encoder, config, options, name) of ``adapter_name`` in a PTuningModel or PeftModel."""
    check_holder(model)
    adapter_name = model.active_adapter if adapter_name is None else adapter_name
    if not isinstance(adapter_name, str) or adapter_name not in model.prompt_encoder:
        raise ValueError(f"`adapter_name`: unknown adapter {adapter_name!r}; known: {sorted(model.prompt_encoder)}")
    options = getattr(model, "prompt_options", {}).get(adapter_name, PromptOptions())
    return model.prompt_encoder[adapter_name], model.peft_config[adapter_name], options, adapter_name


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
class Rows:
    """Which adapter each row of a batch uses: ``names`` (distinct, in first-use order) and
    ``index`` (B,) into ``names``, or None when every row uses ``names[0]``."""

    __slots__ = ("names", "index")

    def __init__(self, names: List[str], index: Optional[torch.Tensor]):
        self.names, self.index = names, index


def task_of(holder) -> TaskType:
    return next(iter(holder.peft_config.values())).task_type


# Adapter names name folders (a saved adapter's sub-folder) and module keys: identifiers, never paths.
ADAPTER_NAME_RULE = "letters, digits, '_' and '-' only (1 to 128 of them)"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_adapter_identifier(name, argument: str = "adapter_name") -> str:
    """``name`` if it can name an adapter (and its folder), else a TypeError/ValueError giving the rule."""
    if not isinstance(name, str):
        raise TypeError(f"`{argument}` must be a str ({ADAPTER_NAME_RULE}), got {type(name).__name__}")
    if not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"`{argument}` {name!r} is not a valid adapter name: use {ADAPTER_NAME_RULE} (it names "
                         "the adapter's folder when saved, so paths, '.' and '..' are refused)")
    return name


def check_adapter_name(holder, name, argument: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"`{argument}` must hold adapter names (str), got {name!r}")
    if name not in holder.prompt_encoder:
        raise ValueError(f"`{argument}`: unknown adapter {name!r}; known: {sorted(holder.prompt_encoder)}")


def resolve_rows(holder, adapter_names, batch_size: int, device) -> Rows:
    """The adapters of a batch's rows: ``adapter_names`` (one name per row) or the active adapter."""
    if adapter_names is None:
        if holder.active_adapter not in holder.prompt_encoder:
            raise ValueError(f"the active adapter {holder.active_adapter!r} is not among the model's adapters "
                             f"{sorted(holder.prompt_encoder)} (deleted?): call set_adapter() with one of them, or "
                             "pass `adapter_names`")
        return Rows([holder.active_adapter], None)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"`adapter_names` must be a list of adapter names (one per row), got "
                        f"{type(adapter_names).__name__}")
    if len(adapter_names) != batch_size:
        raise ValueError(f"`adapter_names` has {len(adapter_names)} names for a batch of {batch_size} rows")
    for name in adapter_names:
        check_adapter_name(holder, name, "adapter_names")
    names = list(dict.fromkeys(adapter_names))
    if len(names) == 1:
        return Rows(names, None)
    _check_mix(holder, names)
    lookup = {name: i for i, name in enumerate(names)}
    index = _on_device(tuple(lookup[n] for n in adapter_names), torch.device(device))  # once per set of names
    return Rows(names, index)


def _check_mix(holder, names: List[str]) -> None:
    """Refuse adapters that cannot share a batch, naming them and saying why."""
    configs, options = holder.peft_config, holder.prompt_options
    kinds = {configs[n].peft_type for n in names}
    if len(kinds) > 1:
        which = {n: configs[n].peft_type.value for n in names}
        raise ValueError(f"`adapter_names` mixes prompt kinds {sorted(k.value for k in kinds)} ({which}): v1 "
                         "prompts are input tokens and deep prompts are attention-cache entries, so they cannot "
                         "share a batch; run each kind's rows separately")
    if kinds == {PeftType.PREFIX_TUNING}:
        _check_deep_prompt_mix(holder, names)
    placements = {options[n].placement for n in names}
    tokens = {options[n].prompt_token_id for n in names}
    if len(placements) > 1 or (placements == {"template"} and len(tokens) > 1):
        which = {n: (options[n].placement, options[n].prompt_token_id) for n in names}
        raise ValueError(f"`adapter_names` mixes template and prefix placements (or placeholder ids): {which} "
                         "(placement, prompt_token_id); one batch is laid out one way, so the rows of a batch "
                         "must share one placement")
    modes = {options[n].positions for n in names}
    if len(modes) > 1:
        which = {n: options[n].positions for n in names}
        raise ValueError(f"`adapter_names` mixes positions={' and '.join(repr(m) for m in sorted(modes))} adapters "
                         f"({which}); one batch numbers its positions one way, so run each mode's rows separately")


def _check_deep_prompt_mix(holder, names: List[str]) -> None:
    """Deep-prompt adapters share a batch through one cache; say why where they cannot."""
    lengths = {name: holder.peft_config[name].num_virtual_tokens for name in names}
    if len(set(lengths.values())) == 1:
        return
    if task_of(holder) == TaskType.SEQ_2_SEQ_LM:
        raise ValueError(f"`adapter_names` mixes deep-prompt adapters of different lengths {lengths} on a seq2seq "
                         "model: its decoder builds its own self-attention mask and cannot hide the prefix "
                         "columns a shorter prompt leaves empty; use adapters of one `num_virtual_tokens`")
    if not accepts(holder.base_model, "position_ids"):
        raise ValueError(f"`adapter_names` mixes deep-prompt adapters of different lengths {lengths}, but "
                         f"{type(holder.base_model).__name__} takes no `position_ids`, so rows with the shorter "
                         "prompts would get wrong positions; use adapters of one `num_virtual_tokens`")


def rows_kind(holder, rows: Rows):
    return holder.peft_config[rows.names[0]].peft_type


def rows_options(holder, rows: Rows) -> PromptOptions:
    return holder.prompt_options[rows.names[0]]


@functools.lru_cache(maxsize=64)
def _on_device(values: tuple, device: torch.device) -> torch.Tensor:
    """``values`` (the rows' adapter index, adapter lengths or their offsets: ints) as an int64 tensor on ``device``,
    copied there once per distinct tuple rather than once per step. Read only."""
    return torch.tensor(values, dtype=torch.long, device=device)


def longest_prompt(holder, rows: Rows) -> int:
    """The longest prompt of the rows' adapters, from their configs (no tensor read)."""
    return max(holder.peft_config[name].num_virtual_tokens for name in rows.names)


def prompt_lengths(holder, rows: Rows, device):
    """Each row's prompt length: an int when every row has the same, else a (B,) int64 tensor;
    and the longest (an int: known without reading any tensor)."""
    lengths = [holder.peft_config[name].num_virtual_tokens for name in rows.names]
    if rows.index is None or len(set(lengths)) == 1:
        return lengths[0], lengths[0]
    return _on_device(tuple(lengths), torch.device(device))[rows.index], longest_prompt(holder, rows)


def prefix_weights(holder, rows: Rows) -> list:
    """The rows' deep-prompt adapters as PrefixWeights, in ``rows.names`` order."""
    return [prefix_weights_of(holder.prompt_encoder[name], name) for name in rows.names]


def prompt_tables(holder, rows: Rows, batch_size: int, device):
    """v1: (table (sum of T, D), row offset (B,) into it or 0) for the rows' adapters."""
    tables, lengths = [], []
    for name in rows.names:
        config = holder.peft_config[name]
        table = encoded_prompt_table(holder.prompt_encoder[name], config)
        tables.append(table[: config.num_virtual_tokens])  # seq2seq: the encoder half, as PEFT
        lengths.append(config.num_virtual_tokens)
    if rows.index is None:
        return tables[0], 0
    if len({t.dtype for t in tables}) > 1:
        tables = [t.float() for t in tables]
    offsets = _on_device(tuple(itertools.accumulate([0] + lengths[:-1])), torch.device(device))
    return torch.cat(tables), offsets[rows.index]


__all__ = ["ADAPTER_NAME_RULE", "PROMPT_TYPES", "Rows", "adapter_parts", "check_adapter_identifier",
           "check_adapter_name", "check_config_fits_model", "check_holder",
           "check_not_other_peft_types", "encoded_prompt_table", "longest_prompt", "make_encoder", "prefix_weights",
           "prepare_config", "prompt_lengths", "prompt_tables", "resolve_rows", "rows_kind", "rows_options",
           "task_of"]
