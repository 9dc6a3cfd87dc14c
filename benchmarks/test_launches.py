"""The committed launch counts (benchmarks/results/launches.json, ``python -m benchmarks --only
launches``): on every path ours launches at most PEFT's device operations, and the package's own
host syncs are 0 everywhere; and a recount of the smallest paths gives the committed numbers."""
import json
from pathlib import Path

import pytest

from benchmarks import bench_launches

RESULTS = Path(__file__).parent / "results" / "launches.json"


def _entries():
    return json.loads(RESULTS.read_text())["paths"]


def test_committed_counts_cover_every_path():
    entries = [(e["path"], e["step"]) for e in _entries()]
    assert len(set(entries)) == len(entries)
    assert {step for _, step in entries} == {"train", "eval", "decode"}
    for d in bench_launches.ENCODER["hidden"]:
        assert sum(path.startswith(f"prompt_encoder T=20 d={d} ") for path, _ in entries) == 2  # train, eval
    assert sum(path.startswith("prefix llama-7b") for path, _ in entries) == 2 * 2  # with/without projection
    assert sum(path.startswith("host") for path, _ in entries) == 4 * 3  # 2 routes x 2 kinds x 3 steps


def test_ours_launches_at_most_peft_and_makes_no_host_sync():
    entries = _entries()
    assert entries
    above = [(e["path"], e["step"], e["ours"], e["peft"]) for e in entries if e["ours"] > e["peft"]]
    assert above == []
    assert [(e["path"], e["step"], e["sync_sites"]) for e in entries if e["ours_syncs"]] == []


@pytest.mark.parametrize("group", ["prompt_encoder"])
def test_recount_gives_the_committed_numbers(group):
    committed = {(e["path"], e["step"]): (e["ours"], e["peft"], e["ours_syncs"]) for e in _entries()}
    for e in bench_launches.collect((group,)):
        assert (e["ours"], e["peft"], e["ours_syncs"]) == committed[(e["path"], e["step"])], e["path"]
