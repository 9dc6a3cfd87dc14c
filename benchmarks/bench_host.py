"""The ``host`` set: tiny shapes where a step is a few kernels and the time is Python, validation,
dispatch and launches (P-tuning's T = 8 virtual tokens, a small model, one token at a time).

Tiny Llama (hidden 64, 2 layers, 4 query / 2 KV heads), B = 2, S = 32 (one left-padded row), T = 8,
one thread on CPU. For ``accelerate(peft_model)`` and the native ``PTuningModel``, P-tuning v1
(MLP encoder) and deep prompts (with projection), against PEFT eager on the same weights:

- ``train_step``: forward, backward and an SGD step of the prompt parameters;
- ``eval_forward``: a forward without gradients;
- ``generate_per_token``: greedy ``generate()`` of 16 new tokens, per token;
- ``prefix_build`` (deep prompts): the KV cache holding every layer's prefix for the batch, with
  its autograd graph (PEFT: ``get_prompt``; here: the fused cache).

Each case is checked against PEFT before timing (logits, generated tokens). On a GPU every row
also reports the host time per call (the CPU time of issuing it, without waiting for the device)
beside the device time. Floor: one kernel launch per layer per step, measured.
"""
from __future__ import annotations

import copy
import warnings

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import ptuning_fast
from benchmarks.common import Row, floor_ms, make_rows

COMPONENT = "host"
SHAPE = dict(batch=2, seq=32, tokens=8, hidden=64, layers=2, new=16)
KINDS = ("p_tuning", "prefix")
ROUTES = ("accelerate", "native")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=SHAPE["hidden"], intermediate_size=128,
                                        num_hidden_layers=SHAPE["layers"], num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256))


def config_of(kind: str):
    if kind == "p_tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=SHAPE["tokens"],
                                   encoder_hidden_size=SHAPE["hidden"])
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=SHAPE["tokens"], prefix_projection=True,
                              encoder_hidden_size=SHAPE["hidden"])


def models(kind: str, route: str, device):
    """(plain PEFT model, ours) with the same weights, on ``device``."""
    peft_model = get_peft_model(tiny_llama(), config_of(kind)).to(device)
    if route == "accelerate":
        ours = ptuning_fast.accelerate(copy.deepcopy(peft_model))
    else:
        ours = ptuning_fast.get_ptuning_model(tiny_llama(), config_of(kind)).to(device)
        ours.prompt_encoder.load_state_dict(peft_model.prompt_encoder.state_dict())
    return peft_model, ours


def batch(device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (SHAPE["batch"], SHAPE["seq"]), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : SHAPE["seq"] // 4] = 0  # one left-padded row
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": ids.masked_fill(mask == 0, -100).to(device)}


def workloads(model, inputs: dict, kind: str) -> dict:
    """step -> callable on ``model`` (an eager PEFT model or ours)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-6)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    settings = dict(max_new_tokens=SHAPE["new"], min_new_tokens=SHAPE["new"], do_sample=False, pad_token_id=0)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    @torch.no_grad()
    def eval_forward():
        model.eval()
        return model(**text).logits

    @torch.no_grad()
    def generate():
        model.eval()
        return model.generate(**text, **settings)

    steps = {"train_step": train_step, "eval_forward": eval_forward, "generate_per_token": generate}
    if kind == "prefix":
        steps["prefix_build"] = _prefix_build(model, inputs["input_ids"])
    return steps


def _prefix_build(model, input_ids):
    """The KV cache of every layer's prefix, with its autograd graph, as each path builds it."""
    from peft import PeftModel

    from ptuning_fast.peft_route import is_accelerated
    from ptuning_fast.prefix_tuning.functional import build_prefix_cache

    batch_size, text_length = input_ids.shape
    if isinstance(model, PeftModel) and not is_accelerated(model):
        return lambda: model.get_prompt(batch_size, max_cache_len=text_length + SHAPE["tokens"])
    encoder = model.prompt_encoder["default"]
    base = model.get_base_model()
    return lambda: build_prefix_cache(base, encoder, batch_size, seq_len=text_length)


@torch.no_grad()
def check(peft_model, ours, inputs: dict, kind: str, route: str) -> None:
    """Ours equals PEFT before anything is timed: logits of the real tokens and greedy tokens."""
    peft_model.eval()
    ours.eval()
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    expected, got = peft_model(**text).logits, ours(**text).logits
    width, real = inputs["input_ids"].shape[1], inputs["attention_mask"].bool()
    if route == "accelerate":  # PEFT's layout; a left-padded row keeps PEFT's positions
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    else:  # the unpadded row: PEFT's own semantics agree there
        torch.testing.assert_close(got[1, -width:][real[1]], expected[1, -width:][real[1]], rtol=1e-4, atol=1e-5)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    if not torch.equal(ours.generate(**text, **settings), peft_model.generate(**text, **settings)):
        raise AssertionError(f"host/{route}/{kind}: generated tokens differ from PEFT's")


def measure(device: torch.device, quick: bool) -> list[Row]:
    """Rows of the host set; on CPU on one thread (more threads than free cores make tiny timings erratic)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's warnings about position ids in its generate()
            return _measure(device)
    finally:
        torch.set_num_threads(threads)


def _measure(device: torch.device) -> list[Row]:
    rows = []
    inputs = batch(device)
    launch_floor = floor_ms(device, launches=SHAPE["layers"])
    for kind in KINDS:
        for route in ROUTES:
            peft_model, ours = models(kind, route, device)
            check(peft_model, ours, inputs, kind, route)
            theirs_steps, our_steps = workloads(peft_model, inputs, kind), workloads(ours, inputs, kind)
            for step in our_steps:
                per = SHAPE["new"] if step == "generate_per_token" else 1
                case = f"{route} {kind} {step} B={SHAPE['batch']} S={SHAPE['seq']} T={SHAPE['tokens']}"
                reps = 10 if step == "generate_per_token" else 50
                rows += make_rows(COMPONENT, case, {"peft_eager": theirs_steps[step], "ptuning_fast": our_steps[step]},
                                  device, launch_floor, warmup=3, reps=reps, per=per, per_call_units=per,
                                  threads=torch.get_num_threads())
            del peft_model, ours
    return rows


def test_bench_host_tiny(benchmark):
    """CI: the accelerated deep-prompt train step at the host shapes equals PEFT's logits, then is timed."""
    device = torch.device("cpu")
    inputs = batch(device)
    peft_model, ours = models("prefix", "accelerate", device)
    check(peft_model, ours, inputs, "prefix", "accelerate")
    benchmark.pedantic(workloads(ours, inputs, "prefix")["train_step"], rounds=3, iterations=1)
