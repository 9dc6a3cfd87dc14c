"""Deep prompt (P-Tuning v2) prefix into the KV cache, forward + backward; and a training step.

Component ``prefix_kv``: one training step of the prefix path of a Llama-7B-like model
(L=32, 32 or 8 KV heads, head_dim 128, T=64, B=8, projection hidden 512, model in bf16 with the
adapter in fp32 as PEFT keeps it). A step builds the cache with every layer's prefix, appends S
text tokens per layer as attention does, then backpropagates fixed upstream gradients of every
layer's keys/values into the prefix parameters and the text keys/values.

- ``ptuning_fast``: ``PrefixKVBuffer`` + ``PrefixKVCache`` (Triton on CUDA: per adapter one hidden
  launch and one projection+write launch; per layer one reduction launch for K and one for V in
  the backward; the reference path on CPU).
- ``peft_eager``: ``PeftModel.get_prompt``'s tensor path (encoder on B x T rows, cast, view /
  permute / split, ``DynamicCache``), then ``DynamicCache.update`` per layer (``torch.cat``).
- ``peft_compile``: the same with the encoder-to-split part under ``torch.compile``.

Correctness first: every layer's keys/values and every parameter gradient are checked against an
fp64 oracle with the project's rule (error <= 2 x PEFT's error + a tiny term) before timing.

Floor: the bytes that must move (parameters read, W2 read again for the backward, parameter
gradients written, the prefix written once per row, its gradient read once, the text keys/values
copied into the cache) over the measured copy bandwidth, and the three prefix matmuls over the
measured fp32 matmul throughput. ``extra.bytes_ours`` / ``bytes_floor`` is what our path moves
over that floor (the reduced fp32 gradient G (T, J) written and read is the difference).

Component ``prefix_train_step``: a full training step (forward, backward, SGD step) of a small
Llama with P-Tuning v2, ``prefix_forward`` vs the ``PeftModel``; tokens per second and peak memory.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from peft import PrefixTuningConfig, get_peft_model
from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from benchmarks.common import Row, floor_ms, make_rows, size_of
from ptuning_fast import PrefixKVCache, prefix_forward
from ptuning_fast.ops import PrefixGeometry, PrefixKVBuffer
from ptuning_fast.prefix_tuning.encoder import prefix_weights_of

COMPONENT = "prefix_kv"
TRAIN_COMPONENT = "prefix_train_step"


class Case(NamedTuple):
    layers: int
    kv_heads: int
    head_dim: int
    tokens: int  # T, virtual tokens
    batch: int
    hidden: int  # projection hidden size (0: no projection)
    text: int  # S, text tokens appended per layer

    @property
    def width(self):
        return self.layers * 2 * self.kv_heads * self.head_dim

    def name(self):
        proj = f"Hh={self.hidden}" if self.hidden else "no-proj"
        return f"L={self.layers} Hkv={self.kv_heads} T={self.tokens} B={self.batch} S={self.text} {proj}"


CASES = {
    "gpu": [Case(32, 32, 128, 64, 8, 512, 256), Case(32, 8, 128, 64, 8, 512, 256), Case(32, 8, 128, 64, 8, 0, 256)],
    "cpu": [Case(12, 12, 64, 20, 8, 512, 128), Case(12, 12, 64, 20, 8, 0, 128)],  # GPT-2 small's dims
    "tiny": [Case(4, 2, 16, 8, 4, 32, 16), Case(4, 2, 16, 8, 4, 0, 16)],
}
MODEL_DTYPE = torch.bfloat16


# ----------------------------------------------------------------------------- the prefix step
def make_encoder(case: Case, device, *, seed=0, dtype=torch.float32):
    """PEFT's PrefixEncoder with fresh random weights (init_weights would zero the last layer)."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=case.tokens,
                                token_dim=case.kv_heads * case.head_dim, num_layers=case.layers,
                                num_attention_heads=case.kv_heads, encoder_hidden_size=case.hidden or 1,
                                prefix_projection=bool(case.hidden))
    torch.manual_seed(seed)
    encoder = PeftPrefixEncoder(config).to(device, dtype)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 1.0 / max(p.shape[-1], 1) ** 0.5)
    return encoder, config


