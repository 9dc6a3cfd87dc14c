"""Checkpoints: safetensors and JSON only (no pickle, written or read), built whole in a hidden
folder and renamed into place, so that a job killed at any moment -- mid-step or mid-save --
resumes from its last complete checkpoint to the very adapter of an uninterrupted run."""
import contextlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.train.tiny import tiny_config, trainable_state

from ptuning_fast import train
from ptuning_fast.train import checkpoint
from ptuning_fast.train.checkpoint import CHECKPOINT_FILES, atomic_folder, latest_checkpoint
from ptuning_fast.train.job import Job


def _assert_same(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def _hidden(folder: Path) -> list:
    """Leftovers of writes (the lock of the folder's job is no leftover)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != checkpoint.LOCK_FILE)


def test_no_pickle_is_written_or_read(tiny_bert, small_data, tmp_path, monkeypatch):
    data, eval_data = small_data
    common = dict(data=data, eval_data=eval_data, steps=3, save_every=1, output_dir=str(tmp_path))

    def refused(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in [(torch, "save"), (torch, "load"), (torch.serialization, "save"),
                         (torch.serialization, "load"), (pickle, "dump"), (pickle, "dumps"), (pickle, "load"),
                         (pickle, "loads")]:
        monkeypatch.setattr(module, name, refused)
    straight = trainable_state(train.run(tiny_config(tiny_bert, **common)).model)
    files = {p.name for p in (tmp_path / "checkpoint-3").iterdir()}
    assert files >= {"adapter_config.json", "adapter_model.safetensors", *CHECKPOINT_FILES}
    assert all(name.endswith((".json", ".safetensors", ".md")) for name in files), files
    (tmp_path / "checkpoint-3").rename(tmp_path / "moved")
    resumed = train.run(tiny_config(tiny_bert, resume="latest", **common))
    assert resumed.summary["resumed_from_step"] == 2
    _assert_same(straight, trainable_state(resumed.model))


def test_a_failed_save_leaves_the_checkpoints_as_they_were(tiny_bert, small_data, tmp_path, monkeypatch):
    data, eval_data = small_data
    job = Job(tiny_config(tiny_bert, data=data, eval_data=eval_data, output_dir=str(tmp_path)))
    job.train_step(0)
    job.save(1)
    before = load_file(tmp_path / "checkpoint-1" / train.TRAINABLE_FILE)
    job.train_step(1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_optimizer", disk_full)
    for step in (2, 1):  # a new checkpoint, and a replacement of an existing one
        with pytest.raises(OSError, match="No space left"):
            job.save(step)
        assert latest_checkpoint(tmp_path).name == "checkpoint-1" and not _hidden(tmp_path)
        _assert_same(before, load_file(tmp_path / "checkpoint-1" / train.TRAINABLE_FILE))


def test_a_checkpoint_is_replaced_safely(tiny_bert, small_data, tmp_path, monkeypatch):
    data, eval_data = small_data
    config = tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=3, output_dir=str(tmp_path))
    job = Job(config)
    job.save(1)
    first = load_file(tmp_path / "checkpoint-1" / train.TRAINABLE_FILE)
    job.train_step(0)
    job.save(1)  # the same step again: replaced by the new state
    second = load_file(tmp_path / "checkpoint-1" / train.TRAINABLE_FILE)
    assert any(not torch.equal(first[k], second[k]) for k in first) and not _hidden(tmp_path)

    # Killed between moving the old folder aside and renaming the new one in: the old one counts.
    renames = []
    real_rename = os.rename

    def killed_at_second_rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt  # stands for the kill
        real_rename(src, dst)

    job.train_step(1)
    monkeypatch.setattr(os, "rename", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        job.save(1)
    monkeypatch.setattr(os, "rename", real_rename)
    aside = latest_checkpoint(tmp_path)
    assert aside.name.startswith(".checkpoint-1.old-") and not (tmp_path / "checkpoint-1").exists()
    _assert_same(second, load_file(aside / train.TRAINABLE_FILE))
    resumed = Job(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=3, output_dir=str(tmp_path),
                              resume="latest"))
    assert resumed.start_step == 1
    _assert_same(second, trainable_state(resumed.peft_model))
    with atomic_folder(tmp_path / "checkpoint-7"):  # the next write puts it back under its name
        pass
    assert latest_checkpoint(tmp_path).name == "checkpoint-1" and not _hidden(tmp_path)


def test_latest_checkpoint_ignores_incomplete_folders(tmp_path):
    for name, files in [("checkpoint-2", CHECKPOINT_FILES), ("checkpoint-9", CHECKPOINT_FILES[:-1]),
                        (".checkpoint-10.tmp-123", CHECKPOINT_FILES), ("checkpoint-x", CHECKPOINT_FILES),
                        ("checkpoint-11.bak", CHECKPOINT_FILES)]:
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text("")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(ValueError, match="`resume`: no checkpoint"):
        latest_checkpoint(tmp_path / "missing")
    with pytest.raises(TypeError, match="`output_dir` must be a path"):
        latest_checkpoint(None)


# ------------------------------------------------------------------------------------------------
# Killed at random moments, resumed until done: the adapter of an uninterrupted run, bit for bit
# ------------------------------------------------------------------------------------------------
# A fork server: it imports the package once (seconds), then runs each job in a forked child, in
# milliseconds. Each child pauses after each step and before syncing each checkpoint file, so that
# a kill can land inside a step or inside a save.
SERVER = """
import json, os, signal, sys, time, traceback
from ptuning_fast.train import checkpoint, job, main

def run(pause, argv, log, kill_in_replacement):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sync_file, train_step, rename = checkpoint._sync_file, job.Job.train_step, os.rename

    def rename_then_killed(src, dst):  # killed once an old checkpoint is moved aside for its replacement
        rename(src, dst)
        if ".old-" in os.path.basename(dst):
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_in_replacement:
        os.rename = rename_then_killed

    def slow_sync(path):
        time.sleep(pause)
        sync_file(path)

    def slow_step(self, step):
        train_step(self, step)
        time.sleep(pause)

    checkpoint._sync_file, job.Job.train_step = slow_sync, slow_step
    main(argv)

for line in sys.stdin:
    request = json.loads(line)
    if "argv" in request:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run(request["pause"], request["argv"], request["log"], request.get("kill_in_replacement", False))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        answer = pid
    else:  # {"wait": pid, "block": bool}: the exit code, or None while it runs
        pid, status = os.waitpid(request["wait"], 0 if request["block"] else os.WNOHANG)
        answer = os.waitstatus_to_exitcode(status) if pid else None
    print(json.dumps(answer), flush=True)
"""


class Forked:
    """A job run in a child of the fork server, driven like a ``subprocess.Popen``."""

    def __init__(self, server, pause: float, argv: list, log: Path, kill_in_replacement: bool = False):
        self.server, self.returncode = server, None
        self.pid = self._ask({"pause": pause, "argv": argv, "log": str(log),
                              "kill_in_replacement": kill_in_replacement})

    def _ask(self, request: dict):
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def poll(self):
        if self.returncode is None:
            self.returncode = self._ask({"wait": self.pid, "block": False})
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = self._ask({"wait": self.pid, "block": True})
        return self.returncode

    def kill(self):
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)  # no clean-up runs


STEPS = 8


def _complete_steps(folder: Path) -> set:
    steps = set()
    for path in folder.glob("checkpoint-*"):
        assert all((path / name).is_file() for name in CHECKPOINT_FILES), f"{path.name} is incomplete"
        steps.add(int(path.name.split("-")[1]))
    return steps


def _wait(condition, process, timeout=120.0) -> bool:
    """True once ``condition()`` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.005)
    return True


