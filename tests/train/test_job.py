"""The training job: data files, options, loss, checkpoints/resume, PEFT adapters, DDP, HF Trainer.

Tiny models built from configs (a BERT and a Llama, a word-level vocabulary of the embedded
dataset) keep every run to a few steps of milliseconds; one shortened run of the pretrained
default (the README's job) checks that it learns.
"""
import dataclasses
import json
import os
import re
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tests.train.tiny import tiny_config, trainable_state

import ptuning_fast
from ptuning_fast import cli, train
from ptuning_fast.data import LABELS, read_examples, sentiment_examples, write_examples
from ptuning_fast.train import TrainConfig
from ptuning_fast.train.job import Job


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def test_sentiment_dataset_is_fixed_balanced_and_held_out():
    train_set, test_set = sentiment_examples("train"), sentiment_examples("test")
    assert (len(train_set), len(test_set)) == (3000, 600)
    assert train_set == sentiment_examples("train")  # the same on every call
    for split in (train_set, test_set):
        assert sum(e["label"] == "positive" for e in split) * 2 == len(split)
        assert {e["label"] for e in split} == set(LABELS)
    assert not {e["text"] for e in train_set} & {e["text"] for e in test_set}
    assert len({e["text"] for e in train_set}) == len(train_set)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_examples_round_trip_through_files(tmp_path, suffix):
    examples = sentiment_examples("test")[:17] + [{"text": 'with "quotes", commas\nand a newline', "label": "x"}]
    path = write_examples(examples, tmp_path / f"data{suffix}")
    assert read_examples(path) == examples


def test_read_examples_custom_columns_and_int_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"sentence": "good", "y": 1, "extra": 3}\n\n{"sentence": "bad", "y": 0}\n')
    assert read_examples(path, text_column="sentence", label_column="y") == [
        {"text": "good", "label": 1}, {"text": "bad", "label": 0}]


@pytest.mark.parametrize("name, content, error, message", [
    ("d.txt", "x", ValueError, "`path` must end in one of"),
    ("missing.jsonl", None, ValueError, "does not exist"),
    ("d.jsonl", '{"text": "a"}\n', ValueError, "d.jsonl:1: missing column 'label'"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{oops\n', ValueError, "d.jsonl:2: not valid JSON"),
    ("d.jsonl", '["a", 1]\n', ValueError, "must be a JSON object"),
    ("d.jsonl", '{"text": "  ", "label": 1}\n', ValueError, "must be a non-empty string"),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n', ValueError, "must be a non-blank string or an int"),
    ("d.csv", "text,label\n", ValueError, "holds no examples"),
    ("d.csv", "text,score\nhi,1\n", ValueError, "d.csv:2: missing column 'label'"),
])
def test_read_examples_errors(tmp_path, name, content, error, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(error, match=message):
        read_examples(tmp_path / name)


def test_data_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="`path` must be a path"):
        read_examples(3)
    with pytest.raises(TypeError, match="`text_column` must be a non-empty str"):
        read_examples(tmp_path / "a.csv", text_column="")
    with pytest.raises(TypeError, match="`examples` must be a list of dicts"):
        write_examples([{"text": "a"}], tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="`split` must be one of"):
        sentiment_examples("validation")
    with pytest.raises(TypeError, match="`split` must be a str"):
        sentiment_examples(1)


# ------------------------------------------------------------------------------------------------
# Options and command line
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, error, message", [
    (["--batch-size", "0"], ValueError, "`batch_size` must be >= 1"),
    (["--epochs", "0"], ValueError, "`epochs` must be in"),
    (["--eval-fraction", "1"], ValueError, "`eval_fraction` must be in"),
    (["--lr", "-1"], ValueError, "`lr` must be in"),
    (["--lr", "nan"], TypeError, "`lr` must be a finite number"),
    (["--steps", "0"], ValueError, "`steps` must be >= 1"),
    (["--task", "causal-lm", "--template", "no placeholder"], ValueError, "`template` 'no placeholder' must contain"),
    (["--eval-data", "x.csv"], ValueError, "`eval_data` needs `data`"),
    (["--resume"], ValueError, "`resume` 'latest' needs `output_dir`"),
    (["--save-every", "5"], ValueError, "`save_every` needs `output_dir`"),
])
def test_bad_options_name_the_option(flags, error, message):
    with pytest.raises(error, match=message):
        train.parse_args(flags)


