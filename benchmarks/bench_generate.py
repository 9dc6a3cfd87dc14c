"""``generate()`` with a prompt: greedy decoding of a P-tuned and a prefix-tuned causal LM.

PEFT eager vs the same PeftModel after ``ptuning_fast.accelerate``; the generated tokens must be
identical before timing. Also the native ``PTuningModel`` with the same prompt weights, as it runs
by default (``ptuning_fast_native``: the prompts encoded from the current parameters on every
call) and after ``freeze_prompts()`` (``ptuning_fast_native_frozen``: encoded once), whose ratio
is what never reusing encoded prompts across calls costs; those two must generate the same tokens.
Floor: every decoding step reads the frozen weights once (params x bytes x new tokens over copy
bandwidth), plus one launch per layer per step.
"""
from __future__ import annotations

import copy

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

import ptuning_fast
from benchmarks import models
from benchmarks.common import Row, floor_ms, make_rows, size_of

NEW_TOKENS = 16


def _generate_fn(model, ids, mask):
    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    return run


def measure(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    size = size_of(device, quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for kind in ("p_tuning", "prefix"):
        torch.manual_seed(0)
        base, shape = models.llm_model(size)
        base = base.to(device, dtype).eval()
        if kind == "p_tuning":
            config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape["tokens"],
                                         encoder_hidden_size=base.config.hidden_size)
        else:
            config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape["tokens"])
        peft_model = get_peft_model(base, config).eval()
        fast_model = ptuning_fast.accelerate(copy.deepcopy(peft_model)).eval()
        ids, mask = models.inputs(base, shape, device)
        ref, got = _generate_fn(peft_model, ids, mask)(), _generate_fn(fast_model, ids, mask)()
        if not torch.equal(ref, got):
            raise AssertionError(f"generate/{kind}: tokens differ from PEFT's")
        native = ptuning_fast.get_ptuning_model(copy.deepcopy(base), config).eval()
        native.prompt_encoder.load_state_dict(peft_model.prompt_encoder.state_dict())
        frozen = copy.deepcopy(native)
        frozen.freeze_prompts()
        if not torch.equal(_generate_fn(native, ids, mask)(), _generate_fn(frozen, ids, mask)()):
            raise AssertionError(f"generate/{kind}: freeze_prompts() changed the generated tokens")
        weight_bytes = models.frozen_params(base) * base.dtype.itemsize
        floor = floor_ms(device, bytes_moved=weight_bytes * NEW_TOKENS,
                         launches=NEW_TOKENS * base.config.num_hidden_layers)
        case = f"{kind} B={shape['batch']} S={shape['seq']} T={shape['tokens']} new={NEW_TOKENS}"
        fns = {"peft_eager": peft_model, "ptuning_fast": fast_model, "ptuning_fast_native": native,
               "ptuning_fast_native_frozen": frozen}
        rows += make_rows("generate", case, {impl: _generate_fn(model, ids, mask) for impl, model in fns.items()},
                          device, floor, warmup=1, reps={"tiny": 10, "cpu": 6, "gpu": 10}[size])
        del peft_model, fast_model, native, frozen, base, fns
    return rows


def test_bench_generate_tiny(benchmark):
    """CI: greedy generate of an accelerated prefix-tuned tiny LLM equals PEFT's tokens."""
    torch.manual_seed(0)
    base, shape = models.llm_model("tiny")
    peft_model = get_peft_model(base.eval(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    fast = ptuning_fast.accelerate(copy.deepcopy(peft_model)).eval()
    ids, mask = models.inputs(base, shape, torch.device("cpu"))
    expected = _generate_fn(peft_model, ids, mask)()
    got = benchmark.pedantic(_generate_fn(fast, ids, mask), rounds=2, iterations=1)
    assert torch.equal(got, expected)
