"""Misuses that used to give a silently wrong answer or an unclear error: each now does what the
files say, or fails with a message saying what to do."""
import json
import os

import pytest
import torch
from tests.native.test_inspect import save_tiny_model
from tests.tiny_models import build, prompt_configs, random_ids, randomize_

from ptuning_fast import get_ptuning_model, inspect_adapter, load_adapter

KINDS = prompt_configs(4)


def test_loading_into_an_existing_name_takes_the_folders_options(tmp_path):
    saved = get_ptuning_model(build("llama")[0].eval(), KINDS["mlp"]("CAUSAL_LM"), positions="restart")
    randomize_(saved.prompt_encoder, 1)
    saved.save_pretrained(tmp_path, save_encoder=True)
    model = get_ptuning_model(build("llama")[0].eval(), KINDS["mlp"]("CAUSAL_LM"))  # positions="continue"
    assert model.prompt_options["default"] != saved.prompt_options["default"]
    load_adapter(model, tmp_path, is_trainable=True)
    assert model.prompt_options["default"] == saved.prompt_options["default"]
    ids = random_ids(2, 6, 3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the positions mode changes the numbers
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               saved(input_ids=ids, attention_mask=mask).logits)


def test_a_seq_cls_adapter_onto_a_causal_lm_is_refused(tmp_path):
    get_ptuning_model(build("llama_cls")[0], KINDS["mlp"]("SEQ_CLS")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json: the adapter is for task_type SEQ_CLS, but "
                                         "LlamaForCausalLM is a CAUSAL_LM model"):
        load_adapter(build("llama")[0], tmp_path)
    with pytest.raises(ValueError, match="is for task_type SEQ_CLS"):
        load_adapter(get_ptuning_model(build("llama")[0], KINDS["mlp"]("CAUSAL_LM")), tmp_path, adapter_name="cls")
    load_adapter(build("llama_cls")[0], tmp_path)  # onto its own kind of model it loads


def test_a_forward_after_deleting_the_active_adapter_says_so():
    model = get_ptuning_model(build("llama")[0], KINDS["mlp"]("CAUSAL_LM"))
    model.add_adapter("other", KINDS["prefix"]("CAUSAL_LM"))
    model.set_adapter("other")
    del model.prompt_encoder["other"], model.peft_config["other"], model.prompt_options["other"]
    with pytest.raises(ValueError, match=r"the active adapter 'other' is not among the model's adapters \['default'\] "
                                         r"\(deleted\?\): call set_adapter\(\)"):
        model(input_ids=random_ids(1, 4, 2))
    model.set_adapter("default")
    model(input_ids=random_ids(1, 4, 2))


def test_an_optimizer_over_the_parameters_in_another_order_is_refused(tmp_path):
    model = get_ptuning_model(build("llama")[0], KINDS["lstm"]("CAUSAL_LM"))
    params = list(model.prompt_encoder.parameters())
    optimizer = torch.optim.Adam(params)
    model(input_ids=random_ids(2, 4, 1)).logits.sum().backward()
    optimizer.step()
    model.save_pretrained(tmp_path, save_encoder=True, optimizer=optimizer)
    again = get_ptuning_model(build("llama")[0], KINDS["lstm"]("CAUSAL_LM"))
    params = list(again.prompt_encoder.parameters())
    # Two LSTM weights of one shape swapped: the state would fit, and be the wrong one.
    swapped = params[:]
    i, j = next((i, j) for i in range(len(params)) for j in range(i + 1, len(params))
                if params[i].shape == params[j].shape)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    before = {n: p.detach().clone() for n, p in again.prompt_encoder.named_parameters()}
    with pytest.raises(ValueError, match="`optimizer` holds the parameters in another order"):
        load_adapter(again, tmp_path, is_trainable=True, optimizer=torch.optim.Adam(swapped))
    assert all(torch.equal(before[n], p) for n, p in again.prompt_encoder.named_parameters())  # nothing loaded
    load_adapter(again, tmp_path, is_trainable=True, optimizer=torch.optim.Adam(params))


def test_inspect_says_when_it_reads_a_relative_base_model_path(tmp_path, capsys, monkeypatch):
    base, task = save_tiny_model(tmp_path / "base")
    model = get_ptuning_model(base, KINDS["mlp"](task))
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "base"}))
    monkeypatch.chdir(tmp_path)
    result = inspect_adapter("adapter", "out", top_k=2)
    assert result.nearest is not None
    printed = capsys.readouterr().out
    assert (f"base_model_name_or_path 'base' is a relative path, read from the current folder as "
            f"{os.path.join(str(tmp_path), 'base')}") in printed
