"""Compiled steps: ``torch.compile`` (inductor) of a whole prompt-tuned causal LM, ours against
PEFT's, for the training step (forward + backward) and the eval forward, v1 prompts (MLP encoder)
and deep prompts.

Implementations (each compiled once, then timed in alternation): ``peft_eager`` (the runner's
baseline), ``peft_compile``, ``ptuning_fast_compile`` (the same PeftModel after
``ptuning_fast.accelerate``) and ``ptuning_fast_native_compile`` (``get_ptuning_model``). The
losses / logits of every compiled model must equal PEFT eager's before timing. Each row carries
``x_vs_peft_compile`` (PEFT compiled's median / this median) and ``x_vs_peft_compile_paired`` (the
median over rounds of the two calls' ratio in each round: what a drifting machine moves least)
with its 95% interval ``x_vs_peft_compile_paired_ci``; the runner's check fails on a row of ours
whose interval lies below 1 (slower than PEFT compiled, as far as the run can tell).
Compile time is not timed.
"""
from __future__ import annotations

import copy

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

import ptuning_fast
from benchmarks import models
from benchmarks.common import Row, floor_ms, make_rows, size_of


def _config(kind: str, tokens: int, hidden: int):
    if kind == "p_tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, encoder_hidden_size=hidden)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens)


def build(kind: str, size: str, device, backend: str = "inductor"):
    """(models by impl, the callables that compile them, batch, shape): PEFT, accelerated and native
    twins of one tiny-to-CPU-sized Llama with the same prompt weights."""
    torch.manual_seed(0)
    base, shape = models.llm_model(size)
    base = base.to(device)
    config = _config(kind, shape["tokens"], base.config.hidden_size)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    native = ptuning_fast.get_ptuning_model(base, copy.deepcopy(config))
    native.prompt_encoder.load_state_dict(peft_model.prompt_encoder.state_dict())
    plain = {"peft_eager": peft_model, "peft_compile": peft_model,
             "ptuning_fast_compile": ptuning_fast.accelerate(copy.deepcopy(peft_model)),
             "ptuning_fast_native_compile": native}
    calls = {impl: model if impl == "peft_eager" else torch.compile(model, backend=backend)
             for impl, model in plain.items()}
    ids, _ = models.inputs(peft_model, shape, device)
    # unpadded: where PEFT's and the native model's positions of a padded row differ by design
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    return plain, calls, batch, shape


def train_step(model, call, batch):
    def step():
        for p in model.parameters():
            p.grad = None
        loss = call(**batch).loss
        loss.backward()
        return loss
    return step


def eval_forward(model, call, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step():
        with torch.no_grad():
            return call(**inputs).logits
    return step


def check_equal(plain, calls, batch, tol: float) -> None:
    """Every compiled model's loss and logits equal PEFT eager's (training mode)."""
    for model in plain.values():
        model.train()
    with torch.no_grad():
        ref = calls["peft_eager"](**batch)
        for impl, call in calls.items():
            got = call(**batch)
            if not torch.allclose(got.loss.float(), ref.loss.float(), rtol=tol, atol=tol):
                raise AssertionError(f"{impl}: loss {got.loss.item()} != PEFT's {ref.loss.item()}")
            text = batch["input_ids"].shape[1]  # PEFT's v1 logits hold the prompt columns first
            if not torch.allclose(got.logits[:, -text:].float(), ref.logits[:, -text:].float(), rtol=tol, atol=tol):
                raise AssertionError(f"{impl}: logits differ from PEFT's")


def measure(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    size = size_of(device, quick)
    reps = {"tiny": 10, "cpu": 40, "gpu": 50}[size]  # enough rounds for a paired interval of a few %
    for kind in ("p_tuning", "prefix"):
        plain, calls, batch, shape = build(kind, size, device)
        check_equal(plain, calls, batch, 1e-4)
        tokens = shape["batch"] * (shape["seq"] + shape["tokens"])
        frozen = models.frozen_params(plain["peft_eager"].get_base_model())
        case = f"{kind} B={shape['batch']} S={shape['seq']} T={shape['tokens']}"
        for step_name, make, flops in (("train", train_step, 4 * frozen * tokens),
                                       ("eval", eval_forward, 2 * frozen * tokens)):
            for model in plain.values():
                model.train(step_name == "train")
            fns = {impl: make(plain[impl], call, batch) for impl, call in calls.items()}
            pair = make_rows("compiled_step", f"{step_name} {case}", fns, device, floor_ms(device, flops=flops),
                             warmup=3, reps=reps, paired_with="peft_compile")
            compiled_peft = next(r.median_ms for r in pair if r.impl == "peft_compile")
            for row in pair:
                row.extra["x_vs_peft_compile"] = compiled_peft / row.median_ms
            rows += pair
        torch._dynamo.reset()
    return rows


def test_bench_compiled_step_tiny():
    """CI: the component's models compile (aot_eager, fast on CPU) and equal PEFT eager (v1; the
    compile tests cover every path, tests/compile/)."""
    torch._dynamo.reset()
    plain, calls, batch, _ = build("p_tuning", "tiny", torch.device("cpu"), backend="aot_eager")
    check_equal(plain, calls, batch, 1e-4)
    for impl, call in calls.items():
        assert torch.isfinite(train_step(plain[impl], call, batch)())
    torch._dynamo.reset()
