"""``PromptEncoder``: a drop-in for ``peft.tuners.p_tuning.PromptEncoder`` (P-tuning v1).

Same constructor, submodule names, ``state_dict`` keys, initialisation order (seed-for-seed the
same weights as PEFT), warnings and errors. What differs is how it computes:

- The T distinct virtual tokens are encoded once (``encoded_prompts()``, shape (T, D)) and the
  result is broadcast over the batch: an index tensor whose rows are all the same (stride 0 over
  the batch, or B == 1) gets an expanded view, never B copies.
- Nothing derived from the parameters is kept between calls: every call encodes the T tokens
  again (a few small matrix products), so no optimizer step, ``.data`` write or
  ``load_state_dict`` can leave a stale prompt behind.
- The MLP head runs through :func:`ptuning_fast.ops.prompt_mlp_head` (Triton on CUDA, the
  reference elsewhere; see :mod:`ptuning_fast.backend`).
- The indices PeftModel passes (0..T-1 in order, one row expanded over the batch) need no lookup:
  the head reads the embedding table directly and its output is viewed over the batch, so a
  training step of the MLP encoder is three kernel launches forward and three backward. Index
  values are checked where reading them is free (CPU tensors; on an accelerator only with
  ``ptuning_fast.value_checks("always")``); elsewhere the general lookup path runs, exact for any
  row, with no host sync.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from peft.tuners.p_tuning.model import PromptEncoder as _PeftPromptEncoder

from .._validation import INDEX_DTYPES, check_config_int, check_positive_int, check_tensor, reads_values
from ..config import (PromptEncoderConfig, PromptEncoderReparameterizationType, normalize_encoder_type,
                      read_encoder_config)
from ..ops.prompt_mlp import prompt_mlp_head


def _read_config(config) -> PromptEncoderConfig:
    """Accept ours, PEFT's or any object with the fields; validate what the encoder needs."""
    config = read_encoder_config(PromptEncoderConfig, config, "PromptEncoder")
    check_positive_int(config.token_dim, "token_dim")
    check_positive_int(config.num_transformer_submodules, "num_transformer_submodules")
    if not config.inference_mode:
        check_config_int(config, "encoder_hidden_size", "the model's hidden size")
    return config


