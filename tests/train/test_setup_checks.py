"""What the job refuses before it trains (an output folder it cannot write, a prompt and text
longer than the model's positions), what it reads the same whatever the file (labels), and how
its command line describes itself."""
import argparse
import json
import os
import re

import pytest
from tests.train.tiny import tiny_config

from ptuning_fast import train
from ptuning_fast.data import sentiment_examples
from ptuning_fast.train import TrainConfig
from ptuning_fast.train import job as job_module
from ptuning_fast.train.config import build_parser
from ptuning_fast.train.data import label_names
from ptuning_fast.train.job import Job


def _refuse(what):
    def refused(*args, **kwargs):
        raise AssertionError(f"{what} before the check")
    return refused


# ------------------------------------------------------------------------------------------------
# The output folder: checked before any data or model is loaded
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def nothing_loads(monkeypatch):
    monkeypatch.setattr(Job, "load_splits", _refuse("data loaded"))
    monkeypatch.setattr(job_module, "load_tokenizer", _refuse("tokenizer loaded"))


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, nothing_loads):
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    message = f"`output_dir` '{re.escape(str(path))}' is a file, not a folder"
    with pytest.raises(ValueError, match=message):
        train.run(TrainConfig(output_dir=str(path), device="cpu", progress=False))
    with pytest.raises(ValueError, match=message):  # and from the command line
        train.main(["--output-dir", str(path), "--device", "cpu", "--no-progress"])


def test_an_output_dir_under_a_file_is_refused(tmp_path, nothing_loads):
    # Also the permission case where tests run as root (root writes through folder permissions).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = blocker / "runs" / "one"
    with pytest.raises(ValueError, match=f"`output_dir` '{re.escape(str(path))}' cannot be created: "
                                         f"'{re.escape(str(blocker))}' is a file"):
        train.run(TrainConfig(output_dir=str(path), device="cpu", progress=False))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes through folder permissions; the folder-under-a-file test covers the refusal")
def test_an_output_dir_without_write_permission_is_refused(tmp_path, nothing_loads):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for path in (locked, locked / "run"):
            with pytest.raises(ValueError, match=f"`output_dir` '{re.escape(str(path))}' is not writable"):
                train.run(TrainConfig(output_dir=str(path), device="cpu", progress=False))
    finally:
        locked.chmod(0o700)


def test_a_missing_output_dir_is_created(tmp_path, tiny_bert, small_data):
    data, eval_data = small_data
    path = tmp_path / "new" / "run"
    train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=1, output_dir=str(path)))
    assert (path / "summary.json").is_file() and (path / "checkpoint-1").is_dir()


# ------------------------------------------------------------------------------------------------
# Prompt + text longer than the model's learned positions
# ------------------------------------------------------------------------------------------------
def test_prompts_beyond_the_models_positions_are_refused_before_training(monkeypatch):
    monkeypatch.setattr(Job, "train_step", _refuse("trained"))
    with pytest.raises(ValueError, match=r"`num_virtual_tokens` \+ `max_length` = 600 \+ 64 = 664 positions: .*"
                                         r"max_position_embeddings=512"):
        train.run(TrainConfig(num_virtual_tokens=600, steps=1, device="cpu", progress=False))  # MiniLM: 512


@pytest.mark.parametrize("prompt", ["v1", "v2"])
def test_the_position_check_is_exact(tiny_bert, small_data, prompt):
    data, eval_data = small_data  # the tiny BERT has 128 positions; texts of up to 24 tokens
    common = dict(data=data, eval_data=eval_data, prompt=prompt, steps=1, max_length=24)
    train.run(tiny_config(tiny_bert, num_virtual_tokens=104, **common))  # 104 + 24 = 128 positions: fits
    with pytest.raises(ValueError, match=r"105 \+ 24 = 129 positions: .*max_position_embeddings=128"):
        train.run(tiny_config(tiny_bert, num_virtual_tokens=105, **common))


