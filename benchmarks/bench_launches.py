"""Launch counts: the device operations one step would launch on a GPU, ours and PEFT's, and the
package's own host syncs, counted on a CPU (``python -m benchmarks --only launches``).

Counting rule (benchmarks/README.md): under a dispatch mode (:class:`benchmarks.counting.LaunchCounter`)
every aten op that runs a device kernel counts 1; view-only ops (``view``, ``expand``,
``permute``, ``narrow``...), allocations (``empty``) and casts to the same dtype count 0; a
custom op of the package (the C++ mask builder) counts 1 plus the aten ops it calls; each Triton
kernel counts 1 at its launcher. Our path runs as on CUDA (:func:`benchmarks.counting.as_on_cuda`:
the Triton kernels chosen and counted, not run; checks that read values off). Syncs: the host
reads of tensor data made by the package's own code (:class:`benchmarks.counting.HostReads`).

Paths:

- ``prompt_encoder``: the v1 MLP encoder over PEFT's indices (T = 20 virtual tokens, B = 8), hidden
  768 and 4096, on meta tensors (no memory);
- ``prefix``: the KV cache one forward's attention reads at Llama-7B shapes (32 layers, 32 KV heads
  of 128, T = 20, B = 8, S = 16 text tokens appended per layer), with and without projection, on
  meta tensors (PEFT: ``get_prompt`` in a ``DynamicCache``; ours: the ``PrefixKVCache``);
- ``host``: the models of the ``host`` set (:mod:`benchmarks.bench_host`) on CPU: the accelerated
  and the native model, v1 and deep prompts.

Each path counts a training step (forward and backward; the host set adds the SGD step) and an
eval forward; the host set also a ``generate()`` of 16 new tokens (decode). Results:
``benchmarks/results/launches.json``; ``benchmarks/test_launches.py`` checks them in CI.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch

from benchmarks.counting import HostReads, LaunchCounter, as_on_cuda

COMPONENT = "launches"
RESULTS = Path(__file__).resolve().parent / "results" / "launches.json"
ENCODER = dict(tokens=20, batch=8, hidden=(768, 4096))
LLAMA_7B = dict(layers=32, kv_heads=32, head_dim=128, hidden=4096, tokens=20, batch=8, text=16)


def count(fn, ours: bool) -> dict:
    """{"launches", "by_op", "syncs"} of one call of ``fn`` (after a warm-up call)."""
    counter = LaunchCounter()
    if ours:
        with as_on_cuda(counter):
            fn()
            counter.by_op.clear()
            with HostReads() as reads, counter:
                fn()
        syncs = [str(r) for r in reads.own()]
    else:
        fn()
        with counter:
            fn()
        syncs = []
    return {"launches": counter.total, "by_op": dict(sorted(counter.by_op.items())), "syncs": syncs}


def _train(forward, params):
    """A training step of ``forward``: its output times a fixed gradient, backward."""
    def step():
        for p in params:
            p.grad = None
        out = forward()
        out.backward(torch.ones_like(out))
    return step


def _eval(forward):
    def step():
        with torch.no_grad():
            forward()
    return step


# --------------------------------------------------------------------------------------------
def prompt_encoder_paths() -> list:
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder

    from ptuning_fast.p_tuning.encoder import PromptEncoder

    T, B = ENCODER["tokens"], ENCODER["batch"]
    out = []
    for d in ENCODER["hidden"]:
        config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, token_dim=d, encoder_hidden_size=d,
                                     num_transformer_submodules=1, num_layers=1, num_attention_heads=1)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, ours = PeftPromptEncoder(config), PromptEncoder(config)
        indices = torch.arange(T, device="meta").unsqueeze(0).expand(B, -1)  # what PeftModel passes
        for name, encoder, is_ours in (("peft", theirs, False), ("ours", ours, True)):
            params = list(encoder.parameters())
            steps = {"train": _train(lambda e=encoder: e(indices), params), "eval": _eval(lambda e=encoder: e(indices))}
            for step, fn in steps.items():
                out.append((f"prompt_encoder T={T} d={d} B={B}", step, name, count(fn, is_ours)))
    return out


def prefix_paths() -> list:
    """The cache one forward of a deep-prompt model reads: every layer's prefix for B rows, then
    each layer's S text keys and values appended (what attention receives), with the backward of
    everything attention read. PEFT: its ``get_prompt`` in a ``DynamicCache``; ours: the
    :class:`~ptuning_fast.PrefixKVCache` the model path builds."""
    from peft import PrefixTuningConfig
    from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder
    from transformers.cache_utils import DynamicCache

    from ptuning_fast.hf.introspection import PrefixGeometry
    from ptuning_fast.ops.prefix_cache import PrefixKVBuffer
    from ptuning_fast.prefix_tuning.cache import PrefixKVCache
    from ptuning_fast.prefix_tuning.encoder import prefix_weights_of

    g = LLAMA_7B
    T, B, L, H, Dh, S = g["tokens"], g["batch"], g["layers"], g["kv_heads"], g["head_dim"], g["text"]
    out = []
    for projection in (False, True):
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, token_dim=g["hidden"],
                                    num_layers=L, num_attention_heads=H, encoder_hidden_size=g["hidden"],
                                    prefix_projection=projection, num_transformer_submodules=1)
        with torch.device("meta"):
            encoder = PeftPrefixEncoder(config)
        tokens = torch.arange(T, device="meta").unsqueeze(0).expand(B, -1)
        text = torch.zeros((B, H, S, Dh), device="meta", requires_grad=True)  # one layer's new keys / values

        def peft_cache(encoder=encoder):  # PeftModel.forward: get_prompt, then the model's appends
            values = encoder(tokens).view(B, T, 2 * L, H, Dh).permute([2, 0, 3, 1, 4]).split(2)
            cache = DynamicCache([(v[0], v[1]) for v in values])
            return [cache.update(text, text, layer) for layer in range(L)]

        def our_cache(encoder=encoder):
            cache = PrefixKVCache(PrefixKVBuffer([prefix_weights_of(encoder)], PrefixGeometry(L, H, Dh), B,
                                                 capacity=S))
            return [cache.update(text, text, layer) for layer in range(L)]

        params = list(encoder.parameters()) + [text]
        case = f"prefix llama-7b T={T} B={B} S={S} {'projection' if projection else 'no projection'}"
        for name, forward, is_ours in (("peft", peft_cache, False), ("ours", our_cache, True)):
            for step, fn in (("train", _train_layers(forward, params)), ("eval", _eval(forward))):
                out.append((case, step, name, count(fn, is_ours)))
    return out


def _train_layers(forward, params):
    """Backward of every layer's keys and values attention read (one gradient tensor each)."""
    def step():
        for p in params:
            p.grad = None
        outputs = [t for layer in forward() for t in layer]
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    return step


