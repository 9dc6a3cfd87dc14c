"""Several P-tuning tasks trained in one run on one frozen model: ``ptuning-fast train --tasks NAME=FILE ...``.

Each task is a (text, label) data file (the format of ``--data``) and gets its own prompt adapter
(all built from the job's prompt options: ``--prompt``, ``--num-virtual-tokens``...). Every
batch draws its rows from all the tasks at once and runs as ONE batch through the native model
(:class:`ptuning_fast.PTuningModel`) with one adapter name per row (``adapter_names=``), so the
frozen model is shared by every task in every step. What makes it the same as training each task
on its own rows:

- the loss is the sum over the tasks of each task's mean over its own rows (or label tokens),
  so each adapter's gradient is the one its rows alone would give;
- gradient clipping (``--max-grad-norm``) is applied per adapter, and the optimizer keeps
  per-parameter state, so one task's gradients never scale another's update. An adapter with no
  row in a batch gets no gradient and is not updated by that step.

Classification heads: the new classifier of a sequence-classification model (PEFT trains it too,
as ``modules_to_save``) is shared by the tasks and trained on every row; the labels are the union
of the tasks' labels. Causal LM tasks (label words) share nothing trainable.

Outputs in ``--output-dir``: ``adapters/<task>/`` (PEFT's adapter format, one folder per task,
plus the full encoders so training can continue elsewhere), ``trainable_state.safetensors``
(every trained tensor, the classifier included) and ``summary.json`` with per-task accuracy.
One process; ``--resume``, ``--baseline peft`` (PEFT cannot mix prompt adapters in a batch) and
``--data`` do not combine with ``--tasks``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .train import (SUMMARY_FILE, Encoded, TrainConfig, _autocast, _peak_memory, encode_examples, global_batch,
                    label_names, label_token_ids, learning_rate_at, load_base_model, load_examples, load_tokenizer,
                    make_batch, make_optimizer, peft_config_for, setup_distributed, uses_bf16)

ADAPTERS_DIR = "adapters"
TRAINABLE_FILE = "trainable_state.safetensors"
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HEAD_NAMES = ("classifier", "score")  # the new head of a sequence-classification model (PEFT's names)


# ------------------------------------------------------------------------------------------------
# Options
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
            raise ValueError(f"`tasks`: task name {name!r} must be letters, digits, '_', '.' or '-' (it names the "
                             "adapter and its folder)")
        if not path:
            raise ValueError(f"`tasks`: task {name!r} has no data file")
        parsed.append((name, path))
    names = [name for name, _ in parsed]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"`tasks` names {repeated} more than once: each task needs its own name")
    return parsed


def check_tasks(config: TrainConfig) -> None:
    """The checks ``TrainConfig`` runs when ``tasks`` is given."""
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
# Data and model
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TaskSet:
    """All tasks' examples of one split in one pool; ``task_of[i]`` names the task of example ``i``."""

    encoded: Encoded
    task_of: list[str]

    def __len__(self) -> int:
        return len(self.task_of)


def _pool(parts: dict[str, Encoded]) -> TaskSet:
    ids, targets, prompt_lengths, task_of = [], [], [], []
    for name, encoded in parts.items():
        ids += encoded.ids
        targets += encoded.targets
        prompt_lengths += encoded.prompt_lengths
        task_of += [name] * len(encoded.ids)
    return TaskSet(Encoded(ids, targets, prompt_lengths), task_of)


def build_multitask_model(config: TrainConfig, tokenizer, num_labels: Optional[int], task_names: list[str]):
    """The frozen base model with one prompt adapter per task (a :class:`PTuningModel`); for
    classification the new classifier head stays trainable. Seed the RNG first."""
    from .native.model import get_ptuning_model

    base = load_base_model(config, tokenizer, num_labels)
    model = get_ptuning_model(base, peft_config_for(config), adapter_name=task_names[0])
    for name in task_names[1:]:
        model.add_adapter(name, peft_config_for(config))
    if config.task == "classification":
        for name in _HEAD_NAMES:
            head = getattr(base, name, None)
            if isinstance(head, torch.nn.Module):
                head.requires_grad_(True)
    return model


def parameter_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by owner: one group per task's adapter, plus ``"head"`` when trained."""
    groups = {name: [p for p in encoder.parameters() if p.requires_grad]
              for name, encoder in model.prompt_encoder.items()}
    head = [p for name, p in model.base_model.named_parameters() if p.requires_grad]
    if head:
        groups["head"] = head
    return groups


