import os

# Our Triton kernels run on CPU through Triton's interpreter in the tests. Triton reads this when
# it is imported (its own library functions, tl.sum and the like, are decorated then), and other
# tests import it indirectly (torch.export), so it is set before anything else.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

# scripts/test.sh runs what the tests start on one thread a process (OMP_NUM_THREADS=1); the
# tests that run in this worker keep at least two, so that the ops split their work into
# parallel tasks as on any multi-core machine.
torch.set_num_threads(max(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

warnings.filterwarnings("ignore", category=FutureWarning)


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared data folder lies beside the checkout)")
    return path


_warm = None  # this pytest worker's warm `shark` process (helpers/warm_shark.py), once started


def run_shark(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `shark` console command of this environment: forked from this worker's warm
    process (helpers/warm_shark.py: the same command without 4 s of imports), or as the console
    script itself with SHARK_TESTS_COLD=1 or where the environment changed since that process
    started."""
    global _warm
    argv = [str(Path(sys.executable).parent / "shark"), *args]
    if os.environ.get("SHARK_TESTS_COLD") != "1" and _warm is None:
        from helpers.warm_shark import WarmShark

        _warm = WarmShark()
    if _warm is not None and _warm.usable():
        with tempfile.TemporaryDirectory() as out:
            proc = _warm.run(argv, cwd, Path(out), timeout=600)
    else:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"shark {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def pytest_sessionfinish(session, exitstatus):
    if _warm is not None:
        _warm.close()


# Small synthetic problem used by most training tests.
TINY = [
    "--synthetic-train-rows",
    "6000",
    "--synthetic-eval-rows",
    "2000",
    "--synthetic-scale",
    "0.02",
    "--batch-size",
    "128",
    "--eval-batch-size",
    "1024",
    "--embedding-dim",
    "8",
    "--dense-arch",
    "16",
    "--over-arch",
    "16",
    "--no-progress",
]
