"""The job's files: the output folder, and its resumable checkpoints.

``OUTPUT_DIR/checkpoint-STEP/`` holds, written with safetensors and JSON only (nothing is pickled):

- ``adapter_config.json`` + ``adapter_model.safetensors``: the PEFT adapter
  (``PeftModel.from_pretrained`` loads it);
- ``trainable_state.safetensors``: every trained tensor (the full prompt encoder, which PEFT's
  adapter lacks, and the classifier head);
- ``optimizer.safetensors``: the optimizer's state tensors, its param groups as JSON metadata;
- ``rng_state.safetensors``: the RNG states, as uint8 tensors;
- ``training_state.json``: the step, the job's options and its labels.

A checkpoint is built whole in a hidden sibling folder, synced to disk, then renamed into place,
so a process killed at any moment leaves every earlier checkpoint loadable and no half-written
``checkpoint-STEP``; a link planted at its name is replaced, and resuming refuses a linked
checkpoint or a file linked out of it. Resuming checks every file (header, dtypes, shapes, finite
values, the JSON's keys) before restoring anything.

One job uses an output folder at a time: it holds an ``flock`` on ``OUTPUT_DIR/.job.lock``, which
the system drops when the job's process ends, however it ends.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one job per folder is then the user's to keep
    fcntl = None

import torch

from .._files import check_inside
from ..native.checkpoint import (check_optimizer_matches, read_header, read_json, read_tensors, save_optimizer,
                                 write_json, write_safetensors)
from .config import TrainConfig, check_config, default_learning_rate
from .model import trainable_parameters

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable_state.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng_state.safetensors"
TRAINING_STATE_FILE = "training_state.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE, TRAINING_STATE_FILE)
FORMAT_VERSION = 1
# Options that must match between a checkpoint and the job resuming from it: every option that
# changes the training trajectory (model, prompts, data and its split, batches, learning rate and
# its warm-up, optimizer, precision, seed). Not: evaluation, saving, output, backend and device
# choices; nor the run's length (`epochs`, `steps`), so that `--epochs 2 --resume` extends a
# finished run (its schedule then spans the new length).
RESUME_MUST_MATCH = ("model", "task", "prompt", "num_virtual_tokens", "encoder_type", "encoder_hidden_size",
                     "prefix_projection", "init_text", "data", "eval_data", "eval_fraction", "text_column",
                     "label_column", "tasks", "template", "max_length", "batch_size", "head_steps", "lr", "optimizer",
                     "weight_decay", "warmup_ratio", "max_grad_norm", "precision", "seed")
# Hidden siblings of a folder being written: ".NAME.tmp-PID" (incomplete) and ".NAME.old-PID" (a
# complete folder of the same name, moved aside while its replacement is renamed into place).
_SIBLING = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-\d+")
_CHECKPOINT = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(?P<step>\d+)")


# ------------------------------------------------------------------------------------------------
# The output folder
# ------------------------------------------------------------------------------------------------
def _check_path(path, name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"`{name}` must be a path, got {path!r}")
    return Path(path)


def check_output_dir(path) -> Path:
    """Create ``path`` if needed and make sure files can be written in it; raise a ValueError
    naming it otherwise (a file, a folder under a file, no permission, a read-only disk)."""
    folder = _check_path(path, "output_dir")
    try:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing == folder and not folder.is_dir():
            raise ValueError(f"`output_dir` {str(folder)!r} is a file, not a folder")
        if not existing.is_dir():
            raise ValueError(f"`output_dir` {str(folder)!r} cannot be created: {str(existing)!r} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # the one reliable test of writability (ACLs, read-only mounts)
            pass
    except OSError as err:
        raise ValueError(f"`output_dir` {str(folder)!r} is not writable: {err.strerror or err}") from None
    return folder


# One job per output folder: an exclusive lock (fcntl.flock) on OUTPUT_DIR/.job.lock, held until the job
# closes or its process ends (the system drops a killed process's lock, so its successor takes over).
LOCK_FILE = ".job.lock"
_locks: dict = {}  # real path of a locked folder -> [fd, holders in this process]


def lock_output_dir(path) -> Callable[[], None]:
    """Lock the output folder ``path`` for this process; returns the function that releases it
    (several jobs of one process may hold it one after another). Another live process holding it:
    a ValueError naming the folder and that process."""
    folder = _check_path(path, "output_dir")
    key = os.path.realpath(folder)
    if key not in _locks:
        lock_path = folder / LOCK_FILE
        if lock_path.is_symlink():  # never ours: replaced, not followed
            lock_path.unlink()
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            raise ValueError(f"`output_dir`: cannot open its lock file {str(lock_path)!r}: {err.strerror or err}") \
                from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"`output_dir` {str(folder)!r} is in use by another job (process {holder}): one job "
                             "per output folder at a time; wait for it, or use another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _locks[key] = [fd, 0]
    _locks[key][1] += 1
    released = []

    def release() -> None:
        if released:
            return
        released.append(True)
        entry = _locks[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _locks[key]
            os.close(entry[0])  # drops the lock

    return release


def earlier_run_files(output_dir) -> list[Path]:
    """The checkpoints an earlier run left in ``output_dir`` (complete, moved aside or half written):
    what a later ``--resume`` would continue from."""
    folder = _check_path(output_dir, "output_dir")
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        sibling = _SIBLING.fullmatch(entry.name)
        if _CHECKPOINT.fullmatch(entry.name) or (sibling and _CHECKPOINT.fullmatch(sibling["name"])):
            found.append(entry)
    return found


def remove_earlier_run(output_dir) -> None:
    """Remove what :func:`earlier_run_files` finds, and the summary (``--overwrite``)."""
    summary = _check_path(output_dir, "output_dir") / SUMMARY_FILE
    for entry in earlier_run_files(output_dir) + ([summary] if os.path.lexists(summary) else []):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# ------------------------------------------------------------------------------------------------
# Folders written whole
# ------------------------------------------------------------------------------------------------
def _sync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows) cannot sync one either
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tidy(parent: Path) -> None:
    """Remove what killed writes left in ``parent``: incomplete folders, and moved-aside complete
    ones whose replacement exists (one whose replacement never arrived is moved back)."""
    for entry in parent.iterdir():
        match = _SIBLING.fullmatch(entry.name)
        if match is None:
            continue
        if entry.is_symlink():  # never ours: removed, not followed
            entry.unlink()
        elif not entry.is_dir():
            continue
        elif match["kind"] == "old" and not (parent / match["name"]).exists():
            os.rename(entry, parent / match["name"])
        else:
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(folder):
    """Yield a temporary sibling of ``folder`` to fill; when the block ends without error, sync it
    to disk and rename it to ``folder`` (replacing a folder of that name). Killed before the
    rename, ``folder`` is as it was; the next write removes the leftovers."""
    folder = _check_path(folder, "folder")
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    _tidy(parent)
    temporary = parent / f".{folder.name}.tmp-{os.getpid()}"
    temporary.mkdir()
    try:
        yield temporary
        for root, _, files in os.walk(temporary):
            for name in files:
                _sync_file(os.path.join(root, name))
            _sync_folder(root)
        if folder.is_symlink():  # replaced, never written through
            os.unlink(folder)
        if folder.exists():  # no atomic swap of two folders: move the old one aside, complete, first
            aside = parent / f".{folder.name}.old-{os.getpid()}"
            os.rename(folder, aside)
            os.rename(temporary, folder)
            _sync_folder(parent)
            shutil.rmtree(aside)
        else:
            os.rename(temporary, folder)
            _sync_folder(parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # only left there on error


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def checkpoint_folder(output_dir, step: int) -> Path:
    """``OUTPUT_DIR/checkpoint-STEP``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be a non-negative int, got {step!r}")
    return _check_path(output_dir, "output_dir") / f"{CHECKPOINT_PREFIX}{step}"


