"""Process groups and local launching: in-process, spawned, or under torchrun/TorchX."""

from __future__ import annotations

import os
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple, Type

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


def launch(fn: Callable[..., Any], nproc: int, *args: Any, prefer: Tuple[Type[BaseException], ...] = (ValueError, OSError)) -> Any:
    """Run `fn(*args)` on `nproc` local ranks and return rank 0's result.

    nproc == 1 or an existing torchrun world runs it in this process. Otherwise it uses
    torch's elastic launcher (what torchrun runs), so a spawned job and a torchrun job
    behave the same.

    Args:
        fn: a module-level function (spawned ranks import it).
        nproc: local ranks.
        args: its arguments (picklable).
        prefer: when ranks fail, the exception re-raised here is the first (by rank) of these
            types, else the first of any type: a rank that failed with a user error (a bad
            config, a bad line) is the cause, and the others only saw their peer leave.

    Returns:
        What rank 0's `fn` returned.

    Raises:
        The exception a rank raised, as it raised it (so the caller reports it as on one rank);
        RuntimeError naming the rank and carrying its traceback when it cannot be sent back.
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
    results: Dict[int, Any] = elastic_launch(config, _catching)(fn, *args)
    failures = [(rank, results[rank]) for rank in sorted(results) if isinstance(results[rank], _RankFailure)]
    if not failures:
        return results[0]
    preferred = [f for f in failures if isinstance(f[1].error, prefer)] or failures
    rank, failure = preferred[0]
    if failure.error is not None:
        raise failure.error
    raise RuntimeError(f"rank {rank} failed:\n{failure.text}")


@dataclass
class _RankFailure:
    """An exception a spawned rank raised, sent back to the launching process."""

    error: Any  # the exception itself when it pickles, else None
    text: str  # its traceback


def _catching(fn: Callable[..., Any], *args: Any) -> Any:
    """A spawned rank's entry point: a rank that raises returns the exception instead, so the
    launcher re-raises the cause rather than the elastic agent's report of a dead child."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (sent back whole, re-raised by launch)
        import pickle

        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(e))
            return _RankFailure(e, text)
        except Exception:  # noqa: BLE001
            return _RankFailure(None, text)
