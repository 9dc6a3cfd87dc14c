"""Prompts initialised from words: ``init_prompts_from_text(model, "Sentiment of the review:", tokenizer)``.

The contract: a prompt initialised from a text behaves like that text.

- v1 prompts (``P_TUNING``): the *encoded* virtual tokens equal the model's input embeddings of
  the text's tokens. The encoder's last linear layer is solved by least squares (float64) on its
  hidden activations, which is exact when those activations have rank >= T; otherwise all the
  encoder's parameters are fitted with Adam. An inference-mode adapter (embedding only) gets the
  embeddings written directly.
- Deep prompts (``PREFIX_TUNING``): every layer's key/value prefix equals the keys/values the
  frozen base model computes for the text at positions 0..T-1 (keys after RoPE, as a cache holds
  them), in PEFT's flat layout. Without ``prefix_projection`` they are written directly; with it,
  the projection's last layer is solved (or fitted) as for v1.

So, on a causal LM, the logits of any text X after the initialised prompt are those of X after
the words themselves (up to float rounding where the solve is exact).

The text is repeated or cut to the adapter's virtual tokens exactly as PEFT's ``PROMPT_TUNING``
text initialisation does. Only the holder attributes (``prompt_encoder``, ``peft_config``,
``active_adapter``, ``get_base_model()``) and the encoders' parameters are used, so this works on a
:class:`~ptuning_fast.native.model.PTuningModel` and on a ``PeftModel`` (accelerated or not). The
new values are written into the existing parameters in place: optimizers built on them stay valid.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from peft import PeftType
from transformers.cache_utils import DynamicCache

from .._validation import INDEX_DTYPES, check_tensor
from ..hf.compat import CACHE_KWARG
from ..hf.introspection import prefix_geometry
from .adapters import adapter_parts, encoded_prompt_table

FIT_STEPS = 400  # Adam steps of the fallback fit (a few hundred small matrix products)
FIT_LR = 3e-2
FIT_DONE = 1e-6  # relative error at which the fit stops (float32 rounding is about 1e-7)


@dataclass(frozen=True)
class TextInit:
    """What :func:`init_prompts_from_text` did.

    - ``adapter_name``: the adapter written.
    - ``token_ids``: the token ids the virtual tokens stand for (the text repeated or cut to them).
    - ``method``: ``"exact"`` (a direct write, or a least-squares solve of the last layer with
      rank >= T) or ``"fitted"`` (the encoder is too narrow for an exact solve: Adam on all of its
      parameters).
    - ``max_relative_error``: over the virtual tokens, the largest ``||encoded - target|| / ||target||``
      reached, measured with the encoder's own forward after the write.
    """

    adapter_name: str
    token_ids: Tuple[int, ...]
    method: str
    max_relative_error: float


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _token_ids(text, tokenizer, vocab_size: int) -> list:
    """The text's token ids (a list of ints), checked against the vocabulary."""
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("`tokenizer` is needed to tokenize a string `text`; pass the model's tokenizer, "
                             "or give `text` as token ids")
        if not callable(tokenizer):
            raise TypeError(f"`tokenizer` must be a tokenizer (callable), got {type(tokenizer).__name__}")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"`text` {text!r} gives no tokens")
    elif isinstance(text, torch.Tensor):
        if text.dim() != 1 or text.dtype.is_floating_point or text.dtype.is_complex or text.dtype == torch.bool:
            raise TypeError(f"`text` as a tensor must be 1-D token ids of an integer dtype, got shape "
                            f"{tuple(text.shape)} and dtype {text.dtype}")
        ids = text.tolist()
    elif (isinstance(text, Sequence) and not isinstance(text, (bytes, bytearray))
          and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in text)):
        ids = [int(i) for i in text]
    else:
        raise TypeError(f"`text` must be a str, a sequence of token ids (ints) or a 1-D integer tensor, got "
                        f"{type(text).__name__}")
    if not ids:
        raise ValueError("`text` is empty: give at least one token")
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"`text` holds token ids outside the vocabulary [0, {vocab_size}): {outside[:5]}")
    return ids


