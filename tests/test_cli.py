"""The ``ptuning-fast`` command: every subcommand's ``--help`` works from outside a source checkout
(where the ``benchmarks`` suite cannot be imported), and the suite's own entry points agree."""
import subprocess
import sys

import pytest

from ptuning_fast.cli import SUBCOMMANDS


def run_cli(args, cwd):
    code = "import sys; from ptuning_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})


@pytest.mark.parametrize("subcommand", [None, *SUBCOMMANDS])
def test_help_works_outside_a_checkout(subcommand, tmp_path):
    done = run_cli(["--help"] if subcommand is None else [subcommand, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_bench_outside_a_checkout_says_where_the_suite_is(tmp_path):
    done = run_cli(["bench", "--only", "mask"], tmp_path)
    assert done.returncode == 2 and "source checkout" in done.stderr and "python -m benchmarks" in done.stderr


def test_unknown_subcommand(tmp_path):
    done = run_cli(["nope"], tmp_path)
    assert done.returncode == 2 and "unknown subcommand 'nope'" in done.stderr
