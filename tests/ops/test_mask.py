"""Prompt-aware mask and position builder: C++ extension == PyTorch reference == transformers.

transformers' own masks are built the way a prefixed model builds them: a DynamicCache holding
P prompt (+ past) positions and the 2D mask ``cat([live prompt columns, text mask])``.
Masks are exact (no arithmetic), so every comparison is ``torch.equal``.
"""
from __future__ import annotations

import copy
import os
import itertools
import shutil
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, masking_utils

import ptuning_fast
from ptuning_fast import build_prompt_attention_mask, build_prompt_position_ids, use_backend
from ptuning_fast.ops import prompt_padding_mask
from ptuning_fast._extension import load_extension
from ptuning_fast.reference.mask import live_prompt_columns

OUT_DTYPES = [torch.bool, torch.float32, torch.bfloat16, torch.float16]


def random_text_mask(batch, length, side, gen, *, all_padding_row=True):
    """(B, K) int64 0/1 mask with random real lengths; row 0 all padding, row 1 no padding."""
    real = torch.randint(0, length + 1, (batch,), generator=gen)
    if all_padding_row and batch > 1:
        real[0], real[1] = 0, length
    cols = torch.arange(length)
    if side == "left":
        return (cols[None, :] >= length - real[:, None]).long()
    if side == "right":
        return (cols[None, :] < real[:, None]).long()
    return torch.randint(0, 2, (batch, length), generator=gen)  # any layout (e.g. mid-generation)


def per_row_lengths(batch, P, gen):
    lengths = torch.randint(0, P + 1, (batch,), generator=gen)
    lengths[-1] = P  # the longest prompt sets P
    return lengths


def hf_mask(text_mask, lengths, P, *, causal, past_length, sliding_window, dtype):
    """What transformers 5 builds for a model whose cache already holds P prompt + past tokens."""
    batch, text_length = text_mask.shape
    config = LlamaConfig(vocab_size=8, hidden_size=4, num_attention_heads=1, num_hidden_layers=1)
    config._attn_implementation = "sdpa" if dtype == torch.bool else "eager"
    config.sliding_window = sliding_window
    embeds = torch.zeros(batch, text_length - past_length, 1, dtype=torch.float32 if dtype == torch.bool else dtype)
    cache = DynamicCache()
    if P + past_length > 0:
        prefix = torch.zeros(batch, 1, P + past_length, 1)
        cache.update(prefix, prefix, 0)
    mask_2d = torch.cat([live_prompt_columns(lengths, P), text_mask.bool()], dim=1)
    if causal and sliding_window is None:
        return masking_utils.create_causal_mask(config, embeds, mask_2d, cache, allow_is_causal_skip=False)
    if causal:
        return masking_utils.create_sliding_window_causal_mask(config, embeds, mask_2d, cache,
                                                               allow_is_causal_skip=False)
    if sliding_window is None:
        return masking_utils.create_bidirectional_mask(config, embeds, mask_2d, past_key_values=cache,
                                                       allow_is_bidirectional_skip=False)
    return masking_utils.create_bidirectional_sliding_window_mask(config, embeds, mask_2d, past_key_values=cache,
                                                                  allow_is_bidirectional_skip=False)


def build_both(*args, **kwargs):
    """(extension result, reference result) of build_prompt_attention_mask."""
    ours = build_prompt_attention_mask(*args, **kwargs)
    with use_backend("reference"):
        ref = build_prompt_attention_mask(*args, **kwargs)
    return ours, ref


