"""Where each row's text, v1 prompt and padding go in the columns the model sees.

Most batches get the *front* layout: ``[P prompt columns][the input columns as given]``, row b's
``n_b`` virtual tokens in the first ``n_b`` prompt columns, the others masked. It is PEFT's
layout, and it costs a concatenation. What differs is the positions
(:data:`~ptuning_fast.ops.mask.POSITIONS`):

- ``"continue"``: live tokens counted in order (the prompt, then the real text; padding skipped),
  so a padded row computes what it computes alone; ``"restart"``: the prompt and the text each
  counted from 0. Per-token outputs come back at the caller's input columns (a view).
- ``"peft"``: every column counted, as PEFT's forward does; per-token outputs stay in the layout
  (prompt columns first), as PEFT returns them.

A padded batch of a decoder-only model (whose heads read the last column, whose generation
appends there and whose shifted loss reads the column before each token), a left-padded one of an
encoder, and template mode (virtual tokens inside the text) have each row *packed*: the prompt and
the real tokens in one block, the padding moved to the side the model reads from, as each row
computes alone. Per-token outputs are then gathered back to the caller's columns.

Positions come from :func:`ptuning_fast.ops.mask.build_prompt_position_ids`, the one definition
of where text sits after a prompt. A CPU batch whose mask shows the front layout already packed
(no padding; an encoder's right padding) takes it; on an accelerator (and under torch.compile) a
padded batch is packed without reading the mask (the same numbers), so the step never waits for
the device. ``"peft"`` and batches without an attention mask read nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .._validation import reads_values
from ..ops.mask import build_prompt_position_ids, packed_prompt_layout

PromptLengths = Union[int, torch.Tensor]


@dataclass
class PromptLayout:
    """One batch laid out for the model: (B, L) columns, L = S + the longest inserted prompt.

    ``text_columns[b, s]`` is the layout column of input column ``s`` (None in the front layout:
    every column moves by ``shift``); ``prompt_index[b, j]`` is k >= 0 where column j holds
    virtual token k of its row, -1 elsewhere (None when every row's prompt fills the first
    ``shift`` columns). ``position_ids`` is None where the model's own positions are the right ones.
    """

    attention_mask: torch.Tensor  # (B, L)
    position_ids: Optional[torch.Tensor]  # (B, L) long
    width: int
    text_length: int
    text_columns: Optional[torch.Tensor] = None  # (B, S) long
    prompt_index: Optional[torch.Tensor] = None  # (B, L) long
    shift: Optional[int] = None  # every real token of every row sits at column s + shift
    outputs_in_layout: bool = False  # per-token outputs are returned in the layout (PEFT's)

    def scatter(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Per-input-column ``values`` (B, S, ...) placed at their layout columns (B, L, ...)."""
        if self.text_columns is None:  # every input column moves by the same shift
            if self.shift == 0:
                return values
            fill_part = values.new_full((values.shape[0], self.shift) + tuple(values.shape[2:]), fill)
            return torch.cat([fill_part, values], dim=1)
        shape = (values.shape[0], self.width) + tuple(values.shape[2:])
        return values.new_full(shape, fill).scatter(1, _spread(self.text_columns, values.shape), values)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-layout-column ``values`` (B, L, ...) back at the caller's input columns (B, S, ...).

        A view when the real tokens only moved by a common shift (the values at padding columns
        are then those of other padding or prompt columns: padding outputs mean nothing)."""
        if self.shift is not None:
            return values[:, self.shift:self.shift + self.text_length]
        if values.requires_grad:
            return _GatherColumns.apply(values, self.text_columns)
        return values.gather(1, _spread(self.text_columns, values.shape))


def _spread(index: torch.Tensor, shape) -> torch.Tensor:
    """A (B, N) column index over the trailing dimensions of ``shape`` (B, M, ...), for gather."""
    return index.view(index.shape + (1,) * (len(shape) - 2)).expand((-1, -1) + tuple(shape[2:]))


class _GatherColumns(torch.autograd.Function):
    """``values.gather(1, columns)`` over trailing dimensions, whose backward is a gather too. A
    row's input columns sit at distinct layout columns, so the gradient of layout column j is the
    one of the input column placed there (zero at prompt and padding columns): a gather through
    the inverse map, which a compiler fuses into what consumes it, where gather's own backward
    zero-fills the whole (B, L, ...) gradient and scatter-adds into it. It matters for logits
    (B, S, vocab): a compiled training step differentiates every output, the logits included."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(columns)
        ctx.width = values.shape[1]
        return values.gather(1, _spread(columns, values.shape))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (columns,) = ctx.saved_tensors
        batch, text_length = columns.shape
        source = columns.new_full((batch, ctx.width), -1).scatter(
            1, columns, torch.arange(text_length, device=columns.device).expand(batch, -1))  # input column at each
        shape = (batch, ctx.width) + tuple(grad.shape[2:])
        picked = grad.gather(1, _spread(source.clamp(min=0), shape))
        return torch.where(_spread(source >= 0, shape), picked, 0), None