def peft_prefix(encoder, config, batch: int, dtype, tokens):
    """``PeftModel.get_prompt`` for PREFIX_TUNING (peft 0.21.2), its tensor part: returns the
    2L per-layer (key, value) tensors that it hands to ``DynamicCache``."""
    prompt_tokens = tokens.unsqueeze(0).expand(batch, -1)
    past_key_values = encoder(prompt_tokens).to(dtype)
    past_key_values = past_key_values.view(batch, config.num_virtual_tokens, config.num_layers * 2,
                                           config.num_attention_heads,
                                           config.token_dim // config.num_attention_heads)
    return past_key_values.permute([2, 0, 3, 1, 4]).split(2)


def _randn(shape, g, device, dtype):
    # Values representable in the model dtype, so that the fp64 oracle sees the same inputs.
    return torch.randn(shape, generator=g).to(MODEL_DTYPE).to(device, dtype)


def text_states(case: Case, device, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.kv_heads, case.text, case.head_dim)
    return [(_randn(shape, g, device, dtype).requires_grad_(), _randn(shape, g, device, dtype).requires_grad_())
            for _ in range(case.layers)]


def upstream_grads(case: Case, device, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.kv_heads, case.tokens + case.text, case.head_dim)
    return [(_randn(shape, g, device, dtype), _randn(shape, g, device, dtype)) for _ in range(case.layers)]


def make_steps(case: Case, encoder, config, device, dtype, *, compiled_prefix=None):
    """(ours, peft) step functions; each returns (keys/values of every layer, grads) when asked."""
    params = list(encoder.parameters())
    text = text_states(case, device, dtype)
    upstream = upstream_grads(case, device, dtype)
    leaves = params + [t for kv in text for t in kv]
    grads_in = [g for kv in upstream for g in kv]
    tokens = torch.arange(case.tokens, device=device)
    geometry = PrefixGeometry(case.layers, case.kv_heads, case.head_dim)

    def finish(outputs, return_results):
        torch.autograd.backward(outputs, grads_in)
        if return_results:
            return [o.detach() for o in outputs], [t.grad.detach().clone() for t in leaves]
        return None

    def ours(return_results=False):
        for t in leaves:
            t.grad = None
        buffer = PrefixKVBuffer(prefix_weights_of(encoder), geometry, case.batch, capacity=case.text, dtype=dtype)
        cache = PrefixKVCache(buffer)
        outputs = [o for layer, (k, v) in enumerate(text) for o in cache.update(k, v, layer)]
        return finish(outputs, return_results)

    def peft(return_results=False, prefix_fn=None):
        for t in leaves:
            t.grad = None
        kv = (prefix_fn or peft_prefix)(encoder, config, case.batch, dtype, tokens)
        cache = DynamicCache(kv)
        outputs = [o for layer, (k, v) in enumerate(text) for o in cache.update(k, v, layer)]
        return finish(outputs, return_results)

    steps = {"ptuning_fast": ours, "peft_eager": peft}
    if compiled_prefix is not None:
        steps["peft_compile"] = lambda return_results=False: peft(return_results, compiled_prefix)
    return steps


def check(case: Case, device) -> None:
    """Ours within 2 x PEFT's error of the fp64 oracle, for every output and gradient, or raise."""
    encoder, config = make_encoder(case, device)
    oracle, _ = make_encoder(case, device, dtype=torch.float64)
    oracle.load_state_dict({k: v.double() for k, v in encoder.state_dict().items()})
    steps = make_steps(case, encoder, config, device, MODEL_DTYPE)
    ours, ours_grads = steps["ptuning_fast"](True)
    ref, ref_grads = steps["peft_eager"](True)
    exact, exact_grads = make_steps(case, oracle, config, device, torch.float64)["peft_eager"](True)
    pairs = [("keys/values", torch.stack(ours), torch.stack(ref), torch.stack(exact))]
    pairs += [(f"grad {i}", a, b, e) for i, (a, b, e) in enumerate(zip(ours_grads, ref_grads, exact_grads))]
    for name, a, b, e in pairs:
        err = (a.double() - e).abs().max().item()
        ref_err = (b.double() - e).abs().max().item()
        tiny = 1e-6 * max(1.0, e.abs().max().item())
        if not err <= 2 * ref_err + tiny:
            raise AssertionError(f"{case.name()}: ptuning_fast {name} error {err:.3e} exceeds 2 x PEFT's {ref_err:.3e}")


def traffic(case: Case, encoder) -> dict:
    """Bytes that must move in one step, FLOPs, and the bytes our path moves."""
    item = torch.finfo(MODEL_DTYPE).bits // 8
    params = sum(p.numel() * p.element_size() for p in encoder.parameters())
    w2 = encoder.transform[2].weight if case.hidden else None
    prefix = case.batch * case.tokens * case.width * item
    text = case.layers * 2 * case.batch * case.kv_heads * case.text * case.head_dim * item
    floor_bytes = 2 * params + (w2.numel() * w2.element_size() if case.hidden else 0) + 2 * prefix + 2 * text
    flops = 3 * 2 * case.tokens * case.hidden * case.width if case.hidden else 0
    reduced = 2 * case.tokens * case.width * 4  # G (T, J) fp32, written then read
    return dict(bytes_floor=floor_bytes, bytes_ours=floor_bytes + reduced, flops=flops)


def measure_prefix(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    size = size_of(device, quick)
    reps, warmup = {"tiny": (50, 5), "cpu": (10, 2), "gpu": (50, 10)}[size]
    for case in CASES[size]:
        check(case, device)
        encoder, config = make_encoder(case, device)
        try:
            compiled = torch.compile(peft_prefix)
            make_steps(case, encoder, config, device, MODEL_DTYPE, compiled_prefix=compiled)["peft_compile"]()
        except Exception as exc:  # e.g. no working C++ compiler for inductor on this machine
            print(f"   peft_compile skipped for {case.name()}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            compiled = None
        steps = make_steps(case, encoder, config, device, MODEL_DTYPE, compiled_prefix=compiled)
        info = traffic(case, encoder)
        floor = floor_ms(device, bytes_moved=info["bytes_floor"], flops=info["flops"], dtype=torch.float32,
                         launches=1)
        info["bytes_ours_over_floor"] = info["bytes_ours"] / info["bytes_floor"]
        rows += make_rows(COMPONENT, case.name(), steps, device, floor, warmup=warmup, reps=reps,
                          **case._asdict(), **info)
    return rows


# ----------------------------------------------------------------------------- training step
def small_llama(size: str):
    if size == "tiny":
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return config, dict(batch=2, seq=24, tokens=8, hidden=32)
    if size == "cpu":
        config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
        return config, dict(batch=4, seq=128, tokens=20, hidden=128)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    return config, dict(batch=8, seq=512, tokens=64, hidden=512)


def measure_train_step(device: torch.device, quick: bool) -> list[Row]:
    size = size_of(device, quick)
    config, shape = small_llama(size)
    dtype = torch.float32 if device.type == "cpu" else MODEL_DTYPE
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device, dtype)
    peft = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape["tokens"],
                                                   prefix_projection=True, encoder_hidden_size=shape["hidden"]))
    peft.train()
    encoder = peft.prompt_encoder["default"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, config.vocab_size, (shape["batch"], shape["seq"]), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=1e-6)

    def step_of(run):
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = run()
            loss.backward()
            optimizer.step()
            return loss
        return step

    ours = step_of(lambda: prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels).loss)
    theirs = step_of(lambda: peft(input_ids=ids, attention_mask=mask, labels=labels).loss)
    with torch.no_grad():
        a = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels).loss
        b = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
    if not torch.allclose(a.float(), b.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5):
        raise AssertionError(f"train step: loss {a.item()} differs from PEFT's {b.item()}")

    case = f"llama h={config.hidden_size} L={config.num_hidden_layers} T={shape['tokens']} B={shape['batch']} " \
           f"S={shape['seq']} {str(dtype).replace('torch.', '')}"
    n_params = sum(p.numel() for p in base.parameters())
    tokens = shape["batch"] * shape["seq"]
    floor = floor_ms(device, flops=6 * n_params * tokens, dtype=dtype, launches=1)
    reps, warmup = {"tiny": (20, 3), "cpu": (8, 2), "gpu": (20, 5)}[size]
    rows = make_rows(TRAIN_COMPONENT, case, {"ptuning_fast": ours, "peft_eager": theirs}, device, floor,
                     warmup=warmup, reps=reps, **shape)
    for row in rows:
        row.extra["tokens_per_s"] = tokens / (row.median_ms * 1e-3)
    return rows


def measure(device: torch.device, quick: bool) -> list[Row]:
    return measure_prefix(device, quick) + measure_train_step(device, quick)


# ----------------------------------------------------------------------------- CI (CPU, tiny)
TINY = Case(2, 2, 8, 4, 3, 16, 5)


def _tiny_steps():
    device = torch.device("cpu")
    check(TINY, device)
    encoder, config = make_encoder(TINY, device)
    return make_steps(TINY, encoder, config, device, MODEL_DTYPE)


def test_bench_prefix_kv_ptuning_fast(benchmark):
    benchmark(_tiny_steps()["ptuning_fast"])


def test_bench_prefix_kv_peft_eager(benchmark):
    benchmark(_tiny_steps()["peft_eager"])
