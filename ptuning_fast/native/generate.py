"""``generate()`` with prompt adapters: the native path.

The prompts are encoded once per call. v1 prompts go into ``inputs_embeds`` of the laid-out
batch; deep prompts are written into a fresh prefix cache at the first step (through a wrapper
around the model's ``prepare_inputs_for_generation``, for the rows ``generate()`` repeats for
beams; the wrapper is installed once and finds the call's prefix in a context variable, so
concurrent calls on one model stay apart), after which transformers drives the loop alone: no
per-step work here. Positions count real tokens, as the native model's forward does;
``positions="peft"`` (an accelerated PeftModel) follows PEFT's ``generate()``: v1 prompts number
every column (prompt, padding, text, new tokens), deep prompts the real tokens after the prefix.
"""
from __future__ import annotations

import contextvars
import inspect

import torch
from peft import PeftType, TaskType

from ..hf.compat import CACHE_KWARG, get_cache
from ..hf.introspection import accepts, check_position_range, is_decoder_only
from ..prefix_tuning.functional import check_cache_implementation, prefix_attention_mask, prefix_cache_for
from .adapters import Rows, prefix_weights, rows_kind, rows_options, task_of
from .forward import layout_batch


# The step of the prompt_generate() call running in this thread / asyncio task over each step's
# model inputs: (model, function of the model inputs), or None. Concurrent calls on one model each
# see their own.
_INPUTS_STEP: contextvars.ContextVar = contextvars.ContextVar("ptuning_fast_inputs_step", default=None)


class _PrepareInputsWithStep:
    """Installed once as a model's ``prepare_inputs_for_generation``: the model's own method,
    followed, inside a prompt_generate() call on this model, by that call's step (read
    from a context variable, so nothing of a call is stored on the shared model). Keeps the
    original's signature, which generate() inspects."""

    def __init__(self, model):
        self.model = model

    def _original(self):
        return type(self.model).prepare_inputs_for_generation.__get__(self.model)

    @property
    def __signature__(self):
        return inspect.signature(self._original())

    def __call__(self, *args, **kwargs):
        model_inputs = self._original()(*args, **kwargs)
        step = _INPUTS_STEP.get()
        return model_inputs if step is None or step[0] is not self.model else step[1](model_inputs)


def _generate_with_step(model, kwargs: dict, step):
    """``model.generate(**kwargs)`` with ``step`` applied to the model inputs of every step."""
    if not isinstance(model.__dict__.get("prepare_inputs_for_generation"), _PrepareInputsWithStep):
        model.prepare_inputs_for_generation = _PrepareInputsWithStep(model)
    token = _INPUTS_STEP.set((model, step))
    try:
        return model.generate(**kwargs)
    finally:
        _INPUTS_STEP.reset(token)


def _without_position_ids(model_inputs):
    """PEFT's generate() of v1 prompts: each step's position ids dropped, so the model numbers the
    columns itself (every column from the cache position for most; from the mask for OPT's learned
    positions)."""
    model_inputs["position_ids"] = None
    return model_inputs


def _first_present(*tensors):
    return next((t for t in tensors if t is not None), None)


def _with_input_ids(out, input_ids, new_tokens=None):
    """Decoder-only: the caller's ``input_ids`` followed by the new tokens."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new_tokens = sequences if new_tokens is None else new_tokens
    repeats = new_tokens.shape[0] // input_ids.shape[0]  # num_return_sequences / beams
    full = torch.cat([input_ids.repeat_interleave(repeats, 0).to(new_tokens.dtype), new_tokens], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out


@torch.no_grad()
def prompt_generate(holder, rows: Rows, input_ids, attention_mask, inputs_embeds, kwargs: dict):
    """``base_model.generate(**kwargs)`` with the rows' prompts. Decoder-only models return
    ``input_ids`` followed by the new tokens, as transformers does; seq2seq models return the
    decoder tokens."""
    model = holder.base_model
    decoder_only = is_decoder_only(model)
    if not decoder_only and task_of(holder) != TaskType.SEQ_2_SEQ_LM:
        raise ValueError(f"generate() needs a causal LM or seq2seq model, got {type(model).__name__}")
    for key in ("position_ids", "token_type_ids"):
        if kwargs.get(key) is not None:
            raise ValueError(f"generate() computes `{key}` itself from `attention_mask`; do not pass it")
    v1 = rows_kind(holder, rows) == PeftType.P_TUNING
    # PEFT's generate() numbers every column for v1 prompts (it drops the position ids, so the model
    # counts the prompt, the padding and the text), and real tokens after the prefix for deep prompts.
    positions = rows_options(holder, rows).positions
    layout, prefix, inputs = layout_batch(holder, rows, input_ids, attention_mask, inputs_embeds, None,
                                          pad_left=decoder_only,
                                          positions="continue" if positions == "peft" and not v1 else None)
    kwargs.update(inputs)
    max_new_tokens = kwargs.get("max_new_tokens") or 0
    if v1:
        check_position_range(model, layout.width + max_new_tokens - 1, layout.width - layout.text_length,
                             layout.text_length + max_new_tokens)
        kwargs["attention_mask"] = layout.attention_mask
        if positions == "peft":
            out = _generate_with_step(model, kwargs, _without_position_ids)
        else:
            if decoder_only and accepts(model, "position_ids"):
                kwargs["position_ids"] = layout.position_ids
            out = model.generate(**kwargs)
        return _with_input_ids(out, input_ids) if decoder_only and input_ids is not None else out

    check_cache_implementation(model, kwargs)
    batch = layout.attention_mask.shape[0]
    weights = prefix_weights(holder, rows)
    dtype = model.get_input_embeddings().weight.dtype
    if decoder_only:  # prefix columns in front of the mask (per-row lengths: shorter ones masked)
        longest = max(w.num_tokens for w in weights)
        check_position_range(model, longest + layout.width + max_new_tokens - 1, longest,
                             layout.width + max_new_tokens)
        kwargs["attention_mask"] = prefix_attention_mask(layout.attention_mask, prefix, num_prompt_columns=longest)
        if accepts(model, "position_ids"):
            kwargs["position_ids"] = layout.position_ids
    else:
        kwargs["attention_mask"] = layout.attention_mask

    def inject_prefix(model_inputs):
        cache = get_cache(model_inputs)
        if cache is None or cache.get_seq_length() == 0:  # the first step: put the prefix in
            ids = _first_present(model_inputs.get("input_ids"), model_inputs.get("decoder_input_ids"),
                                 model_inputs.get("inputs_embeds"))
            # generate() repeats each row for beams / returned sequences: so do the row adapters
            index = None if rows.index is None else rows.index.repeat_interleave(ids.shape[0] // batch)
            model_inputs[CACHE_KWARG] = prefix_cache_for(model, weights, index, ids.shape[0], seq_len=ids.shape[1],
                                                         max_new_tokens=max_new_tokens, dtype=dtype)
        return model_inputs

    out = _generate_with_step(model, kwargs, inject_prefix)
    if decoder_only and input_ids is not None:  # transformers returned the laid-out ids + new tokens
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return _with_input_ids(out, input_ids, new_tokens=sequences[:, layout.width:])
    return out


__all__ = ["prompt_generate"]