@contextlib.contextmanager
def _fork_server():
    """(server, processes): the fork server (SERVER) and a list for the jobs forked from it; on
    exit every listed job is killed and the server is shut down. One thread per job: several run
    at once."""
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    processes = []
    try:
        yield server, processes
    finally:
        for process in processes:
            process.kill()
            process.wait()
        server.stdin.close()
        server.wait()


def _finished(log_path: Path, process) -> bool:
    """True once ``process`` exits 0; else the test fails with the end of the jobs' log."""
    return process.wait() == 0 or pytest.fail(log_path.read_text()[-3000:])


def _job_flags(model, small_data) -> list:
    data, eval_data = small_data
    return ["--model", model, "--data", data, "--eval-data", eval_data, "--batch-size", "8", "--steps", str(STEPS),
            "--save-every", "1", "--num-virtual-tokens", "3", "--encoder-hidden-size", "16", "--lr", "1e-2",
            "--max-length", "24", "--eval-every", "0", "--device", "cpu", "--no-progress"]


def test_killed_runs_resume_to_the_adapter_of_an_uninterrupted_run(tiny_bert, small_data, tmp_path):
    flags = _job_flags(tiny_bert, small_data)
    log_path = tmp_path / "log.txt"
    with _fork_server() as (server, processes):
        def launch(pause, out, *extra):
            processes.append(Forked(server, pause, [*flags, "--output-dir", str(out), *extra], log_path))
            return processes[-1]

        reference = launch(0, tmp_path / "reference")  # meanwhile, the interrupted runs
        out = tmp_path / "killed"
        rng = random.Random(20240607)
        # A save lasts over 0.2 s (7 files, 0.03 s each): the first kill lands in one whatever the load.
        kills = [("save", 0.0), ("step", rng.uniform(0.0, 0.4)), ("save", rng.uniform(0.0, 0.1)),
                 ("step", rng.uniform(0.0, 0.4))]
        killed_in_a_save = 0
        for where, delay in kills:
            done = _complete_steps(out) if out.exists() else set()
            if STEPS in done:
                break
            process = launch(0.03, out, "--resume")  # one command line, whether a checkpoint exists yet or not
            in_save = lambda: any(out.glob(f".checkpoint-*.tmp-{process.pid}"))  # noqa: E731
            if where == "save":  # inside the next save
                reached = _wait(in_save, process)
            else:  # past start-up: once a new checkpoint is complete, at a random moment
                reached = _wait(lambda: len(_complete_steps(out)) > len(done), process)
            if reached:
                time.sleep(delay)
                process.kill()
            process.wait()
            killed_in_a_save += where == "save" and in_save()  # its half-built folder is still there
            _complete_steps(out)  # every checkpoint-STEP left behind is complete
        assert killed_in_a_save >= 1
        while STEPS not in _complete_steps(out):
            assert _finished(log_path, launch(0, out, "--resume"))
        assert _finished(log_path, reference)
    assert not _hidden(out)  # the leftovers of the killed saves were removed

    expected = load_file(tmp_path / "reference" / f"checkpoint-{STEPS}" / train.TRAINABLE_FILE)
    got = load_file(out / f"checkpoint-{STEPS}" / train.TRAINABLE_FILE)
    _assert_same(expected, got)
    assert any(not torch.equal(got[k], load_file(out / "checkpoint-1" / train.TRAINABLE_FILE)[k]) for k in got)


