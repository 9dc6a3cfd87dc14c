"""The job's data: (train, eval) examples, their labels, tokenised examples, and the batches of
each step (a pure function of the seed and the step, so a resumed run sees the same ones)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..data import read_examples, sentiment_examples
from .config import TrainConfig, check_config

_INTEGER = re.compile(r"-?[0-9]+")


def load_examples(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples: the files given, or the embedded dataset's train/test splits."""
    if check_config(config).data is None:
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


def label_of(example: dict) -> str:
    """An example's label as the job names it: always a str, so the int 1 of a JSONL file and the
    "1" of a CSV file (or of another JSONL line) are one class."""
    label = example["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise TypeError(f"`label` values must be str or int, got {label!r}")
    return str(label)


def _label_order(label: str):
    # Integer labels in numeric order ("2" before "10"), before the other labels in text order.
    return (0, int(label), label) if _INTEGER.fullmatch(label) else (1, 0, label)


def _check_examples(examples, name: str, keys: tuple = ("label",)) -> None:
    if not isinstance(examples, (list, tuple)) or not all(isinstance(e, dict) and all(k in e for k in keys)
                                                          for e in examples):
        raise TypeError(f"`{name}` must be a list of dicts with keys {list(keys)}")


def label_names(train: list[dict], evaluation: list[dict]) -> list[str]:
    """The sorted distinct labels (str) of the train set; eval labels must be among them."""
    _check_examples(train, "train")
    _check_examples(evaluation, "evaluation")
    labels = sorted({label_of(e) for e in train}, key=_label_order)
    if len(labels) < 2:
        raise ValueError(f"the training data needs at least 2 distinct labels, got {labels}")
    unknown = {label_of(e) for e in evaluation} - set(labels)
    if unknown:
        raise ValueError(f"eval labels {sorted(unknown)} do not occur in the training data")
    return labels


@dataclass
class Encoded:
    """Tokenised examples. ``ids[i]``: token ids; classification: ``targets[i]`` is a class id;
    causal LM: ``prompt_lengths[i]`` tokens of prompt, then the label's tokens. ``tasks[i]``
    names the task of example ``i`` in a multi-task pool (None for one task)."""

    ids: list[list[int]]
    targets: list[int]
    prompt_lengths: list[int]
    tasks: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.ids)


def pool(parts: dict) -> Encoded:
    """One :class:`Encoded` of named parts (``tasks`` names each example's part); a single part
    named None is returned as it is."""
    if not isinstance(parts, dict) or not parts or not all(isinstance(p, Encoded) for p in parts.values()):
        raise TypeError("`parts` must be a non-empty dict of name -> Encoded")
    if list(parts) == [None]:
        return parts[None]
    ids, targets, prompt_lengths, tasks = [], [], [], []
    for name, encoded in parts.items():
        ids += encoded.ids
        targets += encoded.targets
        prompt_lengths += encoded.prompt_lengths
        tasks += [name] * len(encoded.ids)
    return Encoded(ids, targets, prompt_lengths, tasks)


def encode_examples(examples: list[dict], labels: list, tokenizer, config: TrainConfig) -> Encoded:
    """Tokenise once, up front; batches are padded later."""
    check_config(config)
    _check_examples(examples, "examples", ("text", "label"))
    if not isinstance(labels, (list, tuple)) or not labels:
        raise TypeError(f"`labels` must be a non-empty list, got {labels!r}")
    index = {str(label): i for i, label in enumerate(labels)}
    unknown = {label_of(e) for e in examples} - set(index)
    if unknown:
        raise ValueError(f"`examples` hold labels {sorted(unknown)} that are not in `labels` {list(labels)}")
    targets = [index[label_of(e)] for e in examples]
    texts = [e["text"] for e in examples]
    if config.task == "classification":
        keep = "end" if getattr(tokenizer, "truncation_side", "right") == "left" else "start"
        cut = cut_texts(texts, config.max_length, keep,
                        lambda part: [len(x) for x in tokenizer(part, add_special_tokens=False)["input_ids"]])
        ids = tokenizer(cut, truncation=True, max_length=config.max_length)["input_ids"]
        return Encoded(ids, targets, [len(x) for x in ids])
    words = label_token_ids(labels, tokenizer)
    kept = max(1, config.max_length - min(len(w) for w in words))  # the most prompt tokens any example keeps
    cut = cut_texts(texts, kept + 2, "end",  # + 2: the template's first token (BOS) and one spare
                    lambda part: [len(x) for x in tokenizer([config.template.format(text=t) for t in part])
                                  ["input_ids"]])
    prompts = tokenizer([config.template.format(text=t) for t in cut])["input_ids"]
    ids, prompt_lengths = [], []
    for prompt, target in zip(prompts, targets):
        answer = words[target]
        prompt = prompt[-max(1, config.max_length - len(answer)):]  # keep the end: it leads to the label
        ids.append(prompt + answer)
        prompt_lengths.append(len(prompt))
    return Encoded(ids, targets, prompt_lengths)


