"""The packed layout op (``ptuning_fast::packed_prompt_layout``, csrc/prompt_mask*): the C++ kernel
against the PyTorch reference, the reference against a plain per-row construction, its checks,
``opcheck``, the fallback without the extension, and its launch count (one kernel, whatever the
mask dtype)."""
from __future__ import annotations

import itertools

import pytest
import torch

import ptuning_fast
from ptuning_fast import use_backend, value_checks
from ptuning_fast._extension import load_extension
from ptuning_fast.ops import mask as mask_ops
from ptuning_fast.ops.mask import build_prompt_position_ids, packed_prompt_layout
from ptuning_fast.reference.mask import packed_prompt_layout_reference
from tests.ops.test_mask import random_text_mask as random_mask

OUTPUTS = ("layout_mask", "text_columns", "prompt_index", "position_ids")


def plain_layout(mask, lengths, cache, longest, pad_left, restart):
    """The packed layout built column by column, one row at a time: the oracle of the reference."""
    batch, text_length = mask.shape
    width = text_length + longest
    out = {name: [] for name in OUTPUTS}
    for b in range(batch):
        real = [s for s in range(text_length) if mask[b, s] != 0]
        pads = [s for s in range(text_length) if mask[b, s] == 0]
        n, live = int(lengths[b]), int(lengths[b]) + len(real)
        first = width - live if pad_left else 0
        layout, index, positions, columns = [0] * width, [-1] * width, [0] * width, [0] * text_length
        for k in range(n):  # the prompt, then the real tokens, in one block
            layout[first + k], index[first + k] = 1, k
            positions[first + k] = k if restart else int(cache[b]) + k
        for i, s in enumerate(real):
            columns[s] = first + n + i
            layout[first + n + i] = 1
            positions[first + n + i] = i if restart else int(cache[b]) + n + i
        free = [c for c in range(width) if not first <= c < first + live]
        for i, s in enumerate(pads):  # padding in order outside the block
            columns[s] = free[i]
        for name, row in zip(OUTPUTS, (layout, columns, index, positions)):
            out[name].append(row)
    return tuple(torch.tensor(out[name], dtype=torch.long).view(len(out[name]), -1) for name in OUTPUTS)


def cases(gen):
    """(mask, prompt_lengths, longest, cache_prompt_lengths) over shapes that include odd ones."""
    for (batch, text_length, longest), side in itertools.product(
            [(1, 1, 0), (2, 5, 3), (4, 7, 1), (5, 13, 6), (3, 0, 4), (6, 40, 9)], ["left", "right", "mixed"]):
        mask = random_mask(batch, text_length, side, gen)
        per_row = torch.randint(0, longest + 1, (batch,), generator=gen)
        per_row[-1] = longest
        for lengths, cache in [(longest, 0), (per_row, 0), (max(longest - 1, 0), 3),
                               (per_row, torch.randint(0, 5, (batch,), generator=gen))]:
            yield mask, lengths, longest, cache


def as_tensor(lengths, batch):
    return lengths if isinstance(lengths, torch.Tensor) else torch.full((batch,), lengths, dtype=torch.long)


def test_the_op_is_the_extension_kernel():
    assert load_extension() is not None, "the C++ extension should be built"
    assert mask_ops._extension(torch.device("cpu")) is not None


@pytest.mark.parametrize("restart", [False, True], ids=["continue", "restart"])
@pytest.mark.parametrize("pad_left", [True, False], ids=["pad_left", "pad_right"])
def test_reference_equals_the_plain_construction(pad_left, restart):
    gen = torch.Generator().manual_seed(1)
    for mask, lengths, longest, cache in cases(gen):
        batch = mask.shape[0]
        ref = packed_prompt_layout_reference(mask, as_tensor(lengths, batch), as_tensor(cache, batch), longest,
                                             pad_left=pad_left, restart=restart)
        plain = plain_layout(mask, as_tensor(lengths, batch), as_tensor(cache, batch), longest, pad_left, restart)
        for name, got, want in zip(OUTPUTS, ref, plain):
            assert got.dtype == torch.long and torch.equal(got, want), (name, mask, lengths, longest, cache)


