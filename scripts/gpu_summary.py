"""Each component's speed against its target, from a benchmark results JSON (``python -m benchmarks``).

    python scripts/gpu_summary.py RESULTS.json [--stages stages.json] > summary.md

Prints markdown: per measured case of a component with a target, its ratio to PEFT eager, to
``torch.compile`` of PEFT (where measured) and to its floor, next to the target and whether it is
met; a line for each target with no matching row (missing rows are expected while shape sets
change: the summary never fails on them); the runner's failures; and, with --stages, the GPU
check's stage table. Exit status 0 unless the inputs cannot be read.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

OURS, PEFT, COMPILED = "ptuning_fast", "peft_eager", "peft_compile"
# Case facts are read from the case name ("T=20 d=768 ...") and from the row's extras.
ALIASES = {"T": "tokens", "d": "dim", "h": "hidden", "L": "layers", "B": "batch", "S": "seq"}


@dataclass
class Target:
    components: tuple
    what: str
    where: dict = field(default_factory=dict)  # fact -> value or tuple of values
    exclude: tuple = ()  # words of the case name that take a row out
    min_vs_peft: Optional[float] = None
    max_of_floor: Optional[float] = None
    less_peak_memory: bool = False

    def text(self) -> str:
        parts = [f">= {self.min_vs_peft:g}x PEFT eager"] if self.min_vs_peft else []
        if self.max_of_floor:
            parts.append(f"<= {self.max_of_floor:g}x floor")
        if self.less_peak_memory:
            parts.append("peak memory < PEFT's")
        return ", ".join(parts)


TARGETS = [
    Target(("prompt_mlp",), "prompt encoder fwd+bwd, T=20, d=h=768/1024", {"T": 20, "d": (768, 1024), "h": (768, 1024)},
           min_vs_peft=4.0, max_of_floor=1.5),
    Target(("prompt_mlp",), "prompt encoder fwd+bwd, T=20, d=h=4096", {"T": 20, "d": 4096, "h": 4096},
           min_vs_peft=1.5, max_of_floor=1.5),
    Target(("prefix_kv",), "deep-prompt build fwd+bwd, 32 layers, head dim 128, T=64, B=8",
           {"L": 32, "head_dim": 128, "T": 64, "B": 8}, min_vs_peft=5.0),
    Target(("mask",), "mask builder vs the transformers path", exclude=("positions",), min_vs_peft=3.0),
    Target(("train_step", "prefix_train_step"), "training step", min_vs_peft=1.15, less_peak_memory=True),
]


def facts(row: dict) -> dict:
    found = {}
    for key, value in re.findall(r"(\w+)=([\w.]+)", row.get("case", "")):
        found[key] = int(value) if value.isdigit() else value
    extra = row.get("extra") or {}
    for short, long in ALIASES.items():
        if short not in found and long in extra:
            found[short] = extra[long]
    return {**extra, **found}


def matches(target: Target, row: dict) -> bool:
    if row.get("component") not in target.components or row.get("impl") != OURS:
        return False
    if any(word in row.get("case", "").split() for word in target.exclude):
        return False
    f = facts(row)
    for key, want in target.where.items():
        allowed = want if isinstance(want, tuple) else (want,)
        if f.get(key) not in allowed:
            return False
    return True


def ratio(a, b) -> Optional[float]:
    return a / b if a and b else None


def fmt(x: Optional[float], suffix="x") -> str:
    return f"{x:.2f}{suffix}" if x is not None else "-"


def verdict(target: Target, vs_peft, of_floor, ours_peak, peft_peak) -> str:
    checks = []
    if target.min_vs_peft is not None:
        checks.append(vs_peft is not None and vs_peft >= target.min_vs_peft)
    if target.max_of_floor is not None:
        checks.append(of_floor is not None and of_floor <= target.max_of_floor)
    if target.less_peak_memory:
        checks.append(ours_peak is not None and peft_peak is not None and ours_peak < peft_peak)
    return "met" if all(checks) else "NOT met"


def summarise(results: dict) -> str:
    rows = results.get("rows", [])
    by_case = {(r.get("component"), r.get("case"), r.get("impl")): r for r in rows}
    env = results.get("environment", {})
    lines = [f"# GPU check: {env.get('device', '?')}",
             "",
             f"torch {env.get('torch')} | triton {env.get('triton')} | transformers {env.get('transformers')} | "
             f"peft {env.get('peft')} | commit {env.get('commit')}",
             "",
             "| component | case | x PEFT eager | x torch.compile | x floor | peak MB (ours / PEFT) | target | |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    missing = []
    for target in TARGETS:
        hits = [r for r in rows if matches(target, r)]
        if not hits:
            missing.append(f"- no rows for: {target.what} ({target.text()})")
        for r in hits:
            peft = by_case.get((r["component"], r["case"], PEFT), {})
            compiled = by_case.get((r["component"], r["case"], COMPILED), {})
            vs_peft = ratio(peft.get("median_ms"), r.get("median_ms"))
            vs_compiled = ratio(compiled.get("median_ms"), r.get("median_ms"))
            of_floor = ratio(r.get("median_ms"), r.get("floor_ms"))
            ours_peak, peft_peak = r.get("peak_bytes"), peft.get("peak_bytes")
            peak = (f"{ours_peak / 2**20:.0f} / {peft_peak / 2**20:.0f}" if ours_peak is not None and peft_peak
                    is not None else "-")
            lines.append(f"| {r['component']} | {r['case']} | {fmt(vs_peft)} | {fmt(vs_compiled)} | {fmt(of_floor)} | "
                         f"{peak} | {target.text()} | {verdict(target, vs_peft, of_floor, ours_peak, peft_peak)} |")
    lines += ["", *(missing or ["Every target has rows."])]
    if results.get("complete") is False:
        measured = sorted({r.get("component") for r in rows})
        lines += ["", f"The benchmark run did not finish (stopped by its time limit?): measured {measured}."]
    failures = results.get("failures") or {}
    if failures:
        lines += ["", "Benchmark failures:", *[f"- {name}: {message}" for name, message in failures.items()]]
    return "\n".join(lines)


def stage_table(stages: list) -> str:
    lines = ["| stage | status | seconds | limit s |", "| --- | --- | ---: | ---: |"]
    for s in stages:
        lines.append(f"| {s.get('name')} | {s.get('status')} | {s.get('seconds')} | {s.get('limit_s')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the JSON file python -m benchmarks wrote")
    parser.add_argument("--stages", type=Path, help="stages.json of scripts/gpu_check.sh")
    args = parser.parse_args(argv)
    out = []
    if args.results.is_file():
        out.append(summarise(json.loads(args.results.read_text())))
    else:
        out.append(f"# GPU check\n\nNo benchmark results at {args.results}: the benchmark stage wrote none.")
    if args.stages is not None:
        stages = json.loads(args.stages.read_text()) if args.stages.is_file() else []
        out.append("## Stages\n\n" + stage_table(stages))
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