CHARS_PER_TOKEN = 16  # the first cut of a long text, in characters per token kept; widened where too short


def _cut_at_space(text: str, limit: int, keep: str) -> str:
    """At most ``limit`` characters from ``keep``'s end of ``text``, cut at whitespace where there
    is some (whole words tokenise as they do in the whole text)."""
    if len(text) <= limit:
        return text
    if keep == "start":
        part = text[:limit]
        space = max(part.rfind(" "), part.rfind("\n"), part.rfind("\t"))
        return part[:space] if space > 0 else part
    part = text[-limit:]
    spaces = [i for i in (part.find(" "), part.find("\n"), part.find("\t")) if i >= 0]
    return part[min(spaces):] if spaces and min(spaces) < len(part) - 1 else part


def cut_texts(texts: list[str], tokens: int, keep: str, count_tokens) -> list[str]:
    """``texts``, each cut to the part (at ``keep``'s end: "start" or "end") that holds at least
    ``tokens`` tokens by ``count_tokens`` (a list of texts -> their token counts), or whole: so a
    100 MB field is never tokenised whole, while truncating the cut text to ``tokens`` keeps the
    tokens of the whole text's truncation."""
    if keep not in ("start", "end"):
        raise ValueError(f"`keep` must be 'start' or 'end', got {keep!r}")
    cut, limit = list(texts), tokens * CHARS_PER_TOKEN + 64
    pending = [i for i, text in enumerate(texts) if len(text) > limit]
    while pending:
        parts = [_cut_at_space(texts[i], limit, keep) for i in pending]
        counts = count_tokens(parts)
        short = []
        for i, part, count in zip(pending, parts, counts):
            cut[i] = part
            if count < tokens and len(part) < len(texts[i]):
                short.append(i)
        pending, limit = short, limit * 4
    return cut


def label_token_ids(labels: list, tokenizer) -> list[list[int]]:
    """Token ids of each label word as it follows the prompt (with a leading space)."""
    if not isinstance(labels, (list, tuple)) or not labels:
        raise TypeError(f"`labels` must be a non-empty list, got {labels!r}")
    words = [tokenizer(" " + str(label), add_special_tokens=False)["input_ids"] for label in labels]
    firsts = [w[0] if w else None for w in words]
    if None in firsts or len(set(firsts)) != len(firsts):
        raise ValueError(f"for causal-lm, each label must start with its own token; labels {labels} tokenise to "
                         f"{words}. Rename the labels (e.g. 'yes'/'no')")
    return words


def make_batch(encoded: Encoded, indices: list[int], pad_id: int, device: torch.device, *,
               pad_to: int, left_pad: bool = False) -> dict:
    """Pad the examples at ``indices`` to ``pad_to`` tokens and move them to ``device``."""
    if not isinstance(encoded, Encoded):
        raise TypeError(f"`encoded` must be an Encoded, got {type(encoded).__name__}")
    if not indices:
        raise ValueError("`indices` must name at least one example")
    longest = max(len(encoded.ids[i]) for i in indices)
    if pad_to < longest:
        raise ValueError(f"`pad_to` ({pad_to}) is shorter than the longest example ({longest} tokens)")
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
    if task not in ("classification", "causal-lm"):
        raise ValueError(f"`task` must be 'classification' or 'causal-lm', got {task!r}")
    if task == "classification":
        return len(indices)
    return sum(len(encoded.ids[i]) - encoded.prompt_lengths[i] for i in indices)


def epoch_order(num_examples: int, epoch: int, seed: int) -> list[int]:
    """The shuffled example order of an epoch: a pure function of (seed, epoch), so a resumed
    run sees the same batches as an uninterrupted one."""
    _check_counts(num_examples=num_examples, epoch=epoch, seed=seed)
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _check_counts(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")


def global_batch(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based); incomplete last batches are dropped."""
    _check_counts(num_examples=num_examples, step=step, seed=seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"`batch_size` ({batch_size}) is larger than `num_examples` ({num_examples})")
    epoch, position = divmod(step, per_epoch)
    return epoch_order(num_examples, epoch, seed)[position * batch_size:(position + 1) * batch_size]


__all__ = ["CHARS_PER_TOKEN", "Encoded", "count_targets", "cut_texts", "encode_examples", "epoch_order", "global_batch",
           "label_names", "label_of", "label_token_ids", "load_examples", "make_batch", "pool"]
