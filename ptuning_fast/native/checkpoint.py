"""Checkpoints in PEFT's adapter format, written and read with safetensors and JSON only (never pickle).

One folder per adapter (``"default"`` at the root, any other in a sub-folder named after it, as
PEFT does):

- ``adapter_config.json``: the PEFT config with ``inference_mode: true``, exactly as PEFT writes it;
- ``adapter_model.safetensors``: ``{"prompt_embeddings": ...}``, the encoded prompts (v1:
  ``(T_total, D)``; deep prompts: ``(T, L * 2 * D)``), exactly as PEFT writes them.

``PeftModel.from_pretrained`` loads such a folder, and :func:`load_adapter_into` loads PEFT's.
``save_encoder=True`` adds what resuming training needs:

- ``ptuning_fast_encoder.safetensors``: the whole encoder ``state_dict`` (embedding, MLP/LSTM or
  projection weights) under ``encoder.<key>``;
- ``ptuning_fast_optimizer.safetensors`` (when an ``optimizer`` is given): its state tensors, with
  the param groups and non-tensor state as JSON metadata.

``ptuning_fast_config.json`` holds the native model's :class:`~ptuning_fast.native.options.PromptOptions`.

Every file is written to a temporary name and renamed into place, so a reader never sees half a
file, and a link planted at a file's name is replaced, not written through. An adapter's files are
all written aside first, then renamed into its folder: a save that fails midway (disk full) leaves
the folder as it was. Loads refuse a file that is a link out of the folder they were given, and
check every file from its safetensors header (names, shapes, floating dtypes), then for finite
values, before anything is restored. The functions work on any holder of prompt adapters (a
``PTuningModel`` or a ``PeftModel``, by their attributes; see :mod:`ptuning_fast.native.adapters`).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from typing import Optional

import torch
from peft import PeftConfig, PeftType, TaskType
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .._files import check_inside, write_bytes, write_text
from ..config import check_sizes
from ..hf.introspection import infer_task_type, learned_position_limit
from .adapters import (PROMPT_TYPES, adapter_parts, check_adapter_identifier, check_config_fits_model, check_holder,
                       encoded_prompt_table, make_encoder)
from .options import PromptOptions

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
OPTIONS_NAME = "ptuning_fast_config.json"
ENCODER_NAME = "ptuning_fast_encoder.safetensors"
OPTIMIZER_NAME = "ptuning_fast_optimizer.safetensors"
FORMAT_VERSION = 1


def adapter_directory(save_directory: str, adapter_name: str) -> str:
    """Where an adapter lives inside a save directory (PEFT's convention)."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


# ---------------------------------------------------------------------------------------------
# Files: safetensors and JSON, each written atomically and read with an error naming the file
# ---------------------------------------------------------------------------------------------
def write_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    write_bytes(save(tensors, metadata={"format": "pt", **(metadata or {})}), path)


def write_json(data, path: str) -> None:
    write_text(json.dumps(data, indent=2, sort_keys=True), path)


# safetensors' dtype names of floating-point tensors (what prompts, weights and optimizer moments may be)
FLOATING_DTYPES = ("F16", "BF16", "F32", "F64")


def _unreadable(path: str, exc) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}")


def read_header(path: str):
    """({key: (shape, safetensors dtype name)}, metadata) of a safetensors file, from its header
    alone: no tensor is read."""
    try:
        with safe_open(path, framework="pt") as handle:
            header = {}
            for key in handle.keys():
                part = handle.get_slice(key)
                header[key] = (tuple(part.get_shape()), part.get_dtype())
            return header, handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None


