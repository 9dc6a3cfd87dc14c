"""The job's output folder: links planted in it are replaced, never written through, and never
followed out of it when resuming."""
import json
import os

import pytest
from tests.train.tiny import tiny_config

from ptuning_fast import train
from ptuning_fast.train.checkpoint import TRAINABLE_FILE
from ptuning_fast.train.job import Job


def test_a_linked_summary_is_replaced_not_written_through(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    outside = tmp_path / "outside.json"
    outside.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(outside, out / "summary.json")
    train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=1, output_dir=str(out)))
    assert outside.read_text() == "keep me"
    assert not (out / "summary.json").is_symlink() and json.loads((out / "summary.json").read_text())["steps"] == 1


def test_a_linked_checkpoint_folder_is_replaced_on_save_and_refused_on_resume(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(elsewhere, out / "checkpoint-1")
    job = Job(tiny_config(tiny_bert, data=data, eval_data=eval_data, output_dir=str(out)))
    job.train_step(0)
    job.save(1)
    assert os.listdir(elsewhere) == ["mine.txt"]
    assert not (out / "checkpoint-1").is_symlink() and (out / "checkpoint-1" / TRAINABLE_FILE).is_file()

    (out / "checkpoint-1").rename(tmp_path / "moved")
    os.symlink(tmp_path / "moved", out / "checkpoint-1")
    with pytest.raises(ValueError, match="checkpoint-1' is a link; checkpoints are read only from inside"):
        Job(tiny_config(tiny_bert, data=data, eval_data=eval_data, output_dir=str(out), resume="latest"))


def test_resume_refuses_a_checkpoint_file_linked_out_of_its_folder(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    out = tmp_path / "run"
    train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=2, save_every=1, output_dir=str(out)))
    planted = out / "checkpoint-1" / TRAINABLE_FILE
    planted.rename(tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", planted)
    (out / "checkpoint-2").rename(tmp_path / "later")
    with pytest.raises(ValueError, match=f"checkpoint-1/{TRAINABLE_FILE} is a link out of .*checkpoint-1: refusing"):
        train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=2, output_dir=str(out),
                              resume="latest"))