class PromptEncoder(_PeftPromptEncoder):
    """P-tuning prompt encoder, interchangeable with PEFT's (it is an instance of PEFT's class).

    Input: indices (B, T) into the ``total_virtual_tokens`` virtual tokens.
    Output: (B, T, token_dim); an expanded view when all rows are the same.
    """

    def __init__(self, config):
        torch.nn.Module.__init__(self)  # PEFT's __init__ is replaced, in the same order, below
        config = _read_config(config)
        self.token_dim = config.token_dim
        self.input_size = self.token_dim
        self.output_size = self.token_dim
        self.hidden_size = config.encoder_hidden_size
        self.total_virtual_tokens = config.num_virtual_tokens * config.num_transformer_submodules
        self.encoder_type = normalize_encoder_type(config.encoder_reparameterization_type)

        self.embedding = torch.nn.Embedding(self.total_virtual_tokens, self.token_dim)
        if config.inference_mode:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = torch.nn.LSTM(
                input_size=self.input_size,
                hidden_size=self.hidden_size,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = torch.nn.Sequential(
                torch.nn.Linear(self.hidden_size * 2, self.hidden_size * 2),
                torch.nn.ReLU(),
                torch.nn.Linear(self.hidden_size * 2, self.output_size),
            )
        else:
            default_layers = PromptEncoderConfig.encoder_num_layers
            if config.encoder_num_layers != default_layers:
                warnings.warn(
                    f"for {self.encoder_type.value}, the argument `encoder_num_layers` is ignored. "
                    f"Exactly {default_layers} MLP layers are used."
                )
            self.mlp_head = torch.nn.Sequential(
                torch.nn.Linear(self.input_size, self.hidden_size),
                torch.nn.ReLU(),
                torch.nn.Linear(self.hidden_size, self.hidden_size),
                torch.nn.ReLU(),
                torch.nn.Linear(self.hidden_size, self.output_size),
            )

    # ----------------------------------------------------------------------------------------
    @property
    def inference_mode(self) -> bool:
        """True when built with ``inference_mode=True``: embedding only, no encoder head."""
        return not hasattr(self, "mlp_head")

    def _mlp_layers(self):
        return [(m.weight, m.bias) for m in self.mlp_head if isinstance(m, torch.nn.Linear)]

    def _encode_sequences(self, embeds: torch.Tensor) -> torch.Tensor:
        """Encoder head over embeddings (..., T, D) -> (..., T, D), no caching."""
        if self.inference_mode:
            return embeds
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            embeds = self.lstm_head(embeds)[0]
        return prompt_mlp_head(embeds, self._mlp_layers())

    def encoded_prompts(self) -> torch.Tensor:
        """The encoded virtual tokens 0..total_virtual_tokens-1 in order, shape (T, token_dim).

        For the LSTM encoder this is the bi-LSTM over that sequence, as PEFT feeds it.
        Computed on every call from the current parameters.
        """
        weight = self.embedding.weight
        if self.inference_mode or self.encoder_type == PromptEncoderReparameterizationType.MLP:
            return self._encode_sequences(weight)  # row-wise: no batch dimension needed
        return self._encode_sequences(weight.unsqueeze(0))[0]

    # ----------------------------------------------------------------------------------------
    def _check_indices(self, indices: torch.Tensor) -> bool:
        """Raise ValueError for index values outside [0, total_virtual_tokens); return whether the
        first row is exactly 0..total-1 (then the encoded table is the answer, no lookup needed).

        Reads values only where that is free (:func:`ptuning_fast._validation.reads_values`: CPU
        tensors, or ``value_checks("always")``); elsewhere (an accelerator, torch.compile, CUDA
        graph capture) nothing is read and the general lookup path runs, exact for any row.
        """
        if indices.numel() == 0 or not reads_values(indices):
            return False
        total = self.total_virtual_tokens
        row = indices[0]
        lo, hi = torch.aminmax(indices)
        if row.shape[0] == total:
            in_order = (row.long() == torch.arange(total, device=row.device)).all()
        else:
            in_order = torch.zeros((), dtype=torch.bool, device=row.device)
        lo, hi, in_order = torch.stack([lo.long(), hi.long(), in_order.long()]).tolist()  # the one read
        if lo < 0 or hi >= total:
            raise ValueError(f"`indices` holds indices outside [0, {total}): min {lo}, max {hi}")
        return bool(in_order)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight
        check_tensor(indices, "indices", ndim=2, dtypes=INDEX_DTYPES, device=weight.device)
        first_row_in_order = self._check_indices(indices)
        if indices.dtype not in (torch.int64, torch.int32):
            indices = indices.long()
        batch = indices.shape[0]
        same_rows = batch == 1 or indices.stride(0) == 0  # one row, or one row expanded over B

        if self.inference_mode or self.encoder_type == PromptEncoderReparameterizationType.MLP:
            table = self.encoded_prompts()  # each distinct token encoded once
            if same_rows and first_row_in_order:
                return table.unsqueeze(0).expand(batch, -1, -1)  # PeftModel's tokens: no lookup at all
            if same_rows:
                return F.embedding(indices[:1], table).expand(batch, -1, -1)
            return F.embedding(indices, table)

        # bi-LSTM: a row is a sequence, so each distinct row is encoded once.
        if same_rows and first_row_in_order:
            return self.encoded_prompts().unsqueeze(0).expand(batch, -1, -1)  # the sequence PEFT always feeds
        if same_rows:
            rows, inverse = indices[:1], None
        else:
            rows, inverse = torch.unique(indices, dim=0, return_inverse=True)
        if not same_rows and rows.shape == (1, self.total_virtual_tokens) and first_row_in_order:
            encoded = self.encoded_prompts().unsqueeze(0)  # every row is the canonical sequence
        else:
            encoded = self._encode_sequences(F.embedding(rows, weight))
        return encoded.expand(batch, -1, -1) if inverse is None else encoded[inverse]


__all__ = ["PromptEncoder"]