def _per_row(lengths: PromptLengths, batch: int, device) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        return lengths.long()
    return torch.full((batch,), int(lengths), dtype=torch.long, device=device)


def build_prompt_layout(attention_mask: torch.Tensor, prompt_lengths: PromptLengths, *, pad_left: bool,
                        positions: str = "continue", placeholders: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None, longest: Optional[int] = None,
                        cache_prompt_lengths: PromptLengths = 0, padded: bool = True) -> PromptLayout:
    """Lay out a batch (see the module docstring).

    ``prompt_lengths`` (int or (B,)): virtual tokens inserted in front of each row's text (0 in
    template mode, where ``placeholders`` (B, S) bool marks the virtual tokens already in the
    input; 0 for deep prompts). ``longest``: the longest of them, when the caller knows it (else
    read from the tensor: one host sync). ``cache_prompt_lengths`` (int or (B,)): a deep prompt
    already in the KV cache before the layout; text positions continue after it.
    ``position_ids`` (B, S), optional: the caller's text positions (counted without any prompt).
    ``padded=False``: the caller knows ``attention_mask`` holds no padding (it gave none).
    """
    if longest is None:
        longest = (int(prompt_lengths.max()) if prompt_lengths.numel() else 0) if isinstance(
            prompt_lengths, torch.Tensor) else int(prompt_lengths)
    if positions == "peft" or (placeholders is None and (not padded or _front_is_packed(attention_mask, pad_left))):
        return _front_layout(attention_mask, prompt_lengths, longest, positions, position_ids, cache_prompt_lengths)
    return _packed_layout(attention_mask, prompt_lengths, longest, pad_left, positions, placeholders, position_ids,
                          cache_prompt_lengths)


def _front_is_packed(attention_mask: torch.Tensor, pad_left: bool) -> bool:
    """Whether the front layout already places every row as packing would (so the cheaper one
    serves): a batch without padding, or an encoder's right padding. A decoder's left padding is
    packed too: the front layout would leave it between the prompt and the text, where the shifted
    loss of a causal LM would read a padding column. Read only where values are read
    (:func:`ptuning_fast._validation.reads_values`: CPU tensors, no sync); elsewhere (an
    accelerator, torch.compile) the batch is packed, with the same numbers and no sync."""
    if attention_mask.shape[1] == 0:
        return True
    if not reads_values(attention_mask):
        return False
    real = attention_mask != 0
    if pad_left:
        return bool(real.all())
    return not bool(torch.gt(real[:, 1:], real[:, :-1]).any())  # no real token after a pad


