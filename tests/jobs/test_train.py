"""End-to-end training: the main job, 1 vs 2 ranks, kill/resume, checkpoint refusal."""

import json

import pytest
import torch

from conftest import TINY, run_shark
from shark_torchrec.jobs.checkpoint import list_checkpoints, load_full_state


def model_tensors(ckpt_dir):
    state = load_full_state(ckpt_dir)
    return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}


def test_main_job_tiny(tmp_path):
    out = tmp_path / "run"
    proc = run_shark("train", *TINY, "--out-dir", str(out), "--metrics-out", str(tmp_path / "m.json"))
    m = json.loads((tmp_path / "m.json").read_text())
    for key in (
        "test_auc",
        "test_logloss",
        "train_seconds",
        "embedding_bytes",
        "optimizer_bytes",
        "fp32_embedding_bytes",
    ):
        assert key in m, key
    assert 0.6 < m["test_auc"] <= 1.0  # the planted signal is learnable
    assert m["embedding_bytes"] == m["fp32_embedding_bytes"] > 0  # stock fp32 tables
    # row-wise Adagrad: one fp32 state per row
    rows = sum(t["fp32_embedding_bytes"] for t in m["tables"].values()) // (8 * 4)
    assert m["optimizer_bytes"] == rows * 4
    assert (out / "config.toml").is_file() and (out / "synthetic_fields.json").is_file()
    assert "test_auc" in proc.stdout
    assert list_checkpoints(out / "checkpoints")


@pytest.mark.parametrize(
    "sharding,extra",
    [
        ("table_wise", []),
        ("column_wise", []),
        ("data_parallel", []),
        # one tier: every row shard keeps no row map
        ("row_wise", ["--precision", "int4"]),
    ],
)
def test_two_ranks_match_one_rank(tmp_path, sharding, extra):
    """2-process DMP (gloo) over the same global batches ends where 1 process does.

    data_parallel tables are trained by RowWiseAdagrad (not the dense optimizer) and must
    neither diverge nor differ from the sharded rule's single-process result."""
    args = [*TINY, "--synthetic-train-rows", "2000", "--sharding-types", sharding, *extra]
    if sharding == "data_parallel":
        args.append("--allow-data-parallel")
    one, two = tmp_path / "one", tmp_path / "two"
    run_shark("train", *args, "--out-dir", str(one), "--metrics-out", str(one / "m.json"))
    run_shark("train", *args, "--nproc", "2", "--out-dir", str(two), "--metrics-out", str(two / "m.json"))
    plan = (two / "sharding_plan.txt").read_text()
    assert sharding in plan
    a, b = model_tensors(one / "checkpoints"), model_tensors(two / "checkpoints")
    assert a.keys() == b.keys() and any("embedding_bags" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ma, mb = (json.loads((d / "m.json").read_text()) for d in (one, two))
    assert mb["world_size"] == 2
    assert abs(ma["test_auc"] - mb["test_auc"]) < 1e-4
    assert ma["embedding_bytes"] == mb["embedding_bytes"]


RESUMED = {
    "fp32": [],
    "shark": ["--precision", "shark", "--memory-budget", "0.7", "--reassign-every", "5"],
    # one tier (no row map) with a bf16 Adagrad state (stochastically rounded)
    "int4-bf16": ["--precision", "int4", "--emb-optimizer-state", "bf16"],
}


@pytest.mark.parametrize("precision", list(RESUMED))
def test_kill_and_resume_is_bit_exact(tmp_path, precision):
    """Mixed precision too: stochastic rounding noise, scores, groups and the step resume."""
    extra = RESUMED[precision]
    args = [*TINY, "--synthetic-train-rows", "3000", "--epochs", "2", "--checkpoint-every", "7", *extra]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_shark("train", *args, "--out-dir", str(straight))
    killed = run_shark("train", *args, "--out-dir", str(broken), "--fail-at-step", "30", check=False)
    assert killed.returncode == 17
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(broken / "checkpoints")]
    assert max(steps) == 28  # the newest checkpoint before the kill (mid-epoch 2)
    if "bf16" in extra:  # continued with an fp32 state asked: refused, not switched to it
        other = [a if a != "bf16" else "fp32" for a in args]
        refused = run_shark("train", *other, "--out-dir", str(broken), "--resume", check=False)
        assert refused.returncode == 2 and "--emb-optimizer-state bf16" in refused.stderr, refused.stderr
    run_shark("train", *args, "--out-dir", str(broken), "--resume")
    a, b = model_tensors(straight / "checkpoints"), model_tensors(broken / "checkpoints")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = (load_full_state(d / "checkpoints")["optim"]["state"] for d in (straight, broken))
    for k in sa:
        for name, t in sa[k].items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, sb[k][name]), (k, name)


