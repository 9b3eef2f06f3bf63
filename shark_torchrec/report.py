"""`shark report RUN_DIR`: a markdown report of a `shark compress` run, with plots.

It reads the run directory's layout (see `shark_torchrec.jobs.compress`) and, when present,
`RUN_DIR/baselines/<name>/metrics.json` written by `bench/compress_quality.py` (fp16-all,
int8-all, freq, F-Q alone, Permutation pruning), and writes `RUN_DIR/report.md` and
`RUN_DIR/report_auc_vs_memory.png`. Memory is always embedding bytes over the base model's
fp32 embedding bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from shark_torchrec.precision.priority import SERVED_GROUP_NAMES, SERVED_PRECISION_ORDER

SERVED_NAMES = {
    "final": "ours (F-P + F-Q)",
    "torchrec-int8": "TorchRec int8 of the base",
    "torchrec-int4": "TorchRec int4 of the base",
}


class RecordError(ValueError):
    """A record of the run directory that cannot be read (the user's to mend: `shark report`
    prints it as one line)."""


def _load(path: Path) -> Optional[Any]:
    """A JSON file of the run directory, None when absent.

    Raises:
        RecordError: the file is not JSON (a truncated or hand-edited record), naming it.
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # json's JSONDecodeError, or UnicodeDecodeError
        raise RecordError(f"{path} cannot be read as JSON ({e})") from e


_RESULT_KEYS = ("test_auc", "test_logloss")


def _record(path: Path, keys: Sequence[str]) -> Optional[Dict[str, Any]]:
    """A JSON object of the run directory holding `keys` (numbers), None when the file is absent.

    Raises:
        RecordError: the file is not JSON, not an object, or lacks one of `keys` (a record
            written part way, hand-edited, or of another command), naming it.
    """
    record = _load(path)
    if record is None:
        return None
    if not isinstance(record, dict):
        raise RecordError(f"{path} is not a record of this run (a JSON object is expected)")
    missing = [k for k in keys if not isinstance(record.get(k), (int, float))]
    if missing:
        raise RecordError(f"{path} lacks {', '.join(missing)} (a record written part way, or of another run?)")
    return record


