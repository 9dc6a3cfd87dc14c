"""The training loss, per row, shared by the single-task and the multi-task jobs.

Classification: cross-entropy over the classes (one term per row). Causal LM: next-token
cross-entropy over the label tokens; a row is correct when its first label token scores highest
among the labels' first tokens.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


_BATCH_KEYS = ("input_ids", "attention_mask", "targets", "answer_starts")


def _check_batch(batch) -> None:
    if not isinstance(batch, dict) or any(k not in batch for k in _BATCH_KEYS):
        raise TypeError(f"`batch` must be a dict with {list(_BATCH_KEYS)} (see ptuning_fast.train.data.make_batch)")


def row_losses(logits: torch.Tensor, batch: dict, task: str, label_words: Optional[list[list[int]]] = None):
    """Per row of ``batch``: (summed loss, number of loss terms, whether it is correct).

    ``logits``: the model's output for ``batch["input_ids"]`` (B, S, V) or, for classification,
    (B, C). A v1 PEFT model's logits also hold the prompt columns in front: the last S are the
    text's.
    """
    _check_batch(batch)
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise TypeError(f"`logits` must be a (B, C) or (B, S, V) tensor, got {getattr(logits, 'shape', logits)!r}")
    logits = logits.float()
    targets = batch["targets"]
    if task == "classification":
        losses = F.cross_entropy(logits, targets, reduction="none")
        return losses, torch.ones_like(losses), logits.argmax(-1) == targets
    if task != "causal-lm":
        raise ValueError(f"`task` must be 'classification' or 'causal-lm', got {task!r}")
    if not label_words:
        raise ValueError("`label_words` (each label's token ids) are needed for causal-lm")
    input_ids = batch["input_ids"]
    rows, seq_len = input_ids.shape
    logits = logits[:, -seq_len:]
    positions = torch.arange(seq_len, device=input_ids.device)
    answer = (positions >= batch["answer_starts"][:, None]) & batch["attention_mask"].bool()
    labels = input_ids.masked_fill(~answer, -100)[:, 1:]
    token_losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="none").view(rows, seq_len - 1)
    first_ids = torch.tensor([w[0] for w in label_words], device=logits.device)
    scores = logits[torch.arange(rows, device=logits.device), batch["answer_starts"] - 1][:, first_ids]
    return token_losses.sum(1), (labels != -100).sum(1).float(), scores.argmax(-1) == targets


def loss_sum_and_correct(model, batch: dict, task: str, label_words: Optional[list[list[int]]] = None):
    """Summed loss over the batch's loss terms, and the number of correctly classified examples,
    of ``model`` on ``batch`` (what the single-task job optimises)."""
    _check_batch(batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses, _, correct = row_losses(out.logits, batch, task, label_words)
    return losses.sum(), correct.sum()


__all__ = ["loss_sum_and_correct", "row_losses"]
