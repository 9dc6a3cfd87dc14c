"""Prompt-aware attention mask and positions: ptuning_fast vs the path PEFT takes through transformers.

PEFT's prefix route: ``cat([ones(B, P), attention_mask])`` then transformers'
``create_causal_mask`` with the prompt in the cache (SDPA -> bool mask, eager -> additive mask in
the model dtype); positions as ``generate()`` computes them from that mask. Ours:
``build_prompt_attention_mask`` / ``build_prompt_position_ids`` (C++ extension, CUDA kernel on
GPU). Outputs are checked equal before anything is timed.

Floor: the output bytes (the mask is write-bound: inputs are B*S bytes) over the measured copy
bandwidth of the device, or one kernel launch, whichever is larger.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig, masking_utils

from benchmarks.common import Row, floor_ms, make_rows, size_of
from ptuning_fast import build_prompt_attention_mask, build_prompt_position_ids, use_backend

COMPONENT = "mask"
CASES = {"gpu": [(32, 2048, 128), (8, 512, 20)], "cpu": [(32, 512, 64), (8, 128, 20)],  # (B, S, P)
         "tiny": [(4, 256, 16), (2, 64, 8)]}


def make_inputs(batch, seq, prompt, device, *, seed=0):
    """Left-padded text mask with random lengths (row 0 unpadded) and a cache holding the prompt."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.randint(1, seq + 1, (batch,), generator=gen)
    real[0] = seq
    text_mask = (torch.arange(seq)[None, :] >= seq - real[:, None]).long().to(device)
    cache = DynamicCache()
    prefix = torch.zeros(batch, 1, prompt, 1, device=device)
    cache.update(prefix, prefix, 0)
    return text_mask, cache


def transformers_mask_fn(text_mask, cache, prompt, dtype):
    """PEFT's route: extend the 2D mask with the prompt, let transformers build the 4D mask."""
    batch, seq = text_mask.shape
    config = LlamaConfig(vocab_size=8, hidden_size=4, num_attention_heads=1, num_hidden_layers=1)
    config._attn_implementation = "sdpa" if dtype == torch.bool else "eager"
    embeds = torch.empty(batch, seq, 1, dtype=torch.bfloat16 if dtype == torch.bool else dtype,
                         device=text_mask.device)
    ones = torch.ones(batch, prompt, dtype=text_mask.dtype, device=text_mask.device)

    def build():
        return masking_utils.create_causal_mask(config, embeds, torch.cat([ones, text_mask], dim=1), cache)

    return build


def transformers_positions_fn(text_mask, prompt):
    """generate()'s positions from the prompt-extended 2D mask (cumsum - 1, padding -> 0)."""
    ones = torch.ones(text_mask.shape[0], prompt, dtype=text_mask.dtype, device=text_mask.device)

    def build():
        full = torch.cat([ones, text_mask], dim=1)
        positions = full.long().cumsum(-1) - 1
        return positions.masked_fill(full == 0, 0)[:, prompt:]

    return build


def mask_fns(text_mask, cache, prompt, dtype):
    """(ours, reference, transformers) builders of one mask case, checked equal."""
    ours = lambda: build_prompt_attention_mask(text_mask, prompt, dtype=dtype)  # noqa: E731

    def reference():
        with use_backend("reference"):
            return build_prompt_attention_mask(text_mask, prompt, dtype=dtype)

    theirs = transformers_mask_fn(text_mask, cache, prompt, dtype)
    expected = theirs()
    for name, fn in (("ptuning_fast", ours), ("reference", reference)):
        if not torch.equal(fn(), expected):
            raise AssertionError(f"{name} mask differs from transformers' for {tuple(text_mask.shape)}, P={prompt}")
    return ours, reference, theirs


def measure(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    size = size_of(device, quick)
    reps = 50 if size == "gpu" else 30
    for batch, seq, prompt in CASES[size]:
        text_mask, cache = make_inputs(batch, seq, prompt, device)
        for dtype in (torch.bool, torch.bfloat16):
            case = f"B={batch} S={seq} P={prompt} {str(dtype).replace('torch.', '')}"
            out_bytes = batch * seq * (prompt + seq) * torch.empty((), dtype=dtype).element_size()
            floor = floor_ms(device, bytes_moved=out_bytes)
            ours, reference, theirs = mask_fns(text_mask, cache, prompt, dtype)
            timed = make_rows(COMPONENT, case, {"ptuning_fast": ours, "ptuning_fast_ref": reference,
                                                "peft_eager": theirs}, device, floor, warmup=3, reps=reps,
                              output_bytes=out_bytes)
            for row in timed:
                row.extra["path"] = "transformers create_causal_mask" if row.impl == "peft_eager" else row.impl
            rows += timed
        # positions of the same case
        ours_pos = lambda: build_prompt_position_ids(text_mask, prompt)  # noqa: E731
        theirs_pos = transformers_positions_fn(text_mask, prompt)
        if not torch.equal(ours_pos(), theirs_pos()):
            raise AssertionError(f"position ids differ from generate()'s for {tuple(text_mask.shape)}, P={prompt}")
        case = f"B={batch} S={seq} P={prompt} positions"
        floor = floor_ms(device, bytes_moved=batch * seq * 8)
        rows += make_rows(COMPONENT, case, {"ptuning_fast": ours_pos, "peft_eager": theirs_pos}, device, floor,
                          warmup=3, reps=reps)
    return rows


# pytest-benchmark tests at small CPU sizes (CI): each checks the result before timing.


def test_bench_mask_ptuning_fast(benchmark):
    text_mask, cache = make_inputs(2, 64, 8, torch.device("cpu"))
    ours, _, _ = mask_fns(text_mask, cache, 8, torch.bfloat16)
    benchmark(ours)


def test_bench_mask_transformers(benchmark):
    text_mask, cache = make_inputs(2, 64, 8, torch.device("cpu"))
    _, _, theirs = mask_fns(text_mask, cache, 8, torch.bfloat16)
    benchmark(theirs)
