"""Checkpoints in PEFT's adapter format: PEFT loads ours, we load PEFT's (same logits), training
resumes from the same loss, and nothing is ever unpickled."""
import json
import os
import pickle

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tests.tiny_models import build, labels_for, prompt_configs, random_ids, randomize_, train_steps

import ptuning_fast
from ptuning_fast import PTuningModel, get_ptuning_model, load_adapter, save_adapter

T = 4
KINDS = prompt_configs(T)
V1 = ("mlp", "lstm")


def logits_of(model, inputs, kind, peft_layout):
    """Logits aligned with the input columns (PEFT's v1 causal-LM logits include the prompt's)."""
    logits = model(**inputs).logits
    return logits[:, T:] if peft_layout and kind in V1 and logits.dim() == 3 else logits


@pytest.mark.peft_oracle
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["llama", "bert_cls"])
def test_peft_adapter_loads_here_with_the_same_logits(tmp_path, name, kind):
    base, task = build(name)
    trained = get_peft_model(base.eval(), KINDS[kind](task))
    randomize_(trained.prompt_encoder, 3)
    trained.save_pretrained(tmp_path)
    inputs = {"input_ids": random_ids(2, 6, 4)}
    expected = logits_of(trained, inputs, kind, peft_layout=True)

    reloaded_by_peft = PeftModel.from_pretrained(build(name)[0].eval(), tmp_path)
    ours = PTuningModel.from_pretrained(build(name)[0].eval(), tmp_path)
    assert isinstance(ours, PTuningModel) and ours.active_peft_config.inference_mode
    assert not any(p.requires_grad for p in ours.parameters())
    torch.testing.assert_close(logits_of(reloaded_by_peft, inputs, kind, True), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_of(ours, inputs, kind, False), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, kind):
    base, task = build("gpt2")
    ours = get_ptuning_model(base.eval(), KINDS[kind](task))
    randomize_(ours.prompt_encoder, 5)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors",
                                            "ptuning_fast_config.json"]  # no encoder unless asked
    with open(tmp_path / "adapter_config.json") as handle:
        saved = json.load(handle)
    assert saved["inference_mode"] is True and saved["task_type"] == "CAUSAL_LM"
    assert saved["peft_type"] == ("P_TUNING" if kind in V1 else "PREFIX_TUNING")
    assert list(load_file(tmp_path / "adapter_model.safetensors")) == ["prompt_embeddings"]

    peft = PeftModel.from_pretrained(build("gpt2")[0].eval(), tmp_path)
    inputs = {"input_ids": random_ids(2, 6, 6)}
    torch.testing.assert_close(logits_of(peft, inputs, kind, True), logits_of(ours, inputs, kind, False),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "lstm", "prefix_proj"])
