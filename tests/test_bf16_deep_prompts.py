"""Deep prompts (PREFIX_TUNING) under bf16 autocast and on bf16 models, through an accelerated
PeftModel, against plain PEFT: forward, backward, ``generate()``, a mixed batch, and the HF
``Trainer`` with ``bf16=True``.

PEFT casts the prefix to the model's dtype and its ``DynamicCache`` concatenates the model's keys
and values after it, promoting them: under autocast a bf16 key beside an fp32 prefix is stored
in fp32. The prefix cache stores narrower states the same way, so the numbers are PEFT's.
Tolerance: bf16's (the largest difference at most 2% of the largest value); the forward and the
generated tokens come out identical.
"""
import copy
import warnings

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

import ptuning_fast
from tests.tiny_models import PAD, build, padded_batch, randomize_

AUTOCAST = "autocast"  # fp32 model under torch.autocast(bfloat16)
BF16_MODEL = "bf16 model"


def twins(name, projection, precision, seed=0, adapters=("default",)):
    base, task = build(name, seed)
    if precision == BF16_MODEL:
        base = base.to(torch.bfloat16)
    model = None
    for index, adapter in enumerate(adapters):
        config = PrefixTuningConfig(task_type=task, num_virtual_tokens=4 + index, prefix_projection=projection,
                                    encoder_hidden_size=12)
        if model is None:
            model = get_peft_model(base, config, adapter_name=adapter)
        else:
            model.add_adapter(adapter, config)
    randomize_(model.prompt_encoder, seed + 50, scale=2.0)
    return model, ptuning_fast.accelerate(copy.deepcopy(model)), task


def precision_context(precision):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == AUTOCAST)


def assert_bf16_close(got, expected, what):
    got, expected = got.float(), expected.float()
    assert got.shape == expected.shape, what
    scale = expected.abs().max().clamp(min=1e-6)
    assert (got - expected).abs().max() <= 2e-2 * scale, what


def labels_of(task, ids, mask):
    if task == "SEQ_CLS":
        return torch.arange(ids.shape[0]) % 3
    return ids.masked_fill(mask == 0, -100)


def forward_backward(model, precision, ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    with precision_context(precision):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.peft_oracle
@pytest.mark.parametrize("precision", [AUTOCAST, BF16_MODEL])
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert_cls"])
def test_forward_and_backward_equal_peft(name, projection, precision):
    plain, fast, task = twins(name, projection, precision)
    ids, mask = padded_batch([6, 4, 5], 6, seed=3, side="left" if task == "CAUSAL_LM" else "right")
    labels = labels_of(task, ids, mask)
    expected, expected_grads = forward_backward(plain, precision, ids, mask, labels)
    got, grads = forward_backward(fast, precision, ids, mask, labels)
    assert_bf16_close(got.logits, expected.logits, "logits")
    assert_bf16_close(got.loss, expected.loss, "loss")
    assert set(grads) == set(expected_grads) and grads
    for key, grad in expected_grads.items():
        assert grad.abs().sum() > 0, key
        assert_bf16_close(grads[key], grad, key)


@pytest.mark.peft_oracle
@pytest.mark.parametrize("precision", [AUTOCAST, BF16_MODEL])
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_equals_peft(name, projection, precision):
    plain, fast, _ = twins(name, projection, precision, seed=1)
    ids, mask = padded_batch([6, 3, 5], 6, seed=4, side="left")
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD, output_logits=True,
                    return_dict_in_generate=True)
    outs = []
    for model in (plain.eval(), fast.eval()):
        with precision_context(precision):
            outs.append(model.generate(input_ids=ids, attention_mask=mask, **settings))
    assert torch.equal(outs[1].sequences, outs[0].sequences)
    for step, (a, b) in enumerate(zip(outs[1].logits, outs[0].logits)):
        assert_bf16_close(a, b, f"step {step}")


@pytest.mark.peft_oracle
def test_mixed_batch_under_autocast_equals_each_adapter_alone():
    """Several adapters share the prefix buffer (not autograd's one-adapter path)."""
    plain, fast, task = twins("llama", True, AUTOCAST, seed=2, adapters=("a", "b"))
    ids, mask = padded_batch([6, 4, 5], 6, seed=5, side="left")
    names = ["b", "a", "b"]
    with precision_context(AUTOCAST):
        mixed = fast(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            plain.set_adapter(name)
            alone = plain(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1]).logits
            real = mask[row].bool()
            assert_bf16_close(mixed[row, -6:][real], alone[0, -6:][real], f"row {row}")


@pytest.mark.peft_oracle
def test_trainer_with_bf16_trains_as_peft(tmp_path):
    """``Trainer(bf16=True)``: the autocast forward and backward of every step; the trained prompt
    weights after two steps are PEFT's."""
    from transformers import Trainer, TrainingArguments

    plain, fast, task = twins("llama", True, "fp32", seed=3)
    ids, mask = padded_batch([6, 4, 5, 6], 6, seed=6, side="left")
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
            for i in range(4)]
    initial = {n: p.detach().clone() for n, p in plain.prompt_encoder.named_parameters()}
    trained = []
    for model in (plain, fast):
        args = TrainingArguments(str(tmp_path / str(len(trained))), max_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-2, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", dataloader_num_workers=0, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(model=model, args=args, train_dataset=data).train()
        trained.append({n: p.detach().clone() for n, p in model.prompt_encoder.named_parameters()})
    for key, value in initial.items():  # two steps of lr 1e-2 moved every weight
        assert not torch.equal(trained[0][key], value), key
    for key, value in trained[0].items():
        assert_bf16_close(trained[1][key], value, key)
