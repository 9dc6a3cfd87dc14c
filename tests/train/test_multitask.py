"""The multi-task job (`ptuning-fast train --tasks NAME=FILE ...`): one adapter per task, every
batch mixing the tasks' rows; a mixed batch must give each adapter the gradient its own rows give.

Tiny models from configs, two small task files (sentiment, and sentiment with flipped labels).
"""
import json
import os

import pytest
import torch
from peft import PeftModel
from tests.tiny_models import random_ids

from ptuning_fast import PTuningModel


def _vocabulary(examples):
    words = set()
    for e in examples:
        words.update(e["text"].replace(".", " ").replace(",", " ").replace("!", " ").replace(":", " ")
                     .replace("?", " ").split())
    words.update(["positive", "negative", "sentiment"])
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", ":", "?"] + sorted(words)


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """Two tasks on the same kind of text: sentiment, and sentiment with the labels flipped (no
    single prompt can serve both), each in its own file."""
    from ptuning_fast.data import sentiment_examples, write_examples

    folder = tmp_path_factory.mktemp("tasks")
    examples = sentiment_examples("train")[:120]
    flip = {"positive": "negative", "negative": "positive"}
    write_examples(examples[:60], folder / "sentiment.jsonl")
    write_examples([{"text": e["text"], "label": flip[e["label"]]} for e in examples[60:]], folder / "flipped.csv")
    return folder, _vocabulary(examples)


@pytest.fixture(scope="module")
def tiny_models(task_files):
    from transformers import BertConfig, BertModel, BertTokenizer, LlamaConfig, LlamaForCausalLM

    folder, vocabulary = task_files
    paths = {}
    for name in ("llama", "bert"):
        path = folder / name
        tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocabulary)})
        tokenizer.save_pretrained(path)
        torch.manual_seed(0)
        if name == "llama":
            LlamaForCausalLM(LlamaConfig(vocab_size=len(vocabulary), hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=0)).save_pretrained(path)
        else:
            BertModel(BertConfig(vocab_size=len(vocabulary), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)).save_pretrained(path)
        paths[name] = str(path)
    return paths