def test_resumed_native_training_continues_from_the_same_loss(tmp_path, kind):
    base, task = build("llama")
    model = get_ptuning_model(base, KINDS[kind](task))
    randomize_(model.prompt_encoder, 7, scale=0.2)
    ids = random_ids(3, 6, 8)
    inputs = {"input_ids": ids, **labels_for(task, ids, 9)}
    optimizer = torch.optim.AdamW(model.prompt_encoder.parameters(), lr=0.01)
    train_steps(model, optimizer, inputs, 3)
    model.save_pretrained(tmp_path, save_encoder=True, optimizer=optimizer)
    expected = train_steps(model, optimizer, inputs, 3)

    # A new job: same base weights, a freshly initialised encoder and optimizer, then resume.
    resumed = get_ptuning_model(build("llama")[0], KINDS[kind](task))
    new_optimizer = torch.optim.AdamW(resumed.prompt_encoder.parameters(), lr=0.01)
    assert load_adapter(resumed, tmp_path, is_trainable=True, optimizer=new_optimizer) is resumed
    assert new_optimizer.state_dict()["state"][0]["step"] == 3
    got = train_steps(resumed, new_optimizer, inputs, 3)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_resumed_accelerated_peft_training_continues_from_the_same_loss(tmp_path):
    base, task = build("gpt2")
    model = ptuning_fast.accelerate(get_peft_model(base, KINDS["lstm"](task)))
    ids = random_ids(3, 6, 10)
    inputs = {"input_ids": ids, **labels_for(task, ids, 11)}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    train_steps(model, optimizer, inputs, 2)
    save_adapter(model, tmp_path, save_encoder=True, optimizer=optimizer)
    expected = train_steps(model, optimizer, inputs, 2)

    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        PeftModel.from_pretrained(build("gpt2")[0], tmp_path, is_trainable=True)  # all PEFT offers

    fresh = ptuning_fast.accelerate(get_peft_model(build("gpt2")[0], KINDS["lstm"](task)))
    new_optimizer = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=0.01)
    assert load_adapter(fresh, tmp_path, is_trainable=True, optimizer=new_optimizer) is fresh
    got = train_steps(fresh, new_optimizer, inputs, 2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_named_adapters_use_sub_folders_and_keep_their_options(tmp_path):
    base, task = build("gpt2")
    placeholder = 99
    model = get_ptuning_model(base.eval(), KINDS["mlp"](task), placement="template", prompt_token_id=placeholder)
    model.add_adapter("deep", KINDS["prefix"](task), ptuning_fast.PromptOptions(positions="restart"))
    randomize_(model.prompt_encoder, 12)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "adapter_config.json")
    assert os.path.isfile(tmp_path / "deep" / "adapter_model.safetensors")

    loaded = PTuningModel.from_pretrained(build("gpt2")[0].eval(), tmp_path)
    loaded.load_adapter(str(tmp_path / "deep"), adapter_name="deep")
    assert loaded.prompt_options == model.prompt_options
    templated = torch.tensor([[placeholder, 5, placeholder, 6, placeholder, placeholder, 7]])
    torch.testing.assert_close(loaded(input_ids=templated).logits, model(input_ids=templated).logits)
    ids = random_ids(2, 5, 13)
    torch.testing.assert_close(loaded(input_ids=ids, adapter_names=["deep"] * 2).logits,
                               model(input_ids=ids, adapter_names=["deep"] * 2).logits)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    base, task = build("llama")
    model = get_ptuning_model(base, KINDS["prefix_proj"](task))
    optimizer = torch.optim.Adam(model.prompt_encoder.parameters())
    model.save_pretrained(tmp_path, save_encoder=True, optimizer=optimizer)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pkl"))]

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    again = get_ptuning_model(build("llama")[0], KINDS["prefix_proj"](task))
    load_adapter(again, tmp_path, is_trainable=True, optimizer=torch.optim.Adam(again.prompt_encoder.parameters()))
    PTuningModel.from_pretrained(build("llama")[0], tmp_path)