def read_tensors(path: str, expected: dict, *, dtypes=FLOATING_DTYPES, finite: bool = True,
                 device: str = "cpu", other_keys: bool = False) -> dict:
    """The tensors of a safetensors file, checked against ``expected`` ({key: shape, or None for
    any shape}) from the header before any tensor is read: the same keys (others are left unread
    with ``other_keys``, else refused), those shapes, dtypes in ``dtypes``; then, as each is read,
    finite values (``finite``). Each error names the file and key."""
    header, _ = read_header(path)
    missing = sorted(set(expected) - set(header))
    unexpected = [] if other_keys else sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} holds other tensors than expected: missing {missing}, unexpected {unexpected}")
    for key, shape in expected.items():
        saved_shape, dtype = header[key]
        if dtype not in dtypes:
            raise ValueError(f"{path}: tensor {key!r} is {dtype}; expected one of {list(dtypes)}")
        if shape is not None and saved_shape != tuple(shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {saved_shape}, expected {tuple(shape)}")
    tensors = {}
    try:
        with safe_open(path, framework="pt", device=device) as handle:
            for key in expected:
                tensors[key] = handle.get_tensor(key)
                if finite and not bool(torch.isfinite(tensors[key]).all()):  # once, at load
                    raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf")
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None
    return tensors


MAX_JSON_BYTES = 16 * 2**20  # configs, options and training states are kilobytes


def read_json(path: str):
    """The JSON in ``path`` (a config or state file: at most :data:`MAX_JSON_BYTES`)."""
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path} holds {size} bytes, more than the {MAX_JSON_BYTES} a config or state file may")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The holder's adapter
# ---------------------------------------------------------------------------------------------
def encoded_prompts(encoder, config) -> torch.Tensor:
    """What PEFT saves as ``prompt_embeddings`` (the encoder's output for the canonical tokens),
    detached, on the encoder's device."""
    with torch.no_grad():
        if config.inference_mode:
            weights = encoder.embedding.weight
        elif config.peft_type == PeftType.P_TUNING:
            weights = encoded_prompt_table(encoder, config)
        else:
            tokens = torch.arange(config.num_virtual_tokens, device=encoder.embedding.weight.device)
            weights = encoder(tokens[None])[0]
    return weights.detach()


def prompt_embeddings_to_save(encoder, config) -> torch.Tensor:
    return encoded_prompts(encoder, config).to("cpu").contiguous()


def freeze_adapter(encoder, config):
    """(inference-mode encoder holding ``encoder``'s encoded prompts, its config): the adapter as
    ``PeftModel.from_pretrained`` would load it after a save, with gradients off."""
    frozen_config = copy.deepcopy(config)
    frozen_config.inference_mode = True
    prompts = encoded_prompts(encoder, config)
    frozen = make_encoder(frozen_config).to(device=prompts.device, dtype=prompts.dtype)
    with torch.no_grad():
        frozen.embedding.weight.copy_(prompts)
    frozen.requires_grad_(False)
    return frozen.train(encoder.training), frozen_config


def _parameter_names(optimizer, module) -> list:
    """The name in ``module`` of each of ``optimizer``'s parameters, in its order (None: not in it)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]


def _optimizer_tensors(optimizer, module=None):
    """Optimizer state -> (tensors, metadata) for safetensors; with ``module``, the metadata also
    names each parameter (so that a load can tell parameters given in another order)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    try:
        metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
        if module is not None:
            metadata["param_names"] = json.dumps(_parameter_names(optimizer, module))
    except TypeError as exc:
        raise ValueError(f"`optimizer` state holds values that cannot be written without pickle ({exc}); keep "
                         "hyper-parameters as plain numbers, or save the optimizer yourself") from None
    return tensors, metadata


def _metadata_json(path: str, metadata: dict, key: str, default=None):
    if key not in metadata:
        if default is not None:
            return default
        raise ValueError(f"{path} is not an optimizer state written by ptuning_fast (no {key!r} in its metadata)")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON: {exc}") from None


def optimizer_state_from_file(path: str, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """The ``state_dict`` of an optimizer written by :func:`save_adapter` (or the training job),
    checked from the file's header (and against ``optimizer``'s parameters, when given: each state
    tensor a scalar or of its parameter's shape) before any tensor is read."""
    header, metadata = read_header(path)
    groups = _metadata_json(path, metadata, "param_groups")
    scalars = _metadata_json(path, metadata, "scalars", default={})
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ValueError(f"{path}: metadata 'param_groups' must be a list of groups with 'params' lists")
    if not isinstance(scalars, dict):
        raise ValueError(f"{path}: metadata 'scalars' must be a JSON object")
    params = None if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
    count = sum(len(g["params"]) for g in groups)
    expected = {}
    for key, (shape, _) in header.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) >= count:
            raise ValueError(f"{path}: tensor {key!r} is not the state of one of its {count} parameters "
                             "('state.INDEX.NAME')")
        if params is not None and shape != () and int(parts[1]) < len(params) \
                and shape != tuple(params[int(parts[1])].shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {shape}, but parameter {parts[1]} of `optimizer` "
                             f"has shape {tuple(params[int(parts[1])].shape)}")
        expected[key] = shape
    state = {}
    for key, value in read_tensors(path, expected).items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in scalars.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or not name or int(index) >= count:
            raise ValueError(f"{path}: metadata 'scalars' key {key!r} is not 'INDEX.NAME' of one of its {count} "
                             "parameters")
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def save_optimizer(optimizer, path: str, module=None) -> None:
    """``optimizer``'s state into ``path``; ``module`` (which holds its parameters) names them."""
    tensors, metadata = _optimizer_tensors(optimizer, module)
    write_safetensors(tensors, path, metadata)


