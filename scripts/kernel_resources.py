"""Registers, spills and shared memory of every Triton kernel at its launchers' default configs,
per chip (sm_80, sm_90), compiled ahead of time on this machine (no GPU needed).

    python scripts/kernel_resources.py [--out benchmarks/results/kernel_resources.json] [--jobs N]

"Default" is the heuristic's pick of each launch (what runs with PTUNING_FAST_AUTOTUNE=0 or
during CUDA-graph capture); the launches are those of each family's ``launch_variants``. Prints a
markdown table (one row per kernel, chip and compute dtype: ranges over its launches) and writes
every launch's numbers as JSON with the Triton version, commit and command. Needs a process
without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict:
    import torch
    import triton

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {"triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "commit": git("rev-parse", "HEAD"), "dirty_tree": bool(git("status", "--porcelain")),
            "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def dtype_label(row: dict) -> str:
    """What a launch computes in: the compute dtype (with TF32), and its pointer dtypes."""
    c = row["constexprs"]
    compute = c.get("COMPUTE_DTYPE", "-")
    if c.get("INPUT_PRECISION") == "tf32" and c.get("PROJECT", True):
        compute += "+tf32"
    names = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int32": "i32"}
    return f"{compute} ({','.join(dict.fromkeys(names.get(p, p) for p in row['pointers']))})"


def table(rows: list[dict]) -> str:
    """Markdown: per kernel, chip and dtypes, the range over its default launches."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["chip"], dtype_label(r))].append(r)
    lines = ["| kernel | chip | compute (pointers) | launches | registers | stack+local B | shared KiB | fails |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (kernel, chip, label), group in sorted(groups.items()):
        ok = [r for r in group if "registers" in r]
        regs = sorted(r["registers"] for r in ok)
        spill = max((r["stack"] + r["local"] for r in ok), default=0)
        shared = max((r["shared"] for r in ok), default=0) / 1024
        failing = sum(1 for r in group if r.get("error") or r.get("violations"))
        lines.append(f"| {kernel} | sm_{chip} | {label} | {len(group)} | "
                     f"{f'{regs[0]}-{regs[-1]}' if regs else '-'} | {spill} | {shared:.1f} | {failing} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_resources.json")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; Triton 3.9 warns without it
    sys.path.insert(0, str(ROOT))
    from ptuning_fast.kernels import aot

    rows = aot.compile_all(aot.FAMILIES, sorted(aot.CHIPS), args.jobs, defaults_only=True)
    markdown = table(rows)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "table": markdown, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 1 if any(r.get("error") or r.get("violations") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
