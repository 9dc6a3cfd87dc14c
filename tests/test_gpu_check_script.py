"""scripts/gpu_check.sh (the GPU machine's one command) plans and checks its tools anywhere, and
scripts/gpu_summary.py reads benchmark results against the targets, tolerating missing rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["env", "build", "tests", "memcheck", "racecheck", "bench", "summary"]
TOOLS = ["python", "pip", "pytest", "pytest-xdist", "torch", "triton", "pybind11", "ninja", "nvidia-smi", "nvcc",
         "compute-sanitizer", "timeout", "git"]


def test_dry_run_prints_the_plan_and_the_tools(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for stage in STAGES:
        assert f"stage {stage} " in text, stage
    for tool in TOOLS:  # each one either found or listed as missing
        assert any(line.split()[:2] in (["found", tool], ["MISSING", tool]) for line in text.splitlines()), tool
    assert "found    python" in text and "found    torch" in text  # this interpreter has torch
    assert "missing:" in text or "every tool is found" in text
    assert "-m benchmarks --tag gpu" in text and "compute-sanitizer --tool memcheck" in text
    assert not out.exists()  # a dry run writes nothing


def test_usage_errors():
    for args in ([], ["--dry-run"], ["a", "b"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "usage:" in done.stderr, args


def row(component, case, impl, ms, floor=None, peak=None, **extra):
    return {"component": component, "case": case, "impl": impl, "median_ms": ms, "floor_ms": floor,
            "peak_bytes": peak, "extra": extra}


def test_summary_against_targets(tmp_path):
    results = {"environment": {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0"},
               "failures": {"generate": "RuntimeError: boom"}, "complete": False,
               "rows": [
                   row("prompt_mlp", "T=20 d=768 h=768 B=8 fp32", "ptuning_fast", 0.1, floor=0.08),
                   row("prompt_mlp", "T=20 d=768 h=768 B=8 fp32", "peft_eager", 0.5),
                   row("prompt_mlp", "T=20 d=768 h=768 B=8 fp32", "peft_compile", 0.3),
                   row("prompt_mlp", "T=20 d=4096 h=4096 B=8 fp32", "ptuning_fast", 1.0, floor=0.5),
                   row("prompt_mlp", "T=20 d=4096 h=4096 B=8 fp32", "peft_eager", 2.0),
                   row("mask", "B=32 S=2048 P=128 bool", "ptuning_fast", 1.0),
                   row("mask", "B=32 S=2048 P=128 bool", "peft_eager", 2.0),
                   row("mask", "B=32 S=2048 P=128 positions", "ptuning_fast", 1.0),
                   row("train_step", "llm p_tuning B=8 S=512 T=20", "ptuning_fast", 10.0, peak=100 << 20),
                   row("train_step", "llm p_tuning B=8 S=512 T=20", "peft_eager", 12.0, peak=120 << 20),
               ]}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(results))
    stages = tmp_path / "stages.json"
    stages.write_text(json.dumps([{"name": "tests", "status": "ok", "exit_code": 0, "seconds": 100, "limit_s": 240}]))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), str(path), "--stages", str(stages)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    def line_of(case):
        return next(line for line in lines if f"| {case} |" in line)

    assert "| 5.00x | 3.00x | 1.25x |" in line_of("T=20 d=768 h=768 B=8 fp32") and "| met |" in line_of(
        "T=20 d=768 h=768 B=8 fp32")
    assert "| 2.00x | - | 2.00x |" in line_of("T=20 d=4096 h=4096 B=8 fp32")  # 2x PEFT, but 2x the floor
    assert "NOT met" in line_of("T=20 d=4096 h=4096 B=8 fp32")
    assert "| 2.00x |" in line_of("B=32 S=2048 P=128 bool") and "NOT met" in line_of("B=32 S=2048 P=128 bool")
    assert not any("positions" in line for line in lines if line.startswith("| mask"))
    assert "| 1.20x |" in line_of("llm p_tuning B=8 S=512 T=20") and "| 100 / 120 |" in line_of(
        "llm p_tuning B=8 S=512 T=20") and "| met |" in line_of("llm p_tuning B=8 S=512 T=20")
    assert any("no rows for: deep-prompt build" in line for line in lines)
    assert "- generate: RuntimeError: boom" in lines
    assert any(line.startswith("The benchmark run did not finish") and "'train_step'" in line for line in lines)
    assert "| tests | ok | 100 | 240 |" in lines


def test_summary_without_results(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_summary.py"), str(tmp_path / "gpu.json"),
                           "--stages", str(tmp_path / "stages.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "No benchmark results" in done.stdout
