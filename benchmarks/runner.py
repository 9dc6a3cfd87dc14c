"""Benchmark runner: ``python -m benchmarks`` (or ``ptuning-fast bench``; options in
:func:`ptuning_fast.cli.bench_parser`).

Runs every component's ``measure(device, quick)`` (modules ``benchmarks/bench_*.py``), each of
which checks its output against PEFT before timing, then prints one table, writes a JSON file with
the raw rows plus device, versions, commit and command, and PNG plots (speedup over PEFT eager
per case, and time over the floor).
"""
from __future__ import annotations

import datetime
import importlib
import json
import pkgutil
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

import benchmarks

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "peft_eager"


# The components with speed targets run first: a run cut short by a time limit still has them.
FIRST = ("prompt_mlp", "prefix_kv", "mask", "train_step")


def discover() -> list[str]:
    names = [m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")]
    return sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))


def environment(device: torch.device) -> dict:
    def version(name):
        try:
            return importlib.import_module(name).__version__
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip())
    except Exception:
        commit, dirty = None, None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{name: version(name) for name in ("triton", "transformers", "peft")},
        "commit": commit,
        "dirty_tree": dirty,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def ratios(rows: list[dict]) -> list[dict]:
    """Add ``x_vs_peft`` (PEFT eager time / this time) and ``x_of_floor`` (time / floor) to rows."""
    base = {(r["component"], r["case"]): r["median_ms"] for r in rows if r["impl"] == BASELINE}
    for r in rows:
        b = base.get((r["component"], r["case"]))
        r["x_vs_peft"] = b / r["median_ms"] if b and r["median_ms"] > 0 else None
        r["x_of_floor"] = r["median_ms"] / r["floor_ms"] if r["floor_ms"] else None
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'component':<14} {'case':<34} {'impl':<16} {'median ms':>10} {'p20-p80 ms':>17} {'x PEFT':>7} {'x floor':>8} {'peak MB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        vs = f"{r['x_vs_peft']:.2f}" if r.get("x_vs_peft") else "-"
        fl = f"{r['x_of_floor']:.1f}" if r.get("x_of_floor") else "-"
        peak = f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") is not None else "-"
        lines.append(f"{r['component']:<14} {r['case'][:34]:<34} {r['impl']:<16} {r['median_ms']:>10.4f} "
                     f"{spread:>17} {vs:>7} {fl:>8} {peak:>8}")
    return "\n".join(lines)


def plot(rows: list[dict], out_prefix: Path) -> list[Path]:
    """Two PNGs: speedup over PEFT eager per case, and time / floor per case (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    components = sorted({r["component"] for r in rows})
    every_impl = sorted({r["impl"] for r in rows}, key=lambda i: (i != BASELINE, i))
    colour = {impl: plt.get_cmap("tab10")(k % 10) for k, impl in enumerate(every_impl)}  # one colour per impl
    paths = []
    for metric, label, name in (("x_vs_peft", "speedup over PEFT eager (x)", "speedup"),
                                ("x_of_floor", "time / floor (x, lower is better)", "floor")):
        fig, axes = plt.subplots(len(components), 1, figsize=(10, 3.2 * len(components)), squeeze=False)
        for ax, comp in zip(axes[:, 0], components):
            sub = [r for r in rows if r["component"] == comp and r.get(metric)]
            cases = list(dict.fromkeys(r["case"] for r in sub))
            impls = sorted({r["impl"] for r in sub}, key=lambda i: (i != BASELINE, i))  # the baseline first
            width = 0.8 / max(len(impls), 1)
            for i, impl in enumerate(impls):
                vals = [next((r[metric] for r in sub if r["case"] == c and r["impl"] == impl), 0) for c in cases]
                ax.bar([j + i * width for j in range(len(cases))], vals, width, label=impl, color=colour[impl])
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
            ax.set_title(comp)
            ax.set_ylabel(label, fontsize=8)
            if metric == "x_of_floor":
                ax.set_yscale("log")
            ax.axhline(1.0, color="black", linewidth=0.6)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_prefix.with_name(out_prefix.name + f"_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# Rows allowed below PEFT eager, with the reason the README gives:
# (component, case prefix, impl) -> reason.
KNOWN_BELOW_PEFT = {
    ("mask", "", "ptuning_fast_ref"): (
        "the pure-PyTorch oracle, run only where the C++ extension is not built; its additive mask is a "
        "bool mask and then a where(), one more full-size pass than transformers' path"),
}
WITHIN_SPREAD = "within the run's spread: its p20-p80 range overlaps PEFT eager's"


def _reason(row: dict, baseline: Optional[dict]) -> Optional[str]:
    """Why ``row`` may sit below PEFT eager: a stated reason, or measurement spread, or None."""
    stated = next((why for (component, prefix, impl), why in KNOWN_BELOW_PEFT.items()
                   if row["component"] == component and row["case"].startswith(prefix) and row["impl"] == impl), None)
    if stated is None and baseline is not None and row["p20_ms"] <= baseline["p80_ms"]:
        return WITHIN_SPREAD
    return stated


def below_peft(rows: list[dict]) -> list[dict]:
    """This package's rows slower than PEFT eager in the same case, each with its reason or None."""
    base = {(r["component"], r["case"]): r for r in rows if r["impl"] == BASELINE}
    out = []
    for r in rows:
        if r["impl"].startswith("ptuning_fast") and r.get("x_vs_peft") is not None and r["x_vs_peft"] < 1.0:
            out.append({"component": r["component"], "case": r["case"], "impl": r["impl"],
                        "x_vs_peft": r["x_vs_peft"], "reason": _reason(r, base.get((r["component"], r["case"])))})
    return out


def slower_than_compiled_peft(rows: list[dict]) -> list[dict]:
    """This package's compiled rows that their run tells apart from compiled PEFT as slower: the
    95% interval of the paired ratio (``x_vs_peft_compile_paired_ci``, see
    :func:`ptuning_fast._timing.paired_speedup_interval`) lies below 1. A row whose interval
    holds 1 is at parity as far as the run can tell."""
    out = []
    for r in rows:
        interval = (r.get("extra") or {}).get("x_vs_peft_compile_paired_ci")
        if r["impl"].startswith("ptuning_fast") and interval is not None and interval[1] < 1.0:
            out.append({"component": r["component"], "case": r["case"], "impl": r["impl"],
                        "x_vs_peft_compile_paired": r["extra"]["x_vs_peft_compile_paired"], "interval": interval})
    return out


def _print_slower(slower: list[dict]) -> None:
    for s in slower:
        print(f"SLOWER THAN PEFT COMPILED: {s['component']} | {s['case']} | {s['impl']} | "
              f"{s['x_vs_peft_compile_paired']:.3f}x (95% interval {s['interval'][0]:.3f}-{s['interval'][1]:.3f})")


def check(path: Path) -> int:
    """Exit status 1 when the results file has rows below PEFT without a reason, or compiled rows
    slower than compiled PEFT (printed)."""
    rows = ratios(json.loads(Path(path).read_text())["rows"])
    below = below_peft(rows)
    unexplained = [b for b in below if b["reason"] is None]
    for b in below:
        mark = "UNEXPLAINED" if b["reason"] is None else f"known: {b['reason']}"
        print(f"below PEFT: {b['component']} | {b['case']} | {b['impl']} | {b['x_vs_peft']:.2f}x | {mark}")
    slower = slower_than_compiled_peft(rows)
    _print_slower(slower)
    print(f"{path}: {len(unexplained)} row(s) below 1.0x PEFT without a reason, "
          f"{len(slower)} compiled row(s) slower than PEFT compiled")
    return 1 if unexplained or slower else 0


def run(args) -> int:
    """Run the components ``args`` (from :func:`ptuning_fast.cli.bench_parser`) asks for."""
    if args.check:
        return check(Path(args.check))
    unknown = sorted(set(args.only or []) - set(discover()))
    if unknown:
        print(f"unknown components {unknown}; choose from {discover()}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"transformers {env['transformers']} | peft {env['peft']} | commit {env['commit']}")
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{device.type}-{datetime.date.today().isoformat()}"
    json_path = out / f"{tag}.json"
    names = args.only or discover()
    rows, failures = [], {}

    def write(complete: bool) -> tuple:
        """The results so far (rewritten after every component: a run stopped by a time limit
        keeps what it measured; ``complete`` says whether every component ran): (rows, below PEFT,
        slower than PEFT compiled)."""
        measured = ratios(rows)
        below, slower = below_peft(measured), slower_than_compiled_peft(measured)
        json_path.write_text(json.dumps({"environment": env, "complete": complete, "rows": measured,
                                         "failures": failures, "below_peft": below,
                                         "slower_than_peft_compiled": slower}, indent=1))
        return measured, below, slower

    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        if not hasattr(module, "measure"):
            continue
        print(f"-- {name} ...", flush=True)
        try:
            rows += [r.as_dict() for r in module.measure(device, quick)]
        except Exception as exc:  # a wrong or broken component posts no number, and says so
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"   FAILED: {failures[name]}", flush=True)
        write(complete=False)
    rows, below, slower = write(complete=True)
    print(format_table(rows))
    for b in below:
        print(f"BELOW PEFT: {b['component']} | {b['case']} | {b['impl']} | {b['x_vs_peft']:.2f}x"
              + (f" | {b['reason']}" if b["reason"] else " | no stated reason"))
    _print_slower(slower)
    print(f"wrote {json_path}")
    if not args.no_plots and rows:
        for p in plot(rows, out / tag):
            print(f"wrote {p}")
    return 1 if failures else 0


def main(argv=None) -> int:
    from ptuning_fast.cli import bench_parser

    return run(bench_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
