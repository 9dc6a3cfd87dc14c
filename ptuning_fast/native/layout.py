"""Where each row's text, v1 prompt and padding go in the columns the model sees.

Two layouts, chosen by ``positions`` (:data:`~ptuning_fast.ops.mask.POSITIONS`):

- ``"continue"`` / ``"restart"`` (packed): per row, the real tokens packed together with the
  prompt next to them and the padding moved to one side (left for decoder-only models, so the
  last column is the last token; right otherwise). A padded row then computes what it computes
  alone. Per-token outputs are gathered back to the caller's input columns.
- ``"peft"`` (PEFT's): ``[P prompt columns][the input columns as given]``, row ``b``'s ``n_b``
  virtual tokens in the first ``n_b`` prompt columns (where PEFT puts them), the rest masked.
  Per-token outputs stay in this layout, as PEFT returns them.

Positions come from :func:`ptuning_fast.ops.mask.build_prompt_position_ids`, the one definition
of where text sits after a prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..ops.mask import build_prompt_position_ids

PromptLengths = Union[int, torch.Tensor]


@dataclass
class PromptLayout:
    """One batch laid out for the model: (B, L) columns, L = S + the longest inserted prompt.

    ``text_columns[b, s]`` is the layout column of input column ``s``; ``prompt_index[b, j]`` is
    k >= 0 where column j holds virtual token k of its row, -1 elsewhere. ``position_ids`` is None
    where the model's own positions are the right ones (PEFT's layout with one prompt length).
    """

    text_columns: torch.Tensor  # (B, S) long
    prompt_index: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L)
    position_ids: Optional[torch.Tensor]  # (B, L) long
    width: int
    shift: Optional[int] = None  # every real token of every row sits at column s + shift
    outputs_in_layout: bool = False  # per-token outputs are returned in the layout (PEFT's)

    def scatter(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Per-input-column ``values`` (B, S, ...) placed at their layout columns (B, L, ...)."""
        if self.outputs_in_layout:  # PEFT's layout: every input column moves by the same shift
            if self.shift == 0:
                return values
            fill_part = values.new_full((values.shape[0], self.shift) + tuple(values.shape[2:]), fill)
            return torch.cat([fill_part, values], dim=1)
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


def _per_row(lengths: PromptLengths, batch: int, device) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        return lengths.long()
    return torch.full((batch,), int(lengths), dtype=torch.long, device=device)


def build_prompt_layout(attention_mask: torch.Tensor, prompt_lengths: PromptLengths, *, pad_left: bool,
                        positions: str = "continue", placeholders: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None, longest: Optional[int] = None,
                        cache_prompt_lengths: PromptLengths = 0) -> PromptLayout:
    """Lay out a batch (see the module docstring).

    ``prompt_lengths`` (int or (B,)): virtual tokens inserted in front of each row's text (0 in
    template mode, where ``placeholders`` (B, S) bool marks the virtual tokens already in the
    input; 0 for deep prompts). ``longest``: the longest of them, when the caller knows it (else
    read from the tensor: one host sync). ``cache_prompt_lengths`` (int or (B,)): a deep prompt's prefix
    in the cache before the layout; text positions continue after it. ``position_ids`` (B, S),
    optional: the caller's text positions (counted without any prompt).
    """
    if longest is None:
        longest = (int(prompt_lengths.max()) if prompt_lengths.numel() else 0) if isinstance(
            prompt_lengths, torch.Tensor) else int(prompt_lengths)
    if positions == "peft":
        return _peft_layout(attention_mask, prompt_lengths, longest, position_ids, cache_prompt_lengths)
    return _packed_layout(attention_mask, prompt_lengths, longest, pad_left, positions, placeholders, position_ids,
                          cache_prompt_lengths)


def _peft_layout(attention_mask, prompt_lengths, longest, position_ids, cache_prompt_lengths) -> PromptLayout:
    """``[P prompt columns][input columns]``, row b's n_b virtual tokens in the FIRST n_b prompt
    columns (where PEFT puts them: a BERT pooler reads column 0), the rest masked; no
    data-dependent work, no host sync."""
    batch, text_length = attention_mask.shape
    device = attention_mask.device
    width = longest + text_length
    lengths = _per_row(prompt_lengths, batch, device)
    text_columns = (torch.arange(text_length, device=device) + longest).expand(batch, -1)
    k = torch.arange(longest, device=device).expand(batch, -1)
    live = k < lengths[:, None]
    prompt_index = torch.cat([k.masked_fill(~live, -1), torch.full((batch, text_length), -1, dtype=torch.long,
                                                                   device=device)], dim=1)
    mask = torch.cat([live.to(attention_mask.dtype), attention_mask], dim=1)
    uniform = not isinstance(prompt_lengths, torch.Tensor) and not isinstance(cache_prompt_lengths, torch.Tensor)
    if position_ids is None and uniform:
        pos = None  # arange over the columns (after a uniform prefix): what the model computes itself
    else:
        offset = lengths + _per_row(cache_prompt_lengths, batch, device)
        text = (torch.arange(text_length, device=device)[None, :] if position_ids is None else position_ids.long())
        pos = torch.cat([k.masked_fill(~live, 0), text + offset[:, None]], dim=1)
    return PromptLayout(text_columns=text_columns, prompt_index=prompt_index, attention_mask=mask, position_ids=pos,
                        width=width, shift=longest, outputs_in_layout=True)


def _packed_layout(attention_mask, prompt_lengths, longest, pad_left, positions, placeholders, position_ids,
                   cache_prompt_lengths) -> PromptLayout:
    """Per row, the real tokens packed with the prompt next to them, padding on one side."""
    batch, text_length = attention_mask.shape
    device = attention_mask.device
    lengths = _per_row(prompt_lengths, batch, device)
    width = text_length + longest
    real = attention_mask != 0
    live = real.sum(1) + lengths  # real tokens of the row in the layout, prompt included
    first = (width - live) if pad_left else torch.zeros_like(live)  # first live column of the row

    rank = real.long().cumsum(1) - 1  # order among the row's real tokens
    pad_rank = (~real).long().cumsum(1) - 1
    pad_column = pad_rank if pad_left else live[:, None] + pad_rank
    text_columns = torch.where(real, first[:, None] + lengths[:, None] + rank, pad_column)

    # Prompt columns: first + k for k < n_b; the rest go to a spare column that is dropped.
    k = torch.arange(longest, device=device)
    prompt_columns = torch.where(k[None, :] < lengths[:, None], first[:, None] + k[None, :], width)
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
        if positions == "continue":  # every live token counted in order, after any deep prefix
            pos = build_prompt_position_ids(layout_mask, cache_prompt_lengths, positions="continue")
        else:  # text and prompt each counted on their own
            pos = torch.where(is_prompt, prompt_index,
                              build_prompt_position_ids(is_real_text, 0, positions="restart"))
    else:
        text_pos = torch.zeros((batch, width), dtype=torch.long, device=device).scatter(
            1, text_columns, position_ids.long())
        if placeholders is None and positions == "continue":
            text_pos = text_pos + (lengths + _per_row(cache_prompt_lengths, batch, device))[:, None]
        pos = text_pos if placeholders is not None else torch.where(is_prompt, prompt_index, text_pos)
    pos = pos.masked_fill(layout_mask == 0, 0)
    return PromptLayout(text_columns=text_columns, prompt_index=prompt_index, attention_mask=layout_mask,
                        position_ids=pos, width=width, shift=_common_shift(text_columns, real, lengths))


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


__all__ = ["PromptLayout", "build_prompt_layout"]
