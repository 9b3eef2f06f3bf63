"""`shark compress`: base model -> F-Permutation pruning -> F-Quantization fine-tuning.

Run directory layout (`--out DIR`):

    DIR/.lock              held while a `shark compress` job runs here (one for all stages)
    DIR/stages.json        finished stages and what they produced (written atomically)
    DIR/base/              the base model: a `shark train` run (config, metrics, checkpoints)
    DIR/prune/             the pruning loop: prune_log.csv/json, auc_vs_memory.png, pruned/
    DIR/quantize/          the pruned model converted to mixed precision and fine-tuned
    DIR/export/            model.pt (the inference model, torch.save), embedding_collection.pt
                           (its collection, torch.jit.script), export.json (bytes and checks),
                           and what serves raw lines with torch alone: serving_model.pt,
                           serving.json, vocab.json, serve.py, README.md (jobs/export.py)
    DIR/metrics.json       the pipeline's figures (also --metrics-out)
    DIR/report.md          `shark report DIR`, the last stage (with report_auc_vs_memory.png)

Memory split: `--target-memory R` is the whole pipeline's target (embedding bytes over the
base model's fp32 bytes). Pruning goes down to R as far as the AUC bound allows and leaves a
ratio p; F-Quantization then gets the per-table budget R / p, clipped to what all-int8 rows can
reach and to 1 (`--quant-budget` overrides it). F-Quantization starts from the pruned model's
weights (`--init-from`), not from scratch, and fine-tunes for `--quant-epochs`.

Splits (`Dataset.decision_splits`): every training decision (the base model's and fine-tunings'
early stopping, the pruning loop's stop test) reads the selection split, dev's even lines or
with `--selection-fraction F` a carved part of train; the choice of the model to serve tests
ours on the choice split (a quarter of dev, or dev's even lines with F), which no earlier
decision read; the final figure, the chosen model against the base model, comes from the
confirmation split (another quarter of dev, or dev's odd lines with F), which no decision reads
(`metrics.json` `confirmation`); test is logged and drives nothing.

Resume: a stage is recorded in stages.json only once it has finished, so `--resume` skips the
finished stages and redoes the rest: training stages continue from their newest checkpoint
(bit-exact, as `shark train --resume`), an interrupted pruning loop starts over from the base
model. Without `--resume`, a directory that already holds a pipeline is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from shark_torchrec.config import (
    JobConfig,
    QuantConfig,
    config_to_dict,
    load_config,
    save_config,
    with_absolute_paths,
)
from shark_torchrec.data import open_dataset
from shark_torchrec.distributed.env import DistEnv
from shark_torchrec.jobs.checkpoint import (
    CheckpointError,
    list_checkpoints,
    read_meta,
    resolve_checkpoint,
    resolve_checkpoint_on_rank0,
    save_checkpoint,
)
from shark_torchrec.jobs.easy_path import easy_path
from shark_torchrec.jobs.export import ServingTiers, export_checkpoint, served_min_budget
from shark_torchrec.jobs.prune import (
    adopt_checkpoint_model,
    base_model,
    confirmation_check,
    prune_loop,
    write_prune_log,
)
from shark_torchrec.jobs.trainer import (
    TrainedModel,
    TrainState,
    _meta,
    final_metrics,
    fit,
    job_rank,
    write_metrics,
)
from shark_torchrec.jobs.user_errors import user_error_types
from shark_torchrec.modules.precision_policy import split_tiers
from shark_torchrec.precision.priority import GROUP_NAMES, SERVED_GROUP_NAMES, by_precision, min_budget

STAGES = ("base", "prune", "quantize", "export")
STAGES_FILE = "stages.json"
CONFIRM_BASE_FILE = "confirm_base_logits.pt"  # the base model's predictions on the confirmation split


def read_stages(out: Path) -> Dict[str, Any]:
    """The stages a `shark compress` run directory has finished (its stages.json).

    Args:
        out: the run directory.

    Returns:
        stage -> its record, empty when none has finished.

    Raises:
        CheckpointError: a stages.json that is not JSON (the run directory is not one to resume).
    """
    path = out / STAGES_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # json's JSONDecodeError, or UnicodeDecodeError
        raise CheckpointError(f"{path} cannot be read as a compression run's record ({e})") from e


def _record(out: Path, stages: Dict[str, Any], env: DistEnv) -> None:
    if env.is_main:
        tmp = out / f"{STAGES_FILE}.tmp"
        tmp.write_text(json.dumps(stages, indent=2))
        os.replace(tmp, out / STAGES_FILE)  # atomic: a stage is finished or not recorded
    if env.world_size > 1:
        dist.barrier()


def _budget_after_pruning(cfg: JobConfig, prune_ratio: float, floor: float) -> Tuple[float, float]:
    """(budget, what the target asks): --target-memory over the memory ratio pruning left,
    clipped to `floor` (what all rows in the cheapest tier can reach) and to 1."""
    want = cfg.prune.target_memory / max(prune_ratio, 1e-12)
    return min(1.0, max(want, floor)), want


def quant_budget(cfg: JobConfig, prune_ratio: float) -> Tuple[float, str]:
    """F-Quantization's per-table budget after pruning left `prune_ratio` of the memory.

    Args:
        cfg: the run's config (`--quant-budget`, `--target-memory`, the tiers, the dim).
        prune_ratio: the pruned model's embedding bytes over the base model's.

    Returns:
        (budget, why: a sentence for the report saying where it came from and what it missed).
    """
    if cfg.compress.quant_budget is not None:
        return cfg.compress.quant_budget, f"Set by --quant-budget {cfg.compress.quant_budget}."
    tiers = split_tiers(cfg.quant.tiers)  # the quantize stage ranks into these
    floor = min_budget(cfg.model.embedding_dim, max(GROUP_NAMES.index(t) for t in tiers))  # the store's
    budget, want = _budget_after_pruning(cfg, prune_ratio, floor)
    target = cfg.prune.target_memory
    why = f"--target-memory {target} over the {prune_ratio:.3f} of memory pruning left asks {want:.3f}"
    if want < floor:
        why += (
            f"; clipped up to {floor:.3f}, the fewest bytes all-{max(tiers, key=GROUP_NAMES.index)} rows (tiers "
            f"{', '.join(tiers)}) can reach at dim {cfg.model.embedding_dim}"
        )
        why += (
            " (for training: the export serves in --serve-tiers)"
            if cfg.compress.serve_tiers
            else f", so the pipeline misses --target-memory {target}: "
            f"it ends near {floor * prune_ratio:.3f} of the base model's bytes"
        )
    elif want > 1.0:
        why += "; clipped to 1 (pruning alone met the target)"
    return budget, why + "."


def serve_budget(cfg: JobConfig, prune_ratio: float, shapes: Optional[Dict[str, Any]] = None) -> Tuple[float, str]:
    """The budget the export regroups rows to in --serve-tiers (model-wide), and why.

    Args:
        cfg: the run's config (`--serve-tiers`, `--target-memory`, the dim).
        prune_ratio: the pruned model's embedding bytes over the base model's.
        shapes: the pruned model's tables, name -> (rows, dim), for the exact floor (the ranked
            map's fixed bytes too: a budget at a row's share alone can be refused); None: a
            row's share.

    Returns:
        (budget: --target-memory over `prune_ratio`, clipped to the tiers' floor and to 1;
        a sentence for the report saying so).
    """
    tiers = split_tiers(cfg.compress.serve_tiers)
    rows = sum(r for r, _ in (shapes or {}).values())
    # The served model's floor, ranked row map included.
    floor = served_min_budget(cfg.model.embedding_dim, tiers, rows, len(shapes or {}))
    budget, want = _budget_after_pruning(cfg, prune_ratio, floor)
    why = (
        f"Served in {', '.join(tiers)} at {budget:.3f} of the pruned model's fp32 bytes (model-wide), chosen by the "
        f"trained priorities with fitted scales: --target-memory {cfg.prune.target_memory} over the {prune_ratio:.3f} "
        f"pruning left asks {want:.3f}"
    )
    if want < floor:
        why += f"; clipped up to {floor:.4f}, these tiers' floor at dim {cfg.model.embedding_dim}"
    elif want > 1.0:
        why += "; clipped to 1"
    most_precise = SERVED_GROUP_NAMES[by_precision(tiers)[0]]
    top = served_min_budget(cfg.model.embedding_dim, [most_precise])
    if budget > top:
        why += (
            f". All rows in {most_precise}, the most precise of these tiers, take "
            f"{top:.3f}: that is what is served, below the budget"
        )
    return budget, why + "."


def targets(
    cfg: JobConfig, memory_ratio: float, confirmation: Optional[Dict[str, Any]], easy: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """What the run asked and what the served model got: memory against --target-memory, and
    its AUC drop on the confirmation split against --max-auc-drop (point estimate and its
    one-sided 95% bound), with whether it passed its stop test in the choice of what to serve.

    Args:
        cfg: the run's config.
        memory_ratio: our final model's embedding bytes over the base model's.
        confirmation: our final model's confirmation check (`confirmation_check`), or None.
        easy: the export's `easy_path` record; when given, the targets are the served model's
            as exported (ours, regrouped if --serve-tiers, or TorchRec's).

    Returns:
        The report's `targets`: both targets, which model is served, its memory ratio and
        whether it is met, and (with a confirmation) its AUC drop, bound and whether it passed.
    """
    out: Dict[str, Any] = {
        "target_memory": cfg.prune.target_memory,
        "max_auc_drop": cfg.prune.max_auc_drop,
        "served": "final",
    }
    if easy and "exported_model" in easy:  # the served model as exported (ours regrouped, or TorchRec's)
        served = easy[easy["exported_model"]]
        memory_ratio = served["memory"]
        confirmation = {"drop": served["drop"], "upper_bound_95": served["drop_upper_bound_95"]}
        out["served"] = easy["exported_model"]
    out.update(memory_ratio=memory_ratio, memory_met=memory_ratio <= cfg.prune.target_memory + 1e-9)
    if confirmation:
        out.update(
            auc_drop=confirmation["drop"],
            auc_drop_upper_bound_95=confirmation["upper_bound_95"],
            auc_met=confirmation["drop"] <= cfg.prune.max_auc_drop,
        )
    if easy and "exported_within_bound" in easy:
        out["choice_test_passed"] = easy["exported_within_bound"]
    return out


def _stage_config(cfg: JobConfig, out: Path, stage: str) -> JobConfig:
    c = copy.deepcopy(cfg)
    c.run.out_dir = str(out / stage)
    c.run.checkpoint_dir = ""
    c.run.metrics_out = ""
    c.run.resume = bool(cfg.run.resume and list_checkpoints(out / stage / "checkpoints"))
    return c


def prune_stage_config(cfg: JobConfig, out: Path, base_record: Dict[str, Any]) -> JobConfig:
    """The `prune` stage's config: the run's, starting from the base stage's checkpoint in fp32.

    Args:
        cfg: the run's config.
        out: the run directory.
        base_record: the `base` stage's record (its checkpoint).

    Returns:
        The stage's config. Without `--init-from` cleared, a run started with it (the base
        stage's starting point) failed here, after the base stage had trained: the two exclude
        each other.
    """
    p = _stage_config(cfg, out, "prune")
    p.quant = QuantConfig()
    p.run.resume = False
    p.run.checkpoint = base_record["checkpoint"]
    p.run.init_from = ""
    return p


def run_base(cfg: JobConfig, out: Path, env: DistEnv):
    """The `base` stage: train the stock fp32 model in DIR/base (or take `--checkpoint`, or
    resume an interrupted training), on the decision splits.

    Args:
        cfg: the run's config.
        out: the run directory.
        env: the ranks.

    Returns:
        (the stage's record for stages.json: checkpoint, test and dev AUC, embedding bytes, the
        given checkpoint if any; the trained model).
    """
    b = _stage_config(cfg, out, "base")
    b.quant = QuantConfig()  # the base model is stock fp32 TorchRec
    if b.run.resume:
        if b.run.checkpoint:
            # The given model, saved in base/checkpoints before the stage was interrupted: take
            # it as it is again (its kept fields; no epochs), not train it further.
            given = adopt_checkpoint_model(dataclasses.replace(b, run=dataclasses.replace(b.run, resume=False)))
            b.model, b.train.epochs = given.model, 0
        b.run.checkpoint = ""  # continue the interrupted training, not the starting point
    trained = base_model(b, env)
    metrics = final_metrics(b, trained)
    if env.is_main:
        write_metrics(b, metrics)
    record = {
        "checkpoint": str(resolve_checkpoint_on_rank0(b.checkpoint_dir)),
        "test_auc": metrics["test_auc"],
        "dev_auc": metrics["dev_auc"],
        "embedding_bytes": metrics["embedding_bytes"],
        # A base given by --checkpoint was trained elsewhere: its early stopping may have read
        # the confirmation split (the report says so).
        "given_checkpoint": str(b.run.checkpoint or ""),
    }
    return record, trained


def run_prune(cfg: JobConfig, out: Path, env: DistEnv, base_record: Dict[str, Any], base: Optional[TrainedModel]):
    """The `prune` stage: the pruning loop in DIR/prune, from the base model; the accepted
    model is saved to DIR/prune/pruned, with its log and the base model's predictions on the
    confirmation split.

    Args:
        cfg: the run's config.
        out: the run directory.
        env: the ranks.
        base_record: the `base` stage's record (its checkpoint).
        base: the base model as trained in this job, or None (resumed: loaded from its checkpoint).

    Returns:
        The stage's record for stages.json: the pruned checkpoint, kept and pruned fields,
        memory ratio, stop reason, the selection split's resolution, the confirmation check and
        the last accepted iteration's dev and test AUC.
    """
    p = prune_stage_config(cfg, out, base_record)
    if base is None:  # resumed: the base model comes back from its checkpoint
        b = copy.deepcopy(p)
        b.run.out_dir = str(out / "prune" / "base_loaded")
        base = base_model(b, env)
    stage_dir = Path(p.run.out_dir)
    accepted, rows, reason, base_metrics = prune_loop(p, env, base, stage_dir)
    final_cfg = copy.deepcopy(accepted.cfg)
    ckpt = save_checkpoint(
        stage_dir / "pruned",
        0,
        accepted.model,
        accepted.optimizer,
        _meta(final_cfg, TrainState(), accepted.configs, env, accepted.dataset.full_schema),
        keep=1,
    )
    if env.is_main:
        write_prune_log(rows, stage_dir)
        torch.save(base_metrics["base_confirm"], stage_dir / CONFIRM_BASE_FILE)  # for the final model's check
    if env.world_size > 1:
        dist.barrier()
    full = list(base.dataset.schema.sparse_names)
    kept = list(accepted.dataset.schema.sparse_names)
    last = next(r for r in reversed(rows) if r["accepted"])
    return {
        "checkpoint": str(ckpt),
        "kept_fields": kept,
        "pruned_fields": [f for f in full if f not in kept],
        "field_removal": final_cfg.model.field_removal,
        "memory_ratio": accepted.embedding_bytes / base_metrics["embedding_bytes"],
        "stop_reason": reason,
        "selection_resolution": base_metrics["resolution"],
        "confirmation": base_metrics["confirmation"],
        "base_confirm": str(stage_dir / CONFIRM_BASE_FILE),
        "world_size": env.world_size,  # the order of the saved predictions (rank by rank)
        "dev_auc": last["dev_auc"],
        "test_auc": last["test_auc"],
    }


def run_quantize(cfg: JobConfig, out: Path, env: DistEnv, pruned: Dict[str, Any]):
    """The `quantize` stage: the pruned model converted to mixed precision (`--init-from`, at
    `quant_budget`) and fine-tuned in DIR/quantize, then checked on the confirmation split.

    Args:
        cfg: the run's config.
        out: the run directory.
        env: the ranks.
        pruned: the `prune` stage's record.

    Returns:
        {"checkpoint", "budget", "budget_reason", "metrics"} (metrics with `confirmation` when
        the prune stage saved the base model's predictions).

    Raises:
        CheckpointError: the prune stage ran on another number of processes (its saved
            predictions are in that order).
    """
    if "base_confirm" in pruned and pruned.get("world_size", env.world_size) != env.world_size:
        raise CheckpointError(
            f"the prune stage of this run ran on {pruned['world_size']} processes and this one on {env.world_size}: "
            "the confirmation check pairs predictions gathered in that order; resume with the same --nproc"
        )
    budget, budget_reason = quant_budget(cfg, pruned["memory_ratio"])
    q = _stage_config(cfg, out, "quantize")
    q.model.kept_fields = tuple(pruned["kept_fields"])
    q.model.field_removal = pruned["field_removal"]
    if q.quant.precision not in ("shark", "freq"):
        q.quant.precision = "shark"
    if q.quant.t8 is None and not q.quant.row_fractions:
        q.quant.memory_budget = budget
    q.train.epochs = cfg.compress.quant_epochs
    q.run.checkpoint = ""
    q.run.init_from = "" if q.run.resume else pruned["checkpoint"]
    dataset = open_dataset(q.dataset, q.train.seed).decision_splits()  # early stopping reads the selection split
    if not q.train.eval_every and cfg.compress.quant_evals_per_epoch:
        # A base model that has seen all of train can overfit when it sees it again: watch dev
        # within the epoch and keep the best state.
        steps = dataset.num_batches("train", q.train.batch_size)
        q.train.eval_every = max(1, steps // cfg.compress.quant_evals_per_epoch)
        q.train.early_stopping_patience = q.train.early_stopping_patience or 2
    q.validate()
    trained = fit(q, env, dataset)
    metrics = final_metrics(q, trained)
    if "base_confirm" in pruned:  # (a prune stage recorded before the confirmation split has none)
        base_confirm = torch.load(pruned["base_confirm"])
        metrics["confirmation"] = confirmation_check(
            trained.model, trained.dataset, base_confirm, q.train.eval_batch_size, env
        )
    if env.is_main:
        write_metrics(q, metrics)
    return {
        "checkpoint": str(resolve_checkpoint_on_rank0(q.checkpoint_dir)),
        "budget": budget,
        "budget_reason": budget_reason,
        "metrics": metrics,
    }


EXPORT_FAILED = "export_failed_on_rank0"  # what the other ranks receive when rank 0's export raised


def _export_on_rank0(cfg: JobConfig, out: Path, stages: Dict[str, Any]) -> Dict[str, Any]:
    serving, why = None, None
    if cfg.compress.serve_tiers:
        shapes = read_meta(resolve_checkpoint(stages["quantize"]["checkpoint"]))["tables"]
        budget, why = serve_budget(cfg, stages["prune"]["memory_ratio"], shapes)
        serving = ServingTiers(split_tiers(cfg.compress.serve_tiers), budget, "model")
    record = export_checkpoint(
        Path(stages["quantize"]["checkpoint"]),
        out / "export",
        stages["base"]["checkpoint"],
        serving,
        progress=cfg.run.progress,
    )
    if why:
        record["serving_budget_reason"] = why
    # Beside TorchRec's own post-training int8 / int4 of the base model (one process).
    data = open_dataset(cfg.dataset, cfg.train.seed).decision_splits()
    fallback_dir = out / "export" if cfg.compress.fallback == "torchrec" else None
    exported = torch.load(out / "export" / "model.pt", weights_only=False)  # what is served, as export wrote it
    easy = record["easy_path"] = easy_path(
        stages["base"]["checkpoint"],
        exported,
        stages["prune"]["kept_fields"],
        data,
        cfg.train.eval_batch_size,
        record["inference_bytes"],
        cfg.prune.max_auc_drop,
        cfg.prune.confidence,
        fallback_dir,
    )
    if easy["exported"]:  # the serving files are ours: say which file the choice serves instead
        manifest_path = out / "export" / "serving.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["served_instead"] = Path(easy["exported"]).name  # serve.py warns with it, and why:
        ours = (easy.get("final") or {}).get("choice") or {}
        manifest["served_instead_why"] = (
            "smaller, and within the bound as this model is"
            if ours.get("accepted")
            else "this model did not pass its test"
        )
        manifest_path.write_text(json.dumps(manifest, indent=2))
        with (out / "export" / "README.md").open("a") as f:
            f.write(
                f"\n## Served instead: {easy['exported_model']}\n\n`shark compress --fallback torchrec` chose "
                f"`{Path(easy['exported']).name}` (TorchRec's post-training quantization of the base model, "
                "`torch.load(path, weights_only=False)`: a DLRM that scores a batch) over the files above; "
                "see the run's report.md.\n"
            )
    (out / "export" / "export.json").write_text(json.dumps(record, indent=2))
    return record


def run_export(cfg: JobConfig, out: Path, env: DistEnv, stages: Dict[str, Any]) -> Dict[str, Any]:
    """Rank 0 exports the quantized model, checks it against the trained one on dev and
    chooses what to serve (`easy_path`); the other ranks wait for its record (or its error).

    Args:
        cfg: the run's config.
        out: the run directory (the export goes to DIR/export).
        env: the ranks.
        stages: the finished stages' records (base, prune, quantize).

    Returns:
        The export record (export.json), on every rank.
    """
    record: Dict[str, Any] = {}
    error: Optional[BaseException] = None
    if env.is_main:
        try:
            record = _export_on_rank0(cfg, out, stages)
        except Exception as e:  # the other ranks wait in the broadcast below: tell them, then raise
            if env.world_size == 1:
                raise
            error, record = e, {EXPORT_FAILED: f"{type(e).__name__}: {e}"}
    if env.world_size > 1:
        box = [record]
        dist.broadcast_object_list(box, src=0)
        record = box[0]
        if EXPORT_FAILED in record:
            if error is not None:
                raise error
            raise RuntimeError(f"the export stage failed on rank 0: {record[EXPORT_FAILED]}")
    return record


# Run settings a resumed run may change: where and how it reports, not what it computes.
RESUME_MAY_CHANGE = frozenset(
    {
        "run.resume",
        "run.nproc",  # the training stages reshard; the quantize stage checks its own (`run_quantize`)
        "run.progress",
        "run.fail_at_step",
        "run.metrics_out",
        "run.checkpoint_every",
        "run.keep_checkpoints",
        "run.out_dir",  # the directory itself, however it is spelt
    }
)


def resume_differences(saved: JobConfig, now: JobConfig) -> List[str]:
    """What a resumed `shark compress` would change in the settings its run was started with.

    Args:
        saved: the run's config.toml.
        now: the resumed command's config.

    Returns:
        One line per field that differs (`group.field (--flag): X there, Y here`), outside
        `RESUME_MAY_CHANGE`; paths compare as absolute paths (relative ones against the
        working directory: a config.toml written before they were saved absolute).
    """

    def flat(cfg: JobConfig) -> Dict[str, Any]:
        groups = config_to_dict(with_absolute_paths(cfg))
        return {f"{g}.{k}": v for g, fields in groups.items() for k, v in fields.items()}

    a, b = flat(saved), flat(now)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_MAY_CHANGE or a.get(key) == b.get(key):
            continue
        flag = "--" + key.split(".", 1)[1].replace("_", "-")
        lines.append(f"{key} ({flag}): {a.get(key, 'unset')} there, {b.get(key, 'unset')} here")
    return lines


def _forget_a_start_that_failed(out: Path, base_dir_before: bool) -> None:
    """A new run whose base stage failed before its first checkpoint (a --checkpoint that does
    not match the model, say): remove its config.toml and the base stage's folder (if this run
    made it), so that the same command, mended, can run again. They were kept, and the retry
    was refused as "another run" while `--resume` repeated the first run's settings and error.
    A base stage that saved a checkpoint is kept: `--resume` continues it."""
    import shutil

    base = out / "base"
    if list_checkpoints(base / "checkpoints"):
        return
    if base.is_dir() and not base_dir_before:
        shutil.rmtree(base, ignore_errors=True)
    (out / "config.toml").unlink(missing_ok=True)


def compress_job(cfg: JobConfig) -> Dict[str, Any]:
    """One rank of `shark compress`.

    Args:
        cfg: the validated config.

    Returns:
        The pipeline's metrics (also written to DIR/metrics.json), on every rank.

    Raises:
        CheckpointError: the run directory already holds a run and `--resume` was not given.
    """
    # One lock for the whole run directory: the stages are calls inside this job, not jobs.
    with job_rank(cfg, "runs/compress-%Y%m%d-%H%M%S", "compress") as (env, out):
        stages = read_stages(out)
        if stages and not cfg.run.resume:
            raise CheckpointError(
                f"{out} already holds a compression run (stages {', '.join(stages)}): pass --resume to "
                "continue it, or choose another --out (nothing was overwritten)"
            )
        saved = out / "config.toml"
        resuming = cfg.run.resume and saved.is_file()
        if env.world_size > 1:
            dist.barrier()  # every rank has looked before rank 0 may write it
        if resuming:
            changed = resume_differences(load_config(saved), cfg)
            if changed:
                raise CheckpointError(
                    f"{out} was started with other settings, and --resume continues it as it was: "
                    + "; ".join(changed)
                    + ". Give its settings (or none: --resume --out reads them from its config.toml), or choose "
                    "another --out (nothing was changed)"
                )
        elif env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(with_absolute_paths(cfg), saved)
        if env.world_size > 1:
            dist.barrier()
        base = None
        if "base" not in stages:
            t0 = time.perf_counter()
            base_dir_before = (out / "base").exists()
            try:
                stages["base"], base = run_base(cfg, out, env)
            except user_error_types():
                # Only what the user mends and runs again: after Ctrl-C or a fault of ours the
                # run stays, for the --resume the message suggests (with its settings).
                if env.is_main and not resuming:
                    _forget_a_start_that_failed(out, base_dir_before)
                raise
            stages["base"]["seconds"] = time.perf_counter() - t0
            _record(out, stages, env)
        if "prune" not in stages:
            t0 = time.perf_counter()
            stages["prune"] = run_prune(cfg, out, env, stages["base"], base)
            stages["prune"]["seconds"] = time.perf_counter() - t0
            _record(out, stages, env)
        del base
        if "quantize" not in stages:
            t0 = time.perf_counter()
            q = run_quantize(cfg, out, env, stages["prune"])
            stages["quantize"] = {
                "checkpoint": q["checkpoint"],
                "budget": q["budget"],
                "budget_reason": q["budget_reason"],
                "test_auc": q["metrics"]["test_auc"],
                "embedding_bytes": q["metrics"]["embedding_bytes"],
                "confirmation": q["metrics"].get("confirmation"),
                "seconds": time.perf_counter() - t0,
            }
            _record(out, stages, env)
            metrics = q["metrics"]
        else:
            metrics = json.loads((out / "quantize" / "metrics.json").read_text())
        if "export" not in stages:
            t0 = time.perf_counter()
            stages["export"] = run_export(cfg, out, env, stages)
            stages["export"]["seconds"] = time.perf_counter() - t0
            _record(out, stages, env)
        timings = {s: stages[s].get("seconds", 0.0) for s in STAGES}
        memory_ratio = metrics["embedding_bytes"] / stages["base"]["embedding_bytes"]
        if stages["export"].get("serving_tiers"):  # served in other tiers than it trained in
            memory_ratio = stages["export"]["inference_bytes"] / stages["base"]["embedding_bytes"]
        metrics = {
            **metrics,
            "out_dir": str(out),
            "base_test_auc": stages["base"]["test_auc"],
            "base_embedding_bytes": stages["base"]["embedding_bytes"],
            "memory_ratio": memory_ratio,
            "prune_memory_ratio": stages["prune"]["memory_ratio"],
            "quant_budget": stages["quantize"]["budget"],
            "kept_fields": stages["prune"]["kept_fields"],
            "pruned_fields": stages["prune"]["pruned_fields"],
            "stop_reason": stages["prune"]["stop_reason"],
            "confirmation": stages["quantize"].get("confirmation"),
            "targets": targets(
                cfg, memory_ratio, stages["quantize"].get("confirmation"), stages["export"].get("easy_path")
            ),
            "stage_seconds": timings,
            "export": {k: v for k, v in stages["export"].items() if k != "seconds"},
        }
        if env.is_main:
            write_metrics(cfg, metrics)
            from shark_torchrec.report import write_report

            write_report(out)
        return metrics