def test_extension_is_built_and_used():
    ext = load_extension()
    assert ext is not None, "the C++ extension should be built by `pip install -e .`"
    assert ptuning_fast.ops.mask._extension(torch.device("cpu")) is ext
    with use_backend("reference"):
        assert ptuning_fast.ops.mask._extension(torch.device("cpu")) is None


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_matches_transformers(side, causal, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{side}-{causal}-{dtype}".encode()))  # stable across runs
    batch, text_length = 4, 7
    # (P, per-row lengths?, past_length, sliding window): P = 0, S = 1 decode steps, windows.
    cases = [(0, False, 0, None), (3, False, 0, None), (4, True, 0, None), (3, False, 2, None),
             (4, True, 6, None), (0, False, 6, None), (3, False, 0, 3), (4, True, 2, 2), (0, False, 0, 2)]
    for P, per_row, past_length, window in cases:
        text_mask = random_text_mask(batch, text_length, side, gen)
        n = per_row_lengths(batch, P, gen) if per_row else P
        lengths = n if per_row else torch.full((batch,), P)
        ours, ref = build_both(text_mask, n, causal=causal, past_length=past_length, sliding_window=window,
                               dtype=dtype, padding_side=side)
        theirs = hf_mask(text_mask, lengths, P, causal=causal, past_length=past_length, sliding_window=window,
                         dtype=dtype)
        case = f"P={P} per_row={per_row} past={past_length} window={window}"
        assert ours.shape == (batch, 1, text_length - past_length, P + text_length), case
        assert ours.dtype == dtype and ref.dtype == dtype, case
        assert torch.equal(ours, ref), case
        assert torch.equal(ours, theirs), case


def test_encoder_route_without_cache():
    """BERT-like encoders build the mask from the (B, P + S) 2D mask alone (no cache)."""
    gen = torch.Generator().manual_seed(1)
    text_mask = random_text_mask(3, 6, "right", gen)
    lengths = torch.tensor([2, 0, 5])
    config = LlamaConfig(vocab_size=8, hidden_size=4, num_attention_heads=1, num_hidden_layers=1)
    config._attn_implementation = "eager"
    mask_2d = torch.cat([live_prompt_columns(lengths, 5), text_mask.bool()], dim=1)
    theirs = masking_utils.create_bidirectional_mask(config, torch.zeros(3, 11, 1), mask_2d,
                                                     allow_is_bidirectional_skip=False)
    # The encoder's queries are all P + S columns: that is the P = 0 call on the joined mask.
    ours, ref = build_both(mask_2d, 0, causal=False, dtype=torch.float32)
    assert torch.equal(ours, theirs) and torch.equal(ref, theirs)
    # and its last S rows are the prompt-aware mask of the text queries
    text_rows, _ = build_both(text_mask, lengths, causal=False, dtype=torch.float32)
    assert torch.equal(ours[:, :, 5:], text_rows)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_per_row_prompt_equals_row_alone(causal):
    """Row b of a batch with per-row lengths == that row alone with P = n_b (hidden columns dropped)."""
    gen = torch.Generator().manual_seed(2)
    text_mask = random_text_mask(5, 6, "mixed", gen)
    lengths = torch.tensor([0, 3, 1, 5, 2])
    for dtype in (torch.bool, torch.float32):
        batch_mask = build_prompt_attention_mask(text_mask, lengths, causal=causal, dtype=dtype, past_length=1)
        batch_pos = build_prompt_position_ids(text_mask, lengths, past_length=1)
        for b, n in enumerate(lengths.tolist()):
            alone = build_prompt_attention_mask(text_mask[b:b + 1], n, causal=causal, dtype=dtype, past_length=1)
            assert torch.equal(batch_mask[b:b + 1, :, :, 5 - n:], alone)
            hidden = batch_mask[b, :, :, :5 - n]
            assert not hidden.any() if dtype == torch.bool else bool((hidden == torch.finfo(dtype).min).all())
            assert torch.equal(batch_pos[b:b + 1], build_prompt_position_ids(text_mask[b:b + 1], n, past_length=1))


def test_num_prompt_columns_pads_int_prompt():
    gen = torch.Generator().manual_seed(3)
    text_mask = random_text_mask(3, 5, "left", gen)
    ours, ref = build_both(text_mask, 2, num_prompt_columns=6)
    assert ours.shape == (3, 1, 5, 11) and torch.equal(ours, ref)
    assert torch.equal(ours[..., 4:], build_prompt_attention_mask(text_mask, 2)) and not ours[..., :4].any()


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.uint8, torch.float16, torch.float32,
                                        torch.bfloat16])
