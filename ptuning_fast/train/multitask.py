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
(every trained tensor, the classifier included) and ``summary.json`` with per-task accuracy;
``--save-every`` writes the same layout to ``checkpoint-STEP/``. One process; ``--resume``,
``--baseline peft`` (PEFT cannot mix prompt adapters in a batch) and ``--data`` do not combine
with ``--tasks``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import TRAINABLE_FILE, atomic_folder, save_trainable_state
from .config import TrainConfig, parse_tasks
from .data import load_examples
from .job import Job
from .model import load_base_model, peft_config_for

ADAPTERS_DIR = "adapters"
_HEAD_NAMES = ("classifier", "score")  # the new head of a sequence-classification model (PEFT's names)


def build_multitask_model(config: TrainConfig, tokenizer, num_labels: Optional[int], task_names: list[str]):
    """The frozen base model with one prompt adapter per task (a :class:`PTuningModel`); for
    classification the new classifier head stays trainable. Seed the RNG first."""
    from ..native.model import get_ptuning_model

    if not isinstance(task_names, (list, tuple)) or not task_names:
        raise ValueError(f"`task_names` must be a non-empty list of adapter names, got {task_names!r}")
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
    if not isinstance(getattr(model, "prompt_encoder", None), torch.nn.ModuleDict):
        raise TypeError(f"`model` must be a PTuningModel, got {type(model).__name__}")
    groups = {name: [p for p in encoder.parameters() if p.requires_grad]
              for name, encoder in model.prompt_encoder.items()}
    head = [p for name, p in model.base_model.named_parameters() if p.requires_grad]
    if head:
        groups["head"] = head
    return groups


def multitask_loss(losses: torch.Tensor, terms: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """Sum over the tasks of each task's mean loss over its own rows' terms."""
    if not isinstance(adapter_names, (list, tuple)) or len(adapter_names) != len(losses):
        raise ValueError(f"`adapter_names` must name each of the {len(losses)} rows, got {adapter_names!r}")
    total = losses.new_zeros(())
    for name in dict.fromkeys(adapter_names):
        rows = torch.tensor([n == name for n in adapter_names], device=losses.device)
        total = total + losses[rows].sum() / terms[rows].sum().clamp(min=1)
    return total


class MultiTaskJob(Job):
    """One multi-task run (see the module docstring). ``peft_model`` is the :class:`PTuningModel`;
    ``batch()`` also returns each row's adapter name."""

    training_set = "the tasks' training sets together"

    def __init__(self, config: TrainConfig):
        if not isinstance(config, TrainConfig) or not config.tasks:
            raise ValueError("MultiTaskJob needs a TrainConfig with `tasks`")
        self.tasks = parse_tasks(config.tasks)
        super().__init__(config)

    def check_processes(self) -> None:
        if self.dist.enabled:
            raise ValueError("`tasks` runs on one process; launch without torchrun")

    def load_splits(self) -> dict:
        return {name: load_examples(dataclasses.replace(self.config, data=path, tasks=None))
                for name, path in self.tasks}

    def build_model(self, tokenizer, num_labels: Optional[int]):
        return build_multitask_model(self.config, tokenizer, num_labels, [n for n, _ in self.tasks]), "ptuning_fast"

    def uses_left_padding(self) -> bool:
        return False  # the native model finds each row's last real token itself

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return parameter_groups(self.peft_model)  # clipped per adapter: one task never scales another's update

    def step_loss(self, batch: dict, adapter_names: list[str]) -> torch.Tensor:
        """The training objective of one mixed batch (see :func:`multitask_loss`)."""
        losses, terms, _ = self.rows(batch, adapter_names)
        return multitask_loss(losses, terms, adapter_names)

    def objective(self, batch: dict, adapter_names: Optional[list], indices: list[int]):
        loss = self.step_loss(batch, adapter_names)
        return loss, loss.detach().double() / len(set(adapter_names))  # reported: the mean over the batch's tasks

    def describe(self) -> str:
        return super().describe() + f" | {len(self.tasks)} tasks ({', '.join(n for n, _ in self.tasks)}) in every batch"

    def eval_groups(self) -> list[str]:
        return [name for name, _ in self.tasks]

    def eval_result(self, per_group: dict) -> dict:
        return {"tasks": per_group,
                "eval_accuracy": sum(r["eval_accuracy"] for r in per_group.values()) / len(per_group),
                "eval_loss": sum(r["eval_loss"] for r in per_group.values()) / len(per_group)}

    def format_eval(self, result: dict) -> str:
        return "eval accuracy " + ", ".join(f"{n} {r['eval_accuracy']:.4f}" for n, r in result["tasks"].items())

    def write_outputs(self, folder: Path) -> None:
        """Each task's adapter in PEFT's format under ``folder/adapters/<task>/``, and every trained tensor."""
        if (folder / ADAPTERS_DIR).is_symlink():  # replaced, never written through
            (folder / ADAPTERS_DIR).unlink()
        self.peft_model.save_pretrained(str(folder / ADAPTERS_DIR), save_encoder=True)
        save_trainable_state(self.peft_model, folder / TRAINABLE_FILE)

    def write_checkpoint(self, folder: Path, step: int) -> None:
        with atomic_folder(folder) as temporary:
            self.write_outputs(temporary)

    def save_final(self) -> None:
        self.write_outputs(Path(self.config.output_dir))

    def summary_fields(self) -> dict:
        last = self.history[-1]["tasks"]
        return {"tasks": {name: {"data": path, "train_examples": self.train_data.tasks.count(name),
                                 "eval_examples": self.eval_data.tasks.count(name), **last[name]}
                          for name, path in self.tasks}}


__all__ = ["ADAPTERS_DIR", "MultiTaskJob", "build_multitask_model", "multitask_loss", "parameter_groups"]
