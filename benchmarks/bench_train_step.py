"""End-to-end training step of a prompt-tuned model: forward + backward + optimizer step.

PEFT eager vs the same PeftModel after ``ptuning_fast.accelerate`` (one line), for P-tuning v1
(MLP encoder) and deep prompts (prefix tuning with projection), on an NLU and an LLM shape. The
two must give the same loss before timing. The floor is the FLOPs of the frozen model's forward
and activation backward (4 x params x tokens) over measured matmul throughput.
torch.compile of a whole PEFT model's training step is not attempted (compile time dominates).
"""
from __future__ import annotations

import copy

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

import ptuning_fast
from benchmarks import models
from benchmarks.common import Row, floor_ms, make_rows, size_of


def _peft_model(base, kind: str, tokens: int, task: str):
    if kind == "p_tuning":
        config = PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens,
                                     encoder_hidden_size=base.config.hidden_size)
    else:
        config = PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens, prefix_projection=True,
                                    encoder_hidden_size=min(512, base.config.hidden_size))
    return get_peft_model(base, config)


def _batch(model, shape, device, task):
    ids, mask = models.inputs(model, shape, device)
    if task == "SEQ_CLS":
        labels = torch.randint(0, 2, (shape["batch"],), device=device)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss

    return step


def cases():
    for regime, build, task in (("nlu", models.nlu_model, "SEQ_CLS"), ("llm", models.llm_model, "CAUSAL_LM")):
        for kind in ("p_tuning", "prefix"):
            yield regime, build, task, kind


def measure(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    size = size_of(device, quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for regime, build, task, kind in cases():
        torch.manual_seed(0)
        base, shape = build(size)
        base = base.to(device, dtype)
        peft_model = _peft_model(base, kind, shape["tokens"], task)
        fast_model = ptuning_fast.accelerate(copy.deepcopy(peft_model))
        batch = _batch(peft_model, shape, device, task)
        with torch.no_grad():
            ref, got = peft_model(**batch).loss.float(), fast_model(**batch).loss.float()
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        if not torch.allclose(ref, got, rtol=tol, atol=tol):
            raise AssertionError(f"{regime}/{kind}: loss {got.item()} != PEFT's {ref.item()}")
        tokens = shape["batch"] * (shape["seq"] + shape["tokens"])
        floor = floor_ms(device, flops=4 * models.frozen_params(base) * tokens, dtype=dtype)
        case = f"{regime} {kind} B={shape['batch']} S={shape['seq']} T={shape['tokens']}"
        for model in (peft_model, fast_model):
            model.train()
        pair = make_rows("train_step", case, {"peft_eager": _step_fn(peft_model, batch),
                                              "ptuning_fast": _step_fn(fast_model, batch)}, device, floor,
                         warmup=2, reps={"tiny": 10, "cpu": 8, "gpu": 20}[size])
        for row in pair:
            row.extra["tokens_per_s"] = tokens / (row.median_ms * 1e-3)
        rows += pair
        del peft_model, fast_model, base
    return rows


def test_bench_train_step_tiny(benchmark):
    """CI: a P-tuning v1 training step on the tiny LLM, accelerated, equals PEFT's loss."""
    torch.manual_seed(0)
    base, shape = models.llm_model("tiny")
    model = ptuning_fast.accelerate(_peft_model(base, "p_tuning", shape["tokens"], "CAUSAL_LM"))
    batch = _batch(model, shape, torch.device("cpu"), "CAUSAL_LM")
    loss = benchmark(_step_fn(model, batch))
    assert torch.isfinite(loss)