def check_optimizer_matches(optimizer, path: str, module=None) -> dict:
    """The state in ``path``, checked to fit ``optimizer``: the same parameter groups and sizes,
    and (when the file names them and ``module`` is given) the same parameters in the same order."""
    groups = optimizer.param_groups
    metadata = read_header(path)[1]
    header_groups = _metadata_json(path, metadata, "param_groups")
    if not isinstance(header_groups, list) or len(header_groups) != len(groups) or any(
            not isinstance(a, dict) or len(a.get("params", ())) != len(b["params"])
            for a, b in zip(header_groups, groups)):
        raise ValueError(f"`optimizer` does not match the optimizer state in {path} (different parameter groups); "
                         "build it over the same parameters, in the same order, as when it was saved")
    if module is not None and "param_names" in metadata:
        saved, now = _metadata_json(path, metadata, "param_names"), _parameter_names(optimizer, module)
        if saved != now:
            raise ValueError(f"`optimizer` holds the parameters in another order than the state in {path} was saved "
                             f"with: saved {saved}, now {now}; build it over the same parameters, in the same order")
    return optimizer_state_from_file(path, optimizer)


def load_optimizer(optimizer, path: str, module=None) -> dict:
    """Restore ``optimizer`` from ``path`` (checked by :func:`check_optimizer_matches`); returns the
    state loaded."""
    saved = check_optimizer_matches(optimizer, path, module)
    optimizer.load_state_dict(saved)
    return saved


