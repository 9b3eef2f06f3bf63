"""Rank functions for `launch` that import nothing heavy at the top (spawned ranks import this
file)."""

import time
from pathlib import Path

import torch


def threads_of_rank() -> int:
    """This rank's intra-op threads."""
    return torch.get_num_threads()


def write_after_the_write_check(folder: str) -> bool:
    """Two ranks check that `folder` (missing) can be written, as every run does first; rank 1
    is then slow to remove the directories it made, while rank 0 makes the folder again at once
    and writes into it a moment later (as a run's first save does). Returns whether rank 0's
    file is there."""
    import torch.distributed as dist

    from shark_torchrec.distributed.env import init_distributed, shutdown_distributed
    from shark_torchrec.jobs import run_dir

    env = init_distributed()
    if env.rank == 1:
        remove = run_dir._remove_if_empty

        def slowly(dirs):
            time.sleep(0.5)
            remove(dirs)

        run_dir._remove_if_empty = slowly
    d = Path(folder)
    run_dir.check_writable({"--out-dir": d})
    if env.rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        time.sleep(1.0)
        (d / "metrics.json").write_text("{}")
    dist.barrier()
    written = (d / "metrics.json").exists()
    shutdown_distributed()
    return written


def unpack_on_rank_1() -> int:
    """Rank 1 fails with a fault of ours (Python's own ValueError); rank 0 returns 0."""
    import os

    if os.environ.get("RANK") == "1":
        width, depth = [1, 2, 3]
        return width * depth
    return 0


def fault_on_0_user_error_on_1(cfg) -> int:
    """A job of both ranks failing: rank 1 with a user error (ConfigError), rank 0, once rank 1
    is about to raise (a file in the run's --out folder says so), with a fault of ours (a
    ValueError)."""
    import os

    from shark_torchrec.config import ConfigError

    folder = Path(cfg.run.out_dir)
    me, peer = ("rank1", "rank0") if os.environ.get("RANK") == "1" else ("rank0", "rank1")
    if me == "rank0":
        (folder / me).write_text("")  # rank 0 is up: rank 1 may fail (the launcher then stops rank 0)
    while not (folder / peer).exists():
        time.sleep(0.01)
    if me == "rank1":
        (folder / me).write_text("")
        raise ConfigError("train.lr=0.0 (--lr) must be > 0")
    raise ValueError("too many values to unpack (expected 2)")
