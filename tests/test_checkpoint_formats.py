"""Files written by earlier versions still load: a checkpoint and its config.toml written
before the fused optimizer exposed `<table>.momentum1` and before `dataset.fold` /
`dataset.hash_size` became optional (tests/data/checkpoint_v0_shark*, written by commit
315efbb with `--precision shark --memory-budget 0.7 --synthetic-scale 0.002 --embedding-dim 8`)."""

import torch

from conftest import ROOT, run_shark
from shark_torchrec.config import load_config
from shark_torchrec.train.checkpoint import load_full_state

OLD = ROOT / "tests" / "data" / "checkpoint_v0_shark"


def test_checkpoint_from_before_momentum1_loads_and_trains_on(tmp_path):
    old = load_full_state(OLD)
    assert not [name for entry in old["optim"]["state"].values() for name in entry if name.endswith("momentum1")]
    out = tmp_path / "run"
    run_shark("train", "--checkpoint", str(OLD), "--epochs", "0", "--no-progress", "--out", str(out))
    new = load_full_state(out / "checkpoints")
    for key, value in old["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(new["model"][key], value), key  # every tensor as it was saved
    momentum = {k.rsplit(".", 2)[-2]: v for k, v in new["model"].items() if k.endswith(".momentum")}
    state = {k: v for entry in new["optim"]["state"].values() if isinstance(entry, dict) for k, v in entry.items()}
    for table, per_unit in momentum.items():
        assert torch.equal(state[f"{table}.momentum1"], per_unit[:, 0]), table  # filled from the module state
    run_shark("train", "--checkpoint", str(OLD), "--max-steps", "3", "--no-progress", "--out", str(tmp_path / "more"))


def test_config_from_before_optional_fold_and_hash_size_loads(tmp_path):
    text = (ROOT / "tests" / "data" / "checkpoint_v0_shark.config.toml").read_text()
    assert "fold = 0" in text and "hash_size = 100000" in text  # written explicitly then
    cfg = load_config(ROOT / "tests" / "data" / "checkpoint_v0_shark.config.toml")
    assert cfg.dataset.fold is None and cfg.dataset.hash_size is None
    cfg.validate()


def test_a_checkpoint_missing_other_state_is_refused_by_name(tmp_path):
    """Only the momentum1 entries may be missing (they are in the module state); anything else
    a model holds and a checkpoint lacks is an error naming it."""
    proc = run_shark("train", "--checkpoint", str(OLD), "--epochs", "0", "--dense-arch", "8", "8",
                     "--no-progress", "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and "lacks what this model holds" in proc.stderr, proc.stderr[-2000:]
