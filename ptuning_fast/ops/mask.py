"""Prompt-aware attention masks and position ids for prefixed models: the one place that says
where text sits after a prompt.

``build_prompt_attention_mask`` turns the 2D padding mask of the text into the 4D mask the
attention reads when P prompt columns (a deep-prompt K/V prefix in the cache, or P-tuning's
virtual tokens) come before the text; ``prompt_padding_mask`` gives the 2D ``(B, P + S)`` mask of
the same layout (what a model builds its own mask from); ``build_prompt_position_ids`` gives the
matching positions; ``packed_prompt_layout`` lays a padded batch out with each row's prompt and
real tokens packed in one block (the native model's layout). Pass the 4D mask as
``attention_mask=`` to a transformers 5 model: a 4D mask is used untouched. The exact definitions
are in :mod:`ptuning_fast.reference.mask`.

Vocabulary, used across the package: ``num_virtual_tokens`` is an adapter's prompt length (and
``P``, the number of prompt columns); ``prompt_lengths`` is an int or a ``(B,)`` tensor of per-row
lengths; ``positions`` says how text is numbered after a prompt (:data:`POSITIONS`).

Dispatch: backend ``"reference"`` -> PyTorch; otherwise the C++/CUDA extension (CPU kernel or
CUDA kernel by device) when it is loaded, else PyTorch. Both give identical results.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .._deprecation import renamed_keywords
from .._extension import load_extension
from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_positive_int, check_tensor, reads_values
from ..backend import get_backend
from ..reference.mask import (live_prompt_columns, packed_prompt_layout_reference, prompt_attention_mask_reference,
                              prompt_position_ids_reference)

MASK_DTYPES = (torch.bool,) + INDEX_DTYPES + FLOAT_DTYPES
OUTPUT_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)
PADDING_SIDES = ("left", "right")

# How text is numbered after a prompt. "continue": a real token's position is the number of real
# tokens before it, plus the row's prompt length (padding skipped: what generate() does, and what
# a row computes alone); "restart": the same from 0, as if there were no prompt; "peft": text
# column i at prompt length + i, padding counted (PEFT's training forward).
POSITIONS = ("continue", "restart", "peft")


def check_positions(positions, name: str = "positions", allowed=POSITIONS) -> str:
    if positions not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {positions!r}")
    return positions


def _after_prompt_to_positions(after_prompt) -> str:
    if not isinstance(after_prompt, bool):
        raise TypeError(f"`after_prompt` must be a bool, got {after_prompt!r} ({type(after_prompt).__name__})")
    return "continue" if after_prompt else "restart"

PromptLengths = Union[int, torch.Tensor]


def _extension(device: torch.device):
    """The loaded extension when it should build masks on ``device``, else None (use PyTorch)."""
    if get_backend() == "reference" or device.type not in ("cpu", "cuda"):
        return None
    ext = _loaded_extension()
    if ext is None or (device.type == "cuda" and not _EXTENSION_HAS_CUDA):
        return None
    return ext


# Prompt lengths (and prompt columns) above this are refused before anything is allocated: the
# mask has B * S * (P + S) entries, and positions P + S must stay far from int64's end.
MAX_PROMPT_LENGTH = 2**20


def _check_prompt_length(value: int, name: str) -> None:
    if value > MAX_PROMPT_LENGTH:
        raise ValueError(f"`{name}` ({value}) is over the limit of {MAX_PROMPT_LENGTH} prompt columns")


_EXTENSION = False  # not looked for yet; then the module or None (plain globals: torch.compile traces them)
_EXTENSION_HAS_CUDA = False


def _loaded_extension():
    global _EXTENSION, _EXTENSION_HAS_CUDA
    if _EXTENSION is False:
        if torch.compiler.is_compiling():  # loading is not traceable: PyTorch builds the same mask
            return None
        _EXTENSION = load_extension()
        _EXTENSION_HAS_CUDA = _EXTENSION is not None and bool(_EXTENSION.with_cuda())
    return _EXTENSION


def preload_extension() -> None:
    """Load the extension now. Models call it when they are set up, so that a model whose first
    call is compiled builds its masks and layouts with the extension's ops: torch.compile cannot
    load it while tracing and traces the PyTorch path instead (the same numbers, more ops)."""
    _loaded_extension()


# The extension's builders as operators of the dispatcher, with fake implementations, so that
# torch.compile traces them into the graph (a pybind function is opaque to it) and knows their
# output shapes. The schemas are defined here (the operators exist without the extension); the
# extension registers the CPU and CUDA kernels in C++ when it loads (csrc/bindings.cpp), so a call
# costs a dispatch and no Python frame (torch.library.custom_op's wrapper adds ~20 us a call). They
# are only called once the extension is loaded (:func:`_extension`).
_LIBRARY = torch.library.Library("ptuning_fast", "FRAGMENT")
_LIBRARY.define("prompt_attention_mask(Tensor attention_mask, Tensor? prompt_lengths, SymInt num_prompt_columns, "
                "SymInt past_length, bool causal, SymInt sliding_window, ScalarType dtype) -> Tensor")
_LIBRARY.define("prompt_position_ids(Tensor attention_mask, Tensor? prompt_lengths, SymInt num_prompt_columns, "
                "SymInt past_length, bool after_prompt) -> Tensor")
_LIBRARY.define("packed_prompt_layout(Tensor attention_mask, Tensor? prompt_lengths, SymInt longest, "
                "Tensor? cache_prompt_lengths, SymInt cache_prompt_length, bool pad_left, bool restart) "
                "-> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake("ptuning_fast::prompt_attention_mask", lib=_LIBRARY)
def _(attention_mask, prompt_lengths, num_prompt_columns, past_length, causal, sliding_window, dtype):
    batch, text_length = attention_mask.shape
    return attention_mask.new_empty((batch, 1, text_length - past_length, num_prompt_columns + text_length),
                                    dtype=dtype)


@torch.library.register_fake("ptuning_fast::prompt_position_ids", lib=_LIBRARY)
def _(attention_mask, prompt_lengths, num_prompt_columns, past_length, after_prompt):
    batch, text_length = attention_mask.shape
    return attention_mask.new_empty((batch, text_length - past_length), dtype=torch.long)


@torch.library.register_fake("ptuning_fast::packed_prompt_layout", lib=_LIBRARY)
def _(attention_mask, prompt_lengths, longest, cache_prompt_lengths, cache_prompt_length, pad_left, restart):
    batch, text_length = attention_mask.shape
    columns = attention_mask.new_empty((batch, text_length + longest), dtype=torch.long)
    text_columns = attention_mask.new_empty((batch, text_length), dtype=torch.long)
    return columns, text_columns, torch.empty_like(columns), torch.empty_like(columns)


_attention_mask_op = torch.ops.ptuning_fast.prompt_attention_mask.default
_position_ids_op = torch.ops.ptuning_fast.prompt_position_ids.default
_packed_layout_op = torch.ops.ptuning_fast.packed_prompt_layout.default


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__})")
    return value


_UNBOUNDED_COLUMNS = 2 ** 62  # P of per-row lengths that positions need not know (no output has P columns)


def _check_row_lengths(lengths: torch.Tensor, name: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """``lengths``: a ``(B,)`` integer tensor of per-row lengths on the device of ``attention_mask``."""
    lengths = check_tensor(lengths, name, ndim=1, dtypes=INDEX_DTYPES, device=attention_mask.device)
    if lengths.shape[0] != attention_mask.shape[0]:
        raise ValueError(f"`{name}` has {lengths.shape[0]} per-row lengths but `attention_mask` has batch size "
                         f"{attention_mask.shape[0]}")
    return lengths


def _check_arguments(attention_mask, prompt_lengths, past_length, padding_side, num_prompt_columns,
                     need_columns: bool = True):
    """Check every argument; returns (prompt_lengths tensor or None, P).

    The checks of values (a floating mask holds 0/1, the padding side, lengths >= 0) run where
    values are read (:func:`ptuning_fast._validation.reads_values`), in one device->host transfer.
    ``P`` of per-row lengths is read from them only when it is needed (``need_columns``) and not
    given (``num_prompt_columns``): it is an output shape.
    """
    check_tensor(attention_mask, "attention_mask", ndim=2, dtypes=MASK_DTYPES)
    batch, text_length = attention_mask.shape
    check_positive_int(past_length, "past_length", allow_zero=True)
    if past_length > text_length:
        raise ValueError(f"`past_length` ({past_length}) cannot exceed the text length of "
                         f"`attention_mask` ({text_length}); the mask covers past and new tokens")
    if padding_side is not None and padding_side not in PADDING_SIDES:
        raise ValueError(f"`padding_side` must be None, 'left' or 'right'; got {padding_side!r}")

    lengths = None
    if isinstance(prompt_lengths, torch.Tensor):
        lengths = _check_row_lengths(prompt_lengths, "prompt_lengths", attention_mask)
    else:
        check_positive_int(prompt_lengths, "prompt_lengths", allow_zero=True)
        _check_prompt_length(prompt_lengths, "prompt_lengths")
    if num_prompt_columns is not None:
        check_positive_int(num_prompt_columns, "num_prompt_columns", allow_zero=True)
        _check_prompt_length(num_prompt_columns, "num_prompt_columns")

    # Data-dependent checks, gathered so that they cost a single device->host transfer.
    # Integer masks are read as transformers reads them (nonzero = real) with no check.
    check_values = reads_values(attention_mask)
    read_lengths = lengths is not None and batch > 0 and (
        check_values or (need_columns and num_prompt_columns is None))
    float_mask = check_values and attention_mask.dtype.is_floating_point
    side = check_values and padding_side is not None and text_length > 1
    stats = []
    if float_mask:  # e.g. an additive mask passed by mistake
        stats.append(((attention_mask != 0) & (attention_mask != 1)).any())
    if side:
        real = attention_mask != 0
        # Left padding: no real token is followed by a pad. Right padding: no pad by a real token.
        step = real[:, 1:] & ~real[:, :-1] if padding_side == "right" else real[:, :-1] & ~real[:, 1:]
        stats.append(step.any())
    if read_lengths:
        stats += list(torch.aminmax(lengths.long()))
    values = torch.stack([s.long() for s in stats]).tolist() if stats else []

    if float_mask and values.pop(0):
        raise ValueError("a floating `attention_mask` must hold only 0 and 1 (1 = real token, 0 = padding); "
                         "pass the 2D padding mask, not an additive mask")
    if side and values.pop(0):
        raise ValueError(f"`attention_mask` is not {padding_side}-padded: some row has a "
                         f"{'real token after a pad' if padding_side == 'right' else 'pad after a real token'}"
                         f" (check the tokenizer's padding_side)")
    if lengths is None:
        longest = prompt_lengths
    elif read_lengths:
        shortest, longest = values
        if shortest < 0:
            raise ValueError(f"`prompt_lengths` must be >= 0, got a row with {shortest}")
        _check_prompt_length(longest, "prompt_lengths")
    elif num_prompt_columns is not None:  # not read: the given number of columns
        longest = num_prompt_columns
    else:  # not read and not needed (position ids): a bound the builders' clamp of lengths never meets
        longest = 0 if batch == 0 else _UNBOUNDED_COLUMNS
    P = longest if num_prompt_columns is None else num_prompt_columns
    if longest > P:
        raise ValueError(f"`num_prompt_columns` ({P}) is smaller than the longest prompt ({longest})")
    return lengths, P


def _lengths_tensor(lengths, prompt_lengths, batch, device):
    return lengths.long() if lengths is not None else torch.full((batch,), prompt_lengths,
                                                                 dtype=torch.long, device=device)


@renamed_keywords(num_virtual_tokens="prompt_lengths")
def build_prompt_attention_mask(
    attention_mask: torch.Tensor,
    prompt_lengths: PromptLengths,
    *,
    causal: bool = True,
    past_length: int = 0,
    sliding_window: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    padding_side: Optional[str] = None,
    num_prompt_columns: Optional[int] = None,
) -> torch.Tensor:
    """The 4D attention mask ``(B, 1, S, P + K)`` of a text that follows ``P`` prompt columns.

    Args:
        attention_mask: ``(B, K)`` padding mask of the text: bool, integer (nonzero = real
            token, as transformers reads it) or floating holding only 0/1 (checked). With a
            cache it covers the ``past_length`` text tokens already cached and the
            ``S = K - past_length`` tokens of this step, like transformers' 2D mask.
        prompt_lengths: prompt length, an int or a ``(B,)`` integer tensor of per-row
            lengths ``n_b`` (``num_virtual_tokens=`` is the deprecated name). Row b's prompt
            occupies the LAST ``n_b`` of the ``P`` prompt columns (next to the text); the other
            prompt columns are hidden from that row.
        causal: causal text attention (decoders) or bidirectional (encoders). Prompt columns are
            visible to every query either way.
        past_length: text tokens already in the cache before this step's queries.
        sliding_window: keep only keys with ``kv > q - w`` (causal) or ``|q - kv| <= w``
            (bidirectional), as transformers' sliding-window masks, over the whole key axis.
        dtype: ``None`` or ``torch.bool`` for a boolean mask (True = attend; for SDPA), or the
            model's floating dtype for an additive mask (0 / ``finfo(dtype).min``; for eager).
        padding_side: ``None`` accepts any padding layout; ``"left"``/``"right"`` also checks
            that ``attention_mask`` is padded that way (catches a tokenizer mismatch).
        num_prompt_columns: ``P``, the number of prompt columns in the cache; defaults to the
            longest prompt.

    Key columns are ``[P prompt columns][K text columns]`` and query ``i`` is column
    ``P + past_length + i``: equal to what ``transformers.masking_utils`` builds from a cache
    holding the prompt and the 2D mask ``cat([live prompt columns, attention_mask], 1)``.
    For P-tuning's virtual tokens (which are queries too), pass that concatenated mask and
    ``prompt_lengths=0``.
    """
    lengths, P = _check_arguments(attention_mask, prompt_lengths, past_length, padding_side,
                                  num_prompt_columns)
    _check_bool(causal, "causal")
    if sliding_window is not None:
        check_positive_int(sliding_window, "sliding_window")
    if dtype is None:
        dtype = torch.bool
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`dtype` must be a torch.dtype or None, got {type(dtype).__name__}")
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"`dtype` must be torch.bool or a floating dtype "
                        f"(float16, bfloat16, float32, float64); got {dtype}")

    ext = _extension(attention_mask.device)
    if ext is not None:
        if lengths is None and P != prompt_lengths:
            lengths = torch.full((attention_mask.shape[0],), prompt_lengths, dtype=torch.long,
                                 device=attention_mask.device)
        return _attention_mask_op(attention_mask, None if lengths is None else lengths.long(),
                                  P, past_length, causal, sliding_window or 0, dtype)
    return prompt_attention_mask_reference(
        attention_mask, _lengths_tensor(lengths, prompt_lengths, attention_mask.shape[0],
                                        attention_mask.device),
        P, causal=causal, past_length=past_length, sliding_window=sliding_window, dtype=dtype)


@renamed_keywords(num_virtual_tokens="prompt_lengths")
def prompt_padding_mask(
    attention_mask: torch.Tensor,
    prompt_lengths: PromptLengths,
    *,
    num_prompt_columns: Optional[int] = None,
) -> torch.Tensor:
    """The 2D mask ``(B, P + K)`` of the same layout, in ``attention_mask``'s dtype: 1 on each
    row's live prompt columns (the last ``n_b`` of the ``P``), 0 on the prompt columns a shorter
    prompt leaves empty, then ``attention_mask`` itself. What a model builds its own mask from
    when it is given a cache holding the prompt (and what ``generate()`` needs: it tells it the
    cache holds ``P`` tokens the input lacks). Arguments as in :func:`build_prompt_attention_mask`.
    """
    lengths, P = _check_arguments(attention_mask, prompt_lengths, 0, None, num_prompt_columns)
    batch, device = attention_mask.shape[0], attention_mask.device
    if lengths is None and P == prompt_lengths:  # every row's prompt fills the P columns
        live = torch.ones((batch, P), dtype=attention_mask.dtype, device=device)
    else:
        live = live_prompt_columns(_lengths_tensor(lengths, prompt_lengths, batch, device), P)
    return torch.cat([live.to(attention_mask.dtype), attention_mask], dim=1)


@renamed_keywords(num_virtual_tokens="prompt_lengths", after_prompt=("positions", _after_prompt_to_positions))
def build_prompt_position_ids(
    attention_mask: torch.Tensor,
    prompt_lengths: PromptLengths,
    *,
    past_length: int = 0,
    positions: str = "continue",
    padding_side: Optional[str] = None,
) -> torch.Tensor:
    """``position_ids`` ``(B, S)`` (int64) of this step's text tokens, matching the mask above.

    ``positions`` (see :data:`POSITIONS`): ``"continue"`` counts the real tokens before a token
    (left padding is skipped, as ``generate()`` does) plus ``n_b``, so text continues after the
    prompt as transformers and PEFT do with a prefix; ``"restart"`` counts from 0; padding tokens
    get 0 in both. ``"peft"``: column ``i`` at ``n_b + i``, padding counted (PEFT's training
    forward). Arguments as in :func:`build_prompt_attention_mask`; ``prompt_lengths`` may be per
    row. (``after_prompt=True/False`` is the deprecated form of ``"continue"``/``"restart"``.)
    """
    lengths, P = _check_arguments(attention_mask, prompt_lengths, past_length, padding_side, None,
                                  need_columns=False)
    check_positions(positions)
    batch, device = attention_mask.shape[0], attention_mask.device
    if positions == "peft":
        columns = torch.arange(past_length, attention_mask.shape[1], device=device)[None, :]
        return columns + _lengths_tensor(lengths, prompt_lengths, batch, device)[:, None]
    after_prompt = positions == "continue"
    ext = _extension(device)
    if ext is not None:
        return _position_ids_op(attention_mask, None if lengths is None else lengths.long(),
                                P, past_length, after_prompt)
    return prompt_position_ids_reference(attention_mask, _lengths_tensor(lengths, prompt_lengths, batch, device),
                                         past_length=past_length, after_prompt=after_prompt)


def _check_cache_lengths(cache_prompt_lengths, attention_mask) -> Optional[torch.Tensor]:
    """``cache_prompt_lengths``: an int >= 0, or a (B,) integer tensor (>= 0 where values are read)."""
    if not isinstance(cache_prompt_lengths, torch.Tensor):
        check_positive_int(cache_prompt_lengths, "cache_prompt_lengths", allow_zero=True)
        return None
    cache = _check_row_lengths(cache_prompt_lengths, "cache_prompt_lengths", attention_mask)
    if cache.numel() and reads_values(cache) and bool((cache < 0).any()):
        raise ValueError("`cache_prompt_lengths` must be >= 0")
    return cache


def packed_prompt_layout(
    attention_mask: torch.Tensor,
    prompt_lengths: PromptLengths,
    *,
    longest: int,
    pad_left: bool,
    positions: str = "continue",
    cache_prompt_lengths: PromptLengths = 0,
) -> tuple:
    """The packed layout of a padded batch: per row, its ``n_b`` virtual tokens and its real
    tokens in one block of live columns, the padding outside it (on the left when ``pad_left``,
    as a decoder reads the last column; else on the right).

    Args:
        attention_mask: ``(B, S)`` padding mask of the text (nonzero = real token; a floating
            mask holds only 0/1, checked where values are read).
        prompt_lengths: virtual tokens of each row, an int or a ``(B,)`` integer tensor, each in
            ``[0, longest]`` (checked where values are read; on an accelerator a length outside
            is clamped into it).
        longest: the longest prompt; the layout has ``W = S + longest`` columns.
        pad_left: the live block at the right end (padding on the left), else from column 0.
        positions: ``"continue"`` (live columns counted in order after ``cache_prompt_lengths``)
            or ``"restart"`` (the prompt and the text each counted from 0); padding gets 0.
        cache_prompt_lengths: an int or ``(B,)`` integer tensor: deep-prompt tokens already in
            the cache before the layout (``"continue"`` counts on after them).

    Returns ``(layout_mask, text_columns, prompt_index, position_ids)``, all int64: the ``(B, W)``
    mask of live columns, the ``(B, S)`` layout column of each input column, the ``(B, W)``
    virtual token index of each prompt column (-1 elsewhere) and the ``(B, W)`` positions. The
    definition is :func:`ptuning_fast.reference.mask.packed_prompt_layout_reference`; the
    extension builds it in one kernel.
    """
    check_positive_int(longest, "longest", allow_zero=True)
    _check_prompt_length(longest, "longest")
    _check_bool(pad_left, "pad_left")
    check_positions(positions, allowed=("continue", "restart"))
    lengths, most = _check_arguments(attention_mask, prompt_lengths, 0, None, None, need_columns=False)
    if most != _UNBOUNDED_COLUMNS and most > longest:  # known: an int, or lengths that were read
        raise ValueError(f"`prompt_lengths` holds a prompt of {most} virtual tokens, more than `longest` ({longest})")
    batch, device = attention_mask.shape[0], attention_mask.device
    cache = _check_cache_lengths(cache_prompt_lengths, attention_mask)
    restart = positions == "restart"
    if _extension(device) is not None:
        if lengths is None and prompt_lengths != longest:  # a uniform prompt shorter than the longest
            lengths = torch.full((batch,), prompt_lengths, dtype=torch.long, device=device)
        cache_length = 0 if cache is not None else cache_prompt_lengths  # the uniform case, no tensor
        return _packed_layout_op(attention_mask, None if lengths is None else lengths.long(), longest,
                                 None if cache is None else cache.long(), cache_length, pad_left, restart)
    return packed_prompt_layout_reference(
        attention_mask, _lengths_tensor(lengths, prompt_lengths, batch, device),
        _lengths_tensor(cache, cache_prompt_lengths, batch, device), longest, pad_left=pad_left, restart=restart)
