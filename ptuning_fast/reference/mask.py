"""Reference of the prompt-aware attention mask and position ids (what csrc/prompt_mask* compute).

Layout of the key axis, as a prefilled cache holds it: ``[P prompt columns][K text columns]``,
where the text part covers the ``past_length`` tokens already in the cache followed by the
``S = K - past_length`` tokens of this step (the queries). Query ``i`` sits at key index
``q = P + past_length + i``, which is where transformers puts it (``q_offset`` = cache length).

Per-row prompts: row ``b`` has ``n_b <= P`` prompt tokens in the LAST ``n_b`` prompt columns;
the first ``P - n_b`` columns are hidden from every query. Right-aligned prompts sit next to the
text, so the hidden columns behave like extra left padding and a row computes what it would
alone with a P = n_b prompt.

Column ``j`` is visible to query ``q`` of row ``b`` when it is live (a live prompt column or a
real text token) and, if ``causal``, ``j <= q``; a sliding window ``w`` further keeps
``j > q - w`` (causal) or ``|q - j| <= w`` (bidirectional), over the whole key axis as
transformers' sliding layers do. Padding hides key columns only; a padded query still sees the
prompt, and its output is ignored downstream. Additive masks use ``finfo(dtype).min`` rather
than ``-inf``, so a row that sees nothing (possible only when its prompt is empty) softmaxes to
a finite uniform row.
"""
from __future__ import annotations

from typing import Optional

import torch


def live_prompt_columns(prompt_lengths: torch.Tensor, num_prompt_columns: int) -> torch.Tensor:
    """(B, P) bool: True on the last ``prompt_lengths[b]`` of the ``P`` prompt columns of row b."""
    columns = torch.arange(num_prompt_columns, device=prompt_lengths.device)
    return columns[None, :] >= (num_prompt_columns - prompt_lengths)[:, None]


def prompt_attention_mask_reference(
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    num_prompt_columns: int,
    *,
    causal: bool = True,
    past_length: int = 0,
    sliding_window: Optional[int] = None,
    dtype: torch.dtype = torch.bool,
) -> torch.Tensor:
    """(B, 1, S, P + K) mask from the (B, K) text mask and the (B,) prompt lengths.

    ``dtype=torch.bool``: True where attention is allowed. A floating ``dtype``: 0 where allowed,
    ``torch.finfo(dtype).min`` where not (transformers' additive convention).
    """
    batch, text_length = attention_mask.shape
    P, device = num_prompt_columns, attention_mask.device
    query_length = text_length - past_length
    live = torch.cat([live_prompt_columns(prompt_lengths, P), attention_mask != 0], dim=1)

    query = torch.arange(query_length, device=device)[:, None] + P + past_length  # (S, 1)
    key = torch.arange(P + text_length, device=device)[None, :]  # (1, P + K)
    allowed = torch.ones(query_length, P + text_length, dtype=torch.bool, device=device)
    if causal:
        allowed &= key <= query
    if sliding_window is not None:
        allowed &= (key > query - sliding_window) if causal else ((query - key).abs() <= sliding_window)

    mask = live[:, None, None, :] & allowed[None, None, :, :]
    if dtype == torch.bool:
        return mask
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def prompt_position_ids_reference(
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    *,
    past_length: int = 0,
    after_prompt: bool = True,
) -> torch.Tensor:
    """(B, S) int64 positions of the query tokens, counting real tokens only (left-padding aware).

    A real token's position is the number of real text tokens before it, plus ``n_b`` when
    ``after_prompt`` (text continues after the prompt, as transformers does with a prefilled
    cache). Padding tokens get 0, as in ``generate()``.
    """
    real = attention_mask != 0
    positions = real.long().cumsum(-1) - 1
    if after_prompt:
        positions = positions + prompt_lengths.long()[:, None]
    return positions.masked_fill(~real, 0)[:, past_length:]


def packed_prompt_layout_reference(
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    cache_prompt_lengths: torch.Tensor,
    longest: int,
    *,
    pad_left: bool,
    restart: bool = False,
):
    """The packed layout of a batch (what csrc/prompt_mask* ``packed_prompt_layout`` computes).

    Row b's ``n_b`` virtual tokens and its real text tokens, in order, fill one block of live
    columns of the ``W = S + longest`` layout columns: at the right end when ``pad_left``, from
    column 0 otherwise; the row's padding columns fill the rest, in order. Returns, all int64:

    - ``layout_mask`` (B, W): 1 on the live block, 0 elsewhere;
    - ``text_columns`` (B, S): the layout column of each input column;
    - ``prompt_index`` (B, W): k on the column of virtual token k, -1 elsewhere;
    - ``position_ids`` (B, W): the live columns counted in order after the row's
      ``cache_prompt_lengths[b]`` (a deep prompt already in the cache), or with ``restart`` the
      prompt and the text each counted from 0; 0 on padding.
    """
    batch, text_length = attention_mask.shape
    device = attention_mask.device
    lengths = prompt_lengths.long()
    width = text_length + longest
    real = attention_mask != 0
    rank = real.long().cumsum(1) - 1  # order among the row's real tokens
    live = rank[:, -1] + 1 + lengths if text_length else lengths  # live columns of the row, prompt included
    first = (width - live) if pad_left else torch.zeros_like(live)
    offset = torch.arange(width, device=device)[None, :] - first[:, None]  # column's place in the live block
    layout_mask = (offset >= 0) & (offset < live[:, None])
    is_prompt = (offset >= 0) & (offset < lengths[:, None])

    pad_rank = (~real).long().cumsum(1) - 1
    pad_column = pad_rank if pad_left else live[:, None] + pad_rank
    text_columns = torch.where(real, first[:, None] + lengths[:, None] + rank, pad_column)
    prompt_index = torch.where(is_prompt, offset, -1)
    if restart:  # the prompt from 0, then the text from 0
        positions = torch.where(is_prompt, offset, offset - lengths[:, None])
    else:  # every live column in order, after the cached prefix
        positions = offset + cache_prompt_lengths.long()[:, None]
    positions = positions.masked_fill(~layout_mask, 0)
    return layout_mask.long(), text_columns, prompt_index, positions