def save_adapter(model, save_directory: str, adapter_name: Optional[str] = None, *, save_encoder: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> str:
    """Save one adapter of a :class:`PTuningModel` or ``PeftModel`` in PEFT's format; returns its folder.

    ``save_encoder=True`` also writes the whole encoder (and ``optimizer``'s state, if given), which
    loading with ``is_trainable=True`` needs to resume training.
    """
    encoder, config, options, adapter_name = adapter_parts(model, adapter_name)
    check_adapter_identifier(adapter_name)
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"`save_directory` must be a path, got {type(save_directory).__name__}")
    if os.path.isfile(save_directory):
        raise ValueError(f"`save_directory` ({save_directory}) is a file, not a directory")
    if not isinstance(save_encoder, bool):
        raise TypeError(f"`save_encoder` must be a bool, got {save_encoder!r}")
    if optimizer is not None and not save_encoder:
        raise ValueError("saving the `optimizer` state only helps to resume training: pass `save_encoder=True` too")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if save_encoder and config.inference_mode:
        raise ValueError(f"adapter {adapter_name!r} holds encoded prompts only (loaded for inference, or frozen): "
                         "there is no encoder to save")
    save_directory = os.fspath(save_directory)
    directory = adapter_directory(save_directory, adapter_name)
    if os.path.islink(directory):
        raise ValueError(f"`save_directory`: {directory} is a link; the adapter {adapter_name!r} is written only "
                         f"inside {save_directory}")
    os.makedirs(directory, exist_ok=True)
    saved_config = copy.deepcopy(config)
    saved_config.inference_mode = True  # as PEFT: the folder holds the encoded prompts
    if saved_config.base_model_name_or_path is None:
        base = model.get_base_model()
        saved_config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
    extras = {"format_version": FORMAT_VERSION, "prompt_options": options.to_dict(),
              "encoder_saved": bool(save_encoder)}
    # Every file is written aside first; only complete files are renamed in (the options last).
    staging = tempfile.mkdtemp(prefix=".adapter-", dir=directory)
    try:
        write_safetensors({"prompt_embeddings": prompt_embeddings_to_save(encoder, config)},
                          os.path.join(staging, WEIGHTS_NAME))
        saved_config.save_pretrained(staging)  # adapter_config.json exactly as PEFT writes it
        if save_encoder:
            tensors = {f"encoder.{k}": v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
            write_safetensors(tensors, os.path.join(staging, ENCODER_NAME))
            if optimizer is not None:
                save_optimizer(optimizer, os.path.join(staging, OPTIMIZER_NAME), encoder)
        write_json(extras, os.path.join(staging, OPTIONS_NAME))
        written = [n for n in (ENCODER_NAME, OPTIMIZER_NAME, WEIGHTS_NAME, CONFIG_NAME, OPTIONS_NAME)
                   if os.path.isfile(os.path.join(staging, n))]
        for name in (ENCODER_NAME, OPTIMIZER_NAME):  # an earlier save's, which would not match the new prompts
            if name not in written and os.path.lexists(os.path.join(directory, name)):
                os.unlink(os.path.join(directory, name))
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_adapter_folder(model_id, *, is_trainable: bool = False, adapter_name: str = "default",
                        optimizer: Optional[torch.optim.Optimizer] = None):
    """(config, options, has_encoder) of an adapter folder, ours or PEFT's, checked for what the
    load asks (``config.inference_mode`` is set to ``not is_trainable``)."""
    if not isinstance(is_trainable, bool):
        raise TypeError(f"`is_trainable` must be a bool, got {is_trainable!r}")
    check_adapter_identifier(adapter_name)
    if optimizer is not None and not is_trainable:
        raise ValueError("restoring an `optimizer` needs `is_trainable=True`")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"`model_id` must be a path to an adapter folder, got {type(model_id).__name__}")
    model_id = os.fspath(model_id)
    config_path = os.path.join(model_id, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {model_id!r}: not an adapter folder (PEFT's format)")
    if not os.path.isfile(os.path.join(model_id, WEIGHTS_NAME)):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {model_id!r}; ptuning_fast reads safetensors only "
                                "(re-save a pickled adapter_model.bin with safetensors)")
    for name in (CONFIG_NAME, WEIGHTS_NAME, OPTIONS_NAME, ENCODER_NAME, OPTIMIZER_NAME):
        if os.path.lexists(os.path.join(model_id, name)):
            check_inside(os.path.join(model_id, name), model_id)
    raw = read_json(config_path)
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type not in PeftType._value2member_map_:
        raise ValueError(f"{config_path}: unknown peft_type {peft_type!r}; known: {sorted(PeftType._value2member_map_)}")
    config = PeftConfig.from_pretrained(model_id)
    if config.peft_type not in PROMPT_TYPES:
        raise ValueError(f"the adapter in {model_id!r} is {config.peft_type.value}, not P_TUNING or PREFIX_TUNING")
    try:
        check_sizes(config)  # before anything is built from it
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: {exc}") from None
    options, has_encoder = PromptOptions(), False
    extras_path = os.path.join(model_id, OPTIONS_NAME)
    if os.path.isfile(extras_path):
        extras = read_json(extras_path)
        try:
            options = PromptOptions.from_dict(extras.get("prompt_options", {}) if isinstance(extras, dict) else extras)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{extras_path}: {exc}") from None
        has_encoder = bool(extras.get("encoder_saved")) and os.path.isfile(os.path.join(model_id, ENCODER_NAME))
    if is_trainable and not has_encoder:
        raise ValueError(f"cannot resume training from {model_id!r}: it holds only the encoded prompts (PEFT's "
                         "format keeps no encoder weights); save with `save_encoder=True` to resume")
    if optimizer is not None and not os.path.isfile(os.path.join(model_id, OPTIMIZER_NAME)):
        raise ValueError(f"no optimizer state ({OPTIMIZER_NAME}) in {model_id!r}: it was saved without `optimizer`")
    config.inference_mode = not is_trainable
    return config, options, has_encoder


def read_prompt_embeddings(model_id: str, shape: tuple, device: str = "cpu") -> torch.Tensor:
    """``prompt_embeddings`` of the adapter folder ``model_id``, checked to be of ``shape``, floating
    and finite before use."""
    # PEFT's file may also hold a task head (modules_to_save): PEFT loads it; it is never read here.
    return read_tensors(os.path.join(model_id, WEIGHTS_NAME), {"prompt_embeddings": shape}, device=device,
                        other_keys=True)["prompt_embeddings"]


def _load_weights(encoder, model_id: str, resume: bool) -> None:
    device = str(encoder.embedding.weight.device)
    if resume:
        path = os.path.join(model_id, ENCODER_NAME)
        expected = encoder.state_dict()  # floating weights only (the encoders hold no buffers)
        tensors = read_tensors(path, {f"encoder.{k}": v.shape for k, v in expected.items()}, device=device)
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items()}, strict=True)
        return
    embeddings = read_prompt_embeddings(model_id, tuple(encoder.embedding.weight.shape), device)
    with torch.no_grad():
        encoder.embedding.weight.copy_(embeddings)


