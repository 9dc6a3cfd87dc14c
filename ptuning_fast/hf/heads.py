"""What each model head (PEFT task type) reads and returns per token, the check of per-token
inputs, and the QA span loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import TaskType

from .._validation import INDEX_DTYPES, check_token_tensor

# Outputs that hold one entry per input token, per task: gathered back to the caller's columns.
TOKEN_OUTPUTS = {
    TaskType.CAUSAL_LM: ("logits", "hidden_states"),
    TaskType.TOKEN_CLS: ("logits", "hidden_states"),
    TaskType.QUESTION_ANS: ("start_logits", "end_logits", "hidden_states"),
    TaskType.SEQ_CLS: ("hidden_states",),
    TaskType.FEATURE_EXTRACTION: ("last_hidden_state", "hidden_states", "logits"),  # logits: masked-LM heads
    TaskType.SEQ_2_SEQ_LM: ("encoder_last_hidden_state", "encoder_hidden_states"),
}
# Labels with one entry per input token (padded with -100 under the prompt).
TOKEN_LABELS = {TaskType.CAUSAL_LM: ("labels",), TaskType.TOKEN_CLS: ("labels",),
                TaskType.FEATURE_EXTRACTION: ("labels",)}  # masked-LM heads take per-token labels


def check_per_token_inputs(task, shape: tuple, device, named: dict, *, of: str, hint: str) -> None:
    """The per-token tensors in ``named`` (``attention_mask``, ``position_ids``, ``token_type_ids``,
    and ``labels`` where the head ``task`` takes one per token) have the text's (B, S) ``shape``,
    integer dtypes where they must: they are moved with the text, so a wrong one is named here."""
    for name, value in named.items():
        if value is None or (name == "labels" and task not in TOKEN_LABELS):
            continue
        check_token_tensor(value, name, shape, of=of, device=device, hint=hint,
                           dtypes=None if name == "attention_mask" else INDEX_DTYPES)


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """Question answering's loss as transformers computes it (out-of-range positions are ignored)."""
    ignored = start_logits.shape[1]
    start = start_positions.reshape(-1).clamp(0, ignored)
    end = end_positions.reshape(-1).clamp(0, ignored)
    return (F.cross_entropy(start_logits, start, ignore_index=ignored)
            + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2


__all__ = ["TOKEN_LABELS", "TOKEN_OUTPUTS", "check_per_token_inputs", "span_loss"]