def test_config_type_and_choice_errors():
    with pytest.raises(ValueError, match="`prompt` must be one of"):
        TrainConfig(prompt="v3")
    with pytest.raises(TypeError, match="`batch_size` must be an int"):
        TrainConfig(batch_size=8.0)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        TrainConfig(backend="cuda")
    with pytest.raises(TypeError, match="`config` must be a TrainConfig"):
        train.run({"steps": 1})
    with pytest.raises(SystemExit):  # argparse rejects unknown choices itself
        train.parse_args(["--task", "regression"])


def test_flags_map_to_config_fields():
    config = train.parse_args(["--prompt", "v2", "--num-virtual-tokens", "7", "--no-progress", "--resume",
                               "--output-dir", "out", "--prefix-projection", "--lr", "0.5"])
    assert (config.prompt, config.num_virtual_tokens, config.progress, config.resume, config.output_dir,
            config.prefix_projection, config.learning_rate) == ("v2", 7, False, "latest", "out", True, 0.5)
    assert TrainConfig(prompt="v1").learning_rate == 1e-2 and TrainConfig(prompt="v2").learning_rate == 3e-2
    assert TrainConfig(prompt="v2", prefix_projection=True).learning_rate == 3e-4


def test_cli_dispatch(capsys, monkeypatch):
    assert cli.main([]) == 0 and "train" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2 and "unknown subcommand 'nope'" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(train, "main", seen.append)
    assert cli.main(["train", "--steps", "2"]) == 0 and seen == [["--steps", "2"]]


def test_default_model_is_the_packaged_minilm():
    path = train.default_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert train.resolve_model("minilm") == (str(path), True)
    with pytest.raises(ValueError, match="is not a model folder"):
        train.resolve_model("./no/such/folder")


def test_default_job_learns_well_above_chance():
    """The README's default job (the packaged pretrained MiniLM-L6 on the built-in sentiment data),
    cut to 50 steps (~20 s on 2 cores): held-out accuracy far above the 50% of chance."""
    config = TrainConfig(steps=50, eval_every=0, progress=False, device="cpu")
    torch.manual_seed(config.seed)
    summary = train.run(config).summary
    assert summary["chance_accuracy"] == 0.5
    assert summary["eval_accuracy"] >= 0.8, summary["eval_accuracy"]


def test_batches_are_a_function_of_seed_and_step():
    first = [train.global_batch(50, 8, step, seed=3) for step in range(12)]
    assert first == [train.global_batch(50, 8, step, seed=3) for step in range(12)]
    epoch0 = sum(first[:6], [])  # 6 full batches per epoch, the last 2 examples dropped
    assert len(set(epoch0)) == 48 and first[6] != first[0]
    assert train.global_batch(50, 8, 0, seed=4) != first[0]
    assert train.learning_rate_at(0, 100, TrainConfig(lr=1.0, warmup_ratio=0.1)) == pytest.approx(1 / 11)
    assert train.learning_rate_at(55, 100, TrainConfig(lr=1.0, warmup_ratio=0.1)) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# Loss: our global-count normalisation must equal the model's own mean loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, prompt", [("classification", "v1"), ("classification", "v2"),
                                          ("causal-lm", "v1"), ("causal-lm", "v2")])
def test_loss_equals_the_models_own_loss(tiny_bert, tiny_llama, task, prompt):
    config = tiny_config(tiny_bert if task == "classification" else tiny_llama, task=task, prompt=prompt)
    examples = sentiment_examples("test")[:6]
    tokenizer = train.load_tokenizer(config)
    labels = train.label_names(examples, examples)
    encoded = train.encode_examples(examples, labels, tokenizer, config)
    torch.manual_seed(1)
    model, _ = train.build_model(config, tokenizer, 2 if task == "classification" else None)
    model.eval()
    indices = list(range(6))
    batch = train.make_batch(encoded, indices, tokenizer.pad_token_id, torch.device("cpu"),
                             pad_to=max(map(len, encoded.ids)))
    words = train.label_token_ids(labels, tokenizer) if task == "causal-lm" else None
    loss_sum, correct = train.loss_sum_and_correct(model, batch, task, words)
    ours = loss_sum / train.count_targets(encoded, indices, task)

    if task == "classification":
        hf_labels = batch["targets"]
    else:
        positions = torch.arange(batch["input_ids"].shape[1])
        answer = (positions >= batch["answer_starts"][:, None]) & batch["attention_mask"].bool()
        hf_labels = batch["input_ids"].masked_fill(~answer, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=hf_labels)
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)
    assert 0 <= int(correct) <= 6


