"""Look at a trained prompt: ``ptuning-fast inspect CHECKPOINT --output DIR`` (:func:`inspect_adapter`).

Reads an adapter folder in PEFT's format (ours or PEFT's: ``adapter_config.json`` and the encoded
prompts ``prompt_embeddings`` in ``adapter_model.safetensors``) and writes:

- ``similarity.png``: the T x T cosine similarity of the encoded virtual tokens (deep prompts: one
  panel per few layers, keys and values);
- ``norms.png``: the norm of each virtual token (deep prompts: per layer, keys and values);
- ``nearest_tokens.json``: for each virtual token, the ``top_k`` vocabulary tokens nearest to it by
  cosine similarity, in the space named by the entry's ``"space"``: ``"input_embeddings"`` (v1:
  the model's input embedding matrix) or ``"layer0_values"`` (deep prompts: the virtual token's
  layer-0 values against the layer-0 values the model computes for each vocabulary token alone at
  position 0). This needs the base model and its tokenizer: ``model`` (a folder, ``"minilm"`` for
  the embedded MiniLM-L6, or a loaded model), else the config's ``base_model_name_or_path`` when
  it is a local folder; without one the file is not written.

and prints a short table. The plots need no model.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from peft import PeftType

from ._files import write_bytes, write_text
from ._validation import check_positive_int
from .native.adapters import check_config_fits_model
from .native.checkpoint import CONFIG_NAME, read_adapter_folder, read_prompt_embeddings
from .native.text_init import layer_key_values

MINILM = "minilm"  # the embedded MiniLM-L6 BERT, as ``ptuning-fast train --model`` names it
SIMILARITY_FILE, NORMS_FILE, NEAREST_FILE = "similarity.png", "norms.png", "nearest_tokens.json"
PANEL_LAYERS = 4  # deep prompts: similarity panels for at most this many layers, spread over the depth
VOCAB_CHUNK = 4096  # vocabulary tokens per forward when computing their layer-0 values


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_adapter` wrote: the files (``nearest_tokens`` is None when no base model
    was available) and the nearest tokens themselves (the JSON's content, or None)."""

    kind: str  # "v1" (P_TUNING) or "deep" (PREFIX_TUNING)
    num_virtual_tokens: int  # rows of prompt_embeddings (v1 seq2seq: both transformer halves)
    similarity: str
    norms: str
    nearest_tokens: Optional[str]
    nearest: Optional[List[dict]]


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------
def read_prompts(checkpoint: str):
    """(config, the encoded prompts as float32: v1 (T_total, D); deep prompts (T, L, 2, token_dim),
    keys at [:, :, 0], values at [:, :, 1]) of an adapter folder."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"`checkpoint` must be a path to an adapter folder, got {type(checkpoint).__name__}")
    checkpoint = os.fspath(checkpoint)
    config, _, _ = read_adapter_folder(checkpoint)
    if config.peft_type == PeftType.P_TUNING:
        expected = (config.num_virtual_tokens * (config.num_transformer_submodules or 1), config.token_dim)
    else:
        expected = (config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
    prompts = read_prompt_embeddings(checkpoint, expected).float()
    if config.peft_type == PeftType.PREFIX_TUNING:  # PEFT's flat layout: ((l * 2 + s) * Hkv + h) * Dh + d
        prompts = prompts.view(config.num_virtual_tokens, config.num_layers, 2, config.token_dim)
    return config, prompts


def _cosine_matrix(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return F.normalize(rows.float(), dim=-1) @ F.normalize(columns.float(), dim=-1).T


def _panel_layers(num_layers: int) -> List[int]:
    """At most ``PANEL_LAYERS`` layers, first and last included, evenly spread."""
    count = min(num_layers, PANEL_LAYERS)
    return sorted({round(i * (num_layers - 1) / max(count - 1, 1)) for i in range(count)})


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API and Agg canvas: headless, and the caller's pyplot backend is left alone)
# ---------------------------------------------------------------------------------------------
def _figure(rows: int, columns: int, panel_size: float):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("`ptuning-fast inspect` draws its plots with matplotlib: pip install 'ptuning_fast[inspect]' "
                          "(or matplotlib)") from None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(panel_size * columns + 1.2, panel_size * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:  # token and layer indices: no fractional ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return figure, axes


def _save_figure(figure, path: str) -> None:
    png = io.BytesIO()
    figure.savefig(png, dpi=110, format="png")
    write_bytes(png.getvalue(), path)  # renamed into place: a link at `path` is replaced, not followed


def _plot_similarity(prompts: torch.Tensor, deep: bool, path: str, title: str) -> None:
    if deep:
        layers = _panel_layers(prompts.shape[1])
        panels = [[(f"layer {l} keys", prompts[:, l, 0]) for l in layers],
                  [(f"layer {l} values", prompts[:, l, 1]) for l in layers]]
    else:
        panels = [[("encoded virtual tokens", prompts)]]
    figure, axes = _figure(len(panels), len(panels[0]), 3.6)
    for row, panel_row in enumerate(panels):
        for column, (name, vectors) in enumerate(panel_row):
            ax = axes[row, column]
            image = ax.imshow(_cosine_matrix(vectors, vectors).numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
            ax.set_title(name)
            ax.set_xlabel("virtual token")
            ax.set_ylabel("virtual token")
    figure.colorbar(image, ax=axes.ravel().tolist(), label="cosine similarity")
    figure.suptitle(title)
    _save_figure(figure, path)


def _plot_norms(prompts: torch.Tensor, deep: bool, path: str, title: str) -> None:
    if deep:
        figure, axes = _figure(1, 2, 4.2)
        for ax, (name, kv) in zip(axes[0], (("keys", 0), ("values", 1))):
            norms = prompts[:, :, kv].norm(dim=-1).T  # (L, T)
            image = ax.imshow(norms.numpy(), aspect="auto", cmap="viridis", origin="lower")
            ax.set_title(f"{name}: norm per layer")
            ax.set_xlabel("virtual token")
            ax.set_ylabel("layer")
            figure.colorbar(image, ax=ax, label="L2 norm")
    else:
        figure, axes = _figure(1, 1, 4.2)
        ax = axes[0, 0]
        ax.bar(range(prompts.shape[0]), prompts.norm(dim=-1).numpy(), color="tab:blue")
        ax.set_title("norm of each encoded virtual token")
        ax.set_xlabel("virtual token")
        ax.set_ylabel("L2 norm")
    figure.suptitle(title)
    _save_figure(figure, path)


# ---------------------------------------------------------------------------------------------
# Nearest vocabulary tokens
# ---------------------------------------------------------------------------------------------
def _local_folder(name) -> Optional[str]:
    if name == MINILM:
        from .train import default_model_path
        return str(default_model_path())
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) and os.path.isdir(name) else None


def _resolve_base_model(model, config):
    """(the base model or None, the folder it came from or None): ``model`` (a folder,
    ``"minilm"``, or a loaded transformers model / prompt holder), else the config's
    ``base_model_name_or_path`` when it is a local folder."""
    if model is None:
        named = getattr(config, "base_model_name_or_path", None)
        folder = _local_folder(named)
        if folder is None:
            return None, None
        if named != MINILM and not os.path.isabs(folder):
            print(f"base model: the adapter config's base_model_name_or_path {named!r} is a relative path, read "
                  f"from the current folder as {os.path.abspath(folder)} (pass --model to choose another)")
    elif isinstance(model, (str, os.PathLike)):
        folder = _local_folder(model)
        if folder is None:
            raise ValueError(f"`model` {os.fspath(model)!r} is not a local model folder (nor {MINILM!r})")
    elif isinstance(model, torch.nn.Module) and callable(getattr(model, "get_input_embeddings", None)):
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        return base, _local_folder(getattr(base, "name_or_path", None) or None)
    else:
        raise TypeError(f"`model` must be a model folder, {MINILM!r} or a transformers model, got "
                        f"{type(model).__name__}")
    from transformers import AutoModel
    try:
        with _quiet_loading():
            return AutoModel.from_pretrained(folder, local_files_only=True), folder
    except (OSError, ValueError) as exc:
        raise ValueError(f"`model`: cannot load a model from {folder!r}: {exc}") from None


@contextlib.contextmanager
def _quiet_loading():
    """transformers without its loading progress bar and load report (a base model loaded without
    its task head reports the head's weights as unexpected: expected here)."""
    from transformers.utils import logging

    verbosity, progress = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if progress:
            logging.enable_progress_bar()


def _resolve_tokenizer(tokenizer, folder: Optional[str]):
    """``tokenizer`` (a tokenizer or a folder), else the one in the model's folder."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        if not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
            raise TypeError(f"`tokenizer` must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}")
        return tokenizer
    source = folder if tokenizer is None else os.fspath(tokenizer)
    if source is None:
        raise ValueError("`tokenizer` is needed to name the nearest tokens: pass one (the model was given "
                         "without a folder to load it from)")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"`tokenizer`: cannot load a tokenizer from {source!r}: {exc}") from None


def _vocabulary_layer0_values(model) -> torch.Tensor:
    """(V, kv_heads * head_dim): the layer-0 values ``model`` computes for each vocabulary token
    alone at position 0 (only the embeddings and layer 0 run)."""
    embeddings = model.get_input_embeddings().weight
    ids = torch.arange(embeddings.shape[0], device=embeddings.device)
    chunks = []
    for start in range(0, ids.numel(), VOCAB_CHUNK):
        values = layer_key_values(model, ids[start:start + VOCAB_CHUNK, None], first_layer_only=True)[0, 1]
        chunks.append(values[:, :, 0].reshape(values.shape[0], -1).float().cpu())  # (chunk, Hkv * Dh)
    return torch.cat(chunks)


def _nearest_tokens(prompts: torch.Tensor, deep: bool, model, tokenizer, top_k: int) -> List[dict]:
    """One entry per virtual token: its ``top_k`` nearest vocabulary tokens by cosine similarity."""
    if deep:
        space, queries, vocabulary = "layer0_values", prompts[:, 0, 1], _vocabulary_layer0_values(model)
    else:
        space, queries = "input_embeddings", prompts
        vocabulary = model.get_input_embeddings().weight.detach().float().cpu()
    if top_k > vocabulary.shape[0]:
        raise ValueError(f"`top_k` ({top_k}) is larger than the vocabulary ({vocabulary.shape[0]} tokens)")
    scores, ids = _cosine_matrix(queries, vocabulary).topk(top_k, dim=1)
    entries = []
    for index, (row_scores, row_ids) in enumerate(zip(scores.tolist(), ids.tolist())):
        names = tokenizer.convert_ids_to_tokens(row_ids)
        tokens = [{"token": str(name), "id": int(i), "score": round(float(s), 6)}
                  for name, i, s in zip(names, row_ids, row_scores)]
        entries.append({"index": index, "space": space, "tokens": tokens})
    return entries


# ---------------------------------------------------------------------------------------------
# The entry points
# ---------------------------------------------------------------------------------------------
def _table(prompts: torch.Tensor, deep: bool, nearest: Optional[List[dict]]) -> str:
    shown = 3  # nearest tokens per row of the table; the JSON has top_k
    if deep:
        header = f"{'token':>5}  {'key norm':>9}  {'value norm':>10}  nearest (layer-0 values, cosine)"
        norms = torch.stack([prompts[:, :, 0].norm(dim=-1).mean(1), prompts[:, :, 1].norm(dim=-1).mean(1)], 1)
        columns = [f"{k:9.3f}  {v:10.3f}" for k, v in norms.tolist()]
    else:
        header = f"{'token':>5}  {'norm':>9}  nearest (input embeddings, cosine)"
        columns = [f"{n:9.3f}" for n in prompts.norm(dim=-1).tolist()]
    lines = [header]
    for index, column in enumerate(columns):
        near = "-" if nearest is None else ", ".join(
            f"{t['token']} {t['score']:.2f}" for t in nearest[index]["tokens"][:shown])
        lines.append(f"{index:>5}  {column}  {near}")
    return "\n".join(lines)


def inspect_adapter(checkpoint, output_dir, *, model=None, tokenizer=None, top_k: int = 5) -> Inspection:
    """Write ``similarity.png``, ``norms.png`` and (with a base model) ``nearest_tokens.json`` for
    the adapter folder ``checkpoint`` into ``output_dir``, and print a short table.

    ``model``: a model folder, ``"minilm"`` (the embedded MiniLM-L6) or a loaded transformers
    model; default the adapter config's ``base_model_name_or_path`` when it is a local folder.
    ``tokenizer``: a tokenizer or a folder; default the model's folder. ``top_k``: nearest tokens
    per virtual token.
    """
    config, prompts = read_prompts(checkpoint)
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"`output_dir` must be a path, got {type(output_dir).__name__}")
    checkpoint, output_dir = os.fspath(checkpoint), os.fspath(output_dir)
    if os.path.isfile(output_dir):
        raise ValueError(f"`output_dir` ({output_dir}) is a file, not a directory")
    check_positive_int(top_k, "top_k")
    deep = config.peft_type == PeftType.PREFIX_TUNING

    base, folder = _resolve_base_model(model, config)  # before writing anything: a bad `model` fails first
    nearest = None
    if base is not None:
        check_config_fits_model(config, base, os.path.join(checkpoint, CONFIG_NAME))
        nearest = _nearest_tokens(prompts, deep, base, _resolve_tokenizer(tokenizer, folder), top_k)

    os.makedirs(output_dir, exist_ok=True)
    kind = "deep prompts (PREFIX_TUNING)" if deep else "v1 prompts (P_TUNING)"
    title = f"{os.path.basename(os.path.abspath(checkpoint))}: {kind}, {prompts.shape[0]} virtual tokens"
    similarity, norms = os.path.join(output_dir, SIMILARITY_FILE), os.path.join(output_dir, NORMS_FILE)
    _plot_similarity(prompts, deep, similarity, title)
    _plot_norms(prompts, deep, norms, title)
    nearest_path = None
    if nearest is not None:
        nearest_path = os.path.join(output_dir, NEAREST_FILE)
        write_text(json.dumps(nearest, indent=2, ensure_ascii=False), nearest_path)

    print(f"{checkpoint}: {kind}, {prompts.shape[0]} virtual tokens")
    print(_table(prompts, deep, nearest))
    print(f"wrote {similarity}, {norms}" + (f", {nearest_path}" if nearest_path else
                                           " (nearest tokens: no base model; pass --model)"))
    return Inspection("deep" if deep else "v1", prompts.shape[0], similarity, norms, nearest_path, nearest)


def main(argv=None) -> int:
    """``ptuning-fast inspect CHECKPOINT --output DIR [--model PATH|minilm] [--tokenizer PATH] [--top-k K]``."""
    parser = argparse.ArgumentParser(prog="ptuning-fast inspect",
                                     description="Plot a prompt adapter's virtual tokens and find the vocabulary "
                                                 "tokens nearest to them.")
    parser.add_argument("checkpoint", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output", "-o", required=True, help="folder for similarity.png, norms.png, "
                                                              "nearest_tokens.json")
    parser.add_argument("--model", default=None, help=f"base model folder, or {MINILM!r} (default: the adapter "
                                                      "config's base_model_name_or_path when it is a local folder)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--top-k", type=int, default=5, help="nearest tokens per virtual token")
    args = parser.parse_args(argv)
    try:
        inspect_adapter(args.checkpoint, args.output, model=args.model, tokenizer=args.tokenizer, top_k=args.top_k)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    return 0


__all__ = ["Inspection", "inspect_adapter", "main", "read_prompts"]
