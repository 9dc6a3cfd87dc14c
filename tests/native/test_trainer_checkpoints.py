"""The native model trained by the HF ``Trainer``: with ``AdapterCheckpointCallback`` every
checkpoint is an adapter folder that ``PeftModel.from_pretrained`` and ``ptuning_fast.load_adapter``
read, giving the trained model's logits."""
import os
import warnings

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig
from transformers import Trainer, TrainingArguments

import ptuning_fast
from tests.tiny_models import build, padded_batch, random_ids

CONFIGS = {
    "v1": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=12),
    "v2": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                     encoder_hidden_size=12),
}


def train(model, output_dir, callback):
    ids, mask = padded_batch([6, 4, 5, 6], 6, seed=6, side="left")
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
            for i in range(4)]
    args = TrainingArguments(str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_strategy="steps", save_steps=1, logging_strategy="no",
                             dataloader_num_workers=0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_trainer_checkpoints_are_adapter_folders_both_loaders_read(tmp_path, kind):
    base, _ = build("llama", 0)
    model = ptuning_fast.get_ptuning_model(base, CONFIGS[kind]())
    before = {n: p.detach().clone() for n, p in model.prompt_encoder.named_parameters()}
    train(model, tmp_path, ptuning_fast.AdapterCheckpointCallback(save_encoder=True))
    model.eval()
    folder = tmp_path / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    assert os.path.exists(tmp_path / "checkpoint-1" / "adapter_config.json")
    assert any(not torch.equal(p, before[n]) for n, p in model.prompt_encoder.named_parameters())

    ids = random_ids(2, 5, 9)  # unpadded: PEFT's positions and the native model's agree
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        fresh, _ = build("llama", 0)
        native = ptuning_fast.load_adapter(fresh, str(folder))(input_ids=ids).logits
        fresh, _ = build("llama", 0)
        peft = PeftModel.from_pretrained(fresh, str(folder)).eval()(input_ids=ids).logits[:, -5:]
    torch.testing.assert_close(native, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peft, trained, rtol=1e-5, atol=1e-5)

    fresh, _ = build("llama", 0)
    resumed = ptuning_fast.load_adapter(fresh, str(folder), is_trainable=True)  # the encoder, to train on
    for name, parameter in model.prompt_encoder.named_parameters():
        assert torch.equal(resumed.prompt_encoder.get_parameter(name), parameter), name


def test_callback_errors(tmp_path):
    with pytest.raises(TypeError, match="`save_encoder` must be a bool"):
        ptuning_fast.AdapterCheckpointCallback(save_encoder="yes")
    base, _ = build("llama", 0)
    with pytest.raises(TypeError, match="saves the adapters of a PTuningModel; the Trainer's model is LlamaForCausalLM"):
        ptuning_fast.AdapterCheckpointCallback().on_save(None, None, None, model=base)