def _front_layout(attention_mask, prompt_lengths, longest, positions, position_ids, cache_prompt_lengths) -> PromptLayout:
    """``[P prompt columns][input columns]``; no data-dependent work."""
    batch, text_length = attention_mask.shape
    device = attention_mask.device
    width = longest + text_length
    uniform = not isinstance(prompt_lengths, torch.Tensor)
    peft = positions == "peft"
    if uniform:
        mask = attention_mask if longest == 0 else torch.cat(
            [attention_mask.new_ones((batch, longest)), attention_mask], dim=1)
        if peft and position_ids is None and not isinstance(cache_prompt_lengths, torch.Tensor):
            # every column counted, after a uniform prefix: what the model computes itself
            return PromptLayout(attention_mask=mask, position_ids=None, width=width, text_length=text_length,
                                shift=longest, outputs_in_layout=True)
        if positions == "continue" and position_ids is None:  # the mask alone gives the positions
            return PromptLayout(attention_mask=mask, width=width, text_length=text_length, shift=longest,
                                position_ids=build_prompt_position_ids(mask, cache_prompt_lengths))
    lengths = _per_row(prompt_lengths, batch, device)
    k = torch.arange(longest, device=device).expand(batch, -1)
    live = k < lengths[:, None]
    if not uniform:
        mask = torch.cat([live.to(attention_mask.dtype), attention_mask], dim=1)
    prompt_index = None if uniform else torch.cat(
        [k.masked_fill(~live, -1), torch.full((batch, text_length), -1, dtype=torch.long, device=device)], dim=1)
    prompt_positions = k.masked_fill(~live, 0)
    if position_ids is not None:  # the caller's text positions, after the prompt (and any prefix)
        offset = 0 if positions == "restart" else lengths + _per_row(cache_prompt_lengths, batch, device)
        text = position_ids.long() + (offset[:, None] if isinstance(offset, torch.Tensor) else offset)
        pos = torch.cat([prompt_positions, text if peft else text.masked_fill(attention_mask == 0, 0)], dim=1)
    elif peft:
        offset = lengths + _per_row(cache_prompt_lengths, batch, device)
        pos = torch.cat([prompt_positions, torch.arange(text_length, device=device)[None, :] + offset[:, None]], dim=1)
    elif positions == "continue":  # live columns counted in order: the prompt, then the real text
        pos = build_prompt_position_ids(mask, cache_prompt_lengths, positions="continue")
    else:  # "restart": the prompt and the text each from 0
        pos = torch.cat([prompt_positions, build_prompt_position_ids(attention_mask, 0, positions="restart")], dim=1)
    return PromptLayout(attention_mask=mask, position_ids=pos, width=width, text_length=text_length,
                        prompt_index=prompt_index, shift=longest, outputs_in_layout=peft)


def _packed_layout(attention_mask, prompt_lengths, longest, pad_left, positions, placeholders, position_ids,
                   cache_prompt_lengths) -> PromptLayout:
    """Per row, the prompt and the real tokens packed into one block of live columns (the right
    end for ``pad_left``, from column 0 otherwise), padding outside it: one fused op
    (:func:`ptuning_fast.ops.mask.packed_prompt_layout`). Template mode and the caller's
    position ids then adjust its outputs."""
    batch, text_length = attention_mask.shape
    device = attention_mask.device
    width = text_length + longest
    layout_mask, text_columns, prompt_index, pos = packed_prompt_layout(
        attention_mask, prompt_lengths, longest=longest, pad_left=pad_left, positions=positions,
        cache_prompt_lengths=cache_prompt_lengths)
    is_prompt = None
    if placeholders is not None:  # template mode: virtual token k is the row's k-th placeholder
        marked = torch.zeros((batch, width), dtype=torch.bool, device=device).scatter(
            1, text_columns, placeholders & (attention_mask != 0))
        is_prompt = (prompt_index >= 0) | marked
        prompt_index = torch.where(marked, marked.long().cumsum(1) - 1, prompt_index)
        if position_ids is None and positions == "restart":  # text and prompt each counted on their own
            is_real_text = (layout_mask != 0) & ~is_prompt
            pos = torch.where(is_prompt, prompt_index, build_prompt_position_ids(is_real_text, 0, positions="restart"))
    if position_ids is not None:  # the caller's text positions, after the prompt (and any prefix)
        if is_prompt is None:
            is_prompt = prompt_index >= 0
        text_pos = torch.zeros((batch, width), dtype=torch.long, device=device).scatter(
            1, text_columns, position_ids.long())
        if placeholders is None and positions == "continue":
            lengths = _per_row(prompt_lengths, batch, device)
            text_pos = text_pos + (lengths + _per_row(cache_prompt_lengths, batch, device))[:, None]
        pos = text_pos if placeholders is not None else torch.where(is_prompt, prompt_index, text_pos)
        pos = pos.masked_fill(layout_mask == 0, 0)
    return PromptLayout(attention_mask=layout_mask, position_ids=pos, width=width, text_length=text_length,
                        text_columns=text_columns, prompt_index=prompt_index)


__all__ = ["PromptLayout", "build_prompt_layout"]
