"""Native P-tuning for transformers models, without PEFT: ``get_ptuning_model(model, config)``.

``config`` is a PEFT config (ours or PEFT's): ``PromptEncoderConfig`` (P-tuning v1, ``P_TUNING``:
virtual tokens in the input) or ``PrefixTuningConfig`` (P-Tuning v2 deep prompts,
``PREFIX_TUNING``: a key/value prefix in every layer). Checkpoints use PEFT's adapter format (see
:mod:`ptuning_fast.integrations.checkpoint`), so PEFT loads ours and we load PEFT's.

What it does that PEFT does not:

- **Templates** (v1): with ``PromptOptions(placement="template", prompt_token_id=...)`` the
  virtual tokens go wherever ``input_ids`` hold the placeholder id, e.g. ``[P][P] x [P] ? [MASK]``
  with real "anchor" tokens between them, as in the P-tuning paper. :class:`PromptTemplate`
  builds such inputs from a template string. The k-th placeholder of a row gets virtual token k.
- **Every head**: causal LM, sequence and token classification (labels are padded for the
  prompt, which PEFT crashes on), question answering (``token_type_ids`` and ``position_ids``
  are kept, PEFT drops them; the span loss is taken over the caller's columns, never over prompt
  columns), seq2seq, masked LM and feature extraction, for both prompt kinds. Deep prompts also
  train under gradient checkpointing (PEFT refuses).
- **Padding**: the prompt always sits next to the text. Each row is re-laid out as its real
  tokens (with the prompt) packed together and the padding moved to the side the head reads
  from (left for decoder-only models, so the last column is the last token, right otherwise).
  Positions count real tokens only, so a padded row computes what it computes alone, and
  ``generate()`` uses the same positions as a training forward. Per-token outputs (LM logits,
  token-classification logits, QA start/end logits, hidden states) come back aligned with the
  caller's ``input_ids`` columns.
- **Positions**: ``positions="continue"`` (default) numbers the text after the prompt, as PEFT
  and transformers do; ``"restart"`` numbers the text from 0 as if there were no prompt (the
  virtual tokens of v1 are then numbered 0..T-1 on their own).

Adapters live in ``prompt_encoder`` (an ``nn.ModuleDict`` keyed by adapter name, like PEFT's), and
the rows of a batch are resolved to adapters in one place (:meth:`PTuningModel._rows`), so a batch
may name one adapter per row with ``adapter_names=[...]`` (PEFT's keyword for mixed batches, which
PEFT offers for LoRA-style adapters only), in ``forward`` and ``generate()``: many P-tuned tasks
served, or trained, in one batch on one frozen model. Every row computes what it computes alone,
and each adapter's gradient comes from its own rows only.

- v1 adapters mix freely: each row gets its adapter's encoded virtual tokens (each adapter
  encoded once per step); shorter prompts leave fewer columns, the layout pads them per row.
- Deep-prompt adapters mix too: each adapter's prefix is encoded once per step and written by
  the fused prefix kernel into the cache rows that use it; adapters of different
  ``num_virtual_tokens`` fill the last columns of the longest prefix and the mask and position
  builders take the per-row lengths (seq2seq models, and models without ``position_ids``, need
  one length per batch).
- v1 and deep prompts cannot share a batch (input tokens vs attention-cache entries), nor can
  template and prefix placements or ``positions`` modes: such a mix raises, saying why.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import re
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from peft import PeftType, TaskType
from peft.utils.other import _prepare_prompt_learning_config

from .._validation import INDEX_DTYPES, check_index_range, check_tensor, check_token_tensor
from ..config import PrefixTuningConfig, PromptEncoderConfig
from ..prefix_encoder import PrefixEncoder
from ..prompt_encoder import PromptEncoder
from .cache import PrefixKVCache
from .compat import CACHE_KWARG, get_cache
from .prefix import build_prefix_cache as build_fused_prefix_cache
from .prefix import mask_with_prefix, run_over_prefix_cache

PLACEMENTS = ("prefix", "template")
POSITIONS = ("continue", "restart")
PROMPT_TYPES = (PeftType.P_TUNING, PeftType.PREFIX_TUNING)

# Outputs that hold one entry per input token, per task: gathered back to the caller's columns.
_TOKEN_OUTPUTS = {
    TaskType.CAUSAL_LM: ("logits", "hidden_states"),
    TaskType.TOKEN_CLS: ("logits", "hidden_states"),
    TaskType.QUESTION_ANS: ("start_logits", "end_logits", "hidden_states"),
    TaskType.SEQ_CLS: ("hidden_states",),
    TaskType.FEATURE_EXTRACTION: ("last_hidden_state", "hidden_states", "logits"),  # logits: masked-LM heads
    TaskType.SEQ_2_SEQ_LM: ("encoder_last_hidden_state", "encoder_hidden_states"),
}
# Labels with one entry per input token (padded with -100 under the prompt).
_TOKEN_LABELS = {TaskType.CAUSAL_LM: ("labels",), TaskType.TOKEN_CLS: ("labels",),
                 TaskType.FEATURE_EXTRACTION: ("labels",)}  # masked-LM heads take per-token labels


# ---------------------------------------------------------------------------------------------
# Options and templates
# ---------------------------------------------------------------------------------------------
@dataclass
class PromptOptions:
    """What the native model adds to a PEFT config (saved beside it as ``ptuning_fast_config.json``).

    - ``placement``: ``"prefix"`` (v1 prompt in front of the text, as PEFT) or ``"template"``
      (v1 virtual tokens wherever ``input_ids == prompt_token_id``). Deep prompts use ``"prefix"``.
    - ``prompt_token_id``: the placeholder id of template mode. Any id that never occurs in
      the text; it need not be inside the vocabulary (those columns are never embedded).
    - ``positions``: ``"continue"`` (text positions follow the prompt) or ``"restart"`` (text
      positions start at 0).
    """

    placement: str = "prefix"
    prompt_token_id: Optional[int] = None
    positions: str = "continue"

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"`placement` must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"`positions` must be one of {POSITIONS}, got {self.positions!r}")
        if self.prompt_token_id is not None and (isinstance(self.prompt_token_id, bool)
                                                 or not isinstance(self.prompt_token_id, int)):
            raise TypeError(f"`prompt_token_id` must be an int or None, got {self.prompt_token_id!r}")
        if self.placement == "template" and self.prompt_token_id is None:
            raise ValueError("`placement='template'` needs `prompt_token_id`: the id that marks the virtual "
                             "tokens in `input_ids`")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PromptOptions":
        if not isinstance(data, dict):
            raise TypeError(f"prompt options must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown prompt options {unknown}; known: {sorted(names)}")
        return cls(**data)


class PromptTemplate:
    """A P-tuning v1 template: ``[P]`` marks a virtual token, ``{name}`` an input field, and any
    other text is kept as real "anchor" tokens, e.g. ``"[P][P] {premise} [P] ? [P] {hypothesis}"``.

    ``encode`` turns one example into token ids with ``prompt_token_id`` at the virtual tokens;
    ``batch`` pads several into ``input_ids`` / ``attention_mask`` tensors for a
    :class:`PTuningModel` built with ``PromptOptions(placement="template", prompt_token_id=...)``.
    """

    _PIECE = re.compile(r"(\[P\]|\{[A-Za-z_][A-Za-z0-9_]*\})")

    def __init__(self, template: str):
        if not isinstance(template, str):
            raise TypeError(f"`template` must be a str, got {type(template).__name__}")
        self.template = template
        self.segments = []  # ("prompt", None) | ("field", name) | ("text", literal)
        for piece in self._PIECE.split(template):
            if piece == "[P]":
                self.segments.append(("prompt", None))
            elif piece.startswith("{") and piece.endswith("}") and self._PIECE.fullmatch(piece):
                self.segments.append(("field", piece[1:-1]))
            elif piece.strip():
                self.segments.append(("text", piece))
        if self.num_virtual_tokens == 0:
            raise ValueError(f"`template` has no virtual token `[P]`: {template!r}")

    @property
    def num_virtual_tokens(self) -> int:
        return sum(kind == "prompt" for kind, _ in self.segments)

    @property
    def fields(self) -> List[str]:
        return [value for kind, value in self.segments if kind == "field"]

    def encode(self, tokenizer, prompt_token_id: int, add_special_tokens: bool = True, **fields) -> List[int]:
        """Token ids of one example (``fields`` are the ``{name}`` values, strings or id lists)."""
        missing = [name for name in self.fields if name not in fields]
        if missing:
            raise ValueError(f"missing template fields {missing} for template {self.template!r}")
        unknown = sorted(set(fields) - set(self.fields))
        if unknown:
            raise ValueError(f"unknown template fields {unknown}; the template has {self.fields}")
        ids: List[int] = []
        for kind, value in self.segments:
            if kind == "prompt":
                ids.append(prompt_token_id)
            else:
                content = fields[value] if kind == "field" else value.strip()
                if isinstance(content, str):
                    content = tokenizer(content, add_special_tokens=False)["input_ids"]
                ids.extend(int(i) for i in content)
        if add_special_tokens:
            before, after = _special_tokens_around(tokenizer)
            ids = before + ids + after
        return ids

    def batch(self, tokenizer, examples: Sequence[dict], prompt_token_id: int, *, padding_side: str = "right",
              add_special_tokens: bool = True) -> Dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, S) for a list of examples, padded on ``padding_side``."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(tokenizer, prompt_token_id, add_special_tokens, **example) for example in examples]
        if not rows:
            raise ValueError("`examples` is empty")
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _special_tokens_around(tokenizer):
    """The ids a tokenizer puts before and after a text when adding special tokens ([CLS] / [SEP]...)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    raise ValueError("cannot tell where this tokenizer puts its special tokens; pass add_special_tokens=False "
                     "and add them yourself")


