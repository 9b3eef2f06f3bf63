"""Fixed-seed golden runs (train, compress with its export) reproduce their recorded outputs
bit for bit: every checkpoint tensor, the figures, and the exported model's test logits."""

import pytest

from conftest import run_shark
from helpers import golden


@pytest.mark.parametrize("case", sorted(golden.COMMANDS))
def test_golden_run_is_reproduced_bit_for_bit(tmp_path, case):
    run_shark(*golden.COMMANDS[case], "--out", str(tmp_path / "run"))
    golden.check(case, tmp_path / "run")


def test_a_golden_from_another_cpu_tolerates_rounding_but_not_a_change():
    """On a kind of CPU with no capture, the test compares with the first capture within the
    cross-CPU tolerance: the recorded captures of two CPUs pass against each other, and the
    same fingerprint with one weight's sums moved by 2%, or its dev AUC by 0.001 (changes that
    train something else), fails."""
    import copy
    import json

    for case in golden.COMMANDS:
        captures = json.loads((golden.GOLDEN_DIR / f"{case}.json").read_text())["captures"]
        assert len({c["cpu"] for c in captures}) >= 2, case
        first, other = captures[0]["fingerprint"], captures[1]["fingerprint"]
        problems: list = []
        golden._differences(first, other, case, False, problems)
        assert problems == [], problems
        moved = copy.deepcopy(other)
        tensor = next(iter(moved["checkpoint" if case == "train" else "base_checkpoint"].values()))
        tensor["abs_sum"] *= 1.02
        problems = []
        golden._differences(first, moved, case, False, problems)
        assert len(problems) == 1 and "other CPU" in problems[0]
        moved = copy.deepcopy(other)
        metrics = moved["metrics"]
        metrics["dev_auc"] -= 0.001
        problems = []
        golden._differences(first, moved, case, False, problems)
        assert len(problems) == 1 and "dev_auc" in problems[0], problems