def _need(record: Any, path: Path, what: str, keys: Sequence[str]) -> None:
    """Refuse a part of a run's record that is no object or lacks keys the report reads.

    Args:
        record: the part (a stage, a log entry, the targets, ...).
        path: the file it was read from, for the message.
        what: which part of the file it is, for the message.
        keys: the keys the report reads from it.

    Raises:
        RecordError: naming the file, the part and the keys it lacks.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{path}: {what} is not a JSON object")
    missing = [k for k in keys if k not in record]
    if missing:
        raise RecordError(f"{path}: {what} lacks {', '.join(missing)} (a record written part way, or of another run?)")


def _list_of_objects(path: Path, what: str, keys: Sequence[str]) -> Optional[List[Dict[str, Any]]]:
    """A JSON file of the run holding a list of objects with `keys`, None when absent.

    Raises:
        RecordError: not JSON, not a list, or an entry that is no object or lacks keys.
    """
    entries = _load(path)
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise RecordError(f"{path} is not a record of this run (a JSON list is expected)")
    for i, entry in enumerate(entries):
        _need(entry, path, f"{what} {i}", keys)
    return entries


def _checked_records(run: Path, stages: Dict[str, Any]) -> Dict[str, Any]:
    """The run's records beside the stage results, each checked for the keys the report reads:
    the pruning log, the field importance, the export record and the targets of the run's
    metrics (None where absent).

    Raises:
        RecordError: a file that is not the JSON it should be, or a part lacking keys, named.
    """
    if "prune" in stages:
        _need(stages["prune"], run / "stages.json", "the prune stage", ("pruned_fields", "stop_reason", "kept_fields"))
        if stages["prune"].get("selection_resolution"):
            _need(
                stages["prune"]["selection_resolution"],
                run / "stages.json",
                "the prune stage's selection_resolution",
                ("confidence", "max_auc_drop"),
            )
    for stage in ("prune", "quantize"):
        if isinstance(stages.get(stage), dict) and stages[stage].get("confirmation"):
            _need(
                stages[stage]["confirmation"],
                run / "stages.json",
                f"the {stage} stage's confirmation",
                ("rows", "auc", "base_auc", "drop", "standard_error", "upper_bound_95"),
            )
    if "quantize" in stages:
        _need(stages["quantize"], run / "stages.json", "the quantize stage", ("budget", "test_auc"))
    log_keys = ("iteration", "removed", "memory_ratio", "dev_auc", "test_auc", "test_logloss", "accepted")
    prune_log = _list_of_objects(run / "prune" / "prune_log.json", "entry", log_keys)
    importance_path = run / "prune" / "importance" / "importance.json"
    importance = _load(importance_path)
    if importance is not None:
        _need(importance, importance_path, "the importance record", ("ranking",))
        if not isinstance(importance["ranking"], list):
            raise RecordError(f"{importance_path}: its ranking is not a list")
        for i, r in enumerate(importance["ranking"]):
            _need(r, importance_path, f"ranking entry {i}", ("field", "score"))
    export_path = run / "export" / "export.json"
    export = _load(export_path)
    if export is not None:
        _need(
            export,
            export_path,
            "the export record",
            ("fp32_bytes", "torchrec_int8_bytes", "inference_bytes", "max_abs_logit_diff_dev"),
        )
    metrics_path = run / "metrics.json"
    metrics = _load(metrics_path)
    if metrics is not None:
        _need(metrics, metrics_path, "the run's metrics", ())
        targets = metrics.get("targets")
        if targets:
            keys = ["memory_ratio", "target_memory", "memory_met"]
            if isinstance(targets, dict) and "auc_drop" in targets:
                keys += ["auc_drop_upper_bound_95", "max_auc_drop", "auc_met"]
            _need(targets, metrics_path, "its targets", keys)
    return {"prune_log": prune_log, "importance": importance, "export": export, "metrics": metrics}


def collect(run: Path) -> Dict[str, Any]:
    """What the report shows, read from a `shark compress` run directory.

    Args:
        run: the run directory.

    Returns:
        {"stages", "points" (base, F-P, F-Q + F-P: name, test AUC and log loss, memory),
        "baselines" (the same, per RUN_DIR/baselines/<name>), "prune_log", "export",
        "importance", "metrics" (the run's own)}; absent files read as empty or None.

    Raises:
        FileNotFoundError: the directory is absent or has no stages.json with a base stage.
        RecordError: one of its JSON files is not JSON or not a record the report can read (an
            object without the results it shows), or the base stage's results are missing
            (`_record`).
    """
    if not run.exists():
        raise FileNotFoundError(f"{run} not found")
    stages = _load(run / "stages.json")
    if not isinstance(stages, dict) or "base" not in stages:
        raise FileNotFoundError(f"{run} is not a `shark compress` run directory (no stages.json with a base stage)")
    if not isinstance(stages["base"], dict) or not isinstance(stages["base"].get("embedding_bytes"), (int, float)):
        raise RecordError(f"{run / 'stages.json'}: its base stage lacks embedding_bytes")
    base = _record(run / "base" / "metrics.json", _RESULT_KEYS)
    if base is None:
        raise RecordError(f"{run / 'base' / 'metrics.json'} is missing: the base stage has no results to report")
    base_bytes = stages["base"]["embedding_bytes"]
    points: List[Dict[str, Any]] = [
        {"name": "base (fp32)", "auc": base.get("test_auc"), "logloss": base.get("test_logloss"), "memory": 1.0}
    ]
    records = _checked_records(run, stages)
    prune_log = records["prune_log"] or []
    if "prune" in stages:
        last = next((r for r in reversed(prune_log) if r["accepted"]), None)
        if last:
            points.append(
                {
                    "name": "F-P",
                    "auc": last["test_auc"],
                    "logloss": last["test_logloss"],
                    "memory": last["memory_ratio"],
                }
            )
    quant = _record(run / "quantize" / "metrics.json", (*_RESULT_KEYS, "embedding_bytes"))
    if quant:
        points.append(
            {
                "name": "F-Q + F-P",
                "auc": quant["test_auc"],
                "logloss": quant["test_logloss"],
                "memory": quant["embedding_bytes"] / base_bytes,
            }
        )
    baselines = []
    for path in sorted((run / "baselines").glob("*/metrics.json")):
        m = _record(path, (*_RESULT_KEYS, "embedding_bytes"))
        baselines.append(
            {
                "name": path.parent.name,
                "auc": m["test_auc"],
                "logloss": m["test_logloss"],
                "memory": m["embedding_bytes"] / base_bytes,
            }
        )
    return {
        "stages": stages,
        "points": points,
        "baselines": baselines,
        "prune_log": prune_log,
        "export": records["export"],
        "importance": records["importance"],
        "metrics": records["metrics"],
    }


def plot(info: Dict[str, Any], path: Path) -> None:
    """Test AUC against memory (log scale): the pruning loop's accepted iterations, the
    pipeline's models and the baselines.

    Args:
        info: what `collect` returned.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    log = info["prune_log"]
    if log:
        ok = [r for r in log if r["accepted"]]
        ax.plot(
            [r["memory_ratio"] for r in ok], [r["test_auc"] for r in ok], "o-", color="tab:blue", label="F-P iterations"
        )
    for p in info["points"]:
        ax.scatter([p["memory"]], [p["auc"]], s=90, zorder=3, label=p["name"])
    for b in info["baselines"]:
        ax.scatter([b["memory"]], [b["auc"]], marker="x", s=70, zorder=3, label=b["name"])
    ax.set_xscale("log")
    ax.set_xlabel("embedding memory / base fp32 (log)")
    ax.set_ylabel("test AUC")
    # Plain tick labels: AUCs close together otherwise come out as "+7.5e-1" offsets.
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda x, _: ""))
    ax.set_title("AUC against memory: F-P, F-Q and both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _served_auc_text(e: dict) -> str:
    """The export's dev AUC, and with serving tiers the trained model's beside it (what the
    tiers cost); empty for records written before the export measured them."""
    if "dev_auc" not in e:
        return ""
    text = f" Dev AUC of the served model: {e['dev_auc']:.4f}"
    if "dev_auc_trained" in e:
        text += (
            f"; of the model as trained, before its rows were put in these tiers: {e['dev_auc_trained']:.4f}"
            f" (largest |logit| difference {e['max_abs_logit_diff_dev_to_trained']:.2e})"
        )
    return text + "."


def write_report(run: str | Path) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/report_auc_vs_memory.png for a `shark compress` run.

    Args:
        run: the run directory.

    Returns:
        The report's path.

    Raises:
        FileNotFoundError: not a `shark compress` run directory (`collect`).
        RecordError: one of its JSON files cannot be read as a record of the run (`collect`).
    """
    run = Path(run)
    info = collect(run)
    plot(info, run / "report_auc_vs_memory.png")
    lines = [f"# SHARK compression report: `{run}`", ""]
    lines += ["| model | test AUC | test log loss | memory (of base fp32) |", "|---|---|---|---|"]
    for p in info["points"] + info["baselines"]:
        lines.append(f"| {p['name']} | {p['auc']:.4f} | {p['logloss']:.4f} | {100 * p['memory']:.1f}% |")
    easy = (info["export"] or {}).get("easy_path") or {}
    if "exported_model" in easy and "test" in easy["final"]:
        served = easy[easy["exported_model"]]
        lines.append(
            f"| **served: {SERVED_NAMES[easy['exported_model']]}**, as exported | {served['test']['auc']:.4f} | | "
            f"{100 * served['memory']:.1f}% |"
        )
    lines += ["", "![AUC against memory](report_auc_vs_memory.png)", ""]
    t = (info["metrics"] or {}).get("targets")
    if t:
        who = "" if t.get("served", "final") == "final" else f"The served model is {SERVED_NAMES[t['served']]}. "
        got = who + f"Memory: {t['memory_ratio']:.3f} of the base model's bytes, target {t['target_memory']}: "
        got += "met." if t["memory_met"] else f"**missed** by {t['memory_ratio'] - t['target_memory']:.3f}."
        if "auc_drop" in t:
            got += (
                f" AUC drop on the confirmation split: {t['auc_drop']:+.4f} (95% upper bound "
                f"{t['auc_drop_upper_bound_95']:+.4f}), bound {t['max_auc_drop']}: "
            )
            got += "within it." if t["auc_met"] else "**over it**."
        if t.get("choice_test_passed") is False:
            got += " The served model **did not pass** a stop test (the choice)."
        lines += ["## Targets", "", got, ""]
    st = info["stages"]
    if "prune" in st:
        pr = st["prune"]
        lines += [
            "## F-Permutation",
            "",
            f"Removed {len(pr['pruned_fields'])} field(s): {', '.join(pr['pruned_fields']) or 'none'} "
            f"(stop: {pr['stop_reason']}); kept {', '.join(pr['kept_fields'])}.",
            "",
        ]
        res = pr.get("selection_resolution")
        if res:
            lines += [
                f"The stop test: a step is kept when the one-sided upper bound of its paired AUC drop "
                f"on the selection split (DeLong's standard error, confidence {res['confidence']} over all steps) "
                f"is within {res['max_auc_drop']}. "
                f"The selection split ({res.get('selection_rows', res.get('dev_rows', 0)):,} rows) measures the base "
                f"model's AUC to a standard error of "
                f"{res.get('selection_auc_standard_error', res.get('dev_auc_standard_error', float('nan'))):.4f}.",
                "",
            ]
            if res.get("warning"):
                lines += [f"**Warning:** {res['warning']}.", ""]
        if st["base"].get("given_checkpoint"):
            lines += [
                "The base model came from `--checkpoint` (trained elsewhere): if its early stopping read dev, it read "
                "the confirmation split too, which favours the base model in the figures below.",
                "",
            ]
        regrouped = bool((info["export"] or {}).get("serving_tiers"))
        for stage, what in (
            ("prune", "the pruned model"),
            (
                "quantize",
                "the pruned, quantized model as trained (served regrouped: see below)"
                if regrouped
                else "the final (pruned, quantized) model",
            ),
        ):
            c = st.get(stage, {}).get("confirmation")
            if c:
                lines += [
                    f"Confirmation split ({c['rows']:,} rows, read by no decision), {what} against the base model: "
                    f"AUC {c['auc']:.4f} vs {c['base_auc']:.4f}, drop {c['drop']:+.4f} (SE {c['standard_error']:.4f}, "
                    f"95% upper bound {c['upper_bound_95']:+.4f}).",
                    "",
                ]
        if info["importance"]:
            lines += [
                "Field importance of the base model (least important first):",
                "",
                "| field | score |",
                "|---|---|",
            ]
            lines += [f"| {r['field']} | {r['score']:.6g} |" for r in info["importance"]["ranking"]]
            lines += ["", "![importance](prune/importance/importance.png)", ""]
        lines += [
            "Iterations (`prune/prune_log.csv`):",
            "",
            "| iteration | removed | memory | selection AUC | selection drop (SE) | drop upper bound | "
            "test AUC | kept |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in info["prune_log"]:
            drop = (
                f"{r['dev_auc_drop']:+.4f} ({r['dev_auc_drop_standard_error']:.4f}) | "
                f"{r['dev_auc_drop_upper_bound']:+.4f}"
                if "dev_auc_drop" in r
                else " | "
            )
            lines.append(
                f"| {r['iteration']} | {', '.join(r['removed'])} | {r['memory_ratio']:.3f} | {r['dev_auc']:.4f} | "
                f"{drop} | {r['test_auc']:.4f} | {'yes' if r['accepted'] else 'no'} |"
            )
        lines.append("")
    if "quantize" in st:
        q = st["quantize"]
        lines += [
            "## F-Quantization",
            "",
            f"Per-table budget {q['budget']:.3f} of the pruned model's fp32 bytes; test AUC {q['test_auc']:.4f}.",
            "",
        ]
        why = q.get("budget_reason")
        if why:
            lines += [why, ""]
    if info["export"]:
        e = info["export"]
        lines += [
            "## Inference export",
            "",
            "| tables | bytes |",
            "|---|---|",
            f"| base model, fp32 | {e.get('base_fp32_bytes', 0):,} |",
            f"| base model, TorchRec int8 (`quantize_embeddings`) | {e.get('base_torchrec_int8_bytes', 0):,} |",
            f"| pruned tables, fp32 | {e['fp32_bytes']:,} |",
            f"| pruned tables, TorchRec int8 | {e['torchrec_int8_bytes']:,} |",
            f"| **exported (row groups + ranked row map)** | **{e['inference_bytes']:,}** |",
            "",
            "Rows: "
            + ", ".join(
                f"{e[f'rows_{SERVED_GROUP_NAMES[g]}']:,} {SERVED_GROUP_NAMES[g]}"
                for g in SERVED_PRECISION_ORDER
                if e.get(f"rows_{SERVED_GROUP_NAMES[g]}")
            )
            + ". Largest |logit| "
            f"difference to the {'regrouped' if e.get('serving_tiers') else 'trained'} model over dev: "
            f"{e['max_abs_logit_diff_dev']:.2e}." + _served_auc_text(e),
            "",
        ]
        if e.get("serving_budget_reason"):
            lines += [e["serving_budget_reason"], ""]
    easy = (info["export"] or {}).get("easy_path")
    if easy:
        lines += _easy_path_lines(easy)
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path


def _easy_path_lines(e: Dict[str, Any]) -> List[str]:
    """The compressed model beside TorchRec's post-training quantization of the base model, and
    which of them is served (the choice: ours tested on the choice split, TorchRec's on the
    selection split; `jobs/easy_path.py`)."""
    rows = e.get("choice_rows") or {}
    lines = [
        "## Against TorchRec's post-training quantization",
        "",
        f"Figures on the confirmation split ({e['rows']:,} rows, read by no decision); drops paired against the base "
        "model (DeLong standard errors); bytes as allocated. The last column is the choice: TorchRec's int8 "
        "tested first at the whole error rate and, if it passed, its int4 and ours sharing that rate (Holm's "
        "step-down), each with the stop test; of those that passed, the one with the fewest bytes is served. "
        "Ours is tested on the "
        f"choice split ({rows.get('choice', 0):,} rows, which no earlier decision read: ours was pruned and "
        f"fine-tuned on the selection split), TorchRec's models on the selection split "
        f"({rows.get('dev', 0):,} rows).",
        "",
        "| model | AUC | drop from base (SE) | memory (of base fp32) | minus ours (SE) | choice: drop, upper bound |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in (("base", "base (fp32)"), *SERVED_NAMES.items()):
        r = e[key]
        vs = f"{r['minus_final']:+.4f} ({r['minus_final_standard_error']:.4f})" if "minus_final" in r else ""
        c = r.get("choice") or {}
        choice = ""
        if c.get("test_index"):
            choice = f"{c['drop']:+.4f}, {c['upper_bound']:+.4f} (test {c['test_index']}): " + (
                "**passed**" if c["accepted"] else "failed"
            )
        elif c:
            choice = f"{c['drop']:+.4f} (SE {c['standard_error']:.4f}), not tried"
        lines.append(
            f"| {name} | {r['auc']:.4f} | {r['drop']:+.4f} ({r['drop_standard_error']:.4f}) | "
            f"{100 * r['memory']:.1f}% | {vs} | {choice} |"
        )
    lines.append("")
    if "exported_model" not in e or "choice" not in e["final"]:  # a run exported before this choice existed
        if e.get("torchrec_int4_no_worse_and_smaller"):
            where = (
                f" It was exported as `{Path(e['exported']).name}` (`--fallback torchrec`)."
                if e.get("exported")
                else " `--fallback torchrec` exports it."
            )
            lines += [
                f"**TorchRec's int4 of the base model is no larger and no worse than ours here: serve it.**{where}",
                "",
            ]
        return lines
    served = e["exported_model"]
    would = e.get("fallback_would_serve")
    if served != "final":
        lines += [
            f"**Served: {SERVED_NAMES[served]}**, of the models that passed their tests the one with the fewest "
            f"bytes; exported as "
            f"`{Path(e['exported']).name}` (`--fallback torchrec`). `model.pt` and the serving files are ours.",
            "",
        ]
    elif e["exported_within_bound"]:
        lines += ["Served: ours (it passed the stop test on the choice split).", ""]
    elif "accepted" not in e["final"]["choice"]:  # --fallback torchrec, and int8 failed first
        lines += [
            "**TorchRec's int8 of the base model, tested first, failed its stop test, so nothing else was "
            "tested: only the base model is known to meet --max-auc-drop.** Ours (not tested) was exported as "
            "asked.",
            "",
        ]
    else:  # ours failed alone (no --fallback): the advice names what the flag would serve
        lines += [
            "**Ours failed the stop test on the choice split: its AUC drop may exceed --max-auc-drop.** "
            "It was exported as asked. `--fallback torchrec` also tests TorchRec's int8 and int4 of the base "
            "model and serves the model with the fewest bytes of those that pass: "
            + (
                "here TorchRec's int8, tested first, fails too, so only the base model is known to meet the bound."
                if would is None
                else f"here it would serve {SERVED_NAMES[would]}."
            ),
            "",
        ]
    if (
        served == "final"
        and e["exported_within_bound"]
        and would not in (None, "final")
        and e[would]["bytes"] < e["final"]["bytes"]
    ):
        lines += [
            f"**{SERVED_NAMES[would]} is smaller than ours and passes the same test: `--fallback torchrec` "
            "serves it.**",
            "",
        ]
    return lines


def plot_importance(ranking: List[Dict[str, Any]], method: str, samples: int, path: Path) -> None:
    """Bar chart of field importances (`shark importance`'s importance.png).

    Args:
        ranking: {"field", "score"} per field, least important first.
        method, samples: the scoring method and the samples scored, for the labels.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranking = ranking[::-1]  # most important on top
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(ranking) + 1.2))
    ax.barh([r["field"] for r in ranking][::-1], [r["score"] for r in ranking][::-1], color="tab:blue")
    ax.set_xlabel(f"{method} score (larger = more important)")
    ax.set_title(f"Feature-field importance ({method}, {samples} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prune_log_figure(rows: List[Dict[str, Any]]) -> Any:
    """The figure of `plot_prune_log`: the accepted models joined into the loop's path, each
    rejected candidate a lone marker (the loop kept the previous model, so it is no step).

    Args:
        rows: the loop's log rows (memory_ratio, dev_auc, test_auc, removed, accepted); the
            first is the base model.

    Returns:
        The matplotlib figure (close it when done).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = [r for r in rows if r["accepted"]]
    rejected = [r for r in rows if not r["accepted"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    mem = [r["memory_ratio"] for r in path]
    ax.plot(mem, [r["dev_auc"] for r in path], "o-", color="tab:blue", label="dev AUC (accepted)")
    ax.plot(mem, [r["test_auc"] for r in path], "s--", color="tab:orange", label="test AUC (accepted)")
    if rejected:
        rmem = [r["memory_ratio"] for r in rejected]
        ax.plot(rmem, [r["dev_auc"] for r in rejected], "x", ls="none", color="red", ms=9, label="dev AUC (rejected)")
        ax.plot(
            rmem, [r["test_auc"] for r in rejected], "+", ls="none", color="darkred", ms=9, label="test AUC (rejected)"
        )
    for r in rows[1:]:
        text = "-" + ",".join(r["removed"]) + ("" if r["accepted"] else " (rejected)")
        ax.annotate(text, (r["memory_ratio"], r["dev_auc"]), fontsize=7, rotation=20)
    ax.invert_xaxis()
    ax.set_xlabel("embedding memory / base model")
    ax.set_ylabel("AUC")
    ax.set_title("F-Permutation: AUC against memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_prune_log(rows: List[Dict[str, Any]], path: Path) -> None:
    """Dev and test AUC against memory over the pruning loop's iterations (`shark prune`'s
    auc_vs_memory.png): the accepted models as the path, rejected candidates as lone markers.

    Args:
        rows: the loop's log rows (memory_ratio, dev_auc, test_auc, removed, accepted).
        path: the PNG to write.
    """
    fig = prune_log_figure(rows)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
