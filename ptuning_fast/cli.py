"""The ``ptuning-fast`` command: ``ptuning-fast SUBCOMMAND [options]``.

Each subcommand is a ``main(argv)`` function in another module, imported only when used, so
``ptuning-fast train --help`` starts quickly. Add a subcommand with one line in ``SUBCOMMANDS``.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help)
SUBCOMMANDS = {
    "train": ("ptuning_fast.train", "main", "P-tune a Hugging Face model (default: MiniLM-L6 on built-in data)"),
    "demo": ("ptuning_fast.demo", "main", "compare with PEFT, accelerate a PEFT model, run a short training job"),
    "inspect": ("ptuning_fast.inspect_prompts", "main", "plot a prompt adapter and find its nearest vocabulary tokens"),
    "bench": ("ptuning_fast.cli", "bench", "benchmark every component vs PEFT (the suite of a source checkout)"),
}


def bench_parser():
    """The options of ``ptuning-fast bench`` / ``python -m benchmarks`` (the runner in the source
    checkout's ``benchmarks/`` folder parses with this too)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ptuning-fast bench",
        description="Benchmark every component against PEFT eager and torch.compile of PEFT (checked against "
                    "PEFT before timing), print a table, write JSON and plots. Runs the suite in a source "
                    "checkout's benchmarks/ folder (it is not shipped in the wheel).")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds per component (default: realistic shapes, "
                        "CPU-sized on a machine without a GPU)")
    parser.add_argument("--only", nargs="*", metavar="COMPONENT", help="components to run (default: all), e.g. "
                        "host mask multitask prefix_kv prompt_mlp train_step generate")
    parser.add_argument("--out", default=None, help="folder for JSON and PNG results (default: benchmarks/results)")
    parser.add_argument("--tag", default=None, help="name of the result files (default: device + date)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--check", metavar="RESULTS_JSON", default=None,
                        help="time nothing: check a results file for rows below PEFT without a stated reason")
    return parser


def bench(argv) -> int:
    """``ptuning-fast bench``: the benchmark runner of a source checkout (``--help`` works anywhere)."""
    args = bench_parser().parse_args(argv)
    try:
        from benchmarks.runner import run
    except ImportError:
        print("ptuning-fast bench: the benchmark suite is the benchmarks/ folder of a source checkout (it is not "
              "installed with the package); run it there: python -m benchmarks", file=sys.stderr)
        return 2
    return run(args)


def _usage() -> str:
    lines = ["usage: ptuning-fast SUBCOMMAND [options]   (ptuning-fast SUBCOMMAND --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name:<10} {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run ``ptuning-fast``: dispatch ``argv`` (default ``sys.argv[1:]``) to the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ptuning-fast: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    module, function, _ = SUBCOMMANDS[name]
    result = getattr(importlib.import_module(module), function)(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