# ------------------------------------------------------------------------------------------------
# Loss: each task's mean over its own rows
# ------------------------------------------------------------------------------------------------
def row_losses(model, batch: dict, adapter_names: list[str], task: str, label_words=None):
    """Per row: summed loss, number of loss terms, and whether the row is classified correctly.

    Classification: cross-entropy over the classes (one term per row). Causal LM: next-token
    cross-entropy over the label tokens; correct when the first label token scores highest
    among the labels' first tokens (as the single-task job).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=adapter_names)
    logits = out.logits.float()
    if task == "classification":
        losses = F.cross_entropy(logits, batch["targets"], reduction="none")
        return losses, torch.ones_like(losses), logits.argmax(-1) == batch["targets"]
    input_ids = batch["input_ids"]  # the native model's logits are aligned with input_ids
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    answer = (positions >= batch["answer_starts"][:, None]) & batch["attention_mask"].bool()
    labels = input_ids.masked_fill(~answer, -100)[:, 1:]
    token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
    first_ids = torch.tensor([w[0] for w in label_words], device=logits.device)
    rows = torch.arange(len(input_ids), device=logits.device)
    scores = logits[rows, batch["answer_starts"] - 1][:, first_ids]
    return token_losses.sum(1), (labels != -100).sum(1).float(), scores.argmax(-1) == batch["targets"]


def multitask_loss(losses: torch.Tensor, terms: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """Sum over the tasks of each task's mean loss over its own rows' terms."""
    total = losses.new_zeros(())
    for name in dict.fromkeys(adapter_names):
        rows = torch.tensor([n == name for n in adapter_names], device=losses.device)
        total = total + losses[rows].sum() / terms[rows].sum().clamp(min=1)
    return total


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
class MultiTaskJob:
    """One multi-task run: set up in ``__init__`` (data, model, optimizer), ``train()`` loops.
    ``peft_model`` is the :class:`PTuningModel` (the name the single-task job uses)."""

    def __init__(self, config: TrainConfig):
        if not isinstance(config, TrainConfig) or not config.tasks:
            raise ValueError("MultiTaskJob needs a TrainConfig with `tasks`")
        self.config = config
        self.dist = setup_distributed(config)
        if self.dist.enabled:
            raise ValueError("`tasks` runs on one process; launch without torchrun")
        self.device = self.dist.device
        self.tasks = parse_tasks(config.tasks)
        names = [name for name, _ in self.tasks]

        splits = {name: load_examples(dataclasses.replace(config, data=path, tasks=None))
                  for name, path in self.tasks}
        self.labels = label_names([e for train, _ in splits.values() for e in train],
                                  [e for _, held in splits.values() for e in held])
        tokenizer = load_tokenizer(config)
        self.pad_id = tokenizer.pad_token_id
        self.train_data = _pool({n: encode_examples(s[0], self.labels, tokenizer, config) for n, s in splits.items()})
        self.eval_data = _pool({n: encode_examples(s[1], self.labels, tokenizer, config) for n, s in splits.items()})
        self.label_words = label_token_ids(self.labels, tokenizer) if config.task == "causal-lm" else None
        if len(self.train_data) < config.batch_size:
            raise ValueError(f"`batch_size` ({config.batch_size}) is larger than the tasks' training sets together "
                             f"({len(self.train_data)})")
        self.total_steps = config.steps or max(1, int(round(config.epochs * (len(self.train_data) // config.batch_size))))

        torch.manual_seed(config.seed)
        num_labels = len(self.labels) if config.task == "classification" else None
        self.peft_model = build_multitask_model(config, tokenizer, num_labels, names)
        self.peft_model.to(self.device).train()
        self.groups = parameter_groups(self.peft_model)
        self.params = [p for group in self.groups.values() for p in group]
        self.optimizer = make_optimizer(self.params, config)
        self.history, self.losses = [], []
        self.train_seconds, self.tokens_seen, self.samples_seen = 0.0, 0, 0

    def log(self, message: str) -> None:
        from tqdm.auto import tqdm
        tqdm.write(message)

    def batch(self, data: TaskSet, indices: list[int]) -> tuple[dict, list[str]]:
        pad_to = max(len(data.encoded.ids[i]) for i in indices)
        batch = make_batch(data.encoded, indices, self.pad_id, self.device, pad_to=pad_to)
        return batch, [data.task_of[i] for i in indices]

    def step_loss(self, batch: dict, adapter_names: list[str]) -> torch.Tensor:
        """The training objective of one mixed batch (see :func:`multitask_loss`)."""
        with _autocast(self.config, self.device):
            losses, terms, _ = row_losses(self.peft_model, batch, adapter_names, self.config.task, self.label_words)
        return multitask_loss(losses, terms, adapter_names)

    def train(self) -> None:
        config = self.config
        from tqdm.auto import tqdm
        self.log(f"model {config.model} | task {config.task} | prompts {config.prompt} | {len(self.tasks)} tasks "
                 f"({', '.join(n for n, _ in self.tasks)}) in every batch | device {self.device} | "
                 f"{self.total_steps} steps of {config.batch_size}")
        bar = tqdm(total=self.total_steps, desc="train", dynamic_ncols=True, mininterval=0.5,
                   disable=not config.progress)
        for step in range(self.total_steps):
            self.train_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
            done = step + 1
            if done < self.total_steps and config.eval_every and done % config.eval_every == 0:
                self.evaluate(done)
            if done < self.total_steps and config.save_every and done % config.save_every == 0:
                self.save(Path(config.output_dir) / f"checkpoint-{done}")
        bar.close()
        self.evaluate(self.total_steps)
        if config.output_dir is not None:
            self.save(Path(config.output_dir))

    def train_step(self, step: int) -> None:
        config = self.config
        t0 = time.perf_counter()
        indices = global_batch(len(self.train_data), config.batch_size, step, config.seed)
        batch, names = self.batch(self.train_data, indices)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(step, self.total_steps, config)
        loss = self.step_loss(batch, names)
        loss.backward()
        if config.max_grad_norm > 0:  # per adapter: one task's gradients never scale another's update
            for params in self.groups.values():
                with_grad = [p for p in params if p.grad is not None]
                if with_grad:
                    torch.nn.utils.clip_grad_norm_(with_grad, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses = (self.losses + [loss.item() / len(set(names))])[-20:]  # mean over the batch's tasks
        self.train_seconds += time.perf_counter() - t0
        self.tokens_seen += sum(len(self.train_data.encoded.ids[i]) for i in indices)
        self.samples_seen += len(indices)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Per-task accuracy and loss over the held-out examples, in mixed batches."""
        self.peft_model.eval()
        names_in_order = [name for name, _ in self.tasks]
        totals = torch.zeros(len(names_in_order), 4, dtype=torch.float64)  # loss, terms, correct, rows
        for start in range(0, len(self.eval_data), self.config.eval_batch_size):
            indices = list(range(start, min(start + self.config.eval_batch_size, len(self.eval_data))))
            batch, names = self.batch(self.eval_data, indices)
            with _autocast(self.config, self.device):
                losses, terms, correct = row_losses(self.peft_model, batch, names, self.config.task, self.label_words)
            task_index = torch.tensor([names_in_order.index(n) for n in names])
            rows = torch.stack([losses, terms, correct.float(), torch.ones_like(losses)], 1).double().cpu()
            totals.index_add_(0, task_index, rows)
        self.peft_model.train()
        per_task = {name: {"eval_accuracy": t[2].item() / max(t[3].item(), 1),
                           "eval_loss": t[0].item() / max(t[1].item(), 1)}
                    for name, t in zip(names_in_order, totals)}
        result = {"step": step, "tasks": per_task,
                  "eval_accuracy": sum(r["eval_accuracy"] for r in per_task.values()) / len(per_task),
                  "eval_loss": sum(r["eval_loss"] for r in per_task.values()) / len(per_task)}
        self.history.append(result)
        self.log(f"step {step}: eval accuracy " + ", ".join(f"{n} {r['eval_accuracy']:.4f}" for n, r in per_task.items()))
        return result

    def save(self, folder: Path) -> None:
        """Each task's adapter in PEFT's format under ``folder/adapters/<task>/``, and every trained tensor."""
        from safetensors.torch import save_file
        folder.mkdir(parents=True, exist_ok=True)
        self.peft_model.save_pretrained(str(folder / ADAPTERS_DIR), save_encoder=True)
        state = {name: p.detach().to("cpu", copy=True).contiguous()
                 for name, p in self.peft_model.named_parameters() if p.requires_grad}
        save_file(state, str(folder / TRAINABLE_FILE))

    def summary(self) -> dict:
        config = self.config
        peak_bytes, peak_kind = _peak_memory(self.device)
        seconds = self.train_seconds or float("nan")
        last = self.history[-1]
        summary = {
            "model": config.model, "task": config.task, "prompt": config.prompt, "implementation": "ptuning_fast",
            "backend": config.backend, "device": str(self.device), "world_size": 1, "strategy": "single",
            "precision": "bf16" if uses_bf16(config, self.device) else "fp32",
            "tasks": {name: {"data": path, "train_examples": self.train_data.task_of.count(name),
                             "eval_examples": self.eval_data.task_of.count(name), **last["tasks"][name]}
                      for name, path in self.tasks},
            "steps": self.total_steps, "batch_size": config.batch_size,
            "trainable_parameters": sum(p.numel() for p in self.params), "train_seconds": self.train_seconds,
            "samples_per_second": self.samples_seen / seconds, "tokens_per_second": self.tokens_seen / seconds,
            "final_train_loss": sum(self.losses) / len(self.losses) if self.losses else None,
            "eval_accuracy": last["eval_accuracy"], "eval_loss": last["eval_loss"],
            "peak_memory_bytes": peak_bytes, "peak_memory_kind": peak_kind, "history": self.history,
        }
        if config.output_dir is not None:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(config.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        self.log(f"done: {summary['steps']} steps, {len(self.tasks)} tasks in one model | "
                 f"{summary['tokens_per_second']:,.0f} tokens/s | eval accuracy "
                 + ", ".join(f"{n} {r['eval_accuracy']:.4f}" for n, r in summary["tasks"].items()))
        return summary


__all__ = ["MultiTaskJob", "build_multitask_model", "check_tasks", "multitask_loss", "parameter_groups",
           "parse_tasks", "row_losses"]
