"""`shark compress`: stages, resume after an interruption, and config refusal."""

import json
import os

import pytest
import torch

from conftest import TINY, run_shark
from helpers.checks import compare_export
from shark_torchrec.jobs.checkpoint import load_full_state

ARGS = [
    *TINY,
    "--target-memory",
    "0.3",
    "--max-auc-drop",
    "0.03",
    "--max-iterations",
    "2",
    "--order",
    "importance",
    "--min-saving",
    "0",
    "--support-rows",
    "2000",
    "--quant-epochs",
    "2",
    "--quant-evals-per-epoch",
    "0",
    "--checkpoint-every",
    "10",
]


def test_compress_resumes_from_the_last_finished_stage(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_shark("compress", *ARGS, "--out", str(straight), "--metrics-out", str(straight / "m.json"))
    m = json.loads((straight / "m.json").read_text())
    for key in (
        "test_auc",
        "embedding_bytes",
        "base_test_auc",
        "kept_fields",
        "pruned_fields",
        "memory_ratio",
        "quant_budget",
    ):
        assert key in m, key
    assert m["precision"] == "shark" and m["rows_int8"] > 0
    assert len(m["pruned_fields"]) == 2 and m["memory_ratio"] < m["prune_memory_ratio"] < 1
    for part in (
        "base/metrics.json",
        "prune/prune_log.csv",
        "prune/auc_vs_memory.png",
        "quantize/metrics.json",
        "export/model.pt",
        "export/embedding_collection.pt",
        "export/export.json",
        "stages.json",
        "export/serving_model.pt",
        "export/serving.json",
        "export/serve.py",
        "export/README.md",
    ):
        assert (straight / part).exists(), part
    # The serving export of the pruned model (synthetic data: tensors in, no raw-line layout);
    # its scripted model's dev logits are the trained model's.
    serving = json.loads((straight / "export" / "serving.json").read_text())
    assert serving["fields"] == m["kept_fields"] and serving["parsing"] is None
    assert serving["max_abs_logit_diff_dev"] < 1e-5
    # The pruned, quantized model exports to the inference module with the same logits and bytes.
    quantized = json.loads((straight / "quantize" / "metrics.json").read_text())
    diff, ebc = compare_export(straight / "quantize" / "checkpoints", quantized)
    assert diff < 1e-5 and ebc.feature_names == m["kept_fields"]
    report = (straight / "report.md").read_text()
    for part in (
        "| base (fp32) |",
        "| F-Q + F-P |",
        "Field importance",
        "## Inference export",
        "report_auc_vs_memory.png",
        "The stop test: a step is kept when the one-sided upper bound",
        "| selection drop (SE) | drop upper bound |",
        "Confirmation split (500 rows, read by no decision), the final (pruned, quantized) model",
        # dim 8: all-int8 rows take 0.5 of fp32, so the 0.3 target is missed, and the report says so
        "## Targets",
        "target 0.3: **missed** by",
        "clipped up to 0.500",
        "so the pipeline misses --target-memory 0.3",
    ):
        assert part in report, part
    assert (straight / "report_auc_vs_memory.png").stat().st_size > 0
    again = run_shark("report", str(straight))
    assert "report.md" in again.stdout
    missing = run_shark("report", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 2 and f"{tmp_path / 'nowhere'} not found" in missing.stderr
    other = run_shark("report", str(straight / "base"), check=False)  # a run directory, not a compression run's
    assert other.returncode == 2 and "not a `shark compress` run directory" in other.stderr
    e = m["export"]
    assert (
        e["max_abs_logit_diff_dev"] < 1e-5 and e["inference_bytes"] == ebc.memory_bytes()
    )  # as compare_export checks them
    assert e["inference_bytes"] < e["fp32_bytes"] < e["base_fp32_bytes"]

    # The base stage has 47 steps, so step 60 falls in the quantize stage (2 epochs, 94 steps).
    killed = run_shark("compress", *ARGS, "--out", str(broken), "--fail-at-step", "60", check=False)
    assert killed.returncode == 17
    stages = json.loads((broken / "stages.json").read_text())
    assert set(stages) == {"base", "prune"}
    base_ckpt = stages["base"]["checkpoint"]
    refused = run_shark("compress", *ARGS, "--out", str(broken), check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    run_shark("compress", *ARGS, "--out", str(broken), "--resume")
    after = json.loads((broken / "stages.json").read_text())
    assert after["base"] == stages["base"] and after["prune"] == stages["prune"]  # not redone
    assert after["base"]["checkpoint"] == base_ckpt
    a = load_full_state(straight / "quantize" / "checkpoints")["model"]
    b = load_full_state(broken / "quantize" / "checkpoints")["model"]
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


def test_bad_compress_config_is_refused_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = run_shark("compress", *TINY, "--quant-budget", "0.2", "--out", str(out), check=False)
    assert proc.returncode == 2 and "compress.quant_budget" in proc.stderr
    proc = run_shark(
        "compress", *TINY, "--t8", "5", "--t16", "1", "--precision", "shark", "--out", str(out), check=False
    )
    assert proc.returncode == 2 and "t8" in proc.stderr
    proc = run_shark("compress", *TINY, "--serve-tiers", "int4", "--out", str(out), check=False)  # one tier: no ranking
    assert proc.returncode == 2 and "--serve-tiers" in proc.stderr
    assert not out.exists()


def test_compress_reports_torchrec_post_training_and_falls_back_to_it(tmp_path):
    """With a quantization budget that leaves our model larger than TorchRec's int8 and int4 of
    the base model (0.9 of fp32 at dim 8, where TorchRec pads both to 16 B rows: 0.5),
    `--fallback torchrec` tests int8 first, then int4 (on the selection split) and ours; int8
    passes, and of the accepted models with the fewest bytes int8 is served (on equal bytes, int8
    before int4), and the report says so; the saved model loads
    in a fresh process and scores a batch as TorchRec's own quantization of the base model does.
    TorchRec's drop in the choice is the paired drop on the selection split (dev's even lines);
    ours is tested on the choice split."""
    import subprocess
    import sys

    out = tmp_path / "fb"
    # On 2 processes: the comparison runs on rank 0 alone while rank 1 waits (it once hung there).
    args = [
        *ARGS,
        "--max-iterations",
        "1",
        "--quant-budget",
        "0.9",
        "--quant-epochs",
        "1",
        "--fallback",
        "torchrec",
        "--nproc",
        "2",
    ]
    run_shark("compress", *args, "--out", str(out), "--metrics-out", str(out / "m.json"))
    easy = json.loads((out / "export" / "export.json").read_text())["easy_path"]
    assert easy["torchrec-int4"]["memory"] == 0.5 and easy["torchrec-int8"]["memory"] == 0.5
    assert easy["final"]["memory"] > 0.5 and easy["recommended"] == easy["exported_model"] == "torchrec-int8"
    assert easy["torchrec-int8"]["choice"]["test_index"] == 1
    assert {easy["torchrec-int4"]["choice"]["test_index"], easy["final"]["choice"]["test_index"]} == {2, 3}
    assert easy["final"]["choice"]["split"] == "choice" and easy["torchrec-int8"]["choice"]["split"] == "dev"
    assert easy["rows"] == 500 and easy["exported"].endswith("torchrec_int8_model.pt")
    targets = json.loads((out / "m.json").read_text())["targets"]
    assert targets["served"] == "torchrec-int8" and targets["memory_ratio"] == 0.5 and targets["choice_test_passed"]
    assert "torchrec_int8_model.pt" in (out / "export" / "README.md").read_text()
    # serve.py, which scores ours, warns with it (it said nothing of the choice).
    manifest = json.loads((out / "export" / "serving.json").read_text())
    assert manifest["served_instead"] == "torchrec_int8_model.pt"
    # And why: the fewest bytes among the accepted are served, so ours may have passed too.
    assert manifest["served_instead_why"] == (
        "smaller, and within the bound as this model is"
        if easy["final"]["choice"].get("accepted")
        else "this model did not pass its test"
    )
    report = (out / "report.md").read_text()
    assert (
        "## Against TorchRec's post-training quantization" in report
        and "**Served: TorchRec int8 of the base**" in report
    )
    assert "failed the stop test" not in report
    script = (
        "import sys, torch, json\n"
        "from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC\n"
        "from shark_torchrec.config import DataConfig\n"
        "from shark_torchrec.data import open_dataset\n"
        "m = torch.load(sys.argv[1], weights_only=False)\n"
        "assert isinstance(m.model.sparse_arch.embedding_bag_collection, QuantEBC)\n"
        "d = open_dataset(DataConfig(synthetic_train_rows=6000, synthetic_eval_rows=2000, synthetic_scale=0.02))\n"
        "b = next(iter(d.batches('test', 256)))\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(m(b)[1][1].tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, easy["exported"]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    from shark_torchrec.config import DataConfig
    from shark_torchrec.data import open_dataset
    from shark_torchrec.jobs.easy_path import torchrec_quantized
    from shark_torchrec.jobs.export import load_trained_model

    base, _ = load_trained_model(json.loads((out / "stages.json").read_text())["base"]["checkpoint"])
    want_model = torchrec_quantized(base, torch.qint8)
    b = next(
        iter(
            open_dataset(DataConfig(synthetic_train_rows=6000, synthetic_eval_rows=2000, synthetic_scale=0.02)).batches(
                "test", 256
            )
        )
    )
    with torch.no_grad():
        want = want_model(b)[1][1]
    assert torch.allclose(got, want, atol=1e-6)
    # TorchRec's test read the selection split: its drop is the paired drop there, recomputed.
    from shark_torchrec.config import parse_cli
    from shark_torchrec.distributed.env import DistEnv
    from shark_torchrec.importance.significance import paired_auc
    from shark_torchrec.jobs.evaluation import predict

    cfg = parse_cli(args, prog="test")
    view = open_dataset(cfg.dataset, cfg.train.seed).decision_splits()
    env = DistEnv(0, 1, torch.device("cpu"), "none")
    with torch.no_grad():
        mine, y = predict(want_model, view, "dev", 1024, env)
        theirs, _ = predict(base, view, "dev", 1024, env)
    drop = -paired_auc(mine.numpy(), theirs.numpy(), y.numpy()).difference
    assert abs(easy["torchrec-int8"]["choice"]["drop"] - drop) < 1e-12 and easy["choice_rows"]["dev"] == y.numel()


def test_compress_serves_in_other_tiers_at_the_budget_the_target_leaves(tmp_path):
    """--serve-tiers: the quantize stage trains in the paper's tiers, the export regroups the
    rows into the serving tiers at --target-memory over what pruning left (clipped to their
    floor), and the served model is what the choice and the targets read."""
    from shark_torchrec.jobs.export import served_min_budget

    out = tmp_path / "serve"
    args = [*ARGS, "--max-iterations", "1", "--quant-epochs", "1", "--serve-tiers", "int8,int4"]
    run_shark("compress", *args, "--out", str(out), "--metrics-out", str(out / "m.json"))
    m = json.loads((out / "m.json").read_text())
    stages = json.loads((out / "stages.json").read_text())
    e = stages["export"]
    # The served floor (int4 rows and the ranked map: 0.258 at dim 8) is below the target here.
    want = max(0.3 / stages["prune"]["memory_ratio"], served_min_budget(8, ["int8", "int4"]))
    assert served_min_budget(8, ["int8", "int4"]) == (8 + 0.25) / 32
    assert served_min_budget(8, ["int4", "int8"]) == (8 + 0.25) / 32  # the cheapest tier, in any order given
    assert e["serving_tiers"] == ["int8", "int4"] and abs(e["serving_budget"] - min(1.0, want)) < 1e-12
    assert (
        e["rows_int4"] > 0
        and e["rows_int4"] + e.get("rows_int8", 0) == m["rows_int8"] + m["rows_fp16"] + m["rows_fp32"]
    )
    assert e["max_abs_logit_diff_dev"] < 1e-5  # the inference module serves the regrouped rows
    assert (
        m["memory_ratio"]
        == e["inference_bytes"] / m["base_embedding_bytes"]
        < m["embedding_bytes"] / m["base_embedding_bytes"]
    )
    easy = e["easy_path"]
    assert easy["final"]["bytes"] == e["inference_bytes"] and easy["exported_model"] == "final"
    # The choice and the figures read the regrouped model as exported, not the trained one.
    from shark_torchrec.config import parse_cli
    from shark_torchrec.data import CONFIRM, open_dataset
    from shark_torchrec.distributed.env import DistEnv
    from shark_torchrec.importance.significance import paired_auc
    from shark_torchrec.jobs.evaluation import predict

    cfg = parse_cli(args, prog="test")
    view = open_dataset(cfg.dataset, cfg.train.seed).decision_splits().with_fields(m["kept_fields"])
    served = torch.load(out / "export" / "model.pt", weights_only=False)
    with torch.no_grad():
        logits, y = predict(served, view, CONFIRM, 1024, DistEnv(0, 1, torch.device("cpu"), "none"))
    assert abs(paired_auc(logits.numpy(), logits.numpy(), y.numpy()).auc_a - easy["final"]["auc"]) < 1e-12
    assert m["targets"]["memory_ratio"] == easy["final"]["memory"] and "test" in easy["final"]
    report = (out / "report.md").read_text()
    assert "Served in int8, int4 at" in report and "the pruned, quantized model as trained (served regrouped" in report


def test_compress_serves_one_bit_rows(tmp_path):
    """--serve-tiers int4,int2,int1: the export serves the rows the target cannot keep in int2
    as 1-bit rows (the served-only tier), within the budget, and the figures read that model;
    int1 beside dropped is refused before any work."""
    out = tmp_path / "int1"
    args = [a if a != "0.3" else "0.18" for a in ARGS]  # --target-memory: below the int2 floor (0.201 at dim 8)
    args += ["--max-iterations", "1", "--quant-epochs", "1", "--serve-tiers", "int4,int2,int1"]
    run_shark("compress", *args, "--out", str(out), "--metrics-out", str(out / "m.json"))
    e = json.loads((out / "stages.json").read_text())["export"]
    m = json.loads((out / "m.json").read_text())
    assert e["serving_tiers"] == ["int4", "int2", "int1"] and e["rows_int1"] > 0 and e["rows_int2"] > 0
    assert e["inference_bytes"] <= e["serving_budget"] * e["fp32_bytes"] and e["max_abs_logit_diff_dev"] < 1e-5
    assert m["memory_ratio"] == e["inference_bytes"] / m["base_embedding_bytes"]
    assert f"{e['rows_int2']:,} int2, {e['rows_int1']:,} int1" in (out / "report.md").read_text()
    # A target below every row in 1 bit: clipped to the exact floor, which the export meets.
    low = tmp_path / "low"
    args = [a if a != "0.18" else "0.05" for a in args]
    run_shark("compress", *args, "--out", str(low), "--metrics-out", str(low / "m.json"))
    e = json.loads((low / "stages.json").read_text())["export"]
    assert "clipped up to" in e["serving_budget_reason"] and e["rows_int1"] > 0
    assert e["inference_bytes"] <= e["serving_budget"] * e["fp32_bytes"]
    bad = run_shark("compress", *ARGS, "--serve-tiers", "int2,int1,dropped", "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "int1 and dropped exclude each other" in bad.stderr


def test_the_report_says_plainly_when_torchrec_int4_would_be_served():
    """Without --fallback torchrec, a TorchRec model smaller than ours that passes the same
    test is named, with the flag that serves it; when ours is the smaller, nothing is said."""
    from shark_torchrec.report import _easy_path_lines

    def model(nbytes, **extra):
        return {
            "auc": 0.8,
            "bytes": nbytes,
            "memory": nbytes / 1000,
            "drop": 0.0,
            "drop_standard_error": 0.001,
            "choice": {"drop": 0.0, "standard_error": 0.001, "test_index": None},
            **extra,
        }

    e = {
        "rows": 100,
        "choice_rows": {"dev": 100, "choice": 50},
        "base": model(1000),
        "final": model(400),
        "torchrec-int4": model(250, minus_final=0.0, minus_final_standard_error=0.001),
        "torchrec-int8": model(500, minus_final=0.0, minus_final_standard_error=0.001),
        "recommended": "final",
        "exported_model": "final",
        "exported": None,
        "exported_within_bound": True,
        "fallback_would_serve": "torchrec-int4",
    }
    e["final"]["choice"].update(test_index=1, upper_bound=0.001, accepted=True)
    text = "\n".join(_easy_path_lines(e))
    assert (
        "**TorchRec int4 of the base is smaller than ours and passes the same test" in text
        and "--fallback torchrec" in text
    )
    assert "Served: ours (it passed" in text and "failed the stop test" not in text
    e["final"]["bytes"] = 200
    text = "\n".join(_easy_path_lines(e))
    assert (
        "is smaller than ours" not in text and "Served: ours (it passed" in text and "failed the stop test" not in text
    )
    e["final"]["choice"]["accepted"], e["exported_within_bound"], e["recommended"] = False, False, None
    text = "\n".join(_easy_path_lines(e))
    assert "**Ours failed the stop test" in text and "Served: ours" not in text
    assert "here it would serve TorchRec int4" in text
    e["final"]["bytes"] = 400  # int4 is smaller, but the advice above already names it: said once
    assert "is smaller than ours" not in "\n".join(_easy_path_lines(e))
    e["fallback_would_serve"] = None
    assert "here TorchRec's int8, tested first, fails too" in "\n".join(_easy_path_lines(e))
    # With --fallback torchrec, int8 failed first: ours was not tested, and the report says so.
    del e["final"]["choice"]["accepted"]
    e["final"]["choice"]["test_index"] = None
    e["torchrec-int8"]["choice"].update(test_index=1, upper_bound=0.01, accepted=False)
    text = "\n".join(_easy_path_lines(e))
    assert "tested first, failed its stop test, so nothing else was tested" in text and "Ours failed" not in text


def test_the_prune_plot_joins_only_accepted_models(tmp_path):
    """auc_vs_memory.png: a rejected candidate (the loop kept the previous model) is a lone
    marker, not a step of the path; the path joins the base and the accepted models only."""
    import matplotlib.pyplot as plt

    from shark_torchrec.report import plot_prune_log, prune_log_figure

    def row(mem, dev, test, removed, accepted):
        return {"memory_ratio": mem, "dev_auc": dev, "test_auc": test, "removed": removed, "accepted": accepted}

    rows = [
        row(1.0, 0.80, 0.79, [], True),
        row(0.7, 0.23, 0.22, ["c1"], False),
        row(0.8, 0.83, 0.82, ["c2"], True),
        row(0.5, 0.30, 0.31, ["c3"], False),
    ]
    fig = prune_log_figure(rows)
    try:
        lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
        joined = [ln for ln in lines.values() if ln.get_linestyle() not in ("None", "none", "")]
        assert len(joined) == 2
        for ln in joined:
            assert list(ln.get_xdata()) == [1.0, 0.8], ln.get_label()
        assert list(lines["dev AUC (accepted)"].get_ydata()) == [0.80, 0.83]
        assert list(lines["test AUC (accepted)"].get_ydata()) == [0.79, 0.82]
        lone = lines["dev AUC (rejected)"]
        assert lone.get_linestyle() in ("None", "none", "") and lone.get_marker() not in ("o", "s")
        assert list(lone.get_xdata()) == [0.7, 0.5] and list(lone.get_ydata()) == [0.23, 0.30]
        assert list(lines["test AUC (rejected)"].get_ydata()) == [0.22, 0.31]
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert "dev AUC (rejected)" in legend
    finally:
        plt.close(fig)
    # No rejection: no rejected markers; the PNG is written.
    fig = prune_log_figure([rows[0], rows[2]])
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["dev AUC (accepted)", "test AUC (accepted)"]
    plt.close(fig)
    plot_prune_log(rows, tmp_path / "auc_vs_memory.png")
    assert (tmp_path / "auc_vs_memory.png").stat().st_size > 0


def test_resume_keeps_the_settings_the_run_started_with(tmp_path, capsys):
    """`--resume --out DIR` reads DIR's config.toml as its defaults (the base model's
    `--checkpoint` and the data too: no flag needs repeating), and a flag that would change a
    setting is refused by name before anything is written."""
    from shark_torchrec.cli import resumed_run_defaults
    from shark_torchrec.config import load_config, parse_cli, save_config
    from shark_torchrec.jobs.compress import resume_differences, with_absolute_paths

    out = tmp_path / "run"
    started = parse_cli(
        [
            *TINY,
            "--checkpoint",
            str(tmp_path / "base"),
            "--target-memory",
            "0.08",
            "--fail-at-step",
            "5",
            "--out",
            str(out),
        ],
        prog="shark compress",
        command="compress",
    )
    save_config(started, out / "config.toml")
    (out / "stages.json").write_text(json.dumps({"base": {}, "prune": {}}))
    argv = ["--out", str(out), "--resume"]
    base = resumed_run_defaults(argv)
    assert "fail_at_step" not in base["run"] and "resume" not in base["run"]
    again = parse_cli(argv, prog="shark compress", base=base, command="compress")  # --checkpoint kept beside --resume
    assert again.run.resume and again.run.checkpoint == started.run.checkpoint and again.run.fail_at_step == 0
    assert resume_differences(started, again) == []
    with pytest.raises(SystemExit):  # commands that do not resume: --checkpoint starts a new run
        parse_cli(["--resume", "--out", "runs/x", "--checkpoint", "x"], prog="shark prune", command="prune")
    assert "run.resume (--resume) continues this run's own checkpoints" in capsys.readouterr().err
    changed = parse_cli([*argv, "--target-memory", "0.05"], prog="shark compress", base=base, command="compress")
    assert resume_differences(started, changed) == ["prune.target_memory (--target-memory): 0.08 there, 0.05 here"]
    before = (out / "config.toml").read_text()
    refused = run_shark("compress", *argv, "--target-memory", "0.05", "--serve-tiers", "int4", "int1", check=False)
    assert refused.returncode == 2
    assert "prune.target_memory (--target-memory): 0.08 there, 0.05 here" in refused.stderr
    assert "compress.serve_tiers (--serve-tiers): [] there, ['int4', 'int1'] here" in refused.stderr
    assert (out / "config.toml").read_text() == before and load_config(out / "config.toml").run.fail_at_step == 5
    # A run's config.toml keeps its paths absolute, so a resume started elsewhere reads the same
    # files; a path spelt another way but naming the same file is no change.
    rel = parse_cli(
        ["--data", "csv:some/dir", "--checkpoint", "ck", "--label", "y"], prog="shark compress", command="compress"
    )
    absolute = with_absolute_paths(rel)
    assert absolute.dataset.data == "csv:" + os.path.abspath("some/dir") and absolute.run.checkpoint == os.path.abspath(
        "ck"
    )
    assert resume_differences(absolute, rel) == []
    assert with_absolute_paths(started).dataset.data == "synthetic"


def test_a_resumed_base_stage_takes_the_given_model_as_it_is(tmp_path, monkeypatch):
    """`--checkpoint C --resume` after the base stage saved C's model in base/checkpoints but
    before it was recorded: the stage continues from there with C's kept fields and no epochs
    (it used to train the given model for --epochs more)."""
    import dataclasses

    import shark_torchrec.jobs.compress as compress
    from shark_torchrec.config import parse_cli

    cfg = parse_cli(
        [*TINY, "--checkpoint", str(tmp_path / "given"), "--resume", "--epochs", "3", "--out", str(tmp_path / "run")],
        prog="shark compress",
        command="compress",
    )
    monkeypatch.setattr(compress, "list_checkpoints", lambda path: [path / "step_00000010"])

    def adopt(c):  # what `adopt_checkpoint_model` reads from a pruned given checkpoint
        assert c.run.checkpoint == cfg.run.checkpoint
        return dataclasses.replace(
            c,
            model=dataclasses.replace(c.model, kept_fields=("c1", "c2")),
            train=dataclasses.replace(c.train, epochs=0),
        )

    seen = []

    class Stop(Exception):
        pass

    def base_model(b, env):
        seen.append(b)
        raise Stop

    monkeypatch.setattr(compress, "adopt_checkpoint_model", adopt)
    monkeypatch.setattr(compress, "base_model", base_model)
    with pytest.raises(Stop):
        compress.run_base(cfg, tmp_path / "run", None)
    b = seen[0]
    assert b.run.resume and not b.run.checkpoint and b.train.epochs == 0 and b.model.kept_fields == ("c1", "c2")


def test_the_report_of_a_run_with_a_file_that_is_not_json_names_the_file(tmp_path, capsys):
    """`shark report` on a run directory one of whose JSON files is corrupt (truncated, hand-edited,
    binary) is one line naming the file, exit status 2; it was json's traceback."""
    from shark_torchrec.cli import main

    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    (run / "stages.json").write_text(json.dumps({"base": {"embedding_bytes": 100}}))
    for name, content in (
        ("base/metrics.json", b'{"test_auc": 0.7,'),
        ("base/metrics.json", b"\xff\xfe\x00binary"),
        ("stages.json", b"not json"),
    ):
        (run / name).write_bytes(content)
        assert main(["report", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"shark report: error: {run / name} cannot be read as JSON (")
        assert len(err.strip().splitlines()) == 1
    # JSON, but not a record the report can read (an AttributeError, a TypeError of a None
    # formatted, or the bare key before): named, one line.
    (run / "stages.json").write_text(json.dumps({"base": {"embedding_bytes": 100}}))
    (run / "quantize").mkdir()
    results = json.dumps({"test_auc": 0.7, "test_logloss": 0.5})
    for base, quant, says in (
        ("[1]", None, "base/metrics.json is not a record of this run"),
        (None, None, "base/metrics.json is missing"),
        ('{"dev_auc": 0.7}', None, "base/metrics.json lacks test_auc, test_logloss"),
        (results, '{"dev_auc": 0.7}', "quantize/metrics.json lacks test_auc, test_logloss, embedding_bytes"),
    ):
        for name, content in (("base/metrics.json", base), ("quantize/metrics.json", quant)):
            (run / name).unlink(missing_ok=True)
            if content is not None:
                (run / name).write_text(content)
        assert main(["report", str(run)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "report.md").exists()
    # The run's other records (found by a review: the export record and the run's metrics as
    # [1] were an AttributeError's traceback), each part the report reads.
    (run / "quantize" / "metrics.json").unlink()
    (run / "base" / "metrics.json").write_text(results)
    for stages, says in (
        (
            {"prune": {"pruned_fields": [], "stop_reason": "x", "kept_fields": [], "selection_resolution": {"x": 1}}},
            "the prune stage's selection_resolution lacks confidence, max_auc_drop",
        ),
        (
            {"quantize": {"budget": 0.3, "test_auc": 0.7, "confirmation": {"rows": 5}}},
            "the quantize stage's confirmation lacks auc, base_auc",
        ),
    ):
        (run / "stages.json").write_text(json.dumps({"base": {"embedding_bytes": 100}, **stages}))
        assert main(["report", str(run)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    (run / "stages.json").write_text(json.dumps({"base": {"embedding_bytes": 100}}))
    (run / "prune" / "importance").mkdir(parents=True)
    (run / "export").mkdir()
    entry = {"iteration": 1, "removed": ["c1"], "memory_ratio": 0.5, "dev_auc": 0.7, "test_auc": 0.7}
    for name, content, says in (
        ("export/export.json", "[1]", "export/export.json: the export record is not a JSON object"),
        ("export/export.json", '{"fp32_bytes": 1}', "export/export.json: the export record lacks torchrec_int8_bytes"),
        ("metrics.json", "[1]", "metrics.json: the run's metrics is not a JSON object"),
        (
            "metrics.json",
            '{"targets": {"memory_ratio": 0.3}}',
            "metrics.json: its targets lacks target_memory, memory_met",
        ),
        ("prune/prune_log.json", '{"iteration": 1}', "prune/prune_log.json is not a record of this run (a JSON list"),
        ("prune/prune_log.json", json.dumps([entry]), "prune/prune_log.json: entry 0 lacks test_logloss, accepted"),
        ("prune/importance/importance.json", "{}", "importance.json: the importance record lacks ranking"),
        ("prune/importance/importance.json", '{"ranking": [{"field": "c1"}]}', "ranking entry 0 lacks score"),
    ):
        (run / name).write_text(content)
        assert main(["report", str(run)]) == 2, name
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        (run / name).unlink()
    assert main(["report", str(run)]) == 0
    capsys.readouterr()


def test_a_fault_of_the_report_itself_is_a_traceback(tmp_path, monkeypatch):
    """A KeyError the report raises on records it has checked is a fault of ours: a traceback,
    not "a record of the run lacks ..." with exit status 2 as before."""
    from shark_torchrec import report
    from shark_torchrec.cli import main

    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    (run / "stages.json").write_text(json.dumps({"base": {"embedding_bytes": 100}}))
    (run / "base" / "metrics.json").write_text(json.dumps({"test_auc": 0.7, "test_logloss": 0.5}))

    def broken(info, path):
        raise KeyError("auc")

    monkeypatch.setattr(report, "plot", broken)
    with pytest.raises(KeyError):
        main(["report", str(run)])


def test_a_run_started_with_init_from_prunes_from_its_base_checkpoint(tmp_path):
    """`shark compress --init-from CKPT` trains its base from CKPT; the prune stage then starts
    from the base's own checkpoint. It kept --init-from beside it and failed there, after the
    base had trained ("run.checkpoint and run.init_from exclude each other")."""
    from shark_torchrec.config import parse_cli
    from shark_torchrec.jobs.compress import prune_stage_config

    cfg = parse_cli(["--init-from", str(tmp_path / "given"), "--out", str(tmp_path / "run")], command="compress")
    p = prune_stage_config(cfg, tmp_path / "run", {"checkpoint": str(tmp_path / "run" / "base" / "checkpoints")})
    assert p.run.checkpoint.endswith("base/checkpoints") and not p.run.init_from
    p.run.validate("prune")


def test_a_run_whose_base_stage_fails_first_leaves_nothing_that_blocks_a_retry(tmp_path, capsys):
    """A new compression run refused in its base stage (here a mixed-precision checkpoint
    given as --checkpoint, which must be --init-from) kept its config.toml and base/: the
    mended command was refused as "another run", and --resume repeated the first one's
    settings and error (a newcomer's walkthrough). Now nothing of it stays."""
    from pathlib import Path

    from shark_torchrec.cli import main

    given = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v0_shark"
    run = tmp_path / "run"
    assert main(["compress", "--checkpoint", str(given), "--out", str(run), "--no-progress"]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize("failure", ["ctrl-c", "fault", "user"])
def test_a_base_stage_stopped_by_ctrl_c_or_a_fault_keeps_the_run(failure, tmp_path, monkeypatch):
    """Only a user's error in a new run's first stage clears the run away (for the mended
    command to run again). Ctrl-C (the message suggests --resume, which reads the run's
    config.toml) and faults of ours keep it: a review found Ctrl-C deleted the run."""
    from shark_torchrec.config import ConfigError, parse_cli
    from shark_torchrec.jobs import compress

    raised = {"ctrl-c": KeyboardInterrupt(), "fault": RuntimeError("a fault of ours"), "user": ConfigError("bad")}[
        failure
    ]

    def run_base(cfg, out, env):
        (out / "base").mkdir()
        raise raised

    monkeypatch.setattr(compress, "run_base", run_base)
    cfg = parse_cli(["--out", str(tmp_path / "run")], prog="shark compress", command="compress")
    with pytest.raises(type(raised)):
        compress.compress_job(cfg)
    kept = (tmp_path / "run" / "config.toml").is_file() and (tmp_path / "run" / "base").is_dir()
    assert kept == (failure != "user")
