"""Fixed-seed golden runs (train, compress with its export) reproduce their recorded outputs
bit for bit: every checkpoint tensor, the figures, and the exported model's test logits."""

import pytest

from conftest import run_shark
from helpers import golden


@pytest.mark.parametrize("case", sorted(golden.COMMANDS))
def test_golden_run_is_reproduced_bit_for_bit(tmp_path, case):
    run_shark(*golden.COMMANDS[case], "--out", str(tmp_path / "run"))
    golden.check(case, tmp_path / "run")