def find_latest_checkpoint(output_dir) -> Optional[Path]:
    """The complete ``checkpoint-STEP`` folder with the largest STEP in ``output_dir`` (a complete
    one moved aside by a save killed while replacing it counts, under its hidden name); None when
    there is none."""
    output_dir = _check_path(output_dir, "output_dir")
    found = {}
    entries = sorted(output_dir.iterdir()) if output_dir.is_dir() else []
    for path in entries:
        match = _CHECKPOINT.fullmatch(path.name)
        if match and path.is_symlink():
            raise ValueError(f"`resume`: {str(path)!r} is a link; checkpoints are read only from inside "
                             f"{str(output_dir)!r}")
        if match and all((path / name).is_file() for name in CHECKPOINT_FILES):
            found[int(match["step"])] = path
    for path in entries:
        sibling = _SIBLING.fullmatch(path.name)
        match = sibling and sibling["kind"] == "old" and _CHECKPOINT.fullmatch(sibling["name"])
        if match and int(match["step"]) not in found and not path.is_symlink() \
                and all((path / n).is_file() for n in CHECKPOINT_FILES):
            found[int(match["step"])] = path
    return found[max(found)] if found else None


def latest_checkpoint(output_dir) -> Path:
    """:func:`find_latest_checkpoint`, or a ValueError when ``output_dir`` holds none."""
    found = find_latest_checkpoint(output_dir)
    if found is None:
        raise ValueError(f"`resume`: no checkpoint ({CHECKPOINT_PREFIX}STEP with {TRAINING_STATE_FILE}) in "
                         f"{str(output_dir)!r}")
    return found


def save_trainable_state(model, path) -> None:
    """Every trained tensor of ``model`` (by its name in the model) into one safetensors file."""
    state = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable_parameters(model).items()}
    write_safetensors(state, str(_check_path(path, "path")))


