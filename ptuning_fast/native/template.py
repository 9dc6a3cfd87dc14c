"""P-tuning v1 templates: virtual tokens anywhere in the input, real "anchor" tokens between them."""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

import torch


class PromptTemplate:
    """A P-tuning v1 template: ``[P]`` marks a virtual token, ``{name}`` an input field, and any
    other text is kept as real "anchor" tokens, e.g. ``"[P][P] {premise} [P] ? [P] {hypothesis}"``.

    ``encode`` turns one example into token ids with ``prompt_token_id`` at the virtual tokens;
    ``batch`` pads several into ``input_ids`` / ``attention_mask`` tensors for a
    :class:`PTuningModel` built with ``PromptOptions(placement="template", prompt_token_id=...)``.
    """

    _PIECE = re.compile(r"(\[P\]|\{[A-Za-z_][A-Za-z0-9_]*\})")

    def __init__(self, template: str):
        if not isinstance(template, str):
            raise TypeError(f"`template` must be a str, got {type(template).__name__}")
        self.template = template
        self.segments = []  # ("prompt", None) | ("field", name) | ("text", literal)
        for piece in self._PIECE.split(template):
            if piece == "[P]":
                self.segments.append(("prompt", None))
            elif piece.startswith("{") and piece.endswith("}") and self._PIECE.fullmatch(piece):
                self.segments.append(("field", piece[1:-1]))
            elif piece.strip():
                self.segments.append(("text", piece))
        if self.num_virtual_tokens == 0:
            raise ValueError(f"`template` has no virtual token `[P]`: {template!r}")

    @property
    def num_virtual_tokens(self) -> int:
        return sum(kind == "prompt" for kind, _ in self.segments)

    @property
    def fields(self) -> List[str]:
        return [value for kind, value in self.segments if kind == "field"]

    def encode(self, tokenizer, prompt_token_id: int, add_special_tokens: bool = True, **fields) -> List[int]:
        """Token ids of one example (``fields`` are the ``{name}`` values, strings or id lists)."""
        missing = [name for name in self.fields if name not in fields]
        if missing:
            raise ValueError(f"missing template fields {missing} for template {self.template!r}")
        unknown = sorted(set(fields) - set(self.fields))
        if unknown:
            raise ValueError(f"unknown template fields {unknown}; the template has {self.fields}")
        ids: List[int] = []
        for kind, value in self.segments:
            if kind == "prompt":
                ids.append(prompt_token_id)
            else:
                content = fields[value] if kind == "field" else value.strip()
                if isinstance(content, str):
                    content = tokenizer(content, add_special_tokens=False)["input_ids"]
                ids.extend(int(i) for i in content)
        if add_special_tokens:
            before, after = _special_tokens_around(tokenizer)
            ids = before + ids + after
        return ids

    def batch(self, tokenizer, examples: Sequence[dict], prompt_token_id: int, *, padding_side: str = "right",
              add_special_tokens: bool = True) -> Dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, S) for a list of examples, padded on ``padding_side``."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
        rows = [self.encode(tokenizer, prompt_token_id, add_special_tokens, **example) for example in examples]
        if not rows:
            raise ValueError("`examples` is empty")
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _special_tokens_around(tokenizer):
    """The ids a tokenizer puts before and after a text when adding special tokens ([CLS] / [SEP]...)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    raise ValueError("cannot tell where this tokenizer puts its special tokens; pass add_special_tokens=False "
                     "and add them yourself")


__all__ = ["PromptTemplate"]
