"""The job's output folder: links planted in it are replaced, never written through, and never
followed out of it when resuming; one job at a time uses it; a new run does not mix with an
earlier one's checkpoints; ``--resume`` with no checkpoint yet starts from step 0."""
import json
import os
import subprocess
import sys

import pytest
import torch
from tests.train.tiny import tiny_config, trainable_state

from ptuning_fast import train
from ptuning_fast.train import checkpoint
from ptuning_fast.train.checkpoint import LOCK_FILE, TRAINABLE_FILE
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
    job = Job(tiny_config(tiny_bert, data=data, eval_data=eval_data, output_dir=str(out)))
    os.symlink(elsewhere, out / "checkpoint-1")  # planted while the job runs
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


# ------------------------------------------------------------------------------------------------
# One job per folder; a new run never mixes with an earlier one
# ------------------------------------------------------------------------------------------------
# Another process holding the folder's lock as a job does (flock on .job.lock, its pid inside); plain
# Python, so that it starts in milliseconds.
HOLDER = """
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], sys.argv[2]), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_process_cannot_use_a_locked_output_folder_until_its_holder_dies(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), LOCK_FILE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=1, output_dir=str(out))
        with pytest.raises(ValueError, match=f"is in use by another job \\(process {holder.pid}\\): one job per "
                                             "output folder"):
            train.run(config)
        assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written by the refused job
    finally:
        holder.kill()  # killed: no clean-up runs, the system drops its lock
        holder.wait()
    assert train.run(config).summary["steps"] == 1
    assert str(out.resolve()) not in checkpoint._locks  # released when the run ended


def test_jobs_of_one_process_take_the_folder_in_turn(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    config = tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=2, save_every=1, output_dir=str(tmp_path))
    first = Job(config)
    first.train_step(0)
    first.save(1)
    second = Job(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=2, output_dir=str(tmp_path),
                             resume="latest"))
    assert second.start_step == 1
    first.close(), second.close(), second.close()  # released once each, the last frees the folder
    assert str(tmp_path.resolve()) not in checkpoint._locks


def test_a_new_run_into_an_earlier_runs_folder_needs_overwrite(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    common = dict(data=data, eval_data=eval_data, steps=2, save_every=1, output_dir=str(tmp_path))
    train.run(tiny_config(tiny_bert, lr=1e-2, **common))
    with pytest.raises(ValueError, match="holds an earlier run's checkpoint-1, checkpoint-2: pass --overwrite to "
                                         "replace them, --resume to continue that run"):
        train.run(tiny_config(tiny_bert, lr=5e-2, **common))
    overwritten = train.run(tiny_config(tiny_bert, lr=5e-2, overwrite=True, **{**common, "steps": 3}))
    fresh = train.run(tiny_config(tiny_bert, lr=5e-2, **{**common, "steps": 3, "output_dir": str(tmp_path / "b")}))
    expected, got = trainable_state(fresh.model), trainable_state(overwritten.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert json.loads((tmp_path / "checkpoint-1" / "training_state.json").read_text())["config"]["lr"] == 5e-2
    with pytest.raises(ValueError, match="`overwrite` and `resume` do not combine"):
        tiny_config(tiny_bert, overwrite=True, resume="latest", output_dir=str(tmp_path))
    assert train.parse_args(["--overwrite"]).overwrite is True


def test_resume_with_no_checkpoint_yet_starts_from_step_zero(tiny_bert, small_data, tmp_path, capsys):
    data, eval_data = small_data
    common = dict(data=data, eval_data=eval_data, steps=2, progress=False)
    resumed = train.run(tiny_config(tiny_bert, output_dir=str(tmp_path / "a"), resume="latest", **common))
    lines = [line for line in capsys.readouterr().out.splitlines() if "no checkpoint" in line]
    assert lines == [f"--resume: no checkpoint in {tmp_path / 'a'} yet: starting from step 0"]
    assert resumed.summary["resumed_from_step"] == 0
    fresh = train.run(tiny_config(tiny_bert, output_dir=str(tmp_path / "b"), **common))
    expected, got = trainable_state(fresh.model), trainable_state(resumed.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(ValueError, match="is not a checkpoint of this job"):  # a named folder must exist
        train.run(tiny_config(tiny_bert, resume=str(tmp_path / "missing"), **common))


def test_a_lock_file_that_is_a_folder_or_a_link_is_handled(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / LOCK_FILE).mkdir()
    with pytest.raises(ValueError, match="cannot open its lock file"):
        checkpoint.lock_output_dir(tmp_path / "a")
    (tmp_path / "b").mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    os.symlink(outside, tmp_path / "b" / LOCK_FILE)
    release = checkpoint.lock_output_dir(tmp_path / "b")
    release()
    assert outside.read_text() == "keep me" and not (tmp_path / "b" / LOCK_FILE).is_symlink()