def test_killed_while_replacing_a_checkpoint_then_resumed_by_the_same_command(tiny_bert, small_data, tmp_path):
    """One command line, --resume included, from an empty folder: killed after its third checkpoint;
    that checkpoint then loses a file (the latest complete one is now step 2), so the next start
    replaces it, and is killed (SIGKILL) right after moving the old folder aside; the starts after
    that finish the run, to the adapter of an uninterrupted run, bit for bit. (With --resume taking
    the latest complete checkpoint, only an incomplete one is ever replaced by the same command.)"""
    out, log_path = tmp_path / "killed", tmp_path / "log.txt"
    with _fork_server() as (server, processes):
        def launch(out, *extra, pause=0.0, kill_in_replacement=False):
            argv = [*_job_flags(tiny_bert, small_data), "--output-dir", str(out), *extra]
            processes.append(Forked(server, pause, argv, log_path, kill_in_replacement))
            return processes[-1]

        reference = launch(tmp_path / "reference")
        first = launch(out, "--resume", pause=0.03)  # no checkpoint yet: starts from step 0
        assert _wait(lambda: (out / "checkpoint-3" / checkpoint.TRAINING_STATE_FILE).is_file(), first)
        first.kill()
        first.wait()
        for step in range(4, STEPS + 1):  # the kill may land after later saves: keep step 3 the latest
            shutil.rmtree(out / f"checkpoint-{step}", ignore_errors=True)
        (out / "checkpoint-3" / checkpoint.TRAINING_STATE_FILE).unlink()
        assert latest_checkpoint(out).name == "checkpoint-2"
        replacing = launch(out, "--resume", kill_in_replacement=True)
        assert replacing.wait() == -signal.SIGKILL, log_path.read_text()[-3000:]
        assert not (out / "checkpoint-3").exists() and any(out.glob(".checkpoint-3.old-*"))
        while STEPS not in _complete_steps(out):
            assert _finished(log_path, launch(out, "--resume"))
        assert _finished(log_path, reference)
    assert not _hidden(out)
    assert "no checkpoint in" in log_path.read_text()  # the first start said it started from step 0
    for step in (3, STEPS):
        _assert_same(load_file(tmp_path / "reference" / f"checkpoint-{step}" / train.TRAINABLE_FILE),
                     load_file(out / f"checkpoint-{step}" / train.TRAINABLE_FILE))


def test_two_jobs_started_on_one_output_folder(tiny_bert, small_data, tmp_path):
    """Started together on one --output-dir: one job runs, the other is refused at once, naming the
    folder and the job that holds it (before, they removed each other's temporary folders)."""
    data, eval_data = small_data
    out = tmp_path / "shared"
    flags = ["--model", tiny_bert, "--data", data, "--eval-data", eval_data, "--batch-size", "8", "--steps", "4",
             "--save-every", "1", "--num-virtual-tokens", "3", "--encoder-hidden-size", "16", "--max-length", "24",
             "--eval-every", "0", "--device", "cpu", "--no-progress", "--output-dir", str(out)]
    log_path = tmp_path / "log.txt"
    with _fork_server() as (server, processes):
        processes += [Forked(server, 0.2, flags, log_path) for _ in range(2)]  # 0.2 s a step: they overlap
        codes = sorted(job.wait() for job in processes)
    log = log_path.read_text()
    assert codes == [0, 1], log[-3000:]
    refusals = [line for line in log.splitlines() if line.startswith("ValueError: `output_dir`")]
    assert len(refusals) == 1 and "is in use by another job (process " in refusals[0], log[-3000:]
    assert _complete_steps(out) == {1, 2, 3, 4} and not _hidden(out)
