"""Reference of the P-tuning MLP head: ``Linear -> ReLU -> ... -> Linear`` (ReLU between layers).

PEFT's MLP encoder is three Linear layers (D->H->H->D); the head after its bi-LSTM is two
(2H->2H->D). Each row (virtual token) is independent, so encoding the T distinct tokens once and
broadcasting over the batch gives exactly PEFT's per-row result.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Layer = Tuple[torch.Tensor, Optional[torch.Tensor]]


def prompt_mlp_reference(x: torch.Tensor, layers: Sequence[Layer]) -> torch.Tensor:
    """``x``: (..., D_in); ``layers``: (weight (out, in), bias (out,) or None) per Linear."""
    h = x
    for i, (weight, bias) in enumerate(layers):
        h = F.linear(h, weight, bias)
        if i + 1 < len(layers):
            h = torch.relu(h)
    return h
