"""Several training processes (``torchrun``): joining the group, adding up numbers, sharing states.

``torchrun --nproc_per_node=N -m reid_utils.train ...`` starts N copies of the training program and
tells each its rank through environment variables. Each process trains a full copy of the model on its
own share of every epoch (``DistributedSampler``); ``DistributedDataParallel`` averages the gradients
after every backward pass, so all copies stay identical. NCCL connects GPUs, gloo CPUs. With one
process (the normal case) every function here does nothing special.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


def distributed_context() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` normally; under ``torchrun`` it joins the process group first."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():  # before NCCL starts: each process talks through its own GPU
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world_size


def local_rank() -> int:
    """This process's number on its own machine: which GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _collective_device() -> torch.device:
    """NCCL only moves tensors that live on the GPU; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_processes(values: Sequence[float]) -> list[float]:
    """The element-wise sum of ``values`` over all processes (the values themselves with one process)."""
    if not is_distributed():
        return list(values)
    totals = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(totals)
    return totals.tolist()


def gather_from_processes(obj: object) -> list[object]:
    """Every process's ``obj``, in rank order (``[obj]`` with one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait until every process got here (nothing to wait for with one process)."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group at the end of a run."""
    if is_distributed():
        dist.destroy_process_group()
