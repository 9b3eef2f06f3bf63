"""The mixed-precision collections through `shark train`: checkpoints across plans and world sizes,
converting an fp32 model, AUC against fp32, data-parallel placement."""

import json

import torch

from conftest import TINY, run_shark
from helpers.checks import int8_step
from shark_torchrec.jobs.checkpoint import load_full_state, resolve_checkpoint
from shark_torchrec.precision.priority import FP16, FP32, INT8

SMALL = [*TINY, "--precision", "shark", "--memory-budget", "0.55", "--reassign-every", "10"]


def test_checkpoint_moves_between_plans_and_world_sizes(tmp_path):
    """Saved by 2 ranks with row-wise shards, loaded by 1 rank table-wise: every tensor of
    the logical tables (values, int8 scales, groups, scores, optimizer state) is identical."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_shark("train", *SMALL, "--nproc", "2", "--sharding-types", "row_wise", "--out-dir", str(a))
    run_shark(
        "train",
        *SMALL,
        "--sharding-types",
        "table_wise",
        "--checkpoint",
        str(a / "checkpoints"),
        "--epochs",
        "0",
        "--out-dir",
        str(b),
    )
    sa = load_full_state(resolve_checkpoint(a / "checkpoints"))["model"]
    sb = load_full_state(resolve_checkpoint(b / "checkpoints"))["model"]
    mixed = [k for k in sa if ".embedding_bags." in k]
    assert {k.rsplit(".", 1)[1] for k in mixed} == {
        "weight",
        "qparams",
        "row_group",
        "row_priority",
        "row_seen_step",
        "momentum",
    }
    groups = torch.cat([sa[k][:, 0] for k in mixed if k.endswith("row_group")])
    assert all(int((groups == g).sum()) > 0 for g in range(3))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_fp32_model_converts_explicitly(tmp_path):
    fp32, mixed = tmp_path / "fp32", tmp_path / "mixed"
    run_shark("train", *TINY, "--out-dir", str(fp32))
    refused = run_shark(
        "train", *SMALL, "--checkpoint", str(fp32 / "checkpoints"), "--out-dir", str(mixed), check=False
    )
    assert refused.returncode == 2 and "--init-from" in refused.stderr
    run_shark("train", *SMALL, "--init-from", str(fp32 / "checkpoints"), "--epochs", "0", "--out-dir", str(mixed))
    sa = load_full_state(resolve_checkpoint(fp32 / "checkpoints"))["model"]
    sb = load_full_state(resolve_checkpoint(mixed / "checkpoints"))["model"]
    for k in (k for k in sa if k.endswith(".weight") and ".embedding_bags." in k):
        groups = sb[k.replace(".weight", ".row_group")][:, 0]
        err = (sa[k] - sb[k]).abs().max(dim=1).values
        assert (err[groups == FP32] == 0).all()
        assert (err[groups == FP16] <= sa[k][groups == FP16].abs().max(dim=1).values * 2**-11).all()
        assert (err[groups == INT8] <= int8_step(sa[k][groups == INT8]) * 0.51 + 1e-6).all()


def test_trains_within_half_a_point_of_fp32(tmp_path):
    args = [
        "--synthetic-train-rows",
        "20000",
        "--synthetic-eval-rows",
        "4000",
        "--synthetic-scale",
        "0.05",
        "--batch-size",
        "256",
        "--embedding-dim",
        "16",
        "--no-progress",
    ]
    auc = {}
    for precision in ("fp32", "shark"):
        out = tmp_path / precision
        extra = ["--memory-budget", "0.5", "--reassign-every", "20"] if precision == "shark" else []
        run_shark(
            "train",
            *args,
            "--precision",
            precision,
            *extra,
            "--out-dir",
            str(out),
            "--metrics-out",
            str(out / "m.json"),
        )
        m = json.loads((out / "m.json").read_text())
        auc[precision] = m["test_auc"]
        if precision == "shark":
            assert m["embedding_bytes"] <= 0.5 * m["fp32_embedding_bytes"]
            assert m["rows_fp32"] > 0 and m["rows_fp16"] > 0 and m["rows_int8"] > 0
    assert auc["fp32"] > 0.7
    assert abs(auc["shark"] - auc["fp32"]) <= 0.005, auc


def test_data_parallel_placement_trains_without_nan(tmp_path):
    """Stock fp16 tables placed data-parallel go NaN (a dense optimizer's epsilon underflows
    in fp16); ours update every group with the same row-wise rule."""
    out = tmp_path / "dp"
    run_shark(
        "train",
        *TINY,
        "--precision",
        "fp16",
        "--nproc",
        "2",
        "--allow-data-parallel",
        "--sharding-types",
        "data_parallel",
        "--lr",
        "0.5",
        "--out-dir",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    assert m["test_auc"] == m["test_auc"] and m["test_auc"] > 0.6  # not NaN, and learned
    assert m["test_logloss"] == m["test_logloss"]
