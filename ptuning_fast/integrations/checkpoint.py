"""Checkpoints in PEFT's adapter format, written and read with safetensors only (never pickle).

One folder per adapter (``"default"`` at the root, any other in a sub-folder named after it, as
PEFT does):

- ``adapter_config.json``: the PEFT config with ``inference_mode: true``, exactly as PEFT writes it;
- ``adapter_model.safetensors``: ``{"prompt_embeddings": ...}``, the encoded prompts (v1:
  ``(T_total, D)``; deep prompts: ``(T, L * 2 * D)``), exactly as PEFT writes them.

``PeftModel.from_pretrained`` loads such a folder, and :func:`load_adapter` loads PEFT's. PEFT
keeps only the encoder's output, so its adapters cannot resume training. ``save_encoder=True``
adds what resuming needs:

- ``ptuning_fast_encoder.safetensors``: the whole encoder ``state_dict`` (embedding, MLP/LSTM or
  projection weights) under ``encoder.<key>``;
- ``ptuning_fast_optimizer.safetensors`` (when an ``optimizer`` is given): its state tensors, with
  the param groups and non-tensor state as JSON metadata.

``ptuning_fast_config.json`` holds the native model's :class:`~ptuning_fast.integrations.model.PromptOptions`.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch
from peft import PeftConfig, PeftModel, PeftType
from safetensors.torch import load_file, save_file

from .model import PromptOptions, PTuningModel, encoded_prompt_table

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
OPTIONS_NAME = "ptuning_fast_config.json"
ENCODER_NAME = "ptuning_fast_encoder.safetensors"
OPTIMIZER_NAME = "ptuning_fast_optimizer.safetensors"
FORMAT_VERSION = 1


def adapter_directory(save_directory: str, adapter_name: str) -> str:
    """Where an adapter lives inside a save directory (PEFT's convention)."""
    return save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def _parts(model, adapter_name: Optional[str]):
    """(encoder, config, options) of ``adapter_name`` in a PTuningModel or PeftModel."""
    if not isinstance(model, (PTuningModel, PeftModel)):
        raise TypeError(f"`model` must be a PTuningModel or a peft.PeftModel, got {type(model).__name__}")
    if isinstance(model, PeftModel) and not getattr(model, "_is_prompt_learning", False):
        raise ValueError("`model` holds no prompt-learning adapter (P_TUNING / PREFIX_TUNING)")
    adapter_name = model.active_adapter if adapter_name is None else adapter_name
    if not isinstance(adapter_name, str) or adapter_name not in model.prompt_encoder:
        raise ValueError(f"`adapter_name`: unknown adapter {adapter_name!r}; known: {sorted(model.prompt_encoder)}")
    options = model.prompt_options[adapter_name] if isinstance(model, PTuningModel) else PromptOptions()
    return model.prompt_encoder[adapter_name], model.peft_config[adapter_name], options, adapter_name


def prompt_embeddings_to_save(encoder, config) -> torch.Tensor:
    """What PEFT saves as ``prompt_embeddings``: the encoder's output for the canonical tokens."""
    with torch.no_grad():
        if config.inference_mode:
            weights = encoder.embedding.weight
        elif config.peft_type == PeftType.P_TUNING:
            weights = encoded_prompt_table(encoder, config)
        else:
            tokens = torch.arange(config.num_virtual_tokens, device=encoder.embedding.weight.device)
            weights = encoder(tokens[None])[0]
    return weights.detach().to("cpu").contiguous()


def _optimizer_tensors(optimizer):
    """Optimizer state -> (tensors, metadata) for safetensors."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    try:
        metadata = {"format": "pt", "param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    except TypeError as exc:
        raise ValueError(f"`optimizer` state holds values that cannot be written without pickle ({exc}); keep "
                         "hyper-parameters as plain numbers, or save the optimizer yourself") from None
    return tensors, metadata


def _load_optimizer(optimizer, path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(path)
    if "param_groups" not in metadata:
        raise ValueError(f"{path} is not an optimizer state written by ptuning_fast (no param_groups)")
    state = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(metadata.get("scalars", "{}")).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = json.loads(metadata["param_groups"])
    if len(groups) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups)):
        raise ValueError("`optimizer` does not match the saved optimizer state (different parameter groups); "
                         "build it over the same parameters, in the same order, as when it was saved")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_adapter(model, save_directory: str, adapter_name: Optional[str] = None, *, save_encoder: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> str:
    """Save one adapter of a :class:`PTuningModel` or ``PeftModel`` in PEFT's format; returns its folder.

    ``save_encoder=True`` also writes the whole encoder (and ``optimizer``'s state, if given), which
    :func:`load_adapter` with ``is_trainable=True`` needs to resume training.
    """
    encoder, config, options, adapter_name = _parts(model, adapter_name)
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
        raise ValueError(f"adapter {adapter_name!r} was loaded for inference (encoded prompts only): there is no "
                         "encoder to save")
    directory = adapter_directory(os.fspath(save_directory), adapter_name)
    os.makedirs(directory, exist_ok=True)

    save_file({"prompt_embeddings": prompt_embeddings_to_save(encoder, config)},
              os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    saved_config = copy.deepcopy(config)
    saved_config.inference_mode = True  # as PEFT: the folder holds the encoded prompts
    if saved_config.base_model_name_or_path is None:
        base = model.get_base_model()
        saved_config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
    saved_config.save_pretrained(directory)

    if save_encoder:
        tensors = {f"encoder.{k}": v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
        save_file(tensors, os.path.join(directory, ENCODER_NAME), metadata={"format": "pt"})
        if optimizer is not None:
            optimizer_tensors, metadata = _optimizer_tensors(optimizer)
            save_file(optimizer_tensors, os.path.join(directory, OPTIMIZER_NAME), metadata=metadata)
    extras = {"format_version": FORMAT_VERSION, "prompt_options": options.to_dict(),
              "encoder_saved": bool(save_encoder)}
    with open(os.path.join(directory, OPTIONS_NAME), "w") as handle:
        json.dump(extras, handle, indent=2, sort_keys=True)
    return directory


def _read_folder(model_id: str):
    """(config, options, has_encoder) of an adapter folder, ours or PEFT's."""
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"`model_id` must be a path to an adapter folder, got {type(model_id).__name__}")
    model_id = os.fspath(model_id)
    if not os.path.isfile(os.path.join(model_id, CONFIG_NAME)):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {model_id!r}: not an adapter folder (PEFT's format)")
    if not os.path.isfile(os.path.join(model_id, WEIGHTS_NAME)):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {model_id!r}; ptuning_fast reads safetensors only "
                                "(re-save a pickled adapter_model.bin with safetensors)")
    config = PeftConfig.from_pretrained(model_id)
    if config.peft_type not in (PeftType.P_TUNING, PeftType.PREFIX_TUNING):
        raise ValueError(f"the adapter in {model_id!r} is {config.peft_type.value}, not P_TUNING or PREFIX_TUNING")
    options, has_encoder = PromptOptions(), False
    extras_path = os.path.join(model_id, OPTIONS_NAME)
    if os.path.isfile(extras_path):
        with open(extras_path) as handle:
            extras = json.load(handle)
        options = PromptOptions.from_dict(extras.get("prompt_options", {}))
        has_encoder = bool(extras.get("encoder_saved")) and os.path.isfile(os.path.join(model_id, ENCODER_NAME))
    return config, options, has_encoder


def _load_weights(encoder, model_id: str, config, resume: bool) -> None:
    device = encoder.embedding.weight.device
    if resume:
        tensors = load_file(os.path.join(model_id, ENCODER_NAME), device=str(device))
        state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        missing, unexpected = sorted(set(encoder.state_dict()) - set(state)), sorted(set(state) - set(encoder.state_dict()))
        if missing or unexpected:
            raise ValueError(f"{ENCODER_NAME} in {model_id!r} does not match the encoder its config builds: "
                             f"missing {missing}, unexpected {unexpected}")
        encoder.load_state_dict(state, strict=True)
        return
    weights = load_file(os.path.join(model_id, WEIGHTS_NAME), device=str(device))
    if "prompt_embeddings" not in weights:
        raise ValueError(f"{WEIGHTS_NAME} in {model_id!r} holds {sorted(weights)}, not `prompt_embeddings`")
    embeddings = weights["prompt_embeddings"]
    expected = tuple(encoder.embedding.weight.shape)
    if tuple(embeddings.shape) != expected:
        raise ValueError(f"`prompt_embeddings` in {model_id!r} has shape {tuple(embeddings.shape)}, but the "
                         f"adapter config gives {expected}")
    with torch.no_grad():
        encoder.embedding.weight.copy_(embeddings)


def load_adapter(model, model_id: str, adapter_name: str = "default", *, is_trainable: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None):
    """Load the adapter folder ``model_id`` (ours or PEFT's) as ``adapter_name``.

    ``model``: a transformers model (a new :class:`PTuningModel` is returned), or a
    ``PTuningModel`` / ``PeftModel``: the adapter is added, or, when it exists, its weights are
    copied into its parameters in place (so an optimizer already built on them stays valid).
    ``is_trainable=True`` loads the whole encoder from ``ptuning_fast_encoder.safetensors``
    (written with ``save_encoder=True``) and, with ``optimizer``, restores its state, so that
    training resumes where it stopped::

        model = get_ptuning_model(base, config)                    # or get_peft_model(...)
        optimizer = torch.optim.AdamW(model.prompt_encoder.parameters())
        load_adapter(model, "ckpt", is_trainable=True, optimizer=optimizer)

    Otherwise the encoded prompts are loaded for inference, as PEFT does. Returns the model
    holding the adapter.
    """
    if not isinstance(is_trainable, bool):
        raise TypeError(f"`is_trainable` must be a bool, got {is_trainable!r}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"`adapter_name` must be a non-empty str, got {adapter_name!r}")
    if optimizer is not None and not is_trainable:
        raise ValueError("restoring an `optimizer` needs `is_trainable=True`")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    config, options, has_encoder = _read_folder(model_id)
    model_id = os.fspath(model_id)
    if is_trainable and not has_encoder:
        raise ValueError(f"cannot resume training from {model_id!r}: it holds only the encoded prompts (PEFT's "
                         "format keeps no encoder weights); save with `save_encoder=True` to resume")
    if optimizer is not None and not os.path.isfile(os.path.join(model_id, OPTIMIZER_NAME)):
        raise ValueError(f"no optimizer state ({OPTIMIZER_NAME}) in {model_id!r}: it was saved without `optimizer`")
    config.inference_mode = not is_trainable

    if isinstance(model, (PeftModel, PTuningModel)):
        if adapter_name not in model.prompt_encoder:
            if isinstance(model, PTuningModel):
                model.add_adapter(adapter_name, config, options)
            else:
                model.add_adapter(adapter_name, config)
        elif model.peft_config[adapter_name].peft_type != config.peft_type:
            raise ValueError(f"adapter {adapter_name!r} is {model.peft_config[adapter_name].peft_type.value} but "
                             f"{model_id!r} holds {config.peft_type.value}")
        holder = model
    elif isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        holder = PTuningModel(model, config, adapter_name=adapter_name, options=options)
    else:
        raise TypeError(f"`model` must be a transformers model, a PTuningModel or a peft.PeftModel, got "
                        f"{type(model).__name__}")
    encoder = holder.prompt_encoder[adapter_name]
    if not is_trainable and not holder.peft_config[adapter_name].inference_mode:
        raise ValueError(f"adapter {adapter_name!r} of the PeftModel is built for training; load the encoded "
                         "prompts into a new adapter name, or pass `is_trainable=True`")
    _load_weights(encoder, model_id, config, resume=is_trainable)
    if is_trainable:
        encoder.requires_grad_(True)
        if optimizer is not None:
            _load_optimizer(optimizer, os.path.join(model_id, OPTIMIZER_NAME))
    else:
        encoder.requires_grad_(False)
        encoder.eval()
    return holder


__all__ = ["adapter_directory", "load_adapter", "prompt_embeddings_to_save", "save_adapter"]
