"""Run the coverage matrix and print the README's "Supported models" table (markdown): per cell,
✓ (equal to plain PEFT), refused (plain PEFT fails too; a clear ValueError here), known (an
expected failure of the matrix, with its reason), FAIL, or - (the check does not apply).

    python -m tests.models.table [pytest arguments...]
"""
import sys

import pytest

from .architectures import ARCHITECTURES
from .test_matrix import CHECKS, KINDS, _applies

_HEADINGS = {"forward": "forward", "forward_padded": "padded", "forward_bf16": "bf16 autocast", "generate": "generate",
             "generate_padded": "padded generate", "mixed": "mixed", "native": "native",
             "native_padded": "native padded"}
_SHORT = {"P_TUNING": "v1", "PREFIX_TUNING": "deep"}


class _Collector:
    def __init__(self):
        self.cells = {}

    def pytest_runtest_logreport(self, report):
        if "[" not in report.nodeid or not (report.when == "call" or report.failed or report.skipped):
            return
        key = tuple(report.nodeid.split("[", 1)[1].rstrip("]").split("-"))
        refused = any(name == "peft_raises" for name, _ in report.user_properties)
        if hasattr(report, "wasxfail"):
            mark = "known"
        elif report.passed:
            mark = "refused" if refused else "✓"
        else:
            mark = "FAIL" if report.failed else "skip"
        if key not in self.cells or mark != "✓":
            self.cells[key] = mark


def table(cells) -> str:
    columns = [(kind, check) for kind in KINDS for check in CHECKS]
    lines = ["| model | class | " + " | ".join(f"{_SHORT[k]} {_HEADINGS[c]}" for k, c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name in ARCHITECTURES:
        marks = [cells.get((name, k, c), "?") if _applies(name, c) else "-" for k, c in columns]
        lines.append(f"| {name} | {ARCHITECTURES[name][1]} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def main(argv) -> int:
    collector = _Collector()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/models/test_matrix.py", *argv], plugins=[collector])
    print(table(collector.cells))
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