def save_checkpoint(folder, peft_model, optimizer, step: int, config: TrainConfig, labels: list) -> None:
    """PEFT adapter + full trainable state + optimizer, RNG, step, options and labels, written
    whole into ``folder`` (main process only)."""
    check_config(config)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with atomic_folder(folder) as temporary:
        peft_model.save_pretrained(str(temporary))
        save_trainable_state(peft_model, temporary / TRAINABLE_FILE)
        save_optimizer(optimizer, str(temporary / OPTIMIZER_FILE), peft_model)
        write_safetensors(rng, str(temporary / RNG_FILE))
        write_json({"format": FORMAT_VERSION, "step": step, "config": config.to_dict(), "labels": labels},
                   str(temporary / TRAINING_STATE_FILE))


def read_training_state(path) -> dict:
    """``training_state.json``, checked: a JSON object with ``step`` (an int >= 0), ``config`` (an
    object) and ``labels`` (a list), each error naming the file and key."""
    saved = read_json(str(path))
    if not isinstance(saved, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(saved).__name__}")
    for key, kind, what in (("step", int, "an int"), ("config", dict, "an object"), ("labels", list, "a list")):
        if key not in saved:
            raise ValueError(f"{path} has no {key!r}: not a complete checkpoint")
        if not isinstance(saved[key], kind) or isinstance(saved[key], bool):
            raise ValueError(f"{path}: {key!r} must be {what}, got {saved[key]!r}")
    if saved["step"] < 0:
        raise ValueError(f"{path}: 'step' must be >= 0, got {saved['step']}")
    return saved


def read_rng_state(path: str) -> dict:
    """The RNG states in ``path``, checked to be the uint8 states of this torch build."""
    expected = {"cpu": tuple(torch.get_rng_state().shape)}
    header, _ = read_header(path)
    if "cuda" in header:
        expected["cuda"] = tuple(torch.cuda.get_rng_state().shape) if torch.cuda.is_available() else None
    return read_tensors(path, expected, dtypes=("U8",), finite=False)


def _trajectory_options(options: dict) -> dict:
    """The options of :data:`RESUME_MUST_MATCH` in ``options`` (a job's ``to_dict()``), the
    learning rate as the run uses it (``lr`` omitted: the prompt kind's default)."""
    values = {key: options.get(key) for key in RESUME_MUST_MATCH}
    if values["lr"] is None and isinstance(options.get("prompt"), str):
        values["lr"] = default_learning_rate(options["prompt"], bool(options.get("prefix_projection")))
    return values


def load_checkpoint(folder, peft_model, optimizer, config: TrainConfig, labels: list) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from."""
    check_config(config)
    folder = _check_path(folder, "folder")
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            raise ValueError(f"`resume`: {str(folder)!r} is not a checkpoint of this job (no {name})")
        check_inside(str(folder / name), str(folder))
    saved = read_training_state(folder / TRAINING_STATE_FILE)
    before, now = _trajectory_options(saved["config"]), _trajectory_options(config.to_dict())
    mismatched = [k for k in RESUME_MUST_MATCH if before[k] != now[k]]
    if mismatched:
        raise ValueError("`resume`: the checkpoint was made with different options: " + ", ".join(
            f"{k}={before[k]!r} (now {now[k]!r})" for k in mismatched) + ". Resume with the checkpoint's options, "
            "or start a new run (--overwrite, or another --output-dir)")
    if [str(label) for label in saved["labels"]] != list(labels):
        raise ValueError(f"`resume`: the checkpoint's labels {saved['labels']} differ from the data's {labels}")
    params = trainable_parameters(peft_model)
    state = read_tensors(str(folder / TRAINABLE_FILE), {name: p.shape for name, p in params.items()})
    optimizer_file = str(folder / OPTIMIZER_FILE)
    optimizer_state = check_optimizer_matches(optimizer, optimizer_file, peft_model)
    if saved["step"] > 0 and not optimizer_state["state"]:
        raise ValueError(f"{optimizer_file} holds no optimizer state, but the checkpoint is at step {saved['step']}")
    rng = read_rng_state(str(folder / RNG_FILE))
    with torch.no_grad():  # every file checked: now restore
        for name, p in params.items():
            p.copy_(state[name])
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(saved["step"])


__all__ = ["CHECKPOINT_FILES", "CHECKPOINT_PREFIX", "LOCK_FILE", "OPTIMIZER_FILE", "RNG_FILE", "SUMMARY_FILE",
           "TRAINABLE_FILE", "TRAINING_STATE_FILE", "atomic_folder", "check_output_dir", "checkpoint_folder",
           "earlier_run_files", "find_latest_checkpoint", "latest_checkpoint", "load_checkpoint", "lock_output_dir",
           "read_rng_state", "read_training_state", "remove_earlier_run", "save_checkpoint", "save_trainable_state"]