def load_adapter_into(holder, model_id, adapter_name: str = "default", *, is_trainable: bool = False,
                      optimizer: Optional[torch.optim.Optimizer] = None):
    """Load the adapter folder ``model_id`` into ``holder`` (a ``PTuningModel`` or ``PeftModel``) as
    ``adapter_name``: added when it does not exist, else its weights are copied into its parameters
    in place. Returns ``holder``. See :func:`ptuning_fast.native.model.load_adapter`."""
    check_holder(holder)
    config, options, _ = read_adapter_folder(model_id, is_trainable=is_trainable, adapter_name=adapter_name,
                                             optimizer=optimizer)
    model_id = os.fspath(model_id)
    check_config_fits_model(config, holder.get_base_model(), os.path.join(model_id, CONFIG_NAME))
    limit = learned_position_limit(holder.get_base_model())
    if config.peft_type == PeftType.P_TUNING and limit is not None and config.num_virtual_tokens >= limit:
        raise ValueError(f"{os.path.join(model_id, CONFIG_NAME)}: num_virtual_tokens ({config.num_virtual_tokens}) "
                         f"leaves no position for text: {type(holder.get_base_model()).__name__} has "
                         f"max_position_embeddings={limit}")
    base = holder.get_base_model()
    model_task = infer_task_type(base)
    if config.task_type is not None and model_task != TaskType.FEATURE_EXTRACTION \
            and TaskType(config.task_type) != model_task:
        raise ValueError(f"{os.path.join(model_id, CONFIG_NAME)}: the adapter is for task_type "
                         f"{TaskType(config.task_type).value}, but {type(base).__name__} is a {model_task.value} "
                         "model: its outputs would not be the task's; load it onto a model of that task")
    if adapter_name not in holder.prompt_encoder:
        if hasattr(holder, "prompt_options"):
            holder.add_adapter(adapter_name, config, options)
        else:
            holder.add_adapter(adapter_name, config)
    elif holder.peft_config[adapter_name].peft_type != config.peft_type:
        raise ValueError(f"adapter {adapter_name!r} is {holder.peft_config[adapter_name].peft_type.value} but "
                         f"{model_id!r} holds {config.peft_type.value}")
    encoder = holder.prompt_encoder[adapter_name]
    if not is_trainable and not holder.peft_config[adapter_name].inference_mode:
        raise ValueError(f"adapter {adapter_name!r} of the model is built for training; load the encoded "
                         "prompts into a new adapter name, or pass `is_trainable=True`")
    saved_optimizer = None
    if optimizer is not None:  # checked before anything is loaded
        saved_optimizer = check_optimizer_matches(optimizer, os.path.join(model_id, OPTIMIZER_NAME), encoder)
    _load_weights(encoder, model_id, resume=is_trainable)
    if hasattr(holder, "prompt_options"):  # the folder's options, not those the name had before
        holder.prompt_options[adapter_name] = options
    if is_trainable:
        encoder.requires_grad_(True)
        if saved_optimizer is not None:
            optimizer.load_state_dict(saved_optimizer)
    else:
        encoder.requires_grad_(False)
        encoder.eval()
    return holder


__all__ = ["FLOATING_DTYPES", "MAX_JSON_BYTES", "adapter_directory", "check_optimizer_matches", "encoded_prompts",
           "freeze_adapter", "load_adapter_into", "load_optimizer", "optimizer_state_from_file",
           "prompt_embeddings_to_save", "read_adapter_folder", "read_header", "read_json", "read_prompt_embeddings",
           "read_tensors", "save_adapter", "save_optimizer", "write_json", "write_safetensors"]
