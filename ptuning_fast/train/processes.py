"""Processes and devices: the process group ``torchrun`` starts, this process's device, bf16
autocast, peak memory, and the multi-process pieces (FSDP sharding of the frozen blocks, the
all-reduce of the prompt gradients)."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from .config import TrainConfig, check_config


@dataclass
class Distributed:
    """Where this process sits: rank, world size and its device (world 1: no process group)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over the ranks in place (``op``: 'sum' or 'max'); alone: unchanged."""
        if op not in ("sum", "max"):
            raise ValueError(f"`op` must be 'sum' or 'max', got {op!r}")
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()


def setup_distributed(config: TrainConfig) -> Distributed:
    """Join the process group started by ``torchrun`` (its env variables), or run alone."""
    check_config(config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` 'cuda' was chosen but CUDA is not available")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        import torch.distributed as dist
        backend = config.dist_backend if config.dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
        if backend == "nccl" and not use_cuda:
            raise ValueError("`dist_backend` 'nccl' needs CUDA; use 'gloo' on CPU")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        if config.batch_size % world_size:
            raise ValueError(f"`batch_size` ({config.batch_size}) must be divisible by the number of processes "
                             f"({world_size}): it is the global batch, split evenly over the ranks")
    elif config.strategy != "auto":
        warnings.warn(f"strategy {config.strategy!r} needs several processes (launch with torchrun); running "
                      "on one process")
    return Distributed(rank, world_size, device)


def destroy_process_group() -> None:
    """Leave the process group of a ``torchrun`` launch, if this process joined one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_device(device) -> torch.device:
    if not isinstance(device, torch.device):
        raise TypeError(f"`device` must be a torch.device, got {device!r}")
    return device


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: asked for, or ``auto`` on CUDA."""
    check_config(config)
    _check_device(device)
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def autocast(config: TrainConfig, device: torch.device):
    """The autocast context of ``--precision`` (a no-op context for fp32)."""
    if not uses_bf16(config, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's peak allocation, or the process's peak RSS on CPU."""
    if _check_device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    import resource  # Unix only; the job runs on Linux machines
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def shard_frozen_blocks(model, dist_info: Distributed) -> int:
    """FSDP2: shard each frozen transformer block over the ranks (the memory of a large base model).

    The prompt parameters stay replicated outside the sharded blocks; their gradients are
    all-reduced by the training loop. Returns the number of sharded blocks.
    """
    if not isinstance(dist_info, Distributed) or not dist_info.enabled:
        raise ValueError(f"`dist_info` must be a Distributed of several processes, got {dist_info!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    block_names = set(getattr(model.get_base_model(), "_no_split_modules", None) or [])
    if not block_names:
        raise ValueError("`strategy` 'fsdp' needs a model that names its transformer blocks (_no_split_modules)")
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    # P-tuning v1 calls the word embedding directly, outside its parent's forward: never shard it.
    embedding = model.get_base_model().get_input_embeddings()
    blocks = [m for m in model.get_base_model().modules()
              if type(m).__name__ in block_names and not any(c is embedding for c in m.modules())]
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            raise ValueError(f"`strategy` 'fsdp' shards frozen blocks only, but {type(block).__name__} has "
                             "trainable parameters")
        fully_shard(block, mesh=mesh)
    return len(blocks)


def all_reduce_gradients(params, world_size: int) -> None:
    """Average the trainable gradients over the ranks (one flat all-reduce; they are small)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"`world_size` must be a positive int, got {world_size!r}")
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


__all__ = ["Distributed", "all_reduce_gradients", "autocast", "destroy_process_group", "peak_memory",
           "setup_distributed", "shard_frozen_blocks", "uses_bf16"]
