"""The committed CPU results: no row below PEFT eager without a reason (what `--check` enforces),
and the rule that decides it."""
import json
from pathlib import Path

import pytest

from benchmarks import runner

RESULTS = Path(__file__).parent / "results" / "cpu.json"
COMPILED_RESULTS = Path(__file__).parent / "results" / "cpu_compiled_step.json"


@pytest.mark.parametrize("path", [RESULTS, COMPILED_RESULTS], ids=lambda p: p.name)
def test_committed_cpu_results_pass_the_check(path, capsys):
    """No row below PEFT eager without a reason, no compiled row slower than PEFT compiled."""
    assert runner.main(["--check", str(path)]) == 0, capsys.readouterr().out


def _rows(component, case, impl, ours, peft):
    """A PEFT eager row and one of ours, each as (median, p20, p80) in ms."""
    def row(name, t):
        return {"component": component, "case": case, "impl": name, "median_ms": t[0], "p20_ms": t[1],
                "p80_ms": t[2], "floor_ms": None}
    return [row("peft_eager", peft), row(impl, ours)]


@pytest.mark.parametrize("ours, expected", [
    ((1.10, 1.05, 1.20), runner.WITHIN_SPREAD),  # 0.91x, but the p20-p80 ranges overlap
    ((1.50, 1.40, 1.60), None),  # 0.67x and clearly apart: needs a stated reason
])
def test_below_peft_reason(ours, expected):
    rows = runner.ratios(_rows("train_step", "llm prefix B=4", "ptuning_fast", ours, (1.0, 0.95, 1.08)))
    (below,) = runner.below_peft(rows)
    assert below["reason"] == expected and below["x_vs_peft"] < 1.0


def test_stated_reason_wins_and_faster_rows_are_not_listed():
    rows = runner.ratios(_rows("mask", "B=8 S=64 additive", "ptuning_fast_ref", (2.0, 1.9, 2.1), (1.0, 0.9, 1.1))
                         + _rows("mask", "B=8 bool", "ptuning_fast", (0.5, 0.4, 0.6), (1.0, 0.9, 1.1)))
    (below,) = runner.below_peft(rows)
    assert below["case"].startswith("B=8 S=64 additive") and below["impl"] == "ptuning_fast_ref"
    assert below["reason"] == runner.KNOWN_BELOW_PEFT[("mask", "", "ptuning_fast_ref")]


def test_check_fails_on_an_unexplained_row(tmp_path, capsys):
    path = tmp_path / "results.json"
    rows = _rows("prompt_mlp", "T=20 d=768", "ptuning_fast", (1.5, 1.4, 1.6), (1.0, 0.95, 1.05))
    path.write_text(json.dumps({"rows": rows}))
    assert runner.main(["--check", str(path)]) == 1
    assert "UNEXPLAINED" in capsys.readouterr().out


def _compiled_row(impl, interval):
    return {"component": "compiled_step", "case": "train v1", "impl": impl, "median_ms": 1.0, "p20_ms": 1.0,
            "p80_ms": 1.0, "floor_ms": None,
            "extra": {"x_vs_peft_compile_paired": sum(interval) / 2, "x_vs_peft_compile_paired_ci": interval}}


def test_compiled_rows_slower_than_peft_compiled_fail_the_check(tmp_path, capsys):
    """A compiled row of ours is slower only where its paired interval lies below 1 (one that
    holds 1 is parity as far as the run can tell); PEFT's own rows are not judged."""
    rows = [_compiled_row("ptuning_fast_compile", [0.97, 1.01]), _compiled_row("peft_eager", [0.90, 0.95])]
    assert runner.slower_than_compiled_peft(runner.ratios(rows)) == []
    rows.append(_compiled_row("ptuning_fast_native_compile", [0.95, 0.99]))
    (slower,) = runner.slower_than_compiled_peft(runner.ratios(rows))
    assert slower["impl"] == "ptuning_fast_native_compile" and slower["interval"] == [0.95, 0.99]
    path = tmp_path / "compiled.json"
    path.write_text(json.dumps({"rows": rows}))
    assert runner.main(["--check", str(path)]) == 1
    assert "SLOWER THAN PEFT COMPILED" in capsys.readouterr().out


def test_results_are_written_after_every_component(tmp_path, monkeypatch):
    """A run stopped part-way (a time limit on the GPU machine) keeps what it measured."""
    import sys
    import types

    from benchmarks.common import Row

    json_path = tmp_path / "t.json"

    def first(device, quick):
        return [Row("first", "case", impl, ms, ms, ms, None, None, {}) for impl, ms in (("peft_eager", 2.0),
                                                                                      ("ptuning_fast", 1.0))]

    def second(device, quick):
        written = json.loads(json_path.read_text())
        assert written["complete"] is False and {r["component"] for r in written["rows"]} == {"first"}
        raise RuntimeError("boom")

    for name, measure in (("first", first), ("second", second)):
        monkeypatch.setitem(sys.modules, f"benchmarks.bench_{name}", types.SimpleNamespace(measure=measure))
    monkeypatch.setattr(runner, "discover", lambda: ["first", "second"])
    assert runner.main(["--no-plots", "--out", str(tmp_path), "--tag", "t"]) == 1  # a failure exits 1
    final = json.loads(json_path.read_text())
    assert final["complete"] is True and final["failures"] == {"second": "RuntimeError: boom"}
    assert [r["x_vs_peft"] for r in final["rows"]] == [1.0, 2.0]


def test_components_with_targets_run_first():
    assert runner.discover()[:len(runner.FIRST)] == list(runner.FIRST)