# ------------------------------------------------------------------------------------------------
# Whole runs
# ------------------------------------------------------------------------------------------------
def test_classification_run_trains_prompts_only_and_saves_a_peft_adapter(tiny_bert, small_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    data, eval_data = small_data
    out = tmp_path / "run"
    config = tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=4, eval_every=2, output_dir=str(out))
    torch.manual_seed(config.seed)
    result = train.run(config)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 1 and summary["tokens_per_second"] > 0
    assert [h["step"] for h in summary["history"]] == [2, 4] and 0 <= summary["eval_accuracy"] <= 1
    assert summary["peak_memory_bytes"] > 0 and summary["chance_accuracy"] == 0.5
    assert summary["implementation"] == "ptuning_fast"
    assert isinstance(result.model.prompt_encoder["default"], ptuning_fast.PromptEncoder)

    # The base model is untouched: only prompts and the classifier head were trained.
    model = result.model
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    trained_base = dict(model.get_base_model().named_parameters())
    for name, p in base.named_parameters():
        if name.startswith("bert."):
            assert torch.equal(trained_base[name], p), name
    trainable = train.trainable_parameters(model)
    assert any(".prompt_encoder." in n or n.startswith("prompt_encoder.") for n in trainable)
    assert all("prompt_encoder" in n or "classifier" in n for n in trainable)

    # PEFT loads the adapter and gives the same logits as the trained model.
    checkpoint = out / "checkpoint-4"
    assert {p.name for p in checkpoint.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json",
                                                      train.TRAINABLE_FILE, train.TRAINING_STATE_FILE}
    torch.manual_seed(123)  # a different classifier init: the adapter must overwrite it
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
                                       checkpoint).eval()
    model.eval()
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    # The full encoder state (MLP head included) is in the resumable file.
    saved = load_file(checkpoint / train.TRAINABLE_FILE)
    for name, p in trainable.items():
        assert torch.equal(saved[name], p.detach())


@pytest.mark.parametrize("prompt", ["v1", "v2"])
def test_resume_continues_exactly(tiny_bert, small_data, tmp_path, prompt):
    data, eval_data = small_data
    common = dict(data=data, eval_data=eval_data, prompt=prompt, steps=4, save_every=2)
    straight = train.run(tiny_config(tiny_bert, output_dir=str(tmp_path / "a"), **common)).model
    (tmp_path / "a" / "checkpoint-4").rename(tmp_path / "a" / "moved")  # resume must find step 2
    assert train.latest_checkpoint(tmp_path / "a").name == "checkpoint-2"
    resumed = train.run(tiny_config(tiny_bert, output_dir=str(tmp_path / "a"), resume="latest", **common))
    assert resumed.summary["resumed_from_step"] == 2
    expected = trainable_state(straight)
    got = trainable_state(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    # and the resumed run really moved the weights away from the checkpoint
    at_two = load_file(tmp_path / "a" / "checkpoint-2" / train.TRAINABLE_FILE)
    assert any(not torch.equal(at_two[k], got[k]) for k in got)


def test_resume_errors(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    config = tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=2, output_dir=str(tmp_path))
    train.run(config)
    with pytest.raises(ValueError, match=r"different options: prompt='v1' \(now 'v2'\)"):
        train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=4, prompt="v2",
                              output_dir=str(tmp_path), resume="latest"))
    with pytest.raises(ValueError, match="is at step 2, the job has only 2 steps"):
        train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=2, output_dir=str(tmp_path),
                              resume=str(tmp_path / "checkpoint-2")))
    with pytest.raises(ValueError, match="is not a checkpoint of this job"):
        train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=4, resume=str(tmp_path)))


