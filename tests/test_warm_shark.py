"""The tests' warm `shark` (helpers/warm_shark.py) answers as the console script does."""

import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from helpers.warm_shark import WarmShark


def test_a_forked_command_ends_as_the_console_script_does(tmp_path):
    warm = WarmShark()
    try:
        for args in (["train", "--no-such-flag"], ["report"], ["export", str(tmp_path / "nowhere"), "--out", "x"]):
            argv = [str(Path(sys.executable).parent / "shark"), *args]
            cold = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
            (tmp_path / "out").mkdir(exist_ok=True)
            got = warm.run(argv, ROOT, tmp_path / "out", timeout=120)
            assert cold.returncode == 2, cold.stderr
            assert (got.returncode, got.stdout, got.stderr) == (cold.returncode, cold.stdout, cold.stderr), args
        assert warm.usable()
    finally:
        warm.close()
    assert warm.process.poll() == 0  # stdin closed: the warm process ends