# ------------------------------------------------------------------------------------------------
# Labels: 1 (an int in JSONL) and "1" are one class
# ------------------------------------------------------------------------------------------------
def test_int_and_str_labels_are_one_class(tiny_bert, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = []
    for i, e in enumerate(sentiment_examples("train")[:48]):
        label = 1 if e["label"] == "positive" else 0
        rows.append({"text": e["text"], "label": label if i % 2 else str(label)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    config = tiny_config(tiny_bert, data=str(path), steps=2, save_every=1, output_dir=str(out))
    result = train.run(config)
    assert result.model.config.num_labels == 2
    assert json.loads((out / "checkpoint-1" / train.TRAINING_STATE_FILE).read_text())["labels"] == ["0", "1"]
    resumed = train.run(tiny_config(tiny_bert, data=str(path), steps=2, output_dir=str(out),
                                    resume=str(out / "checkpoint-1")))
    assert resumed.summary["resumed_from_step"] == 1


def test_label_names_are_str_in_a_readable_order():
    examples = [{"label": label} for label in (10, "2", "b", 2, "a", "10", "-1")]
    assert label_names(examples, [{"label": 2}, {"label": "2"}]) == ["-1", "2", "10", "a", "b"]
    with pytest.raises(ValueError, match=r"eval labels \['3'\] do not occur"):
        label_names(examples, [{"label": 3}])
    with pytest.raises(TypeError, match="`label` values must be str or int, got True"):
        label_names([{"label": True}, {"label": 1}], [])
    with pytest.raises(TypeError, match="`train` must be a list of dicts"):
        label_names("labels", [])


# ------------------------------------------------------------------------------------------------
# --help
# ------------------------------------------------------------------------------------------------
def test_help_shows_defaults_only_where_they_read_right(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for wrong in ("(default: True)", "(default: False)", "(default: None)"):
        assert wrong not in text
    assert "--no-progress hide the progress bar (shown unless given)" in text
    assert "--batch-size BATCH_SIZE global batch, split over ranks (default: 32)" in text
    assert "--lr LR learning rate (default: 1e-2 for v1, 3e-2 for v2, 3e-4 with --prefix-projection)" in text
    for action in build_parser()._actions:  # every option with a value for a default names it
        if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, action.dest
    with pytest.raises(TypeError, match="`argv` must be a list of str"):
        train.parse_args("--help")


def test_python_m_runs_the_job(capsys, monkeypatch):
    """``python -m ptuning_fast.train`` (and ``torchrun -m``, which runs modules the same way)."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["ptuning_fast.train", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("ptuning_fast.train", run_name="__main__")
    assert exit_info.value.code == 0 and "usage: ptuning-fast train" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# The building blocks name their bad arguments
# ------------------------------------------------------------------------------------------------
def test_building_blocks_name_their_bad_arguments(tmp_path):
    import torch

    from ptuning_fast.train import checkpoint, data, loss, model, optim, processes

    config = TrainConfig()
    encoded = data.Encoded([[1, 2, 3]], [0], [3])
    cases = [
        (lambda: data.load_examples({"data": None}), TypeError, "`config` must be a TrainConfig"),
        (lambda: data.encode_examples([{"text": "a"}], ["x"], None, config), TypeError, "`examples` must be a list"),
        (lambda: data.encode_examples([{"text": "a", "label": "y"}], ["x"], None, config), ValueError,
         r"labels \['y'\] that are not in `labels`"),
        (lambda: data.make_batch(encoded, [], 0, torch.device("cpu"), pad_to=3), ValueError, "`indices` must name"),
        (lambda: data.make_batch(encoded, [0], 0, torch.device("cpu"), pad_to=2), ValueError,
         r"`pad_to` \(2\) is shorter than the longest example \(3 tokens\)"),
        (lambda: data.count_targets(encoded, [0], "regression"), ValueError, "`task` must be"),
        (lambda: data.global_batch(10, 0, 0, 0), ValueError, "`batch_size` must be a positive int"),
        (lambda: data.global_batch(10, 20, 0, 0), ValueError, r"`batch_size` \(20\) is larger than `num_examples`"),
        (lambda: data.epoch_order(10, -1, 0), ValueError, "`epoch` must be a non-negative int"),
        (lambda: data.pool({}), TypeError, "`parts` must be a non-empty dict"),
        (lambda: model.resolve_model(""), TypeError, "`name` must be a non-empty str"),
        (lambda: model.check_prompt_fits("model", config), TypeError, "`model` must be a torch.nn.Module"),
        (lambda: model.is_prompt_parameter(3), TypeError, "`name` must be a str"),
        (lambda: loss.row_losses(torch.zeros(2, 3), {"input_ids": 0}, "classification"), TypeError,
         "`batch` must be a dict with"),
        (lambda: optim.make_optimizer([], config), ValueError, "`params` must be a non-empty list"),
        (lambda: optim.learning_rate_at(5, 5, config), ValueError, r"`step` must be an int in \[0, total_steps\)"),
        (lambda: processes.uses_bf16(config, "cuda"), TypeError, "`device` must be a torch.device"),
        (lambda: processes.all_reduce_gradients([], 0), ValueError, "`world_size` must be a positive int"),
        (lambda: processes.Distributed(0, 1, torch.device("cpu")).all_reduce(torch.zeros(1), "mean"), ValueError,
         "`op` must be 'sum' or 'max'"),
        (lambda: checkpoint.checkpoint_folder(tmp_path, -1), ValueError, "`step` must be a non-negative int"),
        (lambda: checkpoint.check_output_dir(""), TypeError, "`output_dir` must be a path"),
        (lambda: checkpoint.load_checkpoint(tmp_path, None, None, config, []), ValueError,
         "is not a checkpoint of this job"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