def test_resume_refuses_options_that_change_the_training(tiny_bert, small_data, tmp_path):
    """Every option that changes the trajectory (learning rate, warm-up, batches, seed, ...) must
    match the checkpoint's, each difference named; evaluation, saving and display options may
    change, and the run's length (a finished run extended); an omitted --lr equals its default."""
    data, eval_data = small_data
    common = dict(data=data, eval_data=eval_data, steps=3, save_every=1, output_dir=str(tmp_path))
    train.run(tiny_config(tiny_bert, **common))
    (tmp_path / "checkpoint-3").rename(tmp_path / "moved-3")
    changes = {"lr": 2e-2, "warmup_ratio": 0.5, "batch_size": 4, "seed": 1, "weight_decay": 0.1,
               "max_grad_norm": 0.5, "optimizer": "sgd", "max_length": 16,
               "precision": "bf16", "eval_fraction": 0.2, "template": "{text} Label:"}
    for key, value in changes.items():
        with pytest.raises(ValueError, match=rf"different options: {key}=.* \(now {re.escape(repr(value))}\)"):
            Job(tiny_config(tiny_bert, resume="latest", **{**common, key: value}))
    with pytest.raises(ValueError, match=r"different options: batch_size=8 \(now 4\), lr=0.01 \(now 0.02\), seed=0 "
                                         r"\(now 1\)\. Resume with the checkpoint's options"):
        Job(tiny_config(tiny_bert, resume="latest", **{**common, "lr": 2e-2, "batch_size": 4, "seed": 1}))
    resumed = Job(tiny_config(tiny_bert, resume="latest", **{**common, "eval_every": 1, "eval_batch_size": 3,
                                                             "save_every": 2, "backend": "reference"}))
    assert resumed.start_step == 2
    assert Job(tiny_config(tiny_bert, resume="latest", **{**common, "lr": None})).start_step == 2  # v1's default
    longer = Job(tiny_config(tiny_bert, resume="latest", **{**common, "steps": 5}))
    assert (longer.start_step, longer.total_steps) == (2, 5)


def test_backend_is_checked_up_front_and_restored(tiny_bert, small_data, monkeypatch):
    data, eval_data = small_data
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    previous = ptuning_fast.get_backend()
    with pytest.raises(ValueError, match="`backend` 'triton': .*needs CUDA tensors"):
        train.run(tiny_config(tiny_bert, data=data, backend="triton", device="cpu"))
    assert ptuning_fast.get_backend() == previous
    train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=1, backend="reference"))
    assert ptuning_fast.get_backend() == previous


def test_data_errors_in_a_run(tiny_bert, tiny_llama, tmp_path):
    one_label = tmp_path / "one.jsonl"
    write_examples([{"text": "good film", "label": "positive"}] * 20, one_label)
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        train.run(tiny_config(tiny_bert, data=str(one_label)))
    small = tmp_path / "small.jsonl"
    write_examples(sentiment_examples("test")[:10], small)
    with pytest.raises(ValueError, match="`batch_size` \\(8\\) is larger than the training set"):
        train.run(tiny_config(tiny_bert, data=str(small), eval_fraction=0.5))
    clash = tmp_path / "clash.jsonl"  # both labels start with the same token
    write_examples([{"text": "good film", "label": "positive"}, {"text": "bad film", "label": "positive film"}] * 8,
                   clash)
    with pytest.raises(ValueError, match="each label must start with its own token"):
        train.run(tiny_config(tiny_llama, task="causal-lm", data=str(clash)))


@pytest.mark.parametrize("prompt", ["v1", "v2"])
def test_causal_lm_run(tiny_llama, small_data, prompt):
    data, eval_data = small_data
    result = train.run(tiny_config(tiny_llama, task="causal-lm", prompt=prompt, data=data, eval_data=eval_data))
    assert 0 <= result.summary["eval_accuracy"] <= 1 and result.summary["final_train_loss"] > 0
    assert result.summary["implementation"].startswith(("ptuning_fast", "peft"))


def test_bf16_autocast_run(tiny_bert, small_data):
    data, eval_data = small_data
    config = tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=2, precision="bf16", device="cpu")
    result = train.run(config)
    assert result.summary["precision"] == "bf16" and result.summary["final_train_loss"] > 0
    assert all(p.dtype == torch.float32 for p in train.trainable_parameters(result.model).values())


@pytest.mark.peft_oracle
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_bf16_autocast_deep_prompt_run_matches_the_peft_baseline(tiny_bert, tiny_llama, small_data, task):
    """--precision bf16 (CPU autocast) with deep prompts: two steps train the prefix as plain PEFT
    does under the same autocast (bf16 tolerance: the reduction orders differ)."""
    data, eval_data = small_data
    model = tiny_llama if task == "causal-lm" else tiny_bert
    common = dict(task=task, data=data, eval_data=eval_data, prompt="v2", steps=2, device="cpu", precision="bf16")
    fast = train.run(tiny_config(model, **common))
    peft_run = train.run(tiny_config(model, baseline="peft", **common))
    assert fast.summary["implementation"].startswith("ptuning_fast") and fast.summary["precision"] == "bf16"
    expected, got = trainable_state(peft_run.model), trainable_state(fast.model)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("prompt", ["v1", "v2"])