# ---------------------------------------------------------------------------------------------
# Layout: where each row's text, prompt and padding go
# ---------------------------------------------------------------------------------------------
@dataclass
class PromptLayout:
    """One batch laid out for the model: (B, L) columns, L = S + the longest inserted prompt.

    ``text_columns[b, s]`` is the layout column of input column ``s``; ``prompt_index[b, j]`` is
    k >= 0 where column j holds virtual token k of its row, -1 elsewhere.
    """

    text_columns: torch.Tensor  # (B, S) long
    prompt_index: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor  # (B, L) long
    width: int
    shift: Optional[int] = None  # every real token of every row sits at column s + shift

    def scatter(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Per-input-column ``values`` (B, S, ...) placed at their layout columns (B, L, ...)."""
        shape = (values.shape[0], self.width) + tuple(values.shape[2:])
        out = values.new_full(shape, fill)
        index = self.text_columns.view(self.text_columns.shape + (1,) * (values.dim() - 2)).expand_as(values)
        return out.scatter(1, index, values)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-layout-column ``values`` (B, L, ...) back at the caller's input columns (B, S, ...).

        A view when the real tokens only moved by a common shift (the values at padding columns
        are then those of other padding or prompt columns: padding outputs mean nothing)."""
        text_length = self.text_columns.shape[1]
        if self.shift is not None:
            return values[:, self.shift:self.shift + text_length]
        index = self.text_columns.view(self.text_columns.shape + (1,) * (values.dim() - 2))
        return values.gather(1, index.expand((-1, -1) + tuple(values.shape[2:])))



def build_prompt_layout(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor, *, pad_left: bool,
                        positions: str = "continue", placeholders: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None) -> PromptLayout:
    """Lay out a batch: per row, the real tokens packed together with the prompt, padding on one side.

    ``prompt_lengths`` (B,): virtual tokens inserted in front of each row's text (0 in template
    mode, where ``placeholders`` (B, S) bool marks the virtual tokens already in the input).
    ``position_ids`` (B, S), optional: the caller's text positions (counted without the prompt).
    """
    batch, text_length = attention_mask.shape
    device = attention_mask.device
    longest = int(prompt_lengths.max()) if prompt_lengths.numel() else 0
    width = text_length + longest
    real = attention_mask != 0
    n_real = real.sum(1)
    live = n_real + prompt_lengths  # real tokens of the row in the layout, prompt included
    first = (width - live) if pad_left else torch.zeros_like(live)  # first live column of the row

    rank = real.long().cumsum(1) - 1  # order among the row's real tokens
    pad_rank = (~real).long().cumsum(1) - 1
    pad_column = pad_rank if pad_left else live[:, None] + pad_rank
    text_columns = torch.where(real, first[:, None] + prompt_lengths[:, None] + rank, pad_column)

    # Prompt columns: first + k for k < n_b; the rest go to a spare column that is dropped.
    k = torch.arange(longest, device=device)
    prompt_columns = torch.where(k[None, :] < prompt_lengths[:, None], first[:, None] + k[None, :], width)
    prompt_index = torch.full((batch, width + 1), -1, dtype=torch.long, device=device)
    prompt_index.scatter_(1, prompt_columns, k.expand(batch, -1).contiguous())
    prompt_index = prompt_index[:, :width]
    is_real_text = torch.zeros((batch, width), dtype=torch.bool, device=device).scatter(1, text_columns, real)
    if placeholders is not None:  # template mode: virtual token k is the row's k-th placeholder
        marked = torch.zeros((batch, width), dtype=torch.bool, device=device).scatter(1, text_columns,
                                                                                   placeholders & real)
        prompt_index = torch.where(marked, marked.long().cumsum(1) - 1, prompt_index)
        is_real_text = is_real_text & ~marked
    is_prompt = prompt_index >= 0
    layout_mask = (is_real_text | is_prompt).long()

    if position_ids is None:
        if positions == "continue":  # every live token counted in order
            pos = layout_mask.cumsum(1) - 1
        else:  # text and prompt each counted on their own
            pos = torch.where(is_prompt, prompt_index, is_real_text.long().cumsum(1) - 1)
    else:
        text_pos = torch.zeros((batch, width), dtype=torch.long, device=device).scatter(
            1, text_columns, position_ids.long())
        if placeholders is None and positions == "continue":
            text_pos = text_pos + prompt_lengths[:, None]
        pos = text_pos if placeholders is not None else torch.where(is_prompt, prompt_index, text_pos)
    pos = pos.masked_fill(layout_mask == 0, 0)
    return PromptLayout(text_columns=text_columns, prompt_index=prompt_index, attention_mask=layout_mask,
                        position_ids=pos, width=width, shift=_common_shift(text_columns, real, prompt_lengths))


def _common_shift(text_columns, real, prompt_lengths) -> Optional[int]:
    """The shift k when every real token of every row sits at column s + k (one host sync), else None."""
    if torch.compiler.is_compiling() or text_columns.numel() == 0:
        return None
    shift = prompt_lengths[:1]
    columns = torch.arange(text_columns.shape[1], device=text_columns.device)
    moved = (text_columns == columns + shift[:, None]) | ~real
    if not bool(moved.all() & (prompt_lengths == shift).all()):
        return None
    return int(shift)


# ---------------------------------------------------------------------------------------------
# Helpers on the wrapped transformers model
# ---------------------------------------------------------------------------------------------
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


_DECODER_ONLY = weakref.WeakKeyDictionary()  # model -> bool, so the module walk happens once per model


def is_decoder_only(model) -> bool:
    """True for causal decoder-only models (their heads read the last column; generation pads left)."""
    known = _DECODER_ONLY.get(model)
    if known is None:
        known = not getattr(model.config, "is_encoder_decoder", False) and any(
            getattr(module, "is_causal", False) is True for module in model.modules())
        _DECODER_ONLY[model] = known
    return known


@functools.lru_cache(maxsize=256)
def _forward_parameters(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(model, argument: str) -> bool:
    """Whether ``model.forward`` names ``argument`` (``**kwargs`` does not count)."""
    return argument in _forward_parameters(type(model))


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


def prefix_key_values(encoder, config, batch_size: int, dtype) -> List[tuple]:
    """Per layer (key, value), each (B, kv_heads, T, head_dim), from a prefix encoder: the T
    virtual tokens are encoded once and broadcast over the batch (no B copies)."""
    tokens = config.num_virtual_tokens
    if config.inference_mode:
        flat = encoder.embedding.weight
    else:
        flat = encoder(torch.arange(tokens, device=encoder.embedding.weight.device)[None])[0]
    if dtype is not None:
        flat = flat.to(dtype)
    heads = config.num_attention_heads
    kv = flat.view(tokens, config.num_layers * 2, heads, config.token_dim // heads).permute(1, 2, 0, 3)
    kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, H, T, Dh)
    # PEFT's seq2seq layout: the 2L entries are repeated and read four per layer (self k, v, then
    # cross k, v, which it discards), so layer l reads entries 4l and 4l+1 of the repeated list.
    stride = 2 * config.num_transformer_submodules
    entries = 2 * config.num_layers
    return [(kv[(stride * layer) % entries], kv[(stride * layer + 1) % entries]) for layer in range(config.num_layers)]


def build_prefix_cache(encoder, config, model, batch_size: int, dtype=None, *, seq_len: int = 0,
                       max_new_tokens: int = 0, adapter_index: Optional[torch.Tensor] = None):
    """A transformers cache holding the prefix of every layer, ready for the model's forward.

    ``encoder`` / ``config``: one deep-prompt adapter, or lists of several (one per adapter) with
    ``adapter_index`` ``(B,)`` giving each row's adapter. Each adapter is encoded once, whatever
    the number of its rows; a shorter prefix fills the LAST of the ``P = max T_n`` prefix columns
    (mask the others: :func:`prefix_attention_mask` with the per-row lengths).

    Decoder-only and encoder-only models get the fused :class:`~ptuning_fast.integrations.cache.PrefixKVCache`
    (every layer's prefix written once, room for ``seq_len + max_new_tokens`` text tokens after it).
    Seq2seq models get an ``EncoderDecoderCache`` with the prefix in the decoder's self-attention,
    laid out as PEFT does, built from :func:`prefix_key_values` (adapters of one length).
    """
    encoders = list(encoder) if isinstance(encoder, (list, tuple)) else [encoder]
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if len(encoders) != len(configs):
        raise ValueError(f"{len(encoders)} prefix encoders but {len(configs)} configs: give one config per encoder")
    if configs[0].num_transformer_submodules == 1:
        return build_fused_prefix_cache(encoders, model, batch_size, adapter_index=adapter_index, seq_len=seq_len,
                                        max_new_tokens=max_new_tokens, dtype=dtype)
    from transformers import DynamicCache, EncoderDecoderCache

    if len({c.num_virtual_tokens for c in configs}) > 1:
        raise ValueError("seq2seq deep prompts of one batch must have the same `num_virtual_tokens`, got "
                         f"{[c.num_virtual_tokens for c in configs]}")
    per_adapter = [prefix_key_values(e, c, 1, dtype) for e, c in zip(encoders, configs)]
    if len(per_adapter) == 1:
        layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in per_adapter[0]]
    else:
        if adapter_index is None:
            raise ValueError(f"`adapter_index` is required with {len(per_adapter)} adapters: give the adapter of "
                             "each row")
        layers = []
        for layer in range(len(per_adapter[0])):  # (N, H, T, Dh) per layer, each row picks its adapter's
            keys = torch.cat([kv[layer][0] for kv in per_adapter])
            values = torch.cat([kv[layer][1] for kv in per_adapter])
            layers.append((keys[adapter_index], values[adapter_index]))
    cache = EncoderDecoderCache(DynamicCache(layers), DynamicCache())
    for key in list(cache.is_updated):
        cache.is_updated[key] = False
    return cache


def prefix_attention_mask(attention_mask: torch.Tensor, prefix_length) -> torch.Tensor:
    """The (B, P + S) mask of a model whose cache holds a P-token prefix. ``prefix_length``: an int
    (every row's prefix fills the P columns) or a (B,) tensor of per-row lengths ``n_b`` (row b's
    prefix fills the last ``n_b`` of ``P = max n_b`` columns; the columns before are masked)."""
    if not isinstance(prefix_length, torch.Tensor):
        ones = torch.ones(attention_mask.shape[0], prefix_length, dtype=attention_mask.dtype,
                          device=attention_mask.device)
        return torch.cat([ones, attention_mask], dim=1)
    return mask_with_prefix(attention_mask, prefix_length, int(prefix_length.max()))


def fused_prefix_mask(model, attention_mask: torch.Tensor, prefix_length) -> Optional[torch.Tensor]:
    """The 4D mask (B, 1, S, P + S) of a prefilled P-token prefix, built in one pass by
    :func:`ptuning_fast.build_prompt_attention_mask`, or None where the model must build its own.
    ``prefix_length``: an int, or (B,) per-row lengths (each row's prefix in the last columns).

    transformers uses a 4D mask as given, so this only serves attention implementations that read
    one (``sdpa``: boolean, ``eager``: additive in the model's dtype) and models without
    sliding-window or encoder-decoder masks, whose layers do not all read the same mask.
    """
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager") or getattr(config, "is_encoder_decoder", False):
        return None
    if getattr(config, "sliding_window", None) is not None or getattr(config, "layer_types", None):
        return None
    from ..ops.mask import build_prompt_attention_mask

    dtype = torch.bool if implementation == "sdpa" else model.get_input_embeddings().weight.dtype
    return build_prompt_attention_mask(attention_mask, prefix_length, causal=is_decoder_only(model), dtype=dtype)


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """Question answering's loss as transformers computes it (out-of-range positions are ignored)."""
    ignored = start_logits.shape[1]
    start = start_positions.reshape(-1).clamp(0, ignored)
    end = end_positions.reshape(-1).clamp(0, ignored)
    return (F.cross_entropy(start_logits, start, ignore_index=ignored)
            + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2


def _first_present(*tensors):
    return next((t for t in tensors if t is not None), None)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class _Rows:
    """Which adapter each row of a batch uses: ``names`` (distinct, in first-use order) and
    ``index`` (B,) into ``names``, or None when every row uses ``names[0]``."""

    def __init__(self, names: List[str], index: Optional[torch.Tensor]):
        self.names, self.index = names, index


class PTuningModel(torch.nn.Module):
    """A transformers model with P-tuning prompt adapters (v1 prompts or v2 deep prompts).

    Build with :func:`get_ptuning_model`. The base model's weights are frozen; only the prompt
    encoders train. ``forward`` takes the base model's arguments plus ``adapter_names`` (one name
    per row, optional); ``generate`` likewise. Attributes not found here are read from the base model.
    """

    def __init__(self, model, config, adapter_name: str = "default", options: Optional[PromptOptions] = None):
        super().__init__()
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"`model` must be a transformers model, got {type(model).__name__}")
        self.base_model = model
        self.prompt_encoder = torch.nn.ModuleDict()
        self.peft_config: Dict[str, object] = {}
        self.prompt_options: Dict[str, PromptOptions] = {}
        self.active_adapter = adapter_name
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.add_adapter(adapter_name, config, options)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, config, options: Optional[PromptOptions] = None) -> None:
        """Add a prompt adapter built from ``config`` (not made active: see :meth:`set_adapter`)."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"`adapter_name` must be a non-empty str, got {adapter_name!r}")
        if adapter_name in self.prompt_encoder:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        options = PromptOptions() if options is None else options
        if not isinstance(options, PromptOptions):
            raise TypeError(f"`options` must be a PromptOptions, got {type(options).__name__}")
        known = next(iter(self.peft_config.values()), None)
        config = prepare_config(config, self.base_model, known.task_type if known is not None else None)
        if config.peft_type == PeftType.PREFIX_TUNING and options.placement != "prefix":
            raise ValueError("deep prompts (PREFIX_TUNING) live in the attention cache: `placement` must be 'prefix'")
        if options.placement == "template" and config.num_transformer_submodules != 1:
            raise ValueError("template placement puts the virtual tokens in the encoder input: it needs "
                             "`num_transformer_submodules=1`")
        encoder = make_encoder(config)
        embeddings = self.base_model.get_input_embeddings().weight
        self.prompt_encoder[adapter_name] = encoder.to(embeddings.device)
        self.peft_config[adapter_name] = config
        self.prompt_options[adapter_name] = options

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter of rows that name none."""
        self._check_adapter(adapter_name, "adapter_name")
        self.active_adapter = adapter_name

    @property
    def active_adapters(self) -> List[str]:
        return [self.active_adapter]

    @property
    def active_peft_config(self):
        return self.peft_config[self.active_adapter]

    def _check_adapter(self, name, argument: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"`{argument}` must hold adapter names (str), got {name!r}")
        if name not in self.prompt_encoder:
            raise ValueError(f"`{argument}`: unknown adapter {name!r}; known: {sorted(self.prompt_encoder)}")

    def get_base_model(self):
        return self.base_model

    def get_nb_trainable_parameters(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------------- per-row adapters
    def _rows(self, adapter_names, batch_size: int, device) -> _Rows:
        """The one place where rows are resolved to adapters (and validated)."""
        if adapter_names is None:
            return _Rows([self.active_adapter], None)
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"`adapter_names` must be a list of adapter names (one per row), got "
                            f"{type(adapter_names).__name__}")
        if len(adapter_names) != batch_size:
            raise ValueError(f"`adapter_names` has {len(adapter_names)} names for a batch of {batch_size} rows")
        for name in adapter_names:
            self._check_adapter(name, "adapter_names")
        names = list(dict.fromkeys(adapter_names))
        kinds = {self.peft_config[n].peft_type for n in names}
        if len(kinds) > 1:
            which = {n: self.peft_config[n].peft_type.value for n in names}
            raise ValueError(f"`adapter_names` mixes prompt kinds {sorted(k.value for k in kinds)} ({which}): v1 "
                             "prompts are input tokens and deep prompts are attention-cache entries, so they cannot "
                             "share a batch; run each kind's rows separately")
        if len(names) == 1:
            return _Rows(names, None)
        if kinds == {PeftType.PREFIX_TUNING}:
            self._check_deep_prompt_mix(names)
        placements = {self.prompt_options[n].placement for n in names}
        tokens = {self.prompt_options[n].prompt_token_id for n in names}
        if len(placements) > 1 or (placements == {"template"} and len(tokens) > 1):
            which = {n: (self.prompt_options[n].placement, self.prompt_options[n].prompt_token_id) for n in names}
            raise ValueError(f"`adapter_names` mixes template and prefix placements (or placeholder ids): {which} "
                             "(placement, prompt_token_id); one batch is laid out one way, so the rows of a batch "
                             "must share one placement")
        position_modes = {self.prompt_options[n].positions for n in names}
        if len(position_modes) > 1:
            which = {n: self.prompt_options[n].positions for n in names}
            raise ValueError(f"`adapter_names` mixes positions='continue' and 'restart' adapters ({which}); one "
                             "batch numbers its positions one way, so run each mode's rows separately")
        lookup = {name: i for i, name in enumerate(names)}
        index = torch.tensor([lookup[n] for n in adapter_names], dtype=torch.long, device=device)
        return _Rows(names, index)

    def _check_deep_prompt_mix(self, names: List[str]) -> None:
        """Deep-prompt adapters share a batch through one cache; say why where they cannot."""
        lengths = {name: self.peft_config[name].num_virtual_tokens for name in names}
        if len(set(lengths.values())) == 1:
            return
        if self._task == TaskType.SEQ_2_SEQ_LM:
            raise ValueError(f"`adapter_names` mixes deep-prompt adapters of different lengths {lengths} on a seq2seq "
                             "model: its decoder builds its own self-attention mask and cannot hide the prefix "
                             "columns a shorter prompt leaves empty; use adapters of one `num_virtual_tokens`")
        if not accepts(self.base_model, "position_ids"):
            raise ValueError(f"`adapter_names` mixes deep-prompt adapters of different lengths {lengths}, but "
                             f"{type(self.base_model).__name__} takes no `position_ids`, so rows with the shorter "
                             "prompts would get wrong positions; use adapters of one `num_virtual_tokens`")

    def _prefix_lengths(self, rows: _Rows, batch_size: int, device):
        """Deep prompts: each row's prefix length, an int when every row has the same, else (B,) int64."""
        lengths = [self.peft_config[name].num_virtual_tokens for name in rows.names]
        if rows.index is None or len(set(lengths)) == 1:
            return lengths[0]
        return torch.tensor(lengths, dtype=torch.long, device=device)[rows.index]

    def _prefix_encoders(self, rows: _Rows):
        """(encoders, configs, adapter_index) of the rows' deep-prompt adapters, for the prefix cache."""
        encoders = [self.prompt_encoder[name] for name in rows.names]
        configs = [self.peft_config[name] for name in rows.names]
        return encoders, configs, rows.index

    def _prompt_rows(self, rows: _Rows, batch_size: int, device):
        """v1: (table (sum of T, D), row_offset (B,), prompt_lengths (B,)) for the rows' adapters."""
        tables, lengths = [], []
        for name in rows.names:
            config = self.peft_config[name]
            table = encoded_prompt_table(self.prompt_encoder[name], config)
            tables.append(table[: config.num_virtual_tokens])  # seq2seq: the encoder half, as PEFT
            lengths.append(config.num_virtual_tokens)
        if rows.index is None:
            return (tables[0], torch.zeros(batch_size, dtype=torch.long, device=device),
                    torch.full((batch_size,), lengths[0], dtype=torch.long, device=device))
        lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)
        if len({t.dtype for t in tables}) > 1:
            tables = [t.float() for t in tables]
        offsets = torch.cumsum(lengths_t, 0) - lengths_t
        return torch.cat(tables), offsets[rows.index], lengths_t[rows.index]

    def _options(self, rows: _Rows) -> PromptOptions:
        return self.prompt_options[rows.names[0]]

    def _kind(self, rows: _Rows):
        return self.peft_config[rows.names[0]].peft_type

    @property
    def _task(self) -> TaskType:
        return next(iter(self.peft_config.values())).task_type

    # ------------------------------------------------------------------------------ the layout
    def _layout_batch(self, rows, input_ids, attention_mask, inputs_embeds, position_ids, *, pad_left):
        """The batch laid out for the model, and the model's inputs for it: v1 -> ``inputs_embeds``
        with the encoded prompts at the virtual-token columns; deep prompts -> the caller's
        ``input_ids`` (or ``inputs_embeds``) at their columns."""
        options = self._options(rows)
        text = _first_present(input_ids, inputs_embeds)
        batch, length = text.shape[:2]
        device = text.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        no_prompts = torch.zeros(batch, dtype=torch.long, device=device)
        embedding = self.base_model.get_input_embeddings()
        if self._kind(rows) != PeftType.P_TUNING:
            layout = build_prompt_layout(attention_mask, no_prompts, pad_left=pad_left, position_ids=position_ids)
            if input_ids is not None:
                check_index_range(input_ids, embedding.weight.shape[0], "input_ids")
                return layout, {"input_ids": input_ids if layout.shift == 0 else layout.scatter(input_ids, 0)}
            return layout, {"inputs_embeds": inputs_embeds if layout.shift == 0 else layout.scatter(inputs_embeds, 0.0)}

        table, offsets, lengths = self._prompt_rows(rows, batch, device)
        placeholders = None
        if options.placement == "template":
            if input_ids is None:
                raise ValueError("template placement finds the virtual tokens in `input_ids`; "
                                 "`inputs_embeds` alone cannot carry them")
            placeholders = input_ids == options.prompt_token_id
            self._check_placeholders(placeholders, attention_mask, lengths, options.prompt_token_id)
            lengths = no_prompts
        layout = build_prompt_layout(attention_mask, lengths, pad_left=pad_left, positions=options.positions,
                                     placeholders=placeholders, position_ids=position_ids)
        if inputs_embeds is None:
            safe_ids = input_ids if placeholders is None else input_ids.masked_fill(placeholders, 0)
            check_index_range(safe_ids, embedding.weight.shape[0], "input_ids")
            inputs_embeds = embedding(safe_ids)
        embeds = layout.scatter(inputs_embeds, 0.0)
        is_prompt = layout.prompt_index >= 0
        prompts = F.embedding(layout.prompt_index.clamp(min=0) + offsets[:, None], table).to(embeds.dtype)
        return layout, {"inputs_embeds": torch.where(is_prompt[..., None], prompts, embeds)}

    @staticmethod
    def _check_placeholders(placeholders, attention_mask, lengths, prompt_token_id: int) -> None:
        if torch.compiler.is_compiling():
            return
        counts = (placeholders & (attention_mask != 0)).sum(1)
        bad = (counts != lengths) & (attention_mask != 0).any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"`input_ids` row {row} holds {int(counts[row])} virtual-token placeholders "
                             f"(prompt_token_id={prompt_token_id}), but its adapter has "
                             f"num_virtual_tokens={int(lengths[row])}")

    # ---------------------------------------------------------------------------------- forward
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, token_type_ids=None,
                position_ids=None, start_positions=None, end_positions=None, decoder_input_ids=None,
                decoder_attention_mask=None, *, adapter_names=None, **kwargs):
        """The base model's forward with the prompts of ``adapter_names`` (one adapter name per row;
        default: the active adapter). Arguments as the base model's; ``position_ids`` are the text's
        own positions (counted without the prompt). Per-token outputs are aligned with ``input_ids``."""
        named = dict(labels=labels, token_type_ids=token_type_ids, position_ids=position_ids,
                     start_positions=start_positions, end_positions=end_positions,
                     decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)
        kwargs.update({key: value for key, value in named.items() if value is not None})
        if get_cache(kwargs) is not None:
            raise ValueError("`past_key_values` / `cache`: pass the whole sequence (the prompt is added to it here); "
                             "use generate() for incremental decoding")
        text = self._check_inputs(input_ids, attention_mask, inputs_embeds)
        per_token = {"position_ids": position_ids, "token_type_ids": token_type_ids}
        if self._task in _TOKEN_LABELS:
            per_token["labels"] = labels
        self._check_per_token(per_token, text)
        rows = self._rows(adapter_names, text.shape[0], text.device)
        return_dict = kwargs.pop("return_dict", None)
        out = self._forward(rows, input_ids, attention_mask, inputs_embeds, kwargs)
        return out if return_dict is not False else out.to_tuple()

    def _check_inputs(self, input_ids, attention_mask, inputs_embeds):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        device = self.base_model.get_input_embeddings().weight.device
        if input_ids is not None:
            check_tensor(input_ids, "input_ids", ndim=2, dtypes=INDEX_DTYPES, device=device)
            text = input_ids
        else:
            check_tensor(inputs_embeds, "inputs_embeds", ndim=3, device=device)
            text = inputs_embeds
        if attention_mask is not None:
            check_token_tensor(attention_mask, "attention_mask", text.shape[:2], of="the input", device=device)
        return text

    @staticmethod
    def _check_per_token(tensors: dict, text: torch.Tensor) -> None:
        """Integer tensors with one entry per input token, (B, S) like ``input_ids``; they are moved
        to the prompt layout's columns, so a wrong shape must be named here."""
        for name, value in tensors.items():
            if value is not None:
                check_token_tensor(value, name, text.shape[:2], of="the input", hint=": one entry per input token",
                                   dtypes=INDEX_DTYPES, device=text.device)

    def _forward(self, rows, input_ids, attention_mask, inputs_embeds, kwargs):
        task, model = self._task, self.base_model
        layout, inputs = self._layout_batch(rows, input_ids, attention_mask, inputs_embeds,
                                            kwargs.pop("position_ids", None), pad_left=is_decoder_only(model))
        kwargs.update(inputs)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = layout.scatter(kwargs["token_type_ids"], 0)
        for key in _TOKEN_LABELS.get(task, ()):
            if kwargs.get(key) is not None:
                kwargs[key] = layout.scatter(kwargs[key], -100)
        # QA: the loss is taken over the caller's columns (never over prompt columns), below.
        spans = {key: kwargs.pop(key, None) for key in ("start_positions", "end_positions")}
        if self._kind(rows) == PeftType.P_TUNING:
            kwargs["attention_mask"] = layout.attention_mask
            if task != TaskType.SEQ_2_SEQ_LM and accepts(model, "position_ids"):
                kwargs["position_ids"] = layout.position_ids
            out = model(return_dict=True, **kwargs)
        else:
            self._add_prefix(rows, layout, kwargs)
            out = self._run_with_prefix(kwargs)
        for key in _TOKEN_OUTPUTS[task]:
            value = out.get(key)
            if isinstance(value, torch.Tensor):
                out[key] = layout.gather(value)
            elif isinstance(value, tuple):
                out[key] = tuple(layout.gather(v) for v in value)
        if spans["start_positions"] is not None and spans["end_positions"] is not None:
            out["loss"] = span_loss(out["start_logits"], out["end_logits"], spans["start_positions"],
                                    spans["end_positions"])
        return out

    def _run_with_prefix(self, kwargs):
        """The base model over a prefix cache; under gradient checkpointing the checkpointed layers
        are made to keep the cache (transformers drops caches there, and PEFT refuses)."""
        model = self.base_model
        checkpointing = model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        if not checkpointing or not isinstance(kwargs[CACHE_KWARG], PrefixKVCache):
            return model(return_dict=True, **kwargs)
        return run_over_prefix_cache(model, kwargs.pop(CACHE_KWARG), return_dict=True, **kwargs)

    def _prefix_positions(self, rows, layout: PromptLayout, prefix) -> torch.Tensor:
        """Text positions over a prefix of ``prefix`` tokens (an int, or (B,) per-row lengths):
        counted over real tokens (left-padding aware), plus the row's prefix length with
        ``positions='continue'``; padding gets 0."""
        if self._options(rows).positions == "restart":
            return layout.position_ids
        offset = prefix[:, None] if isinstance(prefix, torch.Tensor) else prefix
        return (layout.position_ids + offset).masked_fill(layout.attention_mask == 0, 0)

    def _add_prefix(self, rows, layout: PromptLayout, kwargs) -> None:
        """Deep prompts: the prefix cache (each adapter encoded once, written into the rows that
        use it), the (B, P + S) or fused 4D mask, and the positions (per-row prefix lengths)."""
        model = self.base_model
        batch = layout.attention_mask.shape[0]
        prefix = self._prefix_lengths(rows, batch, layout.attention_mask.device)
        dtype = model.get_input_embeddings().weight.dtype
        encoders, configs, adapter_index = self._prefix_encoders(rows)
        kwargs[CACHE_KWARG] = build_prefix_cache(encoders, configs, model, batch, dtype, seq_len=layout.width,
                                                 adapter_index=adapter_index)
        if self._task == TaskType.SEQ_2_SEQ_LM:  # prefix in the decoder's self-attention, as PEFT
            kwargs["attention_mask"] = layout.attention_mask
            if kwargs.get("decoder_attention_mask") is not None:
                kwargs["decoder_attention_mask"] = prefix_attention_mask(kwargs["decoder_attention_mask"], prefix)
            return
        if accepts(model, "position_ids"):
            kwargs["position_ids"] = self._prefix_positions(rows, layout, prefix)
        mask = fused_prefix_mask(model, layout.attention_mask, prefix)
        kwargs["attention_mask"] = prefix_attention_mask(layout.attention_mask, prefix) if mask is None else mask

    # --------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, *, adapter_names=None, **kwargs):
        """``base_model.generate`` with the prompts (encoded once per call, from the current weights). Decoder-only models return ``input_ids`` followed by the new tokens, as
        transformers does; seq2seq models return the decoder tokens."""
        text = self._check_inputs(input_ids, attention_mask, inputs_embeds)
        rows = self._rows(adapter_names, text.shape[0], text.device)
        model = self.base_model
        decoder_only = is_decoder_only(model)
        if not decoder_only and self._task != TaskType.SEQ_2_SEQ_LM:
            raise ValueError(f"generate() needs a causal LM or seq2seq model, got {type(model).__name__}")
        for key in ("position_ids", "token_type_ids"):
            if kwargs.get(key) is not None:
                raise ValueError(f"generate() computes `{key}` itself from `attention_mask`; do not pass it")
        layout, inputs = self._layout_batch(rows, input_ids, attention_mask, inputs_embeds, None,
                                            pad_left=decoder_only)
        kwargs.update(inputs)
        if self._kind(rows) == PeftType.P_TUNING:
            kwargs["attention_mask"] = layout.attention_mask
            if decoder_only and accepts(model, "position_ids"):
                kwargs["position_ids"] = layout.position_ids
            return self._with_input_ids(model.generate(**kwargs), input_ids, decoder_only)

        batch = layout.attention_mask.shape[0]
        prefix = self._prefix_lengths(rows, batch, layout.attention_mask.device)
        encoders, configs, adapter_index = self._prefix_encoders(rows)
        dtype = model.get_input_embeddings().weight.dtype
        if decoder_only:  # prefix columns in front of the mask (per-row lengths: shorter ones masked)
            kwargs["attention_mask"] = prefix_attention_mask(layout.attention_mask, prefix)
            if accepts(model, "position_ids"):
                kwargs["position_ids"] = self._prefix_positions(rows, layout, prefix)
        else:
            kwargs["attention_mask"] = layout.attention_mask

        max_new_tokens = kwargs.get("max_new_tokens") or 0

        def inject_prefix(original, *args, **kwargs):  # named `kwargs`: generate() inspects the signature
            model_inputs = original(*args, **kwargs)
            cache = get_cache(model_inputs)
            if cache is None or cache.get_seq_length() == 0:  # the first step: put the prefix in
                ids = _first_present(model_inputs.get("input_ids"), model_inputs.get("decoder_input_ids"),
                                     model_inputs.get("inputs_embeds"))
                # generate() repeats each row for beams / returned sequences: so do the row adapters
                index = None if adapter_index is None else adapter_index.repeat_interleave(ids.shape[0] // batch)
                model_inputs[CACHE_KWARG] = build_prefix_cache(
                    encoders, configs, model, ids.shape[0], dtype, seq_len=ids.shape[1],
                    max_new_tokens=max_new_tokens, adapter_index=index)
            return model_inputs

        with _patched_prepare_inputs(model, inject_prefix):
            out = model.generate(**kwargs)
        if decoder_only and input_ids is not None:  # transformers returned the laid-out ids + new tokens
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            return self._with_input_ids(out, input_ids, decoder_only, new_tokens=sequences[:, layout.width:])
        return out

    @staticmethod
    def _with_input_ids(out, input_ids, decoder_only: bool, new_tokens=None):
        """Decoder-only: the caller's ``input_ids`` followed by the new tokens."""
        if not decoder_only or input_ids is None:
            return out
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new_tokens = sequences if new_tokens is None else new_tokens
        repeats = new_tokens.shape[0] // input_ids.shape[0]  # num_return_sequences / beams
        full = torch.cat([input_ids.repeat_interleave(repeats, 0).to(new_tokens.dtype), new_tokens], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out

    # ------------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[Sequence[str]] = None,
                        save_encoder: bool = False, optimizer=None) -> None:
        """Save adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``;
        non-default adapters in sub-folders). ``save_encoder=True`` also saves the full encoder
        (and ``optimizer``'s state) so that training can resume. Safetensors only."""
        from .checkpoint import save_adapter

        names = list(self.prompt_encoder) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_adapter(name, "selected_adapters")
            save_adapter(self, save_directory, adapter_name=name, save_encoder=save_encoder,
                         optimizer=optimizer if name == names[0] else None)

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                     optimizer=None) -> None:
        """Add the adapter saved in ``model_id`` (ours or PEFT's) as ``adapter_name``."""
        from .checkpoint import load_adapter

        load_adapter(self, model_id, adapter_name=adapter_name, is_trainable=is_trainable, optimizer=optimizer)

    @classmethod
    def from_pretrained(cls, model, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                        optimizer=None) -> "PTuningModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (ours or PEFT's)."""
        from .checkpoint import load_adapter

        return load_adapter(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                            optimizer=optimizer)


