"""Serving many P-tuned tasks on one frozen model: one mixed batch vs one batch per task.

For N = 1, 4 and 16 tasks (one prompt adapter each) and a fixed total of B rows (B / N per task),
forward and greedy ``generate()``, v1 prompts (``P_TUNING``) and deep prompts (``PREFIX_TUNING``):

- ``peft_eager``: PEFT, which activates one prompt adapter per forward: N batches of B / N rows,
  ``set_adapter`` between them (its ``adapter_names=`` mixed batches are for LoRA-style adapters);
- ``ptuning_fast_separate``: the native model, also N batches of B / N rows;
- ``ptuning_fast_mixed``: the native model, ONE batch of B rows with ``adapter_names=[...]``;
- ``ptuning_fast_accelerated_mixed``: the same PEFT model after ``ptuning_fast.accelerate``, ONE
  batch of B rows with PEFT's own keyword ``adapter_names=[...]`` (the one-line route).

Before timing, every row of the mixed batch is checked against PEFT running that row's adapter
(logits; generated tokens). Throughput is rows (and tokens) per second; peak memory is
``torch.cuda.max_memory_allocated`` above the memory held before the call on GPU, and on CPU the
peak of the tensors alive at once during the call (PyTorch profiler's memory timeline). Floor:
the FLOPs of the whole batch over measured matmul throughput, or the frozen weights read once per
forward (once per new token in generate), or one launch per layer per forward, whichever is largest.
"""
from __future__ import annotations

import copy

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

import ptuning_fast
from benchmarks import models
from benchmarks.common import Row, floor_ms, make_rows, size_of

TASK_COUNTS = (1, 4, 16)
KINDS = ("p_tuning", "prefix")
IMPLS = ("peft_eager", "ptuning_fast_separate", "ptuning_fast_mixed", "ptuning_fast_accelerated_mixed")


def _shape(size: str) -> dict:
    if size == "tiny":
        return dict(batch=16, seq=16, tokens=8, new=8, encoder_hidden=32)
    if size == "cpu":  # short requests on the CPU-sized Llama
        return dict(batch=16, seq=16, tokens=20, new=8, encoder_hidden=128)
    return dict(batch=64, seq=256, tokens=32, new=16, encoder_hidden=512)


def _config(kind: str, shape: dict, index: int):
    if kind == "p_tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape["tokens"],
                                   encoder_hidden_size=shape["encoder_hidden"])
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape["tokens"],
                              prefix_projection=index % 2 == 1, encoder_hidden_size=shape["encoder_hidden"])


def build_models(kind: str, num_tasks: int, shape: dict, base, device, dtype):
    """(PEFT model, native model): the same base and the same N adapters (fresh random prompts)."""
    names = [f"task{i}" for i in range(num_tasks)]
    peft_model = get_peft_model(base, _config(kind, shape, 0), adapter_name=names[0])
    for i, name in enumerate(names[1:], start=1):
        peft_model.add_adapter(name, _config(kind, shape, i))
    g = torch.Generator().manual_seed(num_tasks)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model = peft_model.to(device, dtype).eval()
    native = ptuning_fast.get_ptuning_model(base, _config(kind, shape, 0), adapter_name=names[0])
    for i, name in enumerate(names[1:], start=1):
        native.add_adapter(name, _config(kind, shape, i))
    native.prompt_encoder.load_state_dict(peft_model.prompt_encoder.state_dict())  # same keys: drop-ins
    native = native.to(device, dtype).eval()
    return peft_model, native, names


def _rows_of(names: list[str], num_rows: int) -> tuple[list[str], dict]:
    """Row r serves task r % N (tasks interleaved, as requests arrive); each task's row indices."""
    per_row = [names[r % len(names)] for r in range(num_rows)]
    return per_row, {name: torch.tensor([r for r in range(num_rows) if per_row[r] == name]) for name in names}


