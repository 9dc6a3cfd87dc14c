"""What the native model adds to a PEFT config: :class:`PromptOptions` (saved beside the adapter
as ``ptuning_fast_config.json``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..ops.mask import POSITIONS, check_positions

PLACEMENTS = ("prefix", "template")


@dataclass
class PromptOptions:
    """What the native model adds to a PEFT config (saved beside it as ``ptuning_fast_config.json``).

    - ``placement``: ``"prefix"`` (v1 prompt in front of the text, as PEFT) or ``"template"``
      (v1 virtual tokens wherever ``input_ids == prompt_token_id``). Deep prompts use ``"prefix"``.
    - ``prompt_token_id``: the placeholder id of template mode. Any id that never occurs in
      the text; it need not be inside the vocabulary (those columns are never embedded).
    - ``positions`` (:data:`~ptuning_fast.ops.mask.POSITIONS`): ``"continue"`` (text positions
      follow the prompt, counting real tokens: a padded row computes what it computes alone),
      ``"restart"`` (text positions start at 0; v1 virtual tokens are numbered 0..T-1 on their
      own) or ``"peft"`` (PEFT's forward exactly: the v1 prompt in front of the input columns as
      given, padding included, every column counted, per-token outputs in PEFT's layout with the
      prompt columns first; deep prompts: text column i at the prefix length + i).
    """

    placement: str = "prefix"
    prompt_token_id: Optional[int] = None
    positions: str = "continue"

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"`placement` must be one of {PLACEMENTS}, got {self.placement!r}")
        check_positions(self.positions)
        if self.prompt_token_id is not None and (isinstance(self.prompt_token_id, bool)
                                                 or not isinstance(self.prompt_token_id, int)):
            raise TypeError(f"`prompt_token_id` must be an int or None, got {self.prompt_token_id!r}")
        if self.placement == "template" and self.prompt_token_id is None:
            raise ValueError("`placement='template'` needs `prompt_token_id`: the id that marks the virtual "
                             "tokens in `input_ids`")
        if self.placement == "template" and self.positions == "peft":
            raise ValueError("`positions='peft'` lays the prompt out as PEFT does, in front of the input: it does "
                             "not combine with `placement='template'`")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PromptOptions":
        if not isinstance(data, dict):
            raise TypeError(f"prompt options must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown prompt options {unknown}; known: {sorted(names)}")
        return cls(**data)


__all__ = ["PLACEMENTS", "POSITIONS", "PromptOptions"]
