"""The tests' warm `shark` (helpers/warm_shark.py) answers as the console script does."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY
from helpers.warm_shark import WarmShark

SHARK = str(Path(sys.executable).parent / "shark")


def test_a_forked_command_ends_as_the_console_script_does(tmp_path):
    warm = WarmShark()
    try:
        for args, status in (
            (["train", "--help"], 0),
            (["train", "--no-such-flag"], 2),
            (["report"], 2),
            (["export", str(tmp_path / "nowhere"), "--out", "x"], 2),
        ):
            argv = [SHARK, *args]
            cold = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
            (tmp_path / "out").mkdir(exist_ok=True)
            got = warm.run(argv, ROOT, tmp_path / "out", timeout=120)
            assert cold.returncode == status, cold.stderr
            assert (got.returncode, got.stdout, got.stderr) == (cold.returncode, cold.stdout, cold.stderr), args
        # A command past its deadline is killed and reported as subprocess.run reports it; the
        # warm process serves the next one.
        with pytest.raises(subprocess.TimeoutExpired):
            warm.run([SHARK, "train", *TINY, "--epochs", "100", "--out-dir", str(tmp_path / "slow")], ROOT, tmp_path, 1)
        assert warm.usable()
        assert warm.run([SHARK, "report"], ROOT, tmp_path / "out", timeout=120).returncode == 2
    finally:
        warm.close()
    assert warm.process.poll() == 0  # stdin closed: the warm process ends