def workloads(peft_model, native, names, ids, mask, new_tokens: int, accelerated=None) -> dict:
    """impl -> (forward fn, generate fn) over the same B rows (``accelerated``: the PEFT model's
    accelerated twin, for the one-line route)."""
    per_row, rows = _rows_of(names, ids.shape[0])
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def peft_forward():
        out = []
        for name in names:
            peft_model.set_adapter(name)
            out.append(peft_model(input_ids=ids[rows[name]], attention_mask=mask[rows[name]]).logits)
        return out

    def peft_generate():
        out = []
        for name in names:
            peft_model.set_adapter(name)
            out.append(peft_model.generate(input_ids=ids[rows[name]], attention_mask=mask[rows[name]], **settings))
        return out

    def separate_forward():
        return [native(input_ids=ids[rows[n]], attention_mask=mask[rows[n]], adapter_names=[n] * len(rows[n])).logits
                for n in names]

    def separate_generate():
        return [native.generate(input_ids=ids[rows[n]], attention_mask=mask[rows[n]], adapter_names=[n] * len(rows[n]),
                                **settings) for n in names]

    def mixed_forward():
        return native(input_ids=ids, attention_mask=mask, adapter_names=per_row).logits

    def mixed_generate():
        return native.generate(input_ids=ids, attention_mask=mask, adapter_names=per_row, **settings)

    work = {"peft_eager": (peft_forward, peft_generate), "ptuning_fast_separate": (separate_forward, separate_generate),
            "ptuning_fast_mixed": (mixed_forward, mixed_generate)}
    if accelerated is not None:
        work["ptuning_fast_accelerated_mixed"] = (
            lambda: accelerated(input_ids=ids, attention_mask=mask, adapter_names=per_row).logits,
            lambda: accelerated.generate(input_ids=ids, attention_mask=mask, adapter_names=per_row, **settings))
    return work


@torch.no_grad()
def check_mixed_against_peft(kind: str, peft_model, native, names, ids, mask, new_tokens: int, dtype,
                             accelerated=None) -> None:
    """Every row of each mixed batch against PEFT running that row's adapter: logits, then tokens."""
    work = workloads(peft_model, native, names, ids, mask, new_tokens, accelerated)
    _, rows = _rows_of(names, ids.shape[0])
    peft_logits, peft_tokens = work["peft_eager"][0](), work["peft_eager"][1]()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for impl in ("ptuning_fast_mixed", "ptuning_fast_accelerated_mixed"):
        if impl not in work:
            continue
        mixed_logits, mixed_tokens = work[impl][0](), work[impl][1]()
        for name, expected, tokens in zip(names, peft_logits, peft_tokens):
            if kind == "p_tuning":
                expected = expected[:, -ids.shape[1]:]  # PEFT's logits include the prompt columns
            got = mixed_logits[rows[name]][:, -ids.shape[1]:].float()
            scale = expected.float().abs().max().item()
            error = (got - expected.float()).abs().max().item()
            if error > tolerance * max(scale, 1.0):
                raise AssertionError(f"multitask/{kind}/{impl}: mixed-batch logits of {name} differ from PEFT's by "
                                     f"{error:.3g}")
            if dtype == torch.float32 and not torch.equal(mixed_tokens[rows[name]], tokens):
                raise AssertionError(f"multitask/{kind}/{impl}: mixed-batch generate() tokens of {name} differ "
                                     "from PEFT's")
            if dtype != torch.float32:  # low precision: the first new token (from the checked logits) must agree
                first = mixed_tokens[rows[name], ids.shape[1]] == tokens[:, ids.shape[1]]
                if first.float().mean() < 0.9:
                    raise AssertionError(f"multitask/{kind}/{impl}: first generated tokens of {name} differ from "
                                         "PEFT's")


def cpu_peak_bytes(fn) -> int | None:
    """Peak bytes of CPU tensors alive at once during one call of ``fn`` (PyTorch profiler's memory
    timeline); None where the profiler cannot tell."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        live = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            if action.name == "CREATE":
                live += size
            elif action.name == "DESTROY":
                live -= size
            peak = max(peak, live)
        return peak
    except Exception:
        return None


def measure(device: torch.device, quick: bool) -> list[Row]:
    """Rows for every (prompt kind, N, forward / generate, implementation); see the module docstring.
    On CPU it runs on one thread: with more threads than free cores the timings become erratic."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _measure(device, quick)
    finally:
        torch.set_num_threads(threads)