def test_checkpoint_errors(tmp_path):
    base, task = build("llama")
    model = get_ptuning_model(base, KINDS["mlp"](task))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(build("llama")[0], tmp_path / "missing")
    peft_dir = tmp_path / "peft"
    peft = get_peft_model(build("llama")[0], KINDS["mlp"](task))
    peft.save_pretrained(peft_dir)
    with pytest.raises(ValueError, match="cannot resume training.*save_encoder=True"):
        load_adapter(build("llama")[0], peft_dir, is_trainable=True)
    with pytest.raises(ValueError, match="optimizer.*save_encoder=True"):
        save_adapter(model, tmp_path / "x", optimizer=torch.optim.SGD(model.prompt_encoder.parameters(), lr=1.0))
    with pytest.raises(ValueError, match="optimizer.*is_trainable=True"):
        load_adapter(build("llama")[0], peft_dir, optimizer=torch.optim.SGD(model.prompt_encoder.parameters(), lr=1.0))
    with pytest.raises(ValueError, match="adapter_name.*unknown adapter 'other'"):
        save_adapter(model, tmp_path / "y", adapter_name="other")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="save_directory.*is a file"):
        save_adapter(model, tmp_path / "file")
    with pytest.raises(TypeError, match="model.*PTuningModel or a peft.PeftModel"):
        save_adapter(torch.nn.Linear(2, 2), tmp_path / "z")

    wrong = tmp_path / "wrong_shape"
    model.save_pretrained(wrong)
    save_file({"prompt_embeddings": torch.randn(T + 1, 32)}, wrong / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="prompt_embeddings.*shape \\(5, 32\\).*\\(4, 32\\)"):
        load_adapter(build("llama")[0], wrong)

    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled)
    os.remove(pickled / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_adapter(build("llama")[0], pickled)

    lora_dir = tmp_path / "lora"
    get_peft_model(build("llama")[0], LoraConfig(target_modules=["q_proj"], r=2)).save_pretrained(lora_dir)
    with pytest.raises(ValueError, match="LORA, not P_TUNING or PREFIX_TUNING"):
        load_adapter(build("llama")[0], lora_dir)
    with pytest.raises(ValueError, match="no optimizer state"):
        plain = tmp_path / "plain"
        model.save_pretrained(plain, save_encoder=True)
        again = get_ptuning_model(build("llama")[0], KINDS["mlp"](task))
        load_adapter(again, plain, is_trainable=True, optimizer=torch.optim.SGD(again.prompt_encoder.parameters(),
                                                                                  lr=1.0))


# ---------------------------------------------------------------------------------------------
# Clear errors at load time, naming the file or both shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "prefix"])
def test_an_adapter_for_another_model_is_refused_when_loaded(tmp_path, kind):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import VOCAB

    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=44,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    get_ptuning_model(bigger, KINDS[kind]("CAUSAL_LM")).save_pretrained(tmp_path)
    wanted = "{'token_dim': 64}.*has {'token_dim': 32}" if kind == "mlp" else \
        "{'token_dim': 32, 'num_layers': 3, 'num_attention_heads': 2}.*has {'token_dim': 16, 'num_layers': 2"
    with pytest.raises(ValueError, match=f"adapter_config.json was made for a model with {wanted}"):
        load_adapter(build("llama")[0], tmp_path)
    accelerated = ptuning_fast.accelerate(get_peft_model(build("llama")[0], KINDS[kind]("CAUSAL_LM")))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(accelerated, tmp_path, adapter_name="other")


def test_load_adapter_into_a_lora_model_says_why(tmp_path):
    model = get_ptuning_model(build("llama")[0], KINDS["mlp"]("CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    lora = get_peft_model(build("llama")[0], LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="PeftModel holding \\{'default': 'LORA'\\} adapters.*base model instead"):
        load_adapter(lora, tmp_path, adapter_name="prompt")


def test_broken_files_are_named(tmp_path):
    model = get_ptuning_model(build("llama")[0], KINDS["prefix_proj"]("CAUSAL_LM"))
    good = tmp_path / "good"
    model.save_pretrained(good, save_encoder=True)

    def broken(name, edit):
        folder = tmp_path / name
        import shutil

        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def rewrite(file, data):
        return lambda folder: (folder / file).write_bytes(data)

    cases = [
        (broken("peft_type", lambda f: (f / "adapter_config.json").write_text(
            (f / "adapter_config.json").read_text().replace('"PREFIX_TUNING"', '"PREFIX_TUNNING"'))), False,
         "adapter_config.json: unknown peft_type 'PREFIX_TUNNING'"),
        (broken("config_json", rewrite("adapter_config.json", b'{"peft_type": ')), False,
         "adapter_config.json is not valid JSON"),
        (broken("options_json", rewrite("ptuning_fast_config.json", b"{not json")), False,
         "ptuning_fast_config.json is not valid JSON"),
        (broken("zero_bytes", rewrite("adapter_model.safetensors", b"")), False,
         "adapter_model.safetensors is not a readable safetensors file"),
        (broken("truncated", lambda f: (f / "adapter_model.safetensors").write_bytes(
            (good / "adapter_model.safetensors").read_bytes()[:100])), False,
         "adapter_model.safetensors is not a readable safetensors file"),
        (broken("corrupted", lambda f: (f / "ptuning_fast_encoder.safetensors").write_bytes(
            b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}" + b"\x00" * 64)), True,
         "ptuning_fast_encoder.safetensors is not a readable safetensors file"),
    ]
    for folder, trainable, message in cases:
        with pytest.raises(ValueError) as info:
            load_adapter(build("llama")[0], folder, is_trainable=trainable)
        assert message in str(info.value) and str(folder) in str(info.value), (message, str(info.value))


def test_prompt_and_text_longer_than_the_positions_are_refused_before_the_forward():
    """BERT and GPT-2 learn 64 absolute positions here: 60 virtual tokens + 10 tokens do not fit."""
    ids = random_ids(2, 10, 40)
    message = "60 virtual tokens.*10 tokens.*positions up to 69.*max_position_embeddings=64"
    for name, kind in (("bert_cls", "mlp"), ("gpt2", "prefix")):
        base, task = build(name)
        config = prompt_configs(60)[kind](task)
        with pytest.raises(ValueError, match=message):
            get_ptuning_model(base, config)(input_ids=ids)
        with pytest.raises(ValueError, match=message):
            ptuning_fast.accelerate(get_peft_model(build(name)[0], prompt_configs(60)[kind](task)))(input_ids=ids)
    base, _ = build("gpt2")
    encoder = get_peft_model(base, prompt_configs(60)["prefix"]("CAUSAL_LM")).prompt_encoder["default"]
    with pytest.raises(ValueError, match=message):
        ptuning_fast.prefix_forward(base, encoder, ids)
    with pytest.raises(ValueError, match="60 virtual tokens.*positions up to 71"):
        ptuning_fast.prefix_generate(base, encoder, ids[:, :8], max_new_tokens=4)
    get_ptuning_model(build("llama")[0], prompt_configs(60)["mlp"]("CAUSAL_LM"))(input_ids=ids)  # RoPE: no limit
