"""Multi-process training under ``torchrun``: DistributedDataParallel, rank-0-only writes.

    torchrun --nproc-per-node 4 -m finetune.cli --backbone resnet50 --data ./imgs

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op and
training runs in one process. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``world_size == 1`` is plain single-process training."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """Each process on its own GPU (cuda:LOCAL_RANK) when CUDA is used."""
        if not self.enabled:
            return requested
        use_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
        return f"cuda:{self.local_rank}" if use_cuda else "cpu"

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over the parameters that currently require grad (re-wrap after freezing changes)."""
        if not self.enabled:
            return model
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(requested_device: str) -> DistContext:
    """Join the process group torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    context = DistContext(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = context.device(requested_device)
    if device.startswith("cuda"):
        torch.cuda.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if not context.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one log, from rank 0
    logger.info("distributed training: %d processes (%s)", world_size, dist.get_backend())
    return context
