"""Runs that do not collide or lose work: checkpoint checksums."""

import json
import logging
import os
import re
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
