"""Compiled training steps on CPU: ``python -m benchmarks.compiled_steps [v1,deep] [peft,accelerated,native]``.

One training step (forward and backward) of the tests' tiny Llama (hidden 32, 2 layers) with 20
virtual tokens, B=8, S=32, on one thread, eager and under ``torch.compile`` (inductor), for plain
PEFT, the accelerated PeftModel and the native model. The implementations are timed in
interleaved rounds (200, each starting one step later; the median), so that each sees the same
state of the machine; ``x PEFT`` is the median over rounds of PEFT's time / the route's in the same
round (compiled against PEFT compiled), which a drifting machine moves least, with its 95%
interval (:func:`ptuning_fast._timing.paired_speedup_interval`). Graphs and graph
breaks come from dynamo's counters. The routes named run in one process: recompiles of the frames
they share are part of what a user gets.
"""
from __future__ import annotations

import sys
import warnings

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model
from torch._dynamo.utils import counters

import ptuning_fast
from ptuning_fast._timing import paired_speedup, paired_speedup_interval, time_interleaved
from tests.tiny_models import VOCAB, llama

BATCH, SEQ, TOKENS, ROUNDS = 8, 32, 20, 200


def build(kind: str, route: str):
    torch.manual_seed(0)
    config = (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS, encoder_hidden_size=32)
              if kind == "v1" else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS))
    if route == "native":
        return ptuning_fast.get_ptuning_model(llama(), config)
    model = get_peft_model(llama(), config)
    return ptuning_fast.accelerate(model) if route == "accelerated" else model


def measure(kind: str, routes) -> list:
    """[(name, median ms, x PEFT or None, its 95% interval or None, graphs or None, graph breaks or
    None)] of each route, eager and compiled."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    steps, graphs = {}, {}
    for route in routes:
        model = build(kind, route)
        model.train()
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            call = torch.compile(model) if compiled else model

            def step(model=model, call=call):
                for parameter in model.parameters():
                    parameter.grad = None
                call(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()

            for _ in range(3):  # compile, then warm
                step()
            name = f"{route} {'compiled' if compiled else 'eager'}"
            steps[name] = step
            if compiled:
                graphs[name] = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
    # one warm-up round: a compiled step whose frames the dynamo resets above dropped compiles again
    times = time_interleaved(steps, torch.device("cpu"), warmup=1, reps=ROUNDS)
    rows = []
    for name in steps:
        # PEFT's time / this time in the same round (eager vs eager, compiled vs compiled)
        baseline = "peft compiled" if name.endswith("compiled") else "peft eager"
        paired, interval = ((paired_speedup(times, baseline, name), paired_speedup_interval(times, baseline, name))
                            if baseline in times else (None, None))
        rows.append((name, times[name]["median_ms"], paired, interval, *graphs.get(name, (None, None))))
    return rows


def main(argv) -> None:
    torch.set_num_threads(1)
    kinds = (argv[0] if argv else "v1,deep").split(",")
    routes = (argv[1] if len(argv) > 1 else "peft,accelerated,native").split(",")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in kinds:
            for name, ms, paired, interval, graph_count, breaks in measure(kind, routes):
                extra = "" if paired is None else f"  x PEFT {paired:5.3f} ({interval[0]:5.3f}-{interval[1]:5.3f})"
                extra += "" if graph_count is None else f"  graphs {graph_count}  breaks {breaks}"
                print(f"{kind:5} {name:22} {ms:7.2f} ms{extra}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
