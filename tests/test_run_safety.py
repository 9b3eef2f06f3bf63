"""Runs that do not collide or lose work: checkpoint checksums, and where a resumed run picked up."""

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from shark_torchrec.train import checkpoint as ckpt_module
from shark_torchrec.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

from conftest import TINY, run_shark

# 3000 train rows: 24 steps an epoch. Checkpoints every 5 steps; killed after step 16, the
# run leaves step_10 and step_15 (two are kept).
SMALL = [*TINY, "--synthetic-train-rows", "3000", "--checkpoint-every", "5"]
KILL_AT = "16"


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A `shark train` run killed hard (os._exit) after step 16, with its checkpoints."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = run_shark("train", *SMALL, "--out-dir", str(out), "--fail-at-step", KILL_AT, check=False)
    assert proc.returncode == 17
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------------------------------
# Checkpoint checksums


def test_resume_falls_back_past_a_truncated_checkpoint(killed_run, tmp_path):
    out = copy_of(killed_run, tmp_path)
    newest = out / "checkpoints" / "step_00000015"
    data = newest / "__0_0.distcp"
    size = data.stat().st_size
    os.truncate(data, size // 2)
    # Named explicitly, a corrupt checkpoint is an error naming its file.
    proc = run_shark("train", *SMALL, "--checkpoint", str(newest), "--out-dir", str(tmp_path / "other"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"shark train: error: checkpoint {newest} is corrupt: {data} has {size // 2} bytes, {size} were written "
        "(truncated or overwritten)"
    )
    # --resume takes the newest one that passes, and says which one it skipped and why.
    proc = run_shark("train", *SMALL, "--out-dir", str(out), "--resume")
    assert f"skipping corrupt checkpoint {newest}: {data} has {size // 2} bytes" in proc.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_00000010'} at step 10 (epoch 0," in proc.stderr
    assert resolve_checkpoint(out / "checkpoints").name == "step_00000024"  # the run's end, valid


@pytest.fixture
def two_checkpoints(tmp_path):
    """step_1 and step_2 of a small model, as a new process sees them (nothing known good)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 1))
    opt = torch.optim.Adagrad(model.parameters())
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        save_checkpoint(root, step, model, opt, {"tables": {}}, keep=3)
    ckpt_module._checked.clear()
    return root, model, opt


def largest_file(ckpt: Path) -> Path:
    return max((f for f in ckpt.iterdir() if f.name != "meta.json"), key=lambda f: f.stat().st_size)


def flip_a_bit(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "meta"])
def test_corrupt_newest_checkpoint_is_skipped_and_named(two_checkpoints, caplog, damage):
    root, _, _ = two_checkpoints
    newest = root / "step_00000002"
    data = largest_file(newest)
    if damage == "flip":
        flip_a_bit(data)
        why = f"{data} fails its CRC-32 check"
    elif damage == "truncate":
        os.truncate(data, data.stat().st_size - 1)
        why = f"{data} has {data.stat().st_size} bytes, {data.stat().st_size + 1} were written"
    elif damage == "delete":
        data.unlink()
        why = f"{data} is missing"
    else:
        (newest / "meta.json").write_text('{"step": 2, "tab')
        why = f"{newest / 'meta.json'} cannot be read"
    with caplog.at_level(logging.WARNING, logger="shark"):
        assert resolve_checkpoint(root) == root / "step_00000001"
    assert f"skipping corrupt checkpoint {newest}: {why}" in caplog.text
    with pytest.raises(CheckpointError, match="^" + re.escape(f"checkpoint {newest} is corrupt: {why}")):
        resolve_checkpoint(newest)


def test_no_valid_checkpoint_is_an_error(two_checkpoints):
    root, _, _ = two_checkpoints
    for ckpt in list_checkpoints(root):
        flip_a_bit(largest_file(ckpt))
    with pytest.raises(CheckpointError, match=re.escape(f"no valid checkpoint at {root}: all 2 fail their check")):
        resolve_checkpoint(root)


def test_checkpoint_without_checksums_still_loads(two_checkpoints):
    """Checkpoints saved before checksums existed load as they did, unchecked."""
    root, model, opt = two_checkpoints
    newest = root / "step_00000002"
    meta = json.loads((newest / "meta.json").read_text())
    del meta["files"]
    (newest / "meta.json").write_text(json.dumps(meta))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    assert resolve_checkpoint(root) == newest
    load_checkpoint(resolve_checkpoint(newest), model, opt, {})
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_checkpoint_records_every_file_it_wrote(two_checkpoints):
    root, _, _ = two_checkpoints
    ckpt = root / "step_00000002"
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    assert sorted(files) == sorted(f.name for f in ckpt.iterdir() if f.name != "meta.json")
    assert {".metadata"} < set(files)
    for name, entry in files.items():
        assert entry["bytes"] == (ckpt / name).stat().st_size and len(entry["crc32"]) == 8
