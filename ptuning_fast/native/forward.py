"""One forward of a transformers model with prompt adapters: the native path.

``prompt_forward(holder, rows, ...)`` lays the batch out (:mod:`ptuning_fast.native.layout`),
puts the v1 prompts among the input embeddings or the deep prompts into the KV cache
(:func:`ptuning_fast.prefix_tuning.functional.prefix_cache_for`), hands the model the mask in the
form PEFT's path gives attention (:func:`attention_mask_for`), runs it, and returns per-token
outputs at the caller's columns (or in PEFT's layout with ``positions="peft"``). ``holder``: see
:mod:`ptuning_fast.native.adapters`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft import PeftType, TaskType

from .._validation import check_index_range, reads_values
from ..hf.compat import CACHE_KWARG
from ..hf.introspection import (accepts, check_position_range, check_supports_cache, first_position, is_checkpointing,
                                is_decoder_only, takes_fused_mask)
from ..ops.mask import build_prompt_attention_mask
from ..prefix_tuning.cache import PrefixKVCache
from ..prefix_tuning.functional import prefix_attention_mask, prefix_cache_for, run_over_prefix_cache
from .adapters import (Rows, longest_prompt, prefix_weights, prompt_lengths, prompt_tables, rows_kind, rows_options,
                       task_of)
from ..hf.heads import TOKEN_LABELS, TOKEN_OUTPUTS, span_loss
from .layout import PromptLayout, build_prompt_layout


def fused_prefix_mask(model, attention_mask: torch.Tensor, prompt_lengths,
                      longest: Optional[int] = None) -> Optional[torch.Tensor]:
    """The 4D mask (B, 1, S, P + S) of a prefilled P-token prefix, built in one pass by
    :func:`ptuning_fast.build_prompt_attention_mask`, or None where the model must build its own.
    ``prompt_lengths``: an int, or (B,) per-row lengths (each row's prefix in the last columns);
    ``longest``: their P where it is known (from the adapters' configs), so nothing is read.

    transformers uses a 4D mask as given, so this only serves models that read the mask for
    nothing but attention, in one form for every layer
    (:func:`~ptuning_fast.hf.introspection.takes_fused_mask`): ``sdpa`` gets it boolean, ``eager``
    additive in the model's dtype.
    """
    if not takes_fused_mask(model):
        return None
    dtype = torch.bool if model.config._attn_implementation == "sdpa" else model.get_input_embeddings().weight.dtype
    columns = longest if isinstance(prompt_lengths, torch.Tensor) else None
    return build_prompt_attention_mask(attention_mask, prompt_lengths, causal=is_decoder_only(model), dtype=dtype,
                                       num_prompt_columns=columns)


def attention_mask_for(model, layout: PromptLayout, prefix, caller_mask_given: bool,
                       longest: Optional[int] = None) -> Optional[torch.Tensor]:
    """The mask a forward hands the model, in the form PEFT's path gives attention (``prefix``:
    the deep prompts' lengths, an int or (B,) per row; 0 for v1 prompts; ``longest``: the
    longest of per-row lengths, known from the configs):

    - one prompt in front of every row, v1 or deep on a bidirectional model: None when the
      caller gave no mask (a plain concatenation), else the (B, P + S) 2D mask as PEFT hands it;
      the model builds its own 4D mask, or none where nothing is masked (SDPA's fast path);
    - deep prompts on a causal model: the prefix offsets the causal mask, so the model always
      builds one; the fused 4D mask replaces it where the model takes one;
    - rows with masked columns by construction (prompts of several lengths, packed rows): the
      fused 4D mask where the model takes one, else the 2D mask.
    """
    uniform = isinstance(prefix, int) and layout.prompt_index is None and layout.text_columns is None
    if uniform and (prefix == 0 or not is_decoder_only(model)):
        return _mask_2d(layout, prefix, longest) if caller_mask_given else None
    fused = fused_prefix_mask(model, layout.attention_mask, prefix, longest)
    return _mask_2d(layout, prefix, longest) if fused is None else fused


def _mask_2d(layout: PromptLayout, prefix, longest: Optional[int]) -> torch.Tensor:
    """The (B, P + S) mask: the layout's, after any deep prompt's prefix columns."""
    no_prefix = isinstance(prefix, int) and prefix == 0
    return layout.attention_mask if no_prefix else prefix_attention_mask(layout.attention_mask, prefix,
                                                                         num_prompt_columns=longest)


def model_position_ids(model, position_ids: torch.Tensor) -> torch.Tensor:
    """Layout positions (the first token at 0) in the model's numbering (RoBERTa-style models
    start at ``padding_idx + 1``)."""
    first = first_position(model)
    return position_ids + first if first else position_ids


# ---------------------------------------------------------------------------------------------
# The layout and the model's inputs
# ---------------------------------------------------------------------------------------------
def layout_batch(holder, rows: Rows, input_ids, attention_mask, inputs_embeds, position_ids, *, pad_left: bool,
                 positions: Optional[str] = None):
    """(layout, prefix lengths or 0, the model's inputs): v1 -> ``inputs_embeds`` with the encoded
    prompts at the virtual-token columns; deep prompts -> the caller's ``input_ids`` (or
    ``inputs_embeds``) at their columns. ``positions`` overrides the adapters' option."""
    options = rows_options(holder, rows)
    positions = positions or options.positions
    text = input_ids if input_ids is not None else inputs_embeds
    batch, length = text.shape[:2]
    device = text.device
    padded = attention_mask is not None
    if not padded:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    embedding = holder.base_model.get_input_embeddings()
    lengths, longest = prompt_lengths(holder, rows, device)
    if rows_kind(holder, rows) != PeftType.P_TUNING:
        layout = build_prompt_layout(attention_mask, 0, longest=0, pad_left=pad_left, positions=positions,
                                     position_ids=position_ids, cache_prompt_lengths=lengths, padded=padded)
        if input_ids is not None:
            check_index_range(input_ids, embedding.weight.shape[0], "input_ids")
            return layout, lengths, {"input_ids": layout.scatter(input_ids, 0)}
        return layout, lengths, {"inputs_embeds": layout.scatter(inputs_embeds, 0.0)}

    table, offsets = prompt_tables(holder, rows, batch, device)
    placeholders = None
    if options.placement == "template":
        if input_ids is None:
            raise ValueError("template placement finds the virtual tokens in `input_ids`; "
                             "`inputs_embeds` alone cannot carry them")
        placeholders = input_ids == options.prompt_token_id
        _check_placeholders(placeholders, attention_mask, lengths, options.prompt_token_id)
        lengths, longest = 0, 0
    layout = build_prompt_layout(attention_mask, lengths, longest=longest, pad_left=pad_left, positions=positions,
                                 placeholders=placeholders, position_ids=position_ids, padded=padded)
    if inputs_embeds is None:
        safe_ids = input_ids if placeholders is None else input_ids.masked_fill(placeholders, 0)
        check_index_range(safe_ids, embedding.weight.shape[0], "input_ids")
        inputs_embeds = embedding(safe_ids)
    if layout.text_columns is None:  # the front layout: the prompt columns, then the input columns
        return layout, 0, {"inputs_embeds": torch.cat([_prompt_block(layout, table, offsets, batch, inputs_embeds),
                                                       inputs_embeds], dim=1)}
    embeds = layout.scatter(inputs_embeds, 0.0)
    is_prompt = layout.prompt_index >= 0
    index = layout.prompt_index.clamp(min=0)
    if isinstance(offsets, torch.Tensor) or offsets:  # one adapter's table starts at 0: nothing to add
        index = index + (offsets[:, None] if isinstance(offsets, torch.Tensor) else offsets)
    prompts = F.embedding(index, table).to(embeds.dtype)
    return layout, 0, {"inputs_embeds": torch.where(is_prompt[..., None], prompts, embeds)}


def _prompt_block(layout: PromptLayout, table, offsets, batch: int, like: torch.Tensor) -> torch.Tensor:
    """(B, P, D): each row's encoded virtual tokens in the P prompt columns of the front layout."""
    P = layout.shift
    if layout.prompt_index is None and not isinstance(offsets, torch.Tensor):  # one adapter: one prompt, broadcast
        return table[:P].to(like.dtype).unsqueeze(0).expand(batch, -1, -1)
    tokens = torch.arange(P, device=like.device)[None, :] if layout.prompt_index is None else layout.prompt_index[:, :P]
    index = tokens.clamp(min=0) + (offsets[:, None] if isinstance(offsets, torch.Tensor) else offsets)
    prompts = F.embedding(index, table).to(like.dtype)
    return prompts if layout.prompt_index is None else prompts.masked_fill((tokens < 0)[..., None], 0.0)


def _check_placeholders(placeholders, attention_mask, lengths, prompt_token_id: int) -> None:
    if not reads_values(placeholders):  # a check of values: where reading them is free
        return
    counts = (placeholders & (attention_mask != 0)).sum(1)
    bad = (counts != lengths) & (attention_mask != 0).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        expected = int(lengths[row]) if isinstance(lengths, torch.Tensor) else lengths
        raise ValueError(f"`input_ids` row {row} holds {int(counts[row])} virtual-token placeholders "
                         f"(prompt_token_id={prompt_token_id}), but its adapter has num_virtual_tokens={expected}")


# ---------------------------------------------------------------------------------------------
# The forward
# ---------------------------------------------------------------------------------------------
def prompt_forward(holder, rows: Rows, input_ids, attention_mask, inputs_embeds, kwargs: dict):
    """The base model's forward with the rows' prompts; ``kwargs`` are the model's other arguments
    (labels, token_type_ids, position_ids (the text's own), QA spans...). The caller's dict is left
    as given: torch.compile would replay writes into it after the graph (its tensors as outputs)."""
    kwargs = dict(kwargs)
    task, model = task_of(holder), holder.base_model
    if rows_kind(holder, rows) == PeftType.PREFIX_TUNING:
        check_supports_cache(model)
    decoder_only = is_decoder_only(model)
    layout, prefix, inputs = layout_batch(holder, rows, input_ids, attention_mask, inputs_embeds,
                                          kwargs.pop("position_ids", None), pad_left=decoder_only)
    kwargs.update(inputs)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = layout.scatter(kwargs["token_type_ids"], 0)
    for key in TOKEN_LABELS.get(task, ()):
        if kwargs.get(key) is not None:
            kwargs[key] = layout.scatter(kwargs[key], -100)
    # QA: the loss is taken over the caller's columns (never over prompt columns), below; in
    # PEFT's layout the spans go to the model as PEFT passes them.
    spans = {} if layout.outputs_in_layout else {key: kwargs.pop(key, None)
                                                 for key in ("start_positions", "end_positions")}
    _check_positions_fit(holder, rows, layout, prefix)
    if rows_kind(holder, rows) == PeftType.P_TUNING:
        kwargs["attention_mask"] = attention_mask_for(model, layout, 0, attention_mask is not None)
        if task != TaskType.SEQ_2_SEQ_LM and layout.position_ids is not None and accepts(model, "position_ids"):
            kwargs["position_ids"] = model_position_ids(model, layout.position_ids)
        out = model(return_dict=True, **kwargs)
    else:
        _add_prefix(holder, rows, layout, prefix, kwargs, attention_mask is not None)
        out = _run_with_prefix(model, kwargs)
    if not layout.outputs_in_layout:
        _gather_outputs(out, layout, task)
    if spans.get("start_positions") is not None and spans.get("end_positions") is not None:
        out["loss"] = span_loss(out["start_logits"], out["end_logits"], spans["start_positions"],
                                spans["end_positions"])
    return out


def _check_positions_fit(holder, rows: Rows, layout: PromptLayout, prefix) -> None:
    """Refuse, before the forward, a prompt and text longer than the model's learned positions."""
    text_length = layout.text_length
    inserted = layout.width - text_length  # v1 prompt columns in the layout
    deep = longest_prompt(holder, rows) if not isinstance(prefix, int) or prefix else 0
    if rows_options(holder, rows).positions == "restart":
        longest = max(layout.width if deep else text_length, inserted) - 1
    else:
        longest = deep + layout.width - 1
    check_position_range(holder.base_model, longest, inserted + deep, text_length)


def _gather_outputs(out, layout: PromptLayout, task) -> None:
    for key in TOKEN_OUTPUTS[task]:
        value = out.get(key)
        if isinstance(value, torch.Tensor):
            out[key] = layout.gather(value)
        elif isinstance(value, tuple):
            out[key] = tuple(layout.gather(v) for v in value)


def _run_with_prefix(model, kwargs):
    """The base model over a prefix cache; under gradient checkpointing the checkpointed layers
    are made to keep the cache (transformers drops caches there)."""
    if not is_checkpointing(model) or not isinstance(kwargs[CACHE_KWARG], PrefixKVCache):
        return model(return_dict=True, **kwargs)
    return run_over_prefix_cache(model, kwargs.pop(CACHE_KWARG), return_dict=True, **kwargs)


def _add_prefix(holder, rows: Rows, layout: PromptLayout, prefix, kwargs, caller_mask_given: bool) -> None:
    """Deep prompts: the prefix cache (each adapter encoded once, written into the rows that
    use it), the (B, P + S) or fused 4D mask, and the positions (per-row prefix lengths)."""
    model = holder.base_model
    batch = layout.attention_mask.shape[0]
    dtype = model.get_input_embeddings().weight.dtype
    kwargs[CACHE_KWARG] = prefix_cache_for(model, prefix_weights(holder, rows), rows.index, batch,
                                           seq_len=layout.width, dtype=dtype)
    if task_of(holder) == TaskType.SEQ_2_SEQ_LM:  # prefix in the decoder's self-attention, as PEFT
        kwargs["attention_mask"] = layout.attention_mask
        if kwargs.get("decoder_attention_mask") is not None:
            kwargs["decoder_attention_mask"] = prefix_attention_mask(kwargs["decoder_attention_mask"], prefix)
        return
    if layout.position_ids is not None and accepts(model, "position_ids"):
        kwargs["position_ids"] = model_position_ids(model, layout.position_ids)
    kwargs["attention_mask"] = attention_mask_for(model, layout, prefix, caller_mask_given,
                                                  longest_prompt(holder, rows))


__all__ = ["attention_mask_for", "fused_prefix_mask", "layout_batch", "model_position_ids", "prompt_forward"]