@pytest.mark.parametrize("positions", ["continue", "restart"])
@pytest.mark.parametrize("pad_left", [True, False], ids=["pad_left", "pad_right"])
def test_kernel_equals_reference(pad_left, positions):
    gen = torch.Generator().manual_seed(2)
    for mask, lengths, longest, cache in cases(gen):
        kwargs = dict(longest=longest, pad_left=pad_left, positions=positions, cache_prompt_lengths=cache)
        ours = packed_prompt_layout(mask, lengths, **kwargs)
        with use_backend("reference"):
            ref = packed_prompt_layout(mask, lengths, **kwargs)
        for name, got, want in zip(OUTPUTS, ours, ref):
            assert got.dtype == want.dtype == torch.long and torch.equal(got, want), (name, mask, lengths, kwargs)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64,
                                   torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_every_mask_dtype_is_read_as_nonzero(dtype):
    gen = torch.Generator().manual_seed(3)
    mask = random_mask(5, 11, "mixed", gen)
    lengths = torch.tensor([0, 4, 2, 1, 4])
    want = packed_prompt_layout_reference(mask, lengths, torch.zeros(5, dtype=torch.long), 4, pad_left=True)
    got = packed_prompt_layout(mask.to(dtype), lengths, longest=4, pad_left=True)
    for name, g, w in zip(OUTPUTS, got, want):
        assert torch.equal(g, w), (name, dtype)