def _repeat_to_length(ids: list, length: int) -> list:
    """``ids`` cut, or repeated then cut, to ``length`` tokens (PEFT's PROMPT_TUNING text init)."""
    if len(ids) < length:
        ids = ids * math.ceil(length / len(ids))
    return ids[:length]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode (no dropout) inside the block; every submodule's mode is restored after."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class _FirstLayerDone(Exception):
    """Raised by :class:`_FirstLayerCache` once layer 0 has handed over its keys and values."""


class _FirstLayerCache(DynamicCache):
    """A cache that keeps layer 0's keys/values and stops the forward there (the layers after it
    are not needed)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            self.first = (key_states, value_states)
            raise _FirstLayerDone
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@torch.no_grad()
def layer_key_values(model, input_ids: torch.Tensor, *, first_layer_only: bool = False) -> torch.Tensor:
    """The keys and values ``model`` (frozen, eval mode) computes for ``input_ids`` (B, S), as its
    cache holds them (keys after RoPE): ``(L, 2, B, kv_heads, S, head_dim)``; with
    ``first_layer_only`` only layer 0 is run and ``L`` is 1."""
    check_tensor(input_ids, "input_ids", ndim=2, dtypes=INDEX_DTYPES)
    with eval_mode(model):
        if first_layer_only:
            cache = _FirstLayerCache()
            try:
                model(input_ids=input_ids, use_cache=True, **{CACHE_KWARG: cache})
            except _FirstLayerDone:
                return torch.stack(cache.first)[None]
            raise ValueError(f"{type(model).__name__} never wrote layer 0 to its cache: it cannot hold a prefix")
        cache = DynamicCache()  # full layers (a sliding-window layer would drop the start of a long text)
        model(input_ids=input_ids, use_cache=True, **{CACHE_KWARG: cache})
    if not cache.layers or cache.layers[0].keys is None:
        raise ValueError(f"{type(model).__name__} wrote nothing to its cache: it cannot hold a prefix")
    return torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])


# ---------------------------------------------------------------------------------------------
# Targets and encoders
# ---------------------------------------------------------------------------------------------
def _deep_prompt_target(base, ids: torch.Tensor, width: int) -> torch.Tensor:
    """Every layer's keys/values of the text at positions 0..T-1, (T, L * 2 * kv_heads * head_dim)
    in PEFT's flat layout (element ``((l * 2 + s) * Hkv + h) * Dh + d``)."""
    if getattr(base.config, "is_encoder_decoder", False):
        raise ValueError(f"deep prompts are initialised from a text on decoder-only and encoder-only models; "
                         f"{type(base).__name__} is an encoder-decoder model")
    layers, heads, head_dim = prefix_geometry(base)
    kv = layer_key_values(base, ids[None])[:, :, 0]  # (L, 2, Hkv, T, Dh)
    if tuple(kv.shape) != (layers, 2, heads, ids.numel(), head_dim) or layers * 2 * heads * head_dim != width:
        raise ValueError(f"{type(base).__name__} computes keys/values of shape {tuple(kv.shape)} (layer, k/v, "
                         f"head, token, channel) but the adapter's prefix holds {width} values per token "
                         f"({layers} layers x 2 x {heads} heads x {head_dim} expected)")
    return kv.permute(3, 0, 1, 2, 4).reshape(ids.numel(), width)


def _encode(encoder, config) -> torch.Tensor:
    """The adapter's encoded virtual tokens from its current parameters, differentiable:
    v1 (T_total, D); deep prompts (T, L * 2 * D)."""
    if config.peft_type == PeftType.P_TUNING:
        return encoded_prompt_table(encoder, config)
    tokens = torch.arange(config.num_virtual_tokens, device=encoder.embedding.weight.device)
    return encoder(tokens[None])[0]