def job_config(task_files, tiny_models, task, prompt, **overrides):
    from ptuning_fast.train import TrainConfig

    folder, _ = task_files
    options = dict(model=tiny_models["llama" if task == "causal-lm" else "bert"], task=task, prompt=prompt,
                   tasks=[f"sentiment={folder / 'sentiment.jsonl'}", f"flipped={folder / 'flipped.csv'}"],
                   batch_size=8, eval_batch_size=16, steps=2, num_virtual_tokens=3, encoder_hidden_size=16, lr=1e-2,
                   eval_every=0, progress=False, max_length=24, eval_fraction=0.25)
    options.update(overrides)
    return TrainConfig(**options)


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("task, prompt", [("causal-lm", "v1"), ("causal-lm", "v2"), ("classification", "v2")])
def test_a_mixed_training_batch_gives_each_task_its_own_gradient(task_files, tiny_models, task, prompt):
    from ptuning_fast.train.multitask import MultiTaskJob

    job = MultiTaskJob(job_config(task_files, tiny_models, task, prompt))
    model = job.peft_model
    indices = [0, 50, 1, 60, 2, 70, 3]  # both tasks, interleaved
    batch, names = job.batch(job.train_data, indices)
    assert set(names) == {"sentiment", "flipped"}
    job.step_loss(batch, names).backward()
    mixed = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    for name in ("sentiment", "flipped"):
        own = [i for i, n in zip(indices, names) if n == name]
        sub_batch, sub_names = job.batch(job.train_data, own)
        job.step_loss(sub_batch, sub_names).backward()  # the task's mean loss over its rows alone
        if name == "sentiment":  # the other task's adapter gets nothing from these rows
            assert not any(n.startswith("prompt_encoder.flipped.") for n in trainable_grads(model))
    separate = trainable_grads(model)
    assert set(mixed) == set(separate)
    assert any(n.startswith("prompt_encoder.sentiment.") for n in mixed)
    assert any(n.startswith("prompt_encoder.flipped.") for n in mixed)
    assert any(not n.startswith("prompt_encoder.") for n in mixed) == (task == "classification")  # the head
    for key, grad in separate.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(mixed[key], grad, rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.parametrize("task, prompt", [("causal-lm", "v2"), ("classification", "v1")])
def test_tasks_run_saves_one_peft_adapter_per_task(task_files, tiny_models, tmp_path, task, prompt):
    from ptuning_fast import train

    config = job_config(task_files, tiny_models, task, prompt, output_dir=str(tmp_path / "run"), steps=3)
    result = train.run(config)
    summary = result.summary
    assert set(summary["tasks"]) == {"sentiment", "flipped"}
    for name, numbers in summary["tasks"].items():
        assert 0 <= numbers["eval_accuracy"] <= 1 and numbers["eval_loss"] > 0
        assert numbers["train_examples"] + numbers["eval_examples"] == 60
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tasks"].keys() == summary["tasks"].keys()

    model = result.model.eval()
    ids = random_ids(3, 6, 51, low=10)
    if task == "causal-lm":  # the adapters are PEFT adapters: PEFT serves each as we do
        for name in ("sentiment", "flipped"):
            folder = tmp_path / "run" / "adapters" / name
            assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
            from transformers import AutoModelForCausalLM
            peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.model).eval(), folder)
            torch.testing.assert_close(model(input_ids=ids, adapter_names=[name] * 3).logits,
                                       peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # Reloaded from the saved adapters (full encoders), both tasks served in one batch as trained.
    reloaded = PTuningModel.from_pretrained(type(model.base_model).from_pretrained(config.model, **(
        {"num_labels": 2} if task == "classification" else {})).eval(), str(tmp_path / "run" / "adapters" / "sentiment"),
        adapter_name="sentiment", is_trainable=True)
    reloaded.load_adapter(str(tmp_path / "run" / "adapters" / "flipped"), adapter_name="flipped", is_trainable=True)
    if task == "classification":  # the shared head is in trainable_state.safetensors
        from safetensors.torch import load_file
        state = load_file(tmp_path / "run" / "trainable_state.safetensors")
        head = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}
        assert head and not reloaded.base_model.load_state_dict(head, strict=False).unexpected_keys
    reloaded.eval()
    names = ["flipped", "sentiment", "flipped"]
    torch.testing.assert_close(reloaded(input_ids=ids, adapter_names=names).logits,
                               model(input_ids=ids, adapter_names=names).logits, rtol=1e-5, atol=1e-6)


def test_tasks_option_errors(task_files):
    from ptuning_fast import train

    folder, _ = task_files
    files = [f"a={folder / 'sentiment.jsonl'}", f"b={folder / 'flipped.csv'}"]
    assert train.parse_args(["--tasks", *files]).tasks == files
    for flags, error, message in [
        (["--tasks", "sentiment.jsonl"], ValueError, "`tasks` entries must look like NAME=FILE"),
        (["--tasks", "a=x.jsonl", "a=y.jsonl"], ValueError, "`tasks` names \\['a'\\] more than once"),
        (["--tasks", "a/b=x.jsonl"], ValueError, "task name 'a/b' must start with a letter or digit, then letters"),
        (["--tasks", "sst.2=x.jsonl"], ValueError, "task name 'sst.2' must .* '_' and '-' only"),
        (["--tasks", "a="], ValueError, "task 'a' has no data file"),
        (["--tasks", *files, "--data", "x.jsonl"], ValueError, "`tasks` and `data` do not combine"),
        (["--tasks", *files, "--baseline", "peft"], ValueError, "PEFT runs one prompt adapter per batch"),
        (["--tasks", *files, "--resume", "ckpt"], ValueError, "`tasks` and `resume` do not combine"),
    ]:
        with pytest.raises(error, match=message):
            train.parse_args(flags)
    with pytest.raises(TypeError, match="`tasks` must be a non-empty list"):
        train.TrainConfig(tasks="a=x.jsonl")


def test_a_linked_adapters_folder_is_replaced_not_written_through(task_files, tiny_models, tmp_path):
    from ptuning_fast import train

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(elsewhere, out / "adapters")
    train.run(job_config(task_files, tiny_models, "classification", "v1", output_dir=str(out), steps=1))
    assert os.listdir(elsewhere) == []
    assert not (out / "adapters").is_symlink() and (out / "adapters" / "flipped" / "adapter_config.json").is_file()
