"""A corrupt checkpoint is refused with an error naming the file and the key, before anything of
the model, the optimizer or the RNG is restored: every file missing, empty, truncated, of a wrong
dtype or shape, non-finite, with an extra key; the JSON without its keys."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.train.tiny import tiny_config, trainable_state

from ptuning_fast.train.checkpoint import (CHECKPOINT_FILES, OPTIMIZER_FILE, RNG_FILE, TRAINABLE_FILE,
                                           TRAINING_STATE_FILE, load_checkpoint)
from ptuning_fast.train.job import Job


@pytest.fixture(scope="module")
def job_and_checkpoint(tiny_bert, small_data, tmp_path_factory):
    data, eval_data = small_data
    out = tmp_path_factory.mktemp("run")
    job = Job(tiny_config(tiny_bert, data=data, eval_data=eval_data, output_dir=str(out)))
    job.train_step(0)
    job.save(1)
    return job, out / "checkpoint-1"


def _metadata(path):
    with safe_open(path, "pt") as handle:
        return handle.metadata()


def _edit_tensors(edit):
    def apply(path):
        tensors, metadata = load_file(path), _metadata(path)
        edit(tensors)
        save_file(tensors, path, metadata=metadata)
    return apply


def _first(tensors, suffix=""):
    return next(k for k in sorted(tensors) if k.endswith(suffix) and tensors[k].dim() > 0)


def _tensor_cases(file, suffix):
    """Wrong dtype, NaN, cut shape and an extra key in the first tensor named ``*suffix``."""
    def replace(make):
        return _edit_tensors(lambda t: t.__setitem__(_first(t, suffix), make(t[_first(t, suffix)])))

    extra = "state.0.extra" if suffix else "extra"
    return [
        (file, "int64", replace(lambda v: v.long()), "tensor '.*' is I64; expected one of"),
        (file, "nan", replace(lambda v: v.clone().fill_(float("nan"))), "tensor '.*' holds NaN or Inf"),
        (file, "cut", replace(lambda v: v[..., :1].contiguous()), "tensor '.*' has shape"),
        (file, "extra key", _edit_tensors(lambda t: t.__setitem__(extra, torch.ones(3))),
         "tensor 'state.0.extra' has shape \\(3,\\)" if suffix else "unexpected \\['extra'\\]"),
    ]


def _cases():
    cases = []
    for file in CHECKPOINT_FILES:
        cases += [(file, "missing", lambda p: p.unlink(), "is not a checkpoint of this job"),
                  (file, "empty", lambda p: p.write_bytes(b""), "not (a )?(readable safetensors file|valid JSON)"),
                  (file, "truncated", lambda p: p.write_bytes(p.read_bytes()[:-7]),
                   "not (a )?(readable safetensors file|valid JSON)")]
    for file, suffix in ((TRAINABLE_FILE, ""), (OPTIMIZER_FILE, "exp_avg")):
        cases += _tensor_cases(file, suffix)
    cases += [
        (OPTIMIZER_FILE, "no state", lambda p: save_file({}, p, metadata=_metadata(p)), "holds no optimizer state"),
        (OPTIMIZER_FILE, "metadata not JSON",
         lambda p: save_file(load_file(p), p, metadata={**_metadata(p), "scalars": "[1,"}),
         "metadata 'scalars' is not valid JSON"),
        (RNG_FILE, "short", _edit_tensors(lambda t: t.__setitem__("cpu", t["cpu"][:100].clone())),
         "tensor 'cpu' has shape \\(100,\\), expected"),
        (RNG_FILE, "float", _edit_tensors(lambda t: t.__setitem__("cpu", t["cpu"].float())),
         "tensor 'cpu' is F32; expected one of \\['U8'\\]"),
        (RNG_FILE, "no cpu", _edit_tensors(lambda t: t.__setitem__("other", t.pop("cpu"))),
         "missing \\['cpu'\\], unexpected \\['other'\\]"),
    ]
    for key in ("step", "config", "labels"):
        cases.append((TRAINING_STATE_FILE, f"no {key}", lambda p, key=key: p.write_text(json.dumps(
            {k: v for k, v in json.loads(p.read_text()).items() if k != key})), f"has no '{key}'"))
    cases += [(TRAINING_STATE_FILE, "list", lambda p: p.write_text("[]"), "must hold a JSON object"),
              (TRAINING_STATE_FILE, "step not int", lambda p: p.write_text(json.dumps(
                  {**json.loads(p.read_text()), "step": "1"})), "'step' must be an int")]
    return cases


@pytest.mark.parametrize("file,case,edit,message", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_corrupt_file_is_named_and_nothing_is_restored(job_and_checkpoint, tmp_path, file, case, edit,
                                                            message):
    job, good = job_and_checkpoint
    folder = tmp_path / "checkpoint-1"
    shutil.copytree(good, folder)
    edit(folder / file)
    before, rng = trainable_state(job.peft_model), torch.get_rng_state()
    optimizer_state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                       for k, s in job.optimizer.state_dict()["state"].items()}
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(folder, job.peft_model, job.optimizer, job.config, job.labels)
    assert file in str(info.value), str(info.value)
    after = trainable_state(job.peft_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    now = job.optimizer.state_dict()["state"]
    assert now.keys() == optimizer_state.keys()
    assert all(torch.equal(now[k]["exp_avg"], optimizer_state[k]["exp_avg"]) for k in now)


def test_the_good_checkpoint_still_restores(job_and_checkpoint):
    job, good = job_and_checkpoint
    assert load_checkpoint(good, job.peft_model, job.optimizer, job.config, job.labels) == 1
    saved = load_file(good / TRAINABLE_FILE)
    assert all(torch.equal(saved[k], v) for k, v in trainable_state(job.peft_model).items())