def test_mask_input_dtypes(mask_dtype):
    gen = torch.Generator().manual_seed(4)
    text_mask = random_text_mask(3, 6, "left", gen)
    expected = build_prompt_attention_mask(text_mask.bool(), 2, dtype=torch.bfloat16)
    ours, ref = build_both(text_mask.to(mask_dtype), 2, dtype=torch.bfloat16)
    assert torch.equal(ours, expected) and torch.equal(ref, expected)
    assert torch.equal(build_prompt_position_ids(text_mask.to(mask_dtype), 2),
                       build_prompt_position_ids(text_mask.bool(), 2))


def test_non_contiguous_input():
    gen = torch.Generator().manual_seed(5)
    wide = random_text_mask(4, 12, "mixed", gen)
    strided = wide[:, ::2]  # column stride 2
    transposed = random_text_mask(6, 3, "mixed", gen).t()  # (3, 6) with strides (1, 3)
    lengths = torch.tensor([1, 0, 3, 2, 9, 9, 4, 5])[::2]  # a strided lengths tensor too
    # long masks, and bool ones (the CPU kernels read any dtype; the CUDA ones a bool mask)
    for text_mask in (strided, transposed, wide.bool()[:, ::2], transposed.t().bool().t()):
        assert not text_mask.is_contiguous()
        n = lengths[: text_mask.shape[0]]
        for dtype in (torch.bool, torch.float16):
            ours, ref = build_both(text_mask, n, dtype=dtype, past_length=2, sliding_window=3)
            assert torch.equal(ours, build_prompt_attention_mask(text_mask.contiguous(), n.contiguous(),
                                                                 dtype=dtype, past_length=2, sliding_window=3))
            assert torch.equal(ours, ref)
        pos = build_prompt_position_ids(text_mask, n, past_length=1)
        assert torch.equal(pos, build_prompt_position_ids(text_mask.contiguous(), n.contiguous(), past_length=1))


def test_cpu_kernel_with_several_threads():
    """The CPU kernel splits rows over threads (tests otherwise run single-threaded)."""
    gen = torch.Generator().manual_seed(10)
    text_mask = random_text_mask(6, 300, "mixed", gen)
    lengths = per_row_lengths(6, 9, gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.bool, torch.bfloat16):
            ours, ref = build_both(text_mask, lengths, past_length=100, sliding_window=50, dtype=dtype)
            assert torch.equal(ours, ref)
        with use_backend("reference"):
            ref_pos = build_prompt_position_ids(text_mask, lengths, past_length=7)
        assert torch.equal(build_prompt_position_ids(text_mask, lengths, past_length=7), ref_pos)
    finally:
        torch.set_num_threads(threads)


def hf_generate_positions(mask_2d):
    """transformers' generate() positions from a 2D mask (GenerationMixin, 5.x)."""
    from transformers.generation.utils import GenerationMixin

    prepare = GenerationMixin._prepare_position_ids_for_generation
    return prepare(None, torch.zeros_like(mask_2d), {"attention_mask": mask_2d})


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_position_ids_match_generate(side):
    gen = torch.Generator().manual_seed(6)
    text_mask = random_text_mask(5, 8, side, gen)
    for n, past_length in itertools.product([0, 4, per_row_lengths(5, 4, gen)], [0, 3, 7]):
        lengths = n if isinstance(n, torch.Tensor) else torch.full((5,), n)
        P = int(lengths.max())
        joined = torch.cat([live_prompt_columns(lengths, P).long(), text_mask], dim=1)
        expected = hf_generate_positions(joined)[:, P + past_length:]
        for positions, want in (("continue", expected), ("restart", hf_generate_positions(text_mask)[:, past_length:])):
            ours = build_prompt_position_ids(text_mask, n, past_length=past_length, positions=positions)
            with use_backend("reference"):
                ref = build_prompt_position_ids(text_mask, n, past_length=past_length, positions=positions)
            assert ours.dtype == torch.int64 and torch.equal(ours, ref), (n, past_length)
            assert torch.equal(ours, want), (n, past_length, positions)