def _head(encoder, config):
    """(the Sequential whose last Linear is solved, its input (T, in) computed from the current
    parameters), or None for an adapter whose encoded prompts are its embedding."""
    if config.inference_mode:
        return None
    if config.peft_type == PeftType.P_TUNING:
        inputs = encoder.embedding.weight[None]
        if hasattr(encoder, "lstm_head"):  # the bi-LSTM runs over the whole sequence, as PEFT feeds it
            inputs = encoder.lstm_head(inputs)[0]
        return encoder.mlp_head, inputs[0]
    if getattr(encoder, "prefix_projection", False) and getattr(encoder, "transform", None) is not None:
        return encoder.transform, encoder.embedding.weight
    return None


def _relative_error(encoded: torch.Tensor, target: torch.Tensor) -> float:
    """Largest per-token ``||encoded - target|| / ||target||``; a (near-)zero target row is
    measured against the mean row norm instead of its own."""
    encoded, target = encoded.double(), target.double()
    norms = target.norm(dim=1)
    floor = norms.mean() * 1e-3 + torch.finfo(torch.float64).tiny
    return float(((encoded - target).norm(dim=1) / norms.clamp_min(floor)).max())


def _with_bias_column(hidden: torch.Tensor, last: torch.nn.Linear) -> torch.Tensor:
    if last.bias is None:
        return hidden
    return torch.cat([hidden, torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)], dim=1)