def test_strided_mask_and_several_threads():
    gen = torch.Generator().manual_seed(4)
    wide = random_mask(64, 300, "mixed", gen)
    strided = wide[::2, ::3]  # neither dimension contiguous
    lengths = torch.randint(0, 8, (32,), generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = packed_prompt_layout(strided, lengths, longest=7, pad_left=False, cache_prompt_lengths=2)
    finally:
        torch.set_num_threads(threads)
    want = packed_prompt_layout_reference(strided.contiguous(), lengths, torch.full((32,), 2), 7, pad_left=False)
    for name, g, w in zip(OUTPUTS, got, want):
        assert torch.equal(g, w), name


def test_empty_batch_and_empty_text():
    for batch, text_length, longest in [(0, 5, 3), (3, 0, 0), (3, 0, 2), (0, 0, 0)]:
        mask = torch.ones(batch, text_length, dtype=torch.long)
        lengths = torch.full((batch,), longest, dtype=torch.long)
        got = packed_prompt_layout(mask, lengths, longest=longest, pad_left=True)
        no_cache = torch.zeros(batch, dtype=torch.long)
        want = packed_prompt_layout_reference(mask, lengths, no_cache, longest, pad_left=True)
        assert [tuple(t.shape) for t in got] == [(batch, text_length + longest), (batch, text_length),
                                                 (batch, text_length + longest), (batch, text_length + longest)]
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_fallback_without_the_extension(monkeypatch):
    """Where the extension is missing the reference builds the same layout."""
    gen = torch.Generator().manual_seed(5)
    mask, lengths = random_mask(4, 9, "left", gen), torch.tensor([3, 0, 2, 3])
    ours = packed_prompt_layout(mask, lengths, longest=3, pad_left=True, cache_prompt_lengths=1)
    monkeypatch.setattr(mask_ops, "_EXTENSION", None)
    assert mask_ops._extension(torch.device("cpu")) is None
    fallback = packed_prompt_layout(mask, lengths, longest=3, pad_left=True, cache_prompt_lengths=1)
    for name, g, w in zip(OUTPUTS, ours, fallback):
        assert torch.equal(g, w), name


def test_lengths_out_of_range_are_clamped_where_not_read():
    """Unchecked (as on an accelerator), a length above ``longest`` cannot place a column outside
    the layout: the kernel clamps it to ``longest``."""
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with value_checks("never"):
        got = packed_prompt_layout(mask, torch.tensor([9, -4]), longest=2, pad_left=True)
    want = packed_prompt_layout(mask, torch.tensor([2, 0]), longest=2, pad_left=True)
    for name, g, w in zip(OUTPUTS, got, want):
        assert torch.equal(g, w), name


def test_errors():
    mask = torch.ones(2, 5, dtype=torch.long)
    cases = [
        (lambda: packed_prompt_layout(mask[None], 2, longest=2, pad_left=True), ValueError,
         "`attention_mask` must have 2 dimensions"),
        (lambda: packed_prompt_layout(mask.tolist(), 2, longest=2, pad_left=True), TypeError,
         "`attention_mask` must be a torch.Tensor"),
        (lambda: packed_prompt_layout(mask * 0.5, 2, longest=2, pad_left=True), ValueError, "only 0 and 1"),
        (lambda: packed_prompt_layout(mask, 3, longest=2, pad_left=True), ValueError,
         "more than `longest` (2)"),
        (lambda: packed_prompt_layout(mask, torch.tensor([1, 3]), longest=2, pad_left=True), ValueError,
         "more than `longest` (2)"),
        (lambda: packed_prompt_layout(mask, torch.tensor([1, -1]), longest=2, pad_left=True), ValueError,
         "`prompt_lengths` must be >= 0"),
        (lambda: packed_prompt_layout(mask, torch.tensor([1, 2, 2]), longest=2, pad_left=True), ValueError,
         "batch size 2"),
        (lambda: packed_prompt_layout(mask, torch.tensor([1.0, 2.0]), longest=2, pad_left=True), TypeError,
         "`prompt_lengths` must have dtype"),
        (lambda: packed_prompt_layout(mask, 2, longest=-1, pad_left=True), ValueError, "`longest` must be >= 0"),
        (lambda: packed_prompt_layout(mask, 2, longest=2.0, pad_left=True), TypeError, "`longest` must be an int"),
        (lambda: packed_prompt_layout(mask, 2, longest=2, pad_left=1), TypeError, "`pad_left` must be a bool"),
        (lambda: packed_prompt_layout(mask, 2, longest=2, pad_left=True, positions="peft"), ValueError,
         "`positions` must be one of ('continue', 'restart')"),
        (lambda: packed_prompt_layout(mask, 2, longest=2, pad_left=True, cache_prompt_lengths=-1), ValueError,
         "`cache_prompt_lengths` must be >= 0"),
        (lambda: packed_prompt_layout(mask, 2, longest=2, pad_left=True, cache_prompt_lengths=torch.tensor([1, -1])),
         ValueError, "`cache_prompt_lengths` must be >= 0"),
        (lambda: packed_prompt_layout(mask, 2, longest=2, pad_left=True, cache_prompt_lengths=torch.tensor([1])),
         ValueError, "`cache_prompt_lengths` has 1 per-row lengths"),
        (lambda: packed_prompt_layout(mask, 2, longest=2, pad_left=True, cache_prompt_lengths=torch.ones(2)),
         TypeError, "`cache_prompt_lengths` must have dtype"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error) as info:
            fn()
        assert message in str(info.value), (message, str(info.value))


def test_extension_checks_its_arguments():
    """The C++ entry point refuses malformed arguments itself (no out-of-bounds access)."""
    ext = load_extension()
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="attention_mask must be 2D"):
        ext.packed_prompt_layout(mask[None], None, 2, None, 0, True, False)
    with pytest.raises(RuntimeError, match="longest must be >= 0"):
        ext.packed_prompt_layout(mask, None, -1, None, 0, True, False)
    with pytest.raises(RuntimeError, match="cache_prompt_length must be >= 0"):
        ext.packed_prompt_layout(mask, None, 2, None, -1, True, False)
    with pytest.raises(RuntimeError, match="prompt_lengths must have shape"):
        ext.packed_prompt_layout(mask, torch.tensor([1, 2, 3]), 3, None, 0, True, False)
    with pytest.raises(RuntimeError, match="cache_prompt_lengths must be int64"):
        ext.packed_prompt_layout(mask, None, 3, torch.tensor([1, 2], dtype=torch.int32), 0, True, False)


@pytest.mark.parametrize("pad_left", [True, False], ids=["pad_left", "pad_right"])
def test_opcheck(pad_left):
    gen = torch.Generator().manual_seed(6)
    mask = random_mask(4, 9, "mixed", gen)
    for lengths, cache in [(None, None), (torch.tensor([0, 3, 1, 3]), torch.tensor([2, 0, 1, 5]))]:
        torch.library.opcheck(mask_ops._packed_layout_op, (mask, lengths, 3, cache, 4, pad_left, True))
        torch.library.opcheck(mask_ops._packed_layout_op, (mask.bool(), lengths, 3, cache, 0, pad_left, False))


def test_one_launch_whatever_the_mask_dtype():
    """Counted as on a GPU (benchmarks/counting.py): the op is one kernel; the other builders' CUDA
    kernels read a bool mask, so the rule adds their `mask != 0`. On the CPU the extension runs no
    aten op on a long mask for any builder (its kernels read the dtype as it is)."""
    from benchmarks.counting import LaunchCounter

    mask, lengths = torch.ones(2, 5, dtype=torch.long), torch.tensor([1, 2])
    with value_checks("never"), LaunchCounter() as counter:  # as on a GPU: no check reads values
        packed_prompt_layout(mask, lengths, longest=2, pad_left=True)
    assert dict(counter.by_op) == {"ptuning_fast.packed_prompt_layout": 1}

    ext = load_extension()
    with LaunchCounter() as inside:
        ext.packed_prompt_layout(mask, lengths, 2, None, 0, True, False)
    assert inside.total == 0, dict(inside.by_op)
    for build in (lambda: ext.prompt_position_ids(mask, lengths, 2, 0, True),
                  lambda: ext.prompt_attention_mask(mask, lengths, 2, 0, True, 0, torch.bool)):
        with LaunchCounter() as inside:
            build()
        assert inside.total == 0, dict(inside.by_op)
    with value_checks("never"), LaunchCounter() as counter:
        build_prompt_position_ids(mask, lengths)
    assert dict(counter.by_op) == {"ptuning_fast.prompt_position_ids": 1, "aten.ne": 1}  # the CUDA kernel's bool mask


def test_native_layout_is_the_same_through_both_backends():
    """build_prompt_layout packs through the op; template mode and the caller's positions adjust
    its outputs. Each equals the same layout built from the reference."""
    from ptuning_fast.native.layout import build_prompt_layout

    gen = torch.Generator().manual_seed(7)
    mask = random_mask(4, 8, "left", gen)
    placeholders = torch.rand(4, 8, generator=gen) < 0.3
    position_ids = torch.randint(0, 6, (4, 8), generator=gen)
    lengths = torch.tensor([3, 0, 2, 3])
    for kwargs in [dict(prompt_lengths=lengths, longest=3), dict(prompt_lengths=2, cache_prompt_lengths=lengths),
                   dict(prompt_lengths=0, longest=0, placeholders=placeholders),
                   dict(prompt_lengths=lengths, longest=3, position_ids=position_ids)]:
        for positions, pad_left in itertools.product(["continue", "restart"], [True, False]):
            args = dict(kwargs, positions=positions, pad_left=pad_left)
            with value_checks("never"):  # packed as on an accelerator
                ours = build_prompt_layout(mask, **args)
                with use_backend("reference"):
                    ref = build_prompt_layout(mask, **args)
            assert ours.text_columns is not None
            for name in ("attention_mask", "position_ids", "text_columns", "prompt_index"):
                assert torch.equal(getattr(ours, name), getattr(ref, name)), (name, args)


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernel against the CPU kernel.


@pytest.mark.cuda
def test_cuda_kernel_matches_cpu_kernel():
    assert load_extension().with_cuda(), "the extension was built without CUDA"
    gen = torch.Generator().manual_seed(8)
    # Rows longer than a block of 256 threads scan in several steps.
    for (batch, text_length, longest), side in itertools.product(
            [(1, 1, 0), (3, 7, 5), (5, 257, 20), (2, 1000, 131), (4, 0, 3)], ["left", "right", "mixed"]):
        mask = random_mask(batch, text_length, side, gen)
        per_row = torch.randint(0, longest + 1, (batch,), generator=gen)
        for lengths, cache in [(longest, 0), (per_row, torch.randint(0, 9, (batch,), generator=gen))]:
            for pad_left, positions, dtype in itertools.product([True, False], ["continue", "restart"],
                                                                [torch.bool, torch.long, torch.bfloat16]):
                kwargs = dict(longest=longest, pad_left=pad_left, positions=positions)
                cpu = packed_prompt_layout(mask.to(dtype), lengths, cache_prompt_lengths=cache, **kwargs)
                on = (lambda t: t.cuda() if isinstance(t, torch.Tensor) else t)
                gpu = packed_prompt_layout(mask.to(dtype).cuda(), on(lengths), cache_prompt_lengths=on(cache), **kwargs)
                for name, g, c in zip(OUTPUTS, gpu, cpu):
                    assert g.is_cuda and torch.equal(g.cpu(), c), (name, batch, text_length, longest, kwargs)
    strided = random_mask(4, 600, "mixed", gen).cuda()[:, ::3]
    got = packed_prompt_layout(strided, 7, longest=7, pad_left=True)
    want = packed_prompt_layout(strided.cpu(), 7, longest=7, pad_left=True)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