def test_rows_that_see_nothing_stay_finite():
    """P = 0 and an all-padding row: additive rows are all finfo.min, softmax stays finite."""
    text_mask = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]])
    scores = torch.randn(2, 1, 4, 4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        additive = build_prompt_attention_mask(text_mask, 0, dtype=dtype)
        assert bool((additive[0] == torch.finfo(dtype).min).all())
        probs = torch.softmax(scores.to(dtype) + additive, dim=-1)
        assert torch.isfinite(probs).all()
    # bool: SDPA returns zeros for rows with no visible key; with a prompt every row sees it.
    q, k, v = torch.randn(3, 2, 2, 4, 8).unbind(0)
    bool_mask = build_prompt_attention_mask(text_mask, 0)
    assert torch.isfinite(F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)).all()
    assert build_prompt_attention_mask(text_mask, 2)[..., :2].all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefixed_model_logits_match_transformers_path(attn):
    """A tiny Llama with a per-row K/V prefix in its cache: our 4D mask + positions give the same
    logits as letting transformers build the mask from the (B, P + S) 2D mask."""
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=2, attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    batch, P, S = 3, 4, 6
    lengths = torch.tensor([4, 1, 3])
    text_mask = random_text_mask(batch, S, "left", torch.Generator().manual_seed(8), all_padding_row=False)
    cache = DynamicCache()
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(batch, 1, P, 8), torch.randn(batch, 1, P, 8), layer)
    input_ids = torch.randint(0, 32, (batch, S))
    positions = build_prompt_position_ids(text_mask, lengths)
    mask_2d = torch.cat([live_prompt_columns(lengths, P).long(), text_mask], dim=1)
    with torch.no_grad():
        theirs = model(input_ids, attention_mask=mask_2d, past_key_values=copy.deepcopy(cache),
                       position_ids=positions).logits
        mask_4d = build_prompt_attention_mask(text_mask, lengths, dtype=None if attn == "sdpa" else torch.float32)
        ours = model(input_ids, attention_mask=mask_4d, past_key_values=copy.deepcopy(cache),
                     position_ids=positions).logits
    assert torch.equal(ours, theirs)


def test_errors():
    mask = torch.ones(2, 5, dtype=torch.long)
    cases = [
        (lambda: build_prompt_attention_mask(mask[None], 2), ValueError, "`attention_mask` must have 2 dimensions"),
        (lambda: build_prompt_attention_mask(mask.tolist(), 2), TypeError, "`attention_mask` must be a torch.Tensor"),
        (lambda: build_prompt_attention_mask(mask.to(torch.complex64), 2), TypeError, "`attention_mask` must have dtype"),
        (lambda: build_prompt_attention_mask(mask * 0.5, 2), ValueError, "only 0 and 1"),
        (lambda: build_prompt_attention_mask(torch.tensor([[0.0, 0.0, -1e9]]), 2), ValueError, "only 0 and 1"),
        (lambda: build_prompt_attention_mask(mask, -1), ValueError, "`prompt_lengths` must be >= 0"),
        (lambda: build_prompt_attention_mask(mask, 2.0), TypeError, "`prompt_lengths` must be an int"),
        (lambda: build_prompt_attention_mask(mask, True), TypeError, "`prompt_lengths` must be an int"),
        (lambda: build_prompt_attention_mask(mask, torch.tensor([1, -2])), ValueError, "`prompt_lengths` must be >= 0"),
        (lambda: build_prompt_attention_mask(mask, torch.tensor([1, 2, 3])), ValueError, "batch size 2"),
        (lambda: build_prompt_attention_mask(mask, torch.tensor([[1, 2]])), ValueError, "`prompt_lengths` must have 1"),
        (lambda: build_prompt_attention_mask(mask, torch.tensor([1.0, 2.0])), TypeError, "`prompt_lengths` must have dtype"),
        (lambda: build_prompt_attention_mask(mask, 2, past_length=6), ValueError, "`past_length` (6) cannot exceed"),
        (lambda: build_prompt_attention_mask(mask, 2, past_length=-1), ValueError, "`past_length` must be >= 0"),
        (lambda: build_prompt_attention_mask(mask, 2, sliding_window=0), ValueError, "`sliding_window` must be > 0"),
        (lambda: build_prompt_attention_mask(mask, 2, causal=1), TypeError, "`causal` must be a bool"),
        (lambda: build_prompt_attention_mask(mask, 2, dtype=torch.int32), TypeError, "`dtype` must be torch.bool"),
        (lambda: build_prompt_attention_mask(mask, 2, dtype="bool"), TypeError, "`dtype` must be a torch.dtype"),
        (lambda: build_prompt_attention_mask(mask, 2, padding_side="center"), ValueError, "`padding_side` must be"),
        (lambda: build_prompt_attention_mask(torch.tensor([[1, 0, 1]]), 2, padding_side="left"), ValueError,
         "is not left-padded"),
        (lambda: build_prompt_attention_mask(torch.tensor([[0, 1, 1]]), 2, padding_side="right"), ValueError,
         "is not right-padded"),
        (lambda: build_prompt_attention_mask(mask, torch.tensor([1, 3]), num_prompt_columns=2), ValueError,
         "`num_prompt_columns` (2) is smaller"),
        (lambda: build_prompt_position_ids(mask, 2, after_prompt="yes"), TypeError, "`after_prompt` must be a bool"),
        (lambda: build_prompt_position_ids(mask[None], 2), ValueError, "`attention_mask` must have 2 dimensions"),
        (lambda: build_prompt_position_ids(mask, -3), ValueError, "`prompt_lengths` must be >= 0"),
    ]
    for fn, error, message in cases:
        with pytest.raises(error) as info:
            fn()
        assert message in str(info.value), (message, str(info.value))
    # A correctly padded mask passes its side check; all-padding rows fit either side.
    build_prompt_attention_mask(torch.tensor([[0, 1, 1], [0, 0, 0]]), 2, padding_side="left")
    build_prompt_attention_mask(torch.tensor([[1, 1, 0], [0, 0, 0]]), 2, padding_side="right")