def _measure(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    size = size_of(device, quick)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = _shape(size)
    for kind in KINDS:
        for num_tasks in TASK_COUNTS:
            torch.manual_seed(0)
            base, _ = models.llm_model(size)
            base = base.to(device, dtype).eval()
            peft_model, native, names = build_models(kind, num_tasks, shape, base, device, dtype)
            accelerated = ptuning_fast.accelerate(copy.deepcopy(peft_model))
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(3, base.config.vocab_size, (shape["batch"], shape["seq"]), generator=g).to(device)
            mask = torch.ones_like(ids)  # unpadded: PEFT's own outputs are right, so they are the check
            check_mixed_against_peft(kind, peft_model, native, names, ids, mask, shape["new"], dtype, accelerated)

            params = models.frozen_params(base)
            weight_bytes = params * base.dtype.itemsize
            layers = base.config.num_hidden_layers
            batch, tokens = shape["batch"], shape["seq"] + shape["tokens"]
            work = workloads(peft_model, native, names, ids, mask, shape["new"], accelerated)
            for step, index, floor in (
                    ("forward", 0, floor_ms(device, bytes_moved=weight_bytes, flops=2 * params * batch * tokens,
                                            dtype=dtype, launches=layers)),
                    ("generate", 1, floor_ms(device, bytes_moved=weight_bytes * shape["new"],
                                             flops=2 * params * batch * (tokens + shape["new"]), dtype=dtype,
                                             launches=layers * shape["new"]))):
                case = f"{kind} {step} N={num_tasks} B={batch} S={shape['seq']} T={shape['tokens']}"
                if step == "generate":
                    case += f" new={shape['new']}"
                fns = {impl: work[impl][index] for impl in IMPLS}
                reps = {"tiny": 10, "cpu": 5, "gpu": 20}[size]
                with torch.no_grad():
                    timed = make_rows("multitask", case, fns, device, floor, warmup=1, reps=reps,
                                      tasks=num_tasks, threads=torch.get_num_threads())
                for row in timed:
                    row.extra["batches"] = 1 if row.impl.endswith("_mixed") else num_tasks
                    if device.type == "cpu":
                        with torch.no_grad():
                            row.peak_bytes = cpu_peak_bytes(fns[row.impl])
                    seconds = row.median_ms / 1e3
                    row.extra["rows_per_s"] = batch / seconds
                    row.extra["tokens_per_s"] = batch * (shape["new"] if step == "generate" else shape["seq"]) / seconds
                rows += timed
            del peft_model, native, accelerated, base
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def test_bench_multitask_tiny(benchmark):
    """CI: a mixed batch of 4 tasks equals PEFT per task (v1 and deep prompts), then one mixed forward is timed."""
    shape = dict(batch=8, seq=6, tokens=3, new=3, encoder_hidden=16)
    torch.manual_seed(0)
    base, _ = models.llm_model("tiny")
    device = torch.device("cpu")
    for kind in KINDS:
        peft_model, native, names = build_models(kind, 4, shape, base.eval(), device, torch.float32)
        accelerated = ptuning_fast.accelerate(copy.deepcopy(peft_model))
        ids = torch.randint(3, base.config.vocab_size, (shape["batch"], shape["seq"]),
                            generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        check_mixed_against_peft(kind, peft_model, native, names, ids, mask, shape["new"], torch.float32, accelerated)
    forward = workloads(peft_model, native, names, ids, mask, shape["new"])["ptuning_fast_mixed"][0]
    logits = benchmark.pedantic(torch.no_grad()(forward), rounds=2, iterations=1)
    assert logits.shape == (shape["batch"], shape["seq"], base.config.vocab_size)