def host_paths() -> list:
    from benchmarks import bench_host

    device = torch.device("cpu")
    inputs = bench_host.batch(device)
    out = []
    for kind in bench_host.KINDS:
        for route in bench_host.ROUTES:
            peft_model, ours = bench_host.models(kind, route, device)
            case = f"host {route} {kind} B={bench_host.SHAPE['batch']} S={bench_host.SHAPE['seq']}"
            for name, model, is_ours in (("peft", peft_model, False), ("ours", ours, True)):
                steps = bench_host.workloads(model, inputs, kind)
                for step, key in (("train", "train_step"), ("eval", "eval_forward"),
                                  ("decode", "generate_per_token")):
                    out.append((case if step != "decode" else f"{case} new={bench_host.SHAPE['new']}", step, name,
                                count(steps[key], is_ours)))
    return out


def collect(groups=("prompt_encoder", "prefix", "host")) -> list:
    """One entry per (path, step): ours and PEFT's launches, and our syncs."""
    found = {}
    makers = {"prompt_encoder": prompt_encoder_paths, "prefix": prefix_paths, "host": host_paths}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group in groups:
            for case, step, name, result in makers[group]():
                found.setdefault((case, step), {})[name] = result
    return [{"path": case, "step": step, "ours": r["ours"]["launches"], "peft": r["peft"]["launches"],
             "ours_syncs": len(r["ours"]["syncs"]), "sync_sites": r["ours"]["syncs"],
             "ours_by_op": r["ours"]["by_op"], "peft_by_op": r["peft"]["by_op"]} for (case, step), r in found.items()]


def measure(device: torch.device, quick: bool) -> list:
    """Counts (not times): written to results/launches.json; no timed rows."""
    entries = collect()
    RESULTS.write_text(json.dumps({"torch": torch.__version__, "rule": __doc__.split("Paths:")[0].strip(),
                                   "paths": entries}, indent=1) + "\n")
    for e in entries:
        print(f"   {e['path']:<52} {e['step']:<7} ours {e['ours']:>5}  peft {e['peft']:>5}  syncs {e['ours_syncs']}")
    print(f"   wrote {RESULTS}")
    return []
