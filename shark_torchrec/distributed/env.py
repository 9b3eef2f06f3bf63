"""Process groups and local launching: in-process, spawned, or under torchrun/TorchX."""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from shark_torchrec.distributed.process_exit import skip_exit_collections


@dataclass
class DistEnv:
    """This process's place in the job: its rank, the world size, its device and the process
    group's backend (`none` for a one-process stand-in with no process group)."""

    rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and prints)."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun / TorchX set this process's world.

    Returns:
        True when WORLD_SIZE and RANK are both in the environment.
    """
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def exit_without_teardown(code: Optional[int]) -> None:
    """End a torchrun/TorchX rank: flush the standard streams and the logs, then leave without
    Python's interpreter teardown (`os._exit`). A gloo worker thread can still be releasing a
    finished collective's tensors after the job returned; when that release needs the GIL
    during interpreter teardown, the thread is cancelled inside a destructor and the process
    aborts ("terminate called without an active exception", from
    `ProcessGroupGloo::AsyncWork::~AsyncWork`), after the job did all its work. Seen about once
    in 150 runs of `examples/own_model.py` under torchrun here; ranks that torch's elastic
    launcher spawns (`--nproc`) already end this way.

    Args:
        code: the exit status (None: 0).
    """
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(int(code or 0))


def init_distributed() -> DistEnv:
    """Join (or create) the default process group: NCCL on CUDA, gloo on CPU.

    Under torchrun/TorchX the world comes from the environment; otherwise this process is a
    world of one, set up in memory (no port).

    Returns:
        This process's rank, world size and device.
    """
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if launched_by_torchrun():
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            # TorchRec's row-wise shardings ask for the ranks a host holds and warn, once a
            # table, when no launcher said: a world of one holds one.
            os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    rank = dist.get_rank()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, dist.get_world_size(), device, backend)


def shutdown_distributed() -> None:
    """Leave the default process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    nproc: int,
    *args: Any,
    prefer: Sequence[Callable[[BaseException], bool]] = (lambda e: isinstance(e, (ValueError, OSError)),),
) -> Any:
    """Run `fn(*args)` on `nproc` local ranks and return rank 0's result.

    nproc == 1 or an existing torchrun world runs it in this process. Otherwise it uses
    torch's elastic launcher (what torchrun runs), so a spawned job and a torchrun job
    behave the same; each spawned rank runs its share of the cores (`rank_threads`).

    Args:
        fn: a module-level function (spawned ranks import it).
        nproc: local ranks.
        args: its arguments (picklable).
        prefer: when ranks fail, the exception re-raised here is the first (by rank) that the
            first of these tests accepts, else that the second accepts, and so on, else the
            first of any: a rank that failed with a user error (a bad config, a bad line) is
            the cause, and the others only saw their peer leave. Tests rather than types, so
            that the caller's error types need not be imported before a failure.

    Returns:
        What rank 0's `fn` returned.

    Raises:
        The exception a rank raised, as it raised it (so the caller reports it as on one rank),
        the rank's own traceback added as a note (shown where it propagates: the traceback of
        the raise here says nothing of where the rank failed); RuntimeError naming the rank and
        carrying its traceback when it cannot be sent back.
    """
    if nproc == 1 or launched_by_torchrun():
        return fn(*args)
    threads = rank_threads(nproc)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
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
    # The agent logs each failed child as a wall of ProcessExitedException tracebacks, and the
    # workers it stops (a failed rank's peers, or all on Ctrl-C) on loggers of their own level;
    # the failure that matters is re-raised below (with the rank's own traceback when needed).
    elastic_logs = [logging.getLogger("torch.distributed.elastic")] + [
        logging.getLogger(name)
        for name in list(logging.Logger.manager.loggerDict)
        if name.startswith("torch.distributed.elastic.")
    ]
    levels = [logger.level for logger in elastic_logs]
    for logger in elastic_logs:
        logger.setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as failures_dir:
        try:
            results: Dict[int, Any] = elastic_launch(config, _catching)(failures_dir, threads, fn, *args)
        except ChildFailedError:
            failures = _read_failures(Path(failures_dir))
            if not failures:
                raise
            ranked = [next((t for t, test in enumerate(prefer) if test(f[1])), len(prefer)) for f in failures]
            rank, error, text = failures[ranked.index(min(ranked))]
            if error is not None:
                error.add_note(f"raised on rank {rank}:\n{text.rstrip()}")
                raise error from None
            raise RuntimeError(f"rank {rank} failed:\n{text}") from None
        finally:
            for logger, level in zip(elastic_logs, levels):
                logger.setLevel(level)
    return results[0]


def rank_threads(nproc: int) -> Optional[int]:
    """The intra-op threads each of `nproc` spawned ranks runs: the cores this process may use
    shared out (at least one a rank), unless OMP_NUM_THREADS says otherwise (then None: torch
    reads it). torch would give every rank all the cores: two ranks of two threads each on two
    cores made `shark train --nproc 2` take 58 s where one thread a rank took 20 s. torchrun
    sets OMP_NUM_THREADS=1 for several ranks for the same reason; a spawned job keeps the cores
    a rank can use without waiting.

    Args:
        nproc: local ranks.

    Returns:
        Threads a rank, or None where OMP_NUM_THREADS is set.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def _read_failures(folder: Path) -> List[Tuple[int, Any, str]]:
    """(rank, exception or None, traceback) of every rank that recorded its failure."""
    out = []
    for path in sorted(folder.glob("rank_*.pkl"), key=lambda p: int(p.stem.split("_")[1])):
        try:
            error, text = pickle.loads(path.read_bytes())
        except Exception:  # noqa: BLE001 (a half-written record: the traceback is lost, not the run)
            continue
        out.append((int(path.stem.split("_")[1]), error, text))
    return out


def _catching(failures_dir: str, threads: Optional[int], fn: Callable[..., Any], *args: Any) -> Any:
    """A spawned rank's entry point: a rank that raises records the exception (for `launch` to
    re-raise as it was) and then fails as before, so the launcher stops the other ranks, which
    may be waiting for it in a collective. Either way the rank's process ends next, so its exit
    skips the last garbage collections (`skip_exit_collections`). `threads`: the rank's
    intra-op threads (`rank_threads`; None leaves torch's)."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (recorded whole, then re-raised)
        text = traceback.format_exc()
        try:
            record = pickle.dumps((e, text))
            pickle.loads(record)
        except Exception:  # noqa: BLE001 (an exception that does not pickle: its text only)
            record = pickle.dumps((None, text))
        rank = int(os.environ.get("RANK", "0"))
        tmp = Path(failures_dir) / f".rank_{rank}.tmp"
        tmp.write_bytes(record)
        tmp.rename(Path(failures_dir) / f"rank_{rank}.pkl")
        raise
    finally:
        skip_exit_collections()  # this rank's process ends once the launcher has its result
