"""Files and names of earlier versions still work: a checkpoint and its config.toml written
before meta.json carried its version, before the fused optimizer exposed `<table>.momentum1`
and before `dataset.fold` / `dataset.hash_size` became optional (tests/fixtures/checkpoint_v0_shark*, written by commit
315efbb with `--precision shark --memory-budget 0.7 --synthetic-scale 0.002 --embedding-dim 8`)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_shark
from shark_torchrec.config import load_config
from shark_torchrec.jobs.checkpoint import META_VERSION, CheckpointError, load_full_state, read_meta, resolve_checkpoint

OLD = ROOT / "tests" / "fixtures" / "checkpoint_v0_shark"


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
    # The old meta file has no version (1); what this code writes says 2.
    assert "meta_version" not in json.loads((OLD / "meta.json").read_text()) and read_meta(OLD)["meta_version"] == 1
    written = json.loads((resolve_checkpoint(out / "checkpoints") / "meta.json").read_text())
    assert written["meta_version"] == META_VERSION == 2


def test_config_from_before_optional_fold_and_hash_size_loads(tmp_path):
    text = (ROOT / "tests" / "fixtures" / "checkpoint_v0_shark.config.toml").read_text()
    assert "fold = 0" in text and "hash_size = 100000" in text  # written explicitly then
    cfg = load_config(ROOT / "tests" / "fixtures" / "checkpoint_v0_shark.config.toml")
    assert cfg.dataset.fold is None and cfg.dataset.hash_size is None
    cfg.validate()


def test_a_checkpoint_missing_other_state_is_refused_by_name(tmp_path):
    """Only the momentum1 entries may be missing (they are in the module state); anything else
    a model holds and a checkpoint lacks is an error naming it."""
    proc = run_shark(
        "train",
        "--checkpoint",
        str(OLD),
        "--epochs",
        "0",
        "--dense-arch",
        "8",
        "8",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
        check=False,
    )
    assert proc.returncode == 2 and "lacks what this model holds" in proc.stderr, proc.stderr[-2000:]


def test_a_meta_file_of_a_newer_version_is_refused_by_name(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"meta_version": META_VERSION + 1, "step": 1}))
    with pytest.raises(CheckpointError, match=f"meta_version {META_VERSION + 1}; this shark-torchrec reads up to"):
        read_meta(tmp_path)


def test_the_old_package_name_still_imports_with_a_warning():
    """`shark_torchrec.train` moved to `shark_torchrec.jobs` (`train.pruning` to `jobs.prune`)."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    from shark_torchrec.train.pruning import prune_job\n"
        "    from shark_torchrec.train.export import export_checkpoint\n"
        "import shark_torchrec.jobs.prune, shark_torchrec.jobs.export\n"
        "assert prune_job is shark_torchrec.jobs.prune.prune_job\n"
        "assert export_checkpoint is shark_torchrec.jobs.export.export_checkpoint\n"
        "assert any('shark_torchrec.train is now shark_torchrec.jobs' in str(w.message) for w in seen), seen\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