def test_extension_checks_its_arguments():
    """The C++ entry points refuse malformed arguments themselves (no out-of-bounds access)."""
    ext = load_extension()
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="attention_mask must be 2D"):
        ext.prompt_attention_mask(mask[None], None, 2, 0, True, 0, torch.bool)
    with pytest.raises(RuntimeError, match="past_length must be in"):
        ext.prompt_attention_mask(mask, None, 2, 5, True, 0, torch.bool)
    with pytest.raises(RuntimeError, match="prompt_lengths must have shape"):
        ext.prompt_position_ids(mask, torch.tensor([1, 2, 3]), 3, 0, True)
    with pytest.raises(RuntimeError, match="prompt_lengths must be int64"):
        ext.prompt_attention_mask(mask, torch.tensor([1, 2], dtype=torch.int32), 3, 0, True, 0, torch.bool)
    with pytest.raises(RuntimeError, match="out_dtype must be"):
        ext.prompt_attention_mask(mask, None, 2, 0, True, 0, torch.int32)
    with pytest.raises(RuntimeError, match="num_prompt_columns must be >= 0"):
        ext.prompt_attention_mask(mask, None, -1, 0, True, 0, torch.bool)


def test_empty_shapes():
    mask = torch.ones(2, 3, dtype=torch.bool)
    ours, ref = build_both(mask, 2, past_length=3)  # S = 0: nothing new this step
    assert ours.shape == ref.shape == (2, 1, 0, 5)
    ours, ref = build_both(torch.ones(0, 3, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert ours.shape == ref.shape == (0, 1, 3, 3)
    assert build_prompt_position_ids(mask, 2, past_length=3).shape == (2, 0)


# ----------------------------------------------------------------------------------------------
# GPU: the CUDA kernel against the CPU kernel, and compute-sanitizer.


@pytest.mark.cuda
def test_cuda_kernel_matches_cpu_kernel():
    assert load_extension().with_cuda(), "the extension was built without CUDA"
    gen = torch.Generator().manual_seed(9)
    # Odd widths make 16-byte chunks straddle rows; the large case spans many blocks.
    shapes = [(1, 1, 0), (3, 7, 5), (4, 33, 17), (5, 130, 3), (8, 512, 20), (2, 1000, 131)]
    for (batch, text_length, P), side, causal, window in itertools.product(
            shapes, ["left", "right", "mixed"], [True, False], [None, 5]):
        text_mask = random_text_mask(batch, text_length, side, gen)
        for n in (P, per_row_lengths(batch, P, gen)):
            for past_length in {0, text_length // 2, text_length - 1}:
                for dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64):
                    kwargs = dict(causal=causal, past_length=past_length, sliding_window=window, dtype=dtype)
                    cpu = build_prompt_attention_mask(text_mask, n, **kwargs)
                    n_cuda = n.cuda() if isinstance(n, torch.Tensor) else n
                    gpu = build_prompt_attention_mask(text_mask.cuda(), n_cuda, **kwargs)
                    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu), (batch, text_length, P, kwargs)
                for positions in ("continue", "restart"):
                    cpu = build_prompt_position_ids(text_mask, n, past_length=past_length, positions=positions)
                    gpu = build_prompt_position_ids(text_mask.cuda(), n_cuda, past_length=past_length,
                                                    positions=positions)
                    assert torch.equal(gpu.cpu(), cpu)
    strided = random_text_mask(4, 600, "mixed", gen).cuda()[:, ::3]
    assert torch.equal(build_prompt_attention_mask(strided, 7, dtype=torch.bfloat16).cpu(),
                       build_prompt_attention_mask(strided.cpu(), 7, dtype=torch.bfloat16))


SANITIZER_SCRIPT = """
import torch
from ptuning_fast import build_prompt_attention_mask, build_prompt_position_ids
gen = torch.Generator().manual_seed(0)
for batch, K, P in [(3, 37, 5), (2, 300, 20), (1, 1, 0)]:
    mask = torch.randint(0, 2, (batch, K), generator=gen).cuda()
    n = torch.randint(0, P + 1, (batch,), generator=gen).cuda()
    for dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        build_prompt_attention_mask(mask, n, past_length=K // 2, sliding_window=4, dtype=dtype)
        build_prompt_attention_mask(mask[:, ::2], P, causal=False, dtype=dtype)
    build_prompt_position_ids(mask, n, past_length=K // 3)
torch.cuda.synchronize()
print("sanitizer-run-ok")
"""


@pytest.mark.cuda
def test_cuda_kernels_compute_sanitizer_clean():
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(sanitizer):
        pytest.skip("compute-sanitizer is not installed with this CUDA toolkit")
    result = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c",
                             SANITIZER_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "sanitizer-run-ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in result.stdout + result.stderr


def test_peft_positions_and_the_2d_padding_mask():
    """positions="peft" counts every column (PEFT's training forward); prompt_padding_mask is the
    (B, P + K) mask of the same layout (live prompt columns, then the text mask)."""
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    lengths = torch.tensor([2, 1])
    assert build_prompt_position_ids(mask, lengths, positions="peft").tolist() == [[2, 3, 4], [1, 2, 3]]
    assert build_prompt_position_ids(mask, 2, past_length=1, positions="peft").tolist() == [[3, 4], [3, 4]]
    assert prompt_padding_mask(mask, lengths).tolist() == [[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]]
    full = prompt_padding_mask(mask.bool(), 2, num_prompt_columns=3)
    assert full.dtype == torch.bool and full.tolist() == [[False, True, True, False, True, True],
                                                          [False, True, True, True, True, False]]
    with pytest.raises(ValueError, match="`positions` must be one of"):
        build_prompt_position_ids(mask, 2, positions="later")


def test_deprecated_argument_names_still_work_and_warn():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    with pytest.warns(DeprecationWarning, match="`num_virtual_tokens` is deprecated; use `prompt_lengths`"):
        old = build_prompt_attention_mask(mask, num_virtual_tokens=2)
    assert torch.equal(old, build_prompt_attention_mask(mask, 2))
    with pytest.warns(DeprecationWarning, match="`after_prompt` is deprecated; use `positions`"):
        old = build_prompt_position_ids(mask, 2, after_prompt=False)
    assert torch.equal(old, build_prompt_position_ids(mask, 2, positions="restart"))
    with pytest.raises(TypeError, match="both `num_virtual_tokens` \\(deprecated\\) and `prompt_lengths`"):
        build_prompt_attention_mask(mask, num_virtual_tokens=2, prompt_lengths=2)