def test_checkpoint_of_other_tables_is_refused(tmp_path):
    base = tmp_path / "base"
    run_shark("train", *TINY, "--synthetic-train-rows", "500", "--out-dir", str(base))
    proc = run_shark(
        "train",
        *TINY,
        "--synthetic-train-rows",
        "500",
        "--drop",
        "c5",
        "--checkpoint",
        str(base / "checkpoints"),
        "--out-dir",
        str(tmp_path / "other"),
        check=False,
    )
    assert proc.returncode == 2
    assert "t_c5" in proc.stderr and "not in the model" in proc.stderr
    proc = run_shark(
        "train",
        *TINY,
        "--synthetic-train-rows",
        "500",
        "--embedding-dim",
        "12",
        "--dense-arch",
        "16",
        "--checkpoint",
        str(base / "checkpoints"),
        "--out-dir",
        str(tmp_path / "dim"),
        check=False,
    )
    assert proc.returncode == 2 and "[rows, dim]" in proc.stderr
    # a fresh run never writes over an earlier run's checkpoints
    before = sorted(p.name for p in (base / "checkpoints").iterdir())
    proc = run_shark("train", *TINY, "--synthetic-train-rows", "500", "--out-dir", str(base), check=False)
    assert (
        proc.returncode == 2
        and "already holds the files of another run (config.toml, metrics.json, checkpoints" in proc.stderr
    )
    assert sorted(p.name for p in (base / "checkpoints").iterdir()) == before


def test_early_stopping_returns_the_best_dev_model(tmp_path):
    out = tmp_path / "es"
    args = [
        *TINY,
        "--synthetic-train-rows",
        "4000",
        "--epochs",
        "6",
        "--lr",
        "0.5",
        "--dense-lr",
        "0.1",
        "--eval-every",
        "8",
        "--early-stopping-patience",
        "2",
    ]
    run_shark("train", *args, "--out-dir", str(out), "--metrics-out", str(out / "m.json"))
    m = json.loads((out / "m.json").read_text())
    history = [h["dev_auc"] for h in m["dev_history"]]
    assert m["stopped_early"] and m["epochs_completed"] < 6
    assert history[-1] < max(history)  # it stopped after a decline ...
    assert m["dev_auc"] == pytest.approx(max(history), abs=1e-6)  # ... and returned the best


def test_dlrm_dcn_trains(tmp_path):
    out = tmp_path / "dcn"
    run_shark(
        "train",
        *TINY,
        "--arch",
        "dlrm_dcn",
        "--dcn-low-rank-dim",
        "8",
        "--out-dir",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    assert 0.6 < m["test_auc"] <= 1.0
    assert any("inter_arch.crossnet" in k for k in model_tensors(out / "checkpoints"))


def test_the_progress_bar_shows_the_loss_per_real_sample():
    """The trained loss divides by the batch's slots, padding included; the bar's figure is
    over the real samples, so an epoch's last, partial batch reads as the others do."""
    from shark_torchrec.jobs.trainer import sample_mean_loss

    per_sample = torch.tensor([0.5, 0.7, 0.9, 0.3, 0.2, 0.1, 0.4, 0.6])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # 3 lines, 5 slots of padding
    trained = (per_sample * weights).sum() / weights.numel()  # as DLRMTrainModule's forward
    assert abs(sample_mean_loss(trained, weights) - 0.7) < 1e-6 and float(trained) < 0.3
    assert sample_mean_loss(torch.tensor(0.0), torch.zeros(4)) == 0.0


def test_batch_sizes_that_do_not_share_out_name_their_flags():
    """`--nproc 3` with the default batches: the error named the two numbers, not the flags
    that set them (a newcomer's walkthrough)."""
    import torch

    from shark_torchrec.config import ConfigError, JobConfig
    from shark_torchrec.distributed.env import DistEnv
    from shark_torchrec.jobs.trainer import fit

    cfg = JobConfig()
    cfg.train.batch_size, cfg.train.eval_batch_size = 256, 4096
    with pytest.raises(
        ConfigError, match=r"^--batch-size 256 and --eval-batch-size 4096 must be divisible by the 3 ranks"
    ):
        fit(cfg, DistEnv(0, 3, torch.device("cpu"), "gloo"))
    cfg.train.batch_size, cfg.train.eval_batch_size = 254, 4095
    with pytest.raises(ConfigError, match=r"^--eval-batch-size 4095 must be divisible by the 2 ranks"):
        fit(cfg, DistEnv(0, 2, torch.device("cpu"), "gloo"))
