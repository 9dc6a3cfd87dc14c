"""Adapter names are identifiers, never paths; every file a save writes lands inside the folder it
was given (a planted link is replaced, not written through); loads refuse links out of the folder;
an adapter folder is written whole (a save failing midway leaves the old one as it was)."""
import os

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tests.tiny_models import build, prompt_configs, random_ids, randomize_

import ptuning_fast
from ptuning_fast import get_ptuning_model, load_adapter, save_adapter
from ptuning_fast.native import checkpoint

KINDS = prompt_configs(4)
BAD_NAMES = ["/abs/folder", "..", ".", "a/b", "a\x00b", "", "sub/../x", "dé"]


def _model():
    return get_ptuning_model(build("llama")[0].eval(), KINDS["mlp"]("CAUSAL_LM"))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_that_are_paths_are_refused_everywhere(tmp_path, name):
    model = _model()
    rule = "letters, digits, '_' and '-' only"
    with pytest.raises(ValueError, match=rule):
        model.add_adapter(name, KINDS["mlp"]("CAUSAL_LM"))
    assert list(model.prompt_encoder) == ["default"]
    model.save_pretrained(tmp_path / "good")
    with pytest.raises(ValueError, match=rule):
        load_adapter(model, tmp_path / "good", adapter_name=name)
    with pytest.raises(ValueError, match=rule):
        model.load_adapter(str(tmp_path / "good"), adapter_name=name)
    with pytest.raises(ValueError, match=rule):
        load_adapter(build("llama")[0], tmp_path / "good", adapter_name=name)
    # A PeftModel accepts such a name itself; the package still will not save it outside the folder.
    if name and "\x00" not in name and "." not in name:  # names PEFT itself takes
        peft = ptuning_fast.accelerate(get_peft_model(build("llama")[0], KINDS["mlp"]("CAUSAL_LM"),
                                                      adapter_name=name))
        with pytest.raises(ValueError, match=rule):
            save_adapter(peft, tmp_path / "out")
    assert not os.path.exists("/abs/folder")


def test_good_names_round_trip(tmp_path):
    model = _model()
    model.add_adapter("task_2-b", KINDS["prefix"]("CAUSAL_LM"))
    randomize_(model.prompt_encoder, 3)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "task_2-b" / "adapter_model.safetensors")
    loaded = load_adapter(build("llama")[0].eval(), tmp_path / "task_2-b", adapter_name="task_2-b")
    ids = random_ids(2, 5, 1)
    torch.testing.assert_close(loaded(input_ids=ids).logits,
                               model(input_ids=ids, adapter_names=["task_2-b"] * 2).logits)


@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors", "ptuning_fast_config.json",
                                  "ptuning_fast_encoder.safetensors", "ptuning_fast_optimizer.safetensors"])
def test_a_save_replaces_a_planted_link_instead_of_writing_through_it(tmp_path, file):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    folder = tmp_path / "adapter"
    folder.mkdir()
    os.symlink(outside, folder / file)
    model = _model()
    optimizer = torch.optim.Adam(model.prompt_encoder.parameters())
    model.save_pretrained(folder, save_encoder=True, optimizer=optimizer)
    assert outside.read_text() == "keep me"
    assert not os.path.islink(folder / file) and os.path.isfile(folder / file)
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no temporary left


def test_a_linked_adapter_sub_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    model = _model()
    model.add_adapter("other", KINDS["mlp"]("CAUSAL_LM"))
    (tmp_path / "out").mkdir()
    os.symlink(outside, tmp_path / "out" / "other")
    with pytest.raises(ValueError, match="other is a link"):
        model.save_pretrained(tmp_path / "out", selected_adapters=["other"])
    assert os.listdir(outside) == []


@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors", "ptuning_fast_config.json",
                                  "ptuning_fast_encoder.safetensors", "ptuning_fast_optimizer.safetensors"])
def test_a_load_refuses_a_link_out_of_the_folder_naming_it(tmp_path, file):
    model = _model()
    optimizer = torch.optim.Adam(model.prompt_encoder.parameters())
    model.save_pretrained(tmp_path / "real", save_encoder=True, optimizer=optimizer)
    folder = tmp_path / "planted"
    folder.mkdir()
    for name in os.listdir(tmp_path / "real"):
        target = tmp_path / "real" / name
        os.symlink(target, folder / name) if name == file else os.link(target, folder / name)
    again = _model()
    with pytest.raises(ValueError, match=f"{file} is a link out of .*planted: refusing to read it"):
        load_adapter(again, folder, is_trainable=True, optimizer=torch.optim.Adam(again.prompt_encoder.parameters()))
    # A link inside the folder is fine, and so is a folder given through a link.
    os.symlink(tmp_path / "real", tmp_path / "through_link")
    load_adapter(again, tmp_path / "through_link", is_trainable=True)


def test_a_save_failing_midway_leaves_the_old_adapter_folder(tmp_path, monkeypatch):
    model = _model()
    randomize_(model.prompt_encoder, 1)
    model.save_pretrained(tmp_path, save_encoder=True)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    randomize_(model.prompt_encoder, 2)
    real = checkpoint.write_safetensors

    def disk_full(tensors, path, metadata=None):
        if path.endswith(checkpoint.ENCODER_NAME):
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path, save_encoder=True)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    monkeypatch.undo()
    # Saved again without the encoder: the earlier encoder (of other prompts) does not stay beside them.
    model.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / checkpoint.ENCODER_NAME)
    torch.testing.assert_close(load_file(tmp_path / checkpoint.WEIGHTS_NAME)["prompt_embeddings"],
                               checkpoint.prompt_embeddings_to_save(model.prompt_encoder["default"],
                                                                    model.peft_config["default"]))


def test_inspect_replaces_links_planted_in_its_output_folder(tmp_path):
    model = get_ptuning_model(build("gpt2")[0], KINDS["mlp"]("CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    for name in ("similarity.png", "norms.png"):
        os.symlink(outside, tmp_path / "out" / name)
    result = ptuning_fast.inspect_adapter(tmp_path / "adapter", tmp_path / "out")
    assert outside.read_bytes() == b"keep me"
    for path in (result.similarity, result.norms):
        assert not os.path.islink(path) and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