class _patched_prepare_inputs:
    """Within the block, ``model.prepare_inputs_for_generation`` goes through ``hook(original, ...)``."""

    def __init__(self, model, hook):
        self.model, self.hook = model, hook

    def __enter__(self):
        self.saved = self.model.__dict__.get("prepare_inputs_for_generation")
        original = self.model.prepare_inputs_for_generation
        self.model.prepare_inputs_for_generation = functools.partial(self.hook, original)

    def __exit__(self, *exc):
        if self.saved is None:
            del self.model.prepare_inputs_for_generation
        else:
            self.model.prepare_inputs_for_generation = self.saved
        return False


def get_ptuning_model(model, config, adapter_name: str = "default", options: Optional[PromptOptions] = None,
                      **option_kwargs) -> PTuningModel:
    """Wrap a transformers ``model`` with a P-tuning adapter built from ``config``.

    ``config``: ``PromptEncoderConfig`` (v1) or ``PrefixTuningConfig`` (v2 deep prompts), ours or
    PEFT's; ``task_type`` may be left out (read from the model class). ``options`` (or its fields
    as keywords: ``placement``, ``prompt_token_id``, ``positions``): see :class:`PromptOptions`.
    """
    if options is not None and option_kwargs:
        raise ValueError("pass either `options` or its fields as keywords, not both")
    if options is None:
        options = PromptOptions.from_dict(option_kwargs)
    return PTuningModel(model, config, adapter_name=adapter_name, options=options)


__all__ = [
    "PTuningModel",
    "PromptLayout",
    "PromptOptions",
    "PromptTemplate",
    "build_prompt_layout",
    "get_ptuning_model",
]
