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
    "bench": ("benchmarks.runner", "main", "benchmark every component vs PEFT (run from a source checkout)"),
}


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
