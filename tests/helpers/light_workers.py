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
