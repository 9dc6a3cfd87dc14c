"""Adapter files are checked from the safetensors header before any tensor is read: names,
shapes, floating dtypes, then finite values; each error names the file and the key."""
import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.tiny_models import build, prompt_configs

from ptuning_fast import get_ptuning_model, load_adapter
from ptuning_fast.native.checkpoint import ENCODER_NAME, MAX_JSON_BYTES, OPTIMIZER_NAME, WEIGHTS_NAME, read_tensors

KINDS = prompt_configs(4)
BIG = 12 * 2**30  # bytes: a tensor that must never be read


def append_unread_tensor(path, key: str, nbytes: int = BIG) -> None:
    """Add a ``key`` of ``nbytes`` to a safetensors file as a sparse tail: a read of it would need
    ``nbytes`` of memory, a check of the header none."""
    raw = open(path, "rb").read()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    header[key] = {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [len(data), len(data) + nbytes]}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded + data)
    os.truncate(path, 8 + len(encoded) + len(data) + nbytes)


@pytest.fixture
def saved(tmp_path):
    model = get_ptuning_model(build("llama")[0], KINDS["mlp"]("CAUSAL_LM"))
    optimizer = torch.optim.Adam(model.prompt_encoder.parameters())
    model(input_ids=torch.randint(3, 50, (2, 5))).logits.sum().backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "good", save_encoder=True, optimizer=optimizer)
    return tmp_path / "good"


def _copy(saved, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(saved, folder)
    return folder


def _load(folder, trainable=False):
    model = get_ptuning_model(build("llama")[0], KINDS["mlp"]("CAUSAL_LM"))
    optimizer = torch.optim.Adam(model.prompt_encoder.parameters()) if trainable else None
    return load_adapter(model if trainable else build("llama")[0], folder, is_trainable=trainable,
                        optimizer=optimizer, adapter_name="default" if trainable else "loaded")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float8_e4m3fn])
def test_prompt_embeddings_that_are_not_floats_are_refused(saved, tmp_path, dtype):
    folder = _copy(saved, tmp_path, "bad")
    prompts = load_file(folder / WEIGHTS_NAME)["prompt_embeddings"]
    save_file({"prompt_embeddings": prompts.to(dtype)}, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: tensor 'prompt_embeddings' is .*; expected one of"):
        _load(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_prompts_and_encoder_weights_are_refused(saved, tmp_path, value):
    folder = _copy(saved, tmp_path, "bad")
    prompts = load_file(folder / WEIGHTS_NAME)["prompt_embeddings"]
    prompts[1, 3] = value
    save_file({"prompt_embeddings": prompts}, folder / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: tensor 'prompt_embeddings' holds NaN or Inf"):
        _load(folder)
    encoder = load_file(folder / ENCODER_NAME)
    key = sorted(encoder)[0]
    encoder[key].view(-1)[0] = value
    save_file(encoder, folder / ENCODER_NAME)
    with pytest.raises(ValueError, match=f"{ENCODER_NAME}: tensor '{key}' holds NaN or Inf"):
        _load(folder, trainable=True)


def test_a_huge_extra_tensor_is_never_read(saved, tmp_path):
    folder = _copy(saved, tmp_path, "big")
    append_unread_tensor(folder / ENCODER_NAME, "encoder.extra")
    with pytest.raises(ValueError, match=rf"{ENCODER_NAME} holds other tensors than expected: missing \[\], "
                                         r"unexpected \['encoder.extra'\]"):
        _load(folder, trainable=True)
    # PEFT's adapter file may hold a task head too: left unread, the prompts load.
    append_unread_tensor(folder / WEIGHTS_NAME, "base_model.score.weight")
    loaded = _load(folder)
    torch.testing.assert_close(loaded.prompt_encoder["loaded"].embedding.weight,
                               load_file(saved / WEIGHTS_NAME)["prompt_embeddings"])


def test_optimizer_files_are_checked_before_restoring(saved, tmp_path):
    cases = {}
    tensors = load_file(saved / OPTIMIZER_NAME)
    from safetensors import safe_open
    with safe_open(saved / OPTIMIZER_NAME, "pt") as handle:
        metadata = handle.metadata()
    moment = next(k for k in tensors if k.endswith("exp_avg"))
    nan = dict(tensors)
    nan[moment] = tensors[moment].clone().fill_(float("nan"))
    cases["nan"] = (nan, metadata, f"tensor '{moment}' holds NaN or Inf")
    cut = dict(tensors)
    cut[moment] = tensors[moment].reshape(-1)[:1].clone()
    cases["cut"] = (cut, metadata, f"tensor '{moment}' has shape \\(1,\\), but parameter")
    ints = dict(tensors)
    ints[moment] = tensors[moment].long()
    cases["int"] = (ints, metadata, f"tensor '{moment}' is I64")
    cases["not_json"] = (tensors, {**metadata, "param_groups": "{not json"},
                         "metadata 'param_groups' is not valid JSON")
    cases["no_groups"] = (tensors, {"format": "pt"}, "no 'param_groups' in its metadata")
    cases["stray_key"] = ({**tensors, "other": torch.zeros(2)}, metadata, "tensor 'other' is not the state of one")
    for name, (content, meta, message) in cases.items():
        folder = _copy(saved, tmp_path, name)
        save_file(content, folder / OPTIMIZER_NAME, metadata=meta)
        with pytest.raises(ValueError, match=message) as info:
            _load(folder, trainable=True)
        assert OPTIMIZER_NAME in str(info.value), name


def test_read_tensors_names_missing_and_extra_keys(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"a": torch.randn(2), "b": torch.randn(3)}, path)
    with pytest.raises(ValueError, match=r"t.safetensors holds other tensors than expected: missing \['c'\], "
                                         r"unexpected \['b'\]"):
        read_tensors(path, {"a": (2,), "c": None})
    got = read_tensors(path, {"a": (2,), "b": None})
    assert torch.equal(got["a"], load_file(path)["a"])


def test_an_oversized_json_file_is_refused_unread(saved, tmp_path):
    folder = _copy(saved, tmp_path, "big_json")
    with open(folder / "ptuning_fast_config.json", "r+b") as handle:
        handle.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing to read if the size is checked first
    with pytest.raises(ValueError, match=f"ptuning_fast_config.json holds {MAX_JSON_BYTES + 1} bytes, more than"):
        _load(folder)
