"""Process groups and local launching: in-process, spawned, or under torchrun/TorchX."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed() -> DistEnv:
    """Join (or create) the default process group: NCCL on CUDA, gloo on CPU.

    Under torchrun/TorchX the world comes from the environment; otherwise this process is a
    world of one, set up in memory (no port).
    """
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, dist.get_world_size(), device, backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> Any:
    """Run `fn(*args)` on `nproc` local ranks and return rank 0's result.

    nproc == 1 or an existing torchrun world runs it in this process. Otherwise it uses
    torch's elastic launcher (what torchrun runs), so a spawned job and a torchrun job
    behave the same.
    """
    if nproc == 1 or launched_by_torchrun():
        return fn(*args)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    results: Dict[int, Any] = elastic_launch(config, fn)(*args)
    return results[0]