def test_cuda_triton_run_matches_the_peft_baseline(tiny_bert, small_data, prompt):
    data, eval_data = small_data
    common = dict(data=data, eval_data=eval_data, prompt=prompt, steps=2, device="cuda", precision="fp32")
    fast = train.run(tiny_config(tiny_bert, backend="triton", **common))
    peft_run = train.run(tiny_config(tiny_bert, baseline="peft", **common))
    assert fast.summary["implementation"] == "ptuning_fast" and fast.summary["device"].startswith("cuda")
    expected, got = trainable_state(peft_run.model), trainable_state(fast.model)
    for name in expected:  # loose enough for TF32 matmuls in the kernels, far below one step's change (lr 1e-2)
        torch.testing.assert_close(got[name], expected[name], rtol=1e-2, atol=1e-3, msg=name)


def test_baseline_peft_keeps_pefts_modules(tiny_bert, small_data):
    from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder
    data, eval_data = small_data
    result = train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=1, baseline="peft"))
    assert result.summary["implementation"] == "peft"
    assert type(result.model.prompt_encoder["default"]) is PeftPromptEncoder


# ------------------------------------------------------------------------------------------------
# Two processes (gloo) against one
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world_size, port, configs, out_dir):
    """One rank, set up the way torchrun sets it up (env variables), running each config."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    try:
        for name, config in configs.items():
            result = train.run(config)
            assert result.summary["world_size"] == world_size
            assert result.summary["sharded_blocks"] == (2 if config.strategy == "fsdp" else 0)
            save_file({k: v.contiguous() for k, v in trainable_state(result.model).items()},
                      os.path.join(out_dir, f"{name}-rank{rank}.safetensors"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    configs = {
        # SGD: unlike Adam, sensitive to how the gradient is scaled across ranks
        "ddp_v1": tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=3, strategy="ddp", optimizer="sgd",
                              lr=0.5, max_grad_norm=0.0),
        "fsdp_v1": tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=3, strategy="fsdp", optimizer="sgd",
                               lr=0.5, max_grad_norm=0.0),
        "fsdp_v2": tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=3, prompt="v2", strategy="fsdp",
                               output_dir=str(tmp_path / "fsdp_v2")),
    }
    mp.spawn(_distributed_worker, args=(2, _free_port(), configs, str(tmp_path)), nprocs=2, join=True)
    for name, config in configs.items():
        rank0 = load_file(tmp_path / f"{name}-rank0.safetensors")
        rank1 = load_file(tmp_path / f"{name}-rank1.safetensors")
        single = trainable_state(train.run(dataclasses.replace(config, strategy="auto", output_dir=None)).model)
        assert rank0.keys() == rank1.keys() == single.keys()
        for key in single:
            assert torch.equal(rank0[key], rank1[key]), (name, key)  # ranks in exact sync
            # one process on the whole batch == two on halves (up to summation order)
            torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    # rank 0 wrote the checkpoint (adapter + full state) under FSDP too
    saved = load_file(tmp_path / "fsdp_v2" / "checkpoint-3" / train.TRAINABLE_FILE)
    rank0 = load_file(tmp_path / "fsdp_v2-rank0.safetensors")
    assert saved.keys() == rank0.keys() and all(torch.equal(saved[k], rank0[k]) for k in saved)
    assert (tmp_path / "fsdp_v2" / "checkpoint-3" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# Hugging Face Trainer (the README example, on the tiny model)
# ------------------------------------------------------------------------------------------------
def test_hf_trainer_example(tiny_bert, tmp_path):
    from peft import PromptEncoderConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = get_peft_model(model, PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4,
                                                      encoder_hidden_size=16))
    model = ptuning_fast.accelerate(model)
    before = trainable_state(model)
    label_ids = {"negative": 0, "positive": 1}
    dataset = [dict(tokenizer(e["text"], truncation=True, max_length=24), labels=label_ids[e["label"]])
               for e in sentiment_examples("train")[:32]]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2, max_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer)).train()
    after = trainable_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if "prompt_encoder" in k)
