"""Multi-process training through torchrun + DistributedDataParallel.

The same script runs single-process (no environment variables) or under
``torchrun --nproc_per_node=N [--nnodes=M ...] -m difflab.cli train ...``: torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK, :func:`setup` joins the process group (NCCL on CUDA, gloo on
CPU) and every rank takes its contiguous shard of each global batch. DDP averages gradients
over ranks, so with equal shards the update equals the one-process update on the full batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "cleanup", "shard"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1), else single process.

    ``device``: "cpu", "cuda" or None (CUDA if available). Each rank uses cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for but CUDA is not available; use --device cpu")
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()  # no rank tears down its connections while another still uses them
        dist.destroy_process_group()


def shard(n: int, info: DistInfo) -> slice:
    """This rank's contiguous slice of a global batch of n examples (n divisible by world)."""
    if n % info.world_size:
        raise ValueError(f"the global (micro-)batch {n} must be divisible by the number of "
                         f"processes {info.world_size}; change train.batch_size")
    per = n // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)
