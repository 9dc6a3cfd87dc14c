"""The committed launch counts (benchmarks/results/launches.json, ``python -m benchmarks --only
launches``): on every path ours launches at most PEFT's device operations, except where a reason
is stated below, and the package's own host syncs are 0 everywhere; and a recount of the smallest
paths gives the committed numbers."""
import json
from pathlib import Path

import pytest

from benchmarks import bench_launches

RESULTS = Path(__file__).parent / "results" / "launches.json"

# (path prefix, step) -> why ours may launch more than PEFT there.
ABOVE_PEFT = {
    ("host native", "train"): "the native model numbers positions as each row computes alone (positions="
                              "'continue') and packs a padded batch for it; PEFT counts padding. The "
                              "accelerated route (PEFT's semantics) is the like-for-like comparison",
    ("host native", "eval"): "as for the native training step",
}


def _entries():
    return json.loads(RESULTS.read_text())["paths"]


def _reason(entry):
    return next((why for (prefix, step), why in ABOVE_PEFT.items()
                 if entry["path"].startswith(prefix) and entry["step"] == step), None)


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
    above = [(e["path"], e["step"], e["ours"], e["peft"]) for e in entries if e["ours"] > e["peft"] and not _reason(e)]
    assert above == []
    assert [(e["path"], e["step"], e["sync_sites"]) for e in entries if e["ours_syncs"]] == []


@pytest.mark.parametrize("group", ["prompt_encoder"])
def test_recount_gives_the_committed_numbers(group):
    committed = {(e["path"], e["step"]): (e["ours"], e["peft"], e["ours_syncs"]) for e in _entries()}
    for e in bench_launches.collect((group,)):
        assert (e["ours"], e["peft"], e["ours_syncs"]) == committed[(e["path"], e["step"])], e["path"]