def _least_squares(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares solution of ``hidden @ X = target`` in float64 on the CPU
    (gelsd: SVD-based, also for the underdetermined T < H + 1 systems; CUDA's driver is not)."""
    return torch.linalg.lstsq(hidden.detach().double().cpu(), target.double().cpu(), driver="gelsd").solution


def _write_last_layer(last: torch.nn.Linear, solution: torch.Tensor) -> None:
    with torch.no_grad():
        last.weight.copy_(solution[: last.in_features].T)
        if last.bias is not None:
            last.bias.copy_(solution[last.in_features])


def _solve_last_layer(head: torch.nn.Sequential, inputs: torch.Tensor, target: torch.Tensor) -> bool:
    """Least-squares solve of ``head[-1]`` (a Linear) so that ``head(inputs) == target``, written in
    place; returns whether the solve is exact (the hidden activations, with the bias column, have
    rank >= T)."""
    last = head[-1]
    if not isinstance(last, torch.nn.Linear):
        raise TypeError(f"the encoder's last layer is {type(last).__name__}, not a Linear: cannot solve it")
    with torch.no_grad():
        hidden = _with_bias_column(head[:-1](inputs).double().cpu(), last)
        # rank as the parameters' precision sees it: near-dependent activations would need huge weights
        rtol = math.sqrt(torch.finfo(last.weight.dtype).eps)
        exact = int(torch.linalg.matrix_rank(hidden, rtol=rtol)) >= hidden.shape[0]
        _write_last_layer(last, _least_squares(hidden, target))
    return exact


def _fit(encoder, config, target: torch.Tensor, words: Optional[torch.Tensor]) -> None:
    """Fit a float32 copy of ``encoder`` (eval mode) to ``target``, then write its values into
    ``encoder``'s parameters in place.

    v1 starts from the words' input embeddings (``words``, rescaled) as the virtual tokens'
    embeddings: the MLP then gives a repeated word one hidden row, so a text shorter than the
    prompt needs only as many independent rows as it has distinct words. Then variable projection: at every Adam step
    the last layer is the least-squares optimum for the current hidden activations, and Adam moves
    the parameters before it (with the last layer at its optimum, the gradient is that optimum's
    loss gradient). This converges where plain Adam on all parameters stalls.
    """
    work = copy.deepcopy(encoder).float().requires_grad_(True)
    work.eval()
    target = target.float()
    if words is not None:
        with torch.no_grad():  # at the embedding's own scale: the first layer's bias must not drown the words
            embedding = work.embedding.weight
            embedding.copy_(words * (embedding.pow(2).mean().sqrt() / words.pow(2).mean().sqrt().clamp_min(1e-12)))
    last = _head(work, config)[0][-1]
    before = [p for p in work.parameters() if p is not last.weight and p is not last.bias]
    optimizer = torch.optim.Adam(before, lr=FIT_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, FIT_STEPS)
    scale = target.pow(2).sum()
    best_error, best = float("inf"), None
    with torch.enable_grad():
        for _ in range(FIT_STEPS + 1):
            head, inputs = _head(work, config)
            hidden = _with_bias_column(head[:-1](inputs), last)
            solution = _least_squares(hidden, target).to(hidden)
            encoded = hidden @ solution
            error = _relative_error(encoded.detach(), target)
            if best is None or error < best_error:  # Adam can step past its best point: keep that point
                _write_last_layer(last, solution)
                best_error, best = error, {k: v.detach().clone() for k, v in work.state_dict().items()}
            if error <= FIT_DONE:
                break
            loss = (encoded - target).pow(2).sum() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            parameter.copy_(best[name])


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------
def init_prompts_from_text(model, text, tokenizer=None, *, adapter_name: Optional[str] = None) -> TextInit:
    """Initialise a prompt adapter of ``model`` so that it behaves like ``text``.

    ``model``: a :class:`~ptuning_fast.native.model.PTuningModel` or a ``PeftModel`` (any holder of
    prompt adapters). ``text``: a string (tokenized with ``tokenizer``, without special tokens) or
    token ids (a sequence of ints or a 1-D integer tensor); it is repeated or cut to the adapter's
    virtual tokens (``num_virtual_tokens * num_transformer_submodules`` for v1) as PEFT's
    PROMPT_TUNING text init does. ``adapter_name``: default the active adapter.

    v1: the encoded prompts become the input embeddings of those tokens; deep prompts: each
    layer's key/value prefix becomes the keys/values the frozen base model computes for them at
    positions 0..T-1. The values are written into the existing parameters in place (dtype and
    device kept). Returns a :class:`TextInit` (which tokens, ``"exact"`` or ``"fitted"``, the
    error reached).
    """
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise TypeError(f"`adapter_name` must be a str or None, got {type(adapter_name).__name__}")
    encoder, config, _, adapter_name = adapter_parts(model, adapter_name)  # a holder, and one of its adapters
    if not callable(getattr(model, "get_base_model", None)):
        raise TypeError(f"`model` must be a PTuningModel or a peft.PeftModel (a holder of prompt adapters with "
                        f"`get_base_model()`), got {type(model).__name__}")
    if config.peft_type not in (PeftType.P_TUNING, PeftType.PREFIX_TUNING):
        raise ValueError(f"adapter {adapter_name!r} is {config.peft_type.value}, not P_TUNING or PREFIX_TUNING")
    base = model.get_base_model()
    embeddings = base.get_input_embeddings()
    ids = _token_ids(text, tokenizer, embeddings.weight.shape[0])
    deep = config.peft_type == PeftType.PREFIX_TUNING
    length = config.num_virtual_tokens * (1 if deep else config.num_transformer_submodules)
    ids = _repeat_to_length(ids, length)
    id_tensor = torch.tensor(ids, dtype=torch.long, device=embeddings.weight.device)

    with torch.no_grad():
        if deep:
            target = _deep_prompt_target(base, id_tensor, config.num_layers * 2 * config.token_dim)
        else:
            target = embeddings(id_tensor)  # the module, not its weight: some models scale their embeddings
    method = "exact"
    with eval_mode(encoder), torch.no_grad():  # eval: the LSTM's dropout between layers is random
        head = _head(encoder, config)
        if head is None:
            encoder.embedding.weight.copy_(target)
        elif not _solve_last_layer(*head, target):
            _fit(encoder, config, target, None if deep else target)
            method = "fitted"
        error = _relative_error(_encode(encoder, config), target)
    return TextInit(adapter_name, tuple(ids), method, error)


__all__ = ["TextInit", "eval_mode", "init_prompts_from_text", "layer_key_values"]
