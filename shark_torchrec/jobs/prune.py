"""F-Permutation's iterative pruning (paper Algorithm 1) and the jobs behind `shark importance`
and `shark prune`.

Each iteration scores the current model's fields on dev, removes the `fields_per_step` least
important ones (`prune_tables`: a new plan without their tables), fine-tunes on a fresh
seeded sample of train (the support set), and evaluates on dev. The loop stops when the
embedding memory is at most `target_memory` of the base model's (that model is kept), or
when dev AUC may have fallen more than `max_auc_drop` below the base (that model is dropped
and the previous one kept): the drop's one-sided upper confidence bound, from DeLong's
standard error of the paired difference on dev and each step's share of the error rate
(`importance.significance.drop_test`), must be within the bound. A dev split too small to
resolve the bound is reported before any pruning. Test AUC is logged for every model and
never used for a decision.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Dict, Iterator, List

import torch
import torch.distributed as dist

from shark_torchrec.config import ConfigError, JobConfig
from shark_torchrec.data import CHOICE, CONFIRM, Batch, DataError, Dataset, open_dataset
from shark_torchrec.distributed.env import DistEnv
from shark_torchrec.distributed.memory import embedding_memory
from shark_torchrec.importance.model_scoring import FieldImportance, canonical_method, field_means, score_fields
from shark_torchrec.importance.significance import auc_standard_error, drop_test, paired_auc
from shark_torchrec.jobs.checkpoint import (
    load_checkpoint,
    read_meta,
    resolve_checkpoint_on_rank0,
    save_checkpoint,
    table_shapes,
)
from shark_torchrec.jobs.evaluation import binary_metrics, evaluate, predict
from shark_torchrec.jobs.remove_tables import prune_tables
from shark_torchrec.jobs.trainer import (
    TRAIN_OUT_DIR,
    TrainedModel,
    TrainState,
    _meta,
    final_metrics,
    fit,
    job_rank,
    train_steps,
    write_metrics,
)
from shark_torchrec.report import plot_importance, plot_prune_log

log = logging.getLogger("shark")


def support_batches(dataset: Dataset, rows: int, global_batch: int, env: DistEnv, seed: int) -> Iterator[Batch]:
    """About `rows` rows of train, as whole global batches each kept with probability
    rows / train rows. The choice is seeded, so every rank keeps the same batches.

    Args:
        dataset: the data (its train split).
        rows: about how many rows to take (at most ceil(rows / global_batch) batches).
        global_batch: rows per global batch.
        env: the ranks.
        seed: the seed of the choice.

    Yields:
        This rank's share of each kept batch.
    """
    total = dataset.splits["train"].num_lines()
    keep = min(1.0, rows / max(total, 1))
    limit = math.ceil(rows / global_batch)
    gen = torch.Generator().manual_seed(seed)
    taken = 0
    for b in dataset.batches("train", global_batch, env.rank, env.world_size):
        if taken >= limit:
            return
        if keep >= 1.0 or torch.rand((), generator=gen).item() < keep:
            taken += 1
            yield b


def adopt_checkpoint_model(cfg: JobConfig) -> JobConfig:
    """`--checkpoint` of a pruned model: take its kept fields and removal from its config.

    Args:
        cfg: the job's config.

    Returns:
        `cfg` itself without `--checkpoint`; else a validated copy with the checkpoint's kept
        fields and field removal, and no training epochs (the model is taken as it is).

    Raises:
        ConfigError: --kept-fields names other fields than the checkpoint's model keeps, or
            the checkpoint was trained with another --selection-fraction (it trained
            on lines the selection split now holds, or its vocabulary differs).
    """
    if not cfg.run.checkpoint:
        return cfg
    config = read_meta(resolve_checkpoint_on_rank0(cfg.run.checkpoint)).get("config", {})
    carved = float(config.get("dataset", {}).get("selection_fraction", 0.0))
    if carved != cfg.dataset.selection_fraction:
        raise ConfigError(
            f"--checkpoint {cfg.run.checkpoint} was trained with --selection-fraction {carved}, this run asks "
            f"{cfg.dataset.selection_fraction}: the selection split would hold lines the model trained on (or miss "
            "lines of its vocabulary); pass the same value, or train the base model with this one"
        )
    saved = config.get("model", {})
    kept = tuple(saved.get("kept_fields", ()))
    if cfg.model.kept_fields and tuple(cfg.model.kept_fields) != kept:
        raise ConfigError(
            f"model.kept_fields (--kept-fields {' '.join(cfg.model.kept_fields)}): the model of --checkpoint "
            f"{cfg.run.checkpoint} is taken as it is, with "
            + (f"the fields it kept ({', '.join(kept)})" if kept else "all its fields")
            + "; drop --kept-fields (or train a model on those fields first)"
        )
    cfg = copy.deepcopy(cfg)
    cfg.model.kept_fields = kept
    cfg.model.field_removal = saved.get("field_removal", cfg.model.field_removal)
    cfg.train.epochs = 0  # a trained model: score or prune it as it is
    return cfg.validate()


def base_model(cfg: JobConfig, env: DistEnv) -> TrainedModel:
    """The model to start from: `--checkpoint` if given, else one trained now, on the splits
    decisions use (`Dataset.decision_splits`: its early stopping reads the selection split).

    Args:
        cfg: the job's config.
        env: the ranks.

    Returns:
        The model, on the decision splits' view of the data.
    """
    cfg = adopt_checkpoint_model(cfg)
    return fit(cfg, env, open_dataset(cfg.dataset, cfg.train.seed).decision_splits())


def confirmation_check(
    model, dataset: Dataset, base: Dict[str, torch.Tensor], eval_batch: int, env: DistEnv
) -> Dict[str, Any]:
    """The final figure no decision saw: `model` against the base model on the confirmation
    split (`Dataset.decision_splits`), paired (DeLong).

    Args:
        model: the chosen model.
        dataset: its dataset view (with the `confirm` split).
        base: {"logits", "labels"}: the base model's predictions on that split.
        eval_batch, env: as for `evaluate`.

    Returns:
        {"split", "rows", "base_auc", "auc", "drop", "standard_error", "upper_bound_95"} (drop =
        base AUC - the model's; the bound one-sided, for this single test).
    """
    logits, labels = predict(model, dataset, CONFIRM, eval_batch, env)
    if not torch.equal(labels, base["labels"]):
        raise RuntimeError("the confirmation split's labels changed order; the paired check needs the same rows")
    p = paired_auc(logits.numpy(), base["logits"].numpy(), labels.numpy())
    return {
        "split": CONFIRM,
        "rows": int(labels.numel()),
        "base_auc": p.auc_b,
        "auc": p.auc_a,
        "drop": -p.difference,
        "standard_error": p.standard_error,
        "upper_bound_95": p.upper_bound(NormalDist().inv_cdf(0.95)),
    }


def score(cfg: JobConfig, trained_model, dataset: Dataset, env: DistEnv) -> FieldImportance:
    """`score_fields` with the config's method, split, rounds, seed and batch size.

    Args:
        cfg: the job's config.
        trained_model: the model to score.
        dataset: its data.
        env: the ranks.

    Returns:
        The field importances.
    """
    p = cfg.prune
    return score_fields(
        trained_model,
        dataset,
        p.method,
        p.score_split,
        cfg.train.eval_batch_size,
        env,
        rounds=p.rounds,
        seed=cfg.train.seed,
        progress=cfg.run.progress,
        cache_bytes=int(p.score_cache_gb * 2**30),
    )


# ---------------------------------------------------------------------------------------
# shark importance


def write_importance(imp: FieldImportance, out_dir: Path) -> None:
    """Write importance.json, importance.csv (least important first) and importance.png.

    Args:
        imp: the scores.
        out_dir: the directory (created).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ranking = imp.ranking()
    (out_dir / "importance.json").write_text(json.dumps(imp.to_json(), indent=2))
    with open(out_dir / "importance.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank_from_least", "field", "score"])
        for i, r in enumerate(ranking):
            w.writerow([i, r["field"], f"{r['score']:.9g}"])
    plot_importance(ranking, imp.method, imp.samples, out_dir / "importance.png")


def importance_job(cfg: JobConfig) -> Dict[str, Any]:
    """One rank of `shark importance`.

    Args:
        cfg: the validated config.

    Returns:
        The scores as JSON-able data, with the number of fields, the split scored and the scored
        model's dev and test AUC (how good the model the ranking comes from is), on every rank.
    """
    with job_rank(cfg, TRAIN_OUT_DIR) as (env, out_dir):
        trained = fit(adopt_checkpoint_model(cfg), env)  # scored on dev itself: no decision follows
        imp = score(cfg, trained.model, trained.dataset, env)
        b = cfg.train.eval_batch_size
        dev, test = (evaluate(trained.model, trained.dataset, split, b, env) for split in ("dev", "test"))
        metrics = {
            **imp.to_json(),
            "fields": len(imp.fields),
            "score_split": cfg.prune.score_split,
            "model_dev_auc": dev["auc"],
            "model_test_auc": test["auc"],
        }
        if env.is_main:
            log.info("scored model: %d fields, dev AUC %.4f, test AUC %.4f", len(imp.fields), dev["auc"], test["auc"])
            write_importance(imp, out_dir)
            write_metrics(cfg, metrics)
    return metrics


# ---------------------------------------------------------------------------------------
# shark prune


@dataclass
class Candidate:
    """A model of the loop with what it was evaluated to."""

    cfg: JobConfig
    model: Any
    optimizer: Any
    configs: Dict[str, Any]
    dataset: Dataset
    checkpoint: Path
    embedding_bytes: int
    plan: Any = None  # its sharding plan (a pruned model's; the base model's is in its run directory)


def _bytes(model, optimizer, configs) -> int:
    return int(embedding_memory(model, optimizer, configs)["embedding_bytes"])


def finetune(cfg: JobConfig, pruned, env: DistEnv, root: Path, iteration: int, show: bool):
    """Fine-tune on support samples, keeping the state of best dev AUC among the pruned model
    as it is (epoch 0) and after each epoch: a model that has already seen all of train can
    overfit when it sees it again, and then fine-tuning must not be kept.

    Args:
        cfg: the job's config (`[prune]` support rows and epochs, `[train]` batch sizes).
        pruned: the pruned model (`PrunedModel`), trained and restored in place.
        env: the ranks.
        root: where the kept state's checkpoints go.
        iteration: the loop's iteration (seeds the support samples; the step meta.json records).
        show: show progress bars.

    Returns:
        (dev metrics, test metrics, checkpoint of the kept state, epochs kept, the kept
        state's (logits, labels) on dev, for the paired stop test).
    """
    p, t = cfg.prune, cfg.train
    shapes = table_shapes(pruned.configs)
    meta = _meta(pruned.cfg, TrainState(step=iteration), pruned.configs, env, pruned.dataset.full_schema)

    def on_dev():
        logits, labels = predict(pruned.model, pruned.dataset, "dev", t.eval_batch_size, env)
        return binary_metrics(logits, labels), (logits, labels)

    dev, predictions = on_dev()
    best, best_epoch, best_predictions = dev, 0, predictions
    ckpt = save_checkpoint(root, 0, pruned.model, pruned.optimizer, meta, keep=1)
    for epoch in range(1, p.finetune_epochs + 1):
        support = support_batches(
            pruned.dataset, p.support_rows, t.batch_size, env, seed=t.seed * 1000 + iteration * 10 + epoch
        )
        train_steps(
            pruned.model,
            pruned.optimizer,
            support,
            env,
            cfg.quant.precision,
            desc=f"fine-tune {iteration}.{epoch}",
            show=show,
            max_steps=t.max_steps,
        )
        dev, predictions = on_dev()
        if dev["auc"] > best["auc"]:
            best, best_epoch, best_predictions = dev, epoch, predictions
            ckpt = save_checkpoint(root, epoch, pruned.model, pruned.optimizer, meta, keep=1)
    if best_epoch != p.finetune_epochs:
        load_checkpoint(ckpt, pruned.model, pruned.optimizer, shapes, cfg.quant.precision)
    test = evaluate(pruned.model, pruned.dataset, "test", t.eval_batch_size, env)
    return best, test, ckpt, best_epoch, best_predictions


def prune_loop(cfg: JobConfig, env: DistEnv, base: TrainedModel, out_dir: Path):
    """Algorithm 1; returns (accepted candidate, step log, stop reason, base metrics).

    Args:
        cfg: the job's config.
        env: the ranks.
        base: the base model (`base_model`), on the decision splits.
        out_dir: the stage's directory: the candidates' checkpoints go to prune_steps/, the
            base model's ranking to importance/.

    Returns:
        (the `Candidate` kept, one log row per iteration (iteration 0: the base model), the stop
        reason, {"dev_auc", "test_auc", "embedding_bytes", "resolution", "confirmation",
        "base_confirm"} of the base model and the kept model's confirmation check).

    Raises:
        DataError: a decision split whose rows are all of one class (no AUC).
    """
    p, t = cfg.prune, cfg.train
    show = cfg.run.progress and env.is_main
    steps_root = out_dir / "prune_steps"
    base_cfg = adopt_checkpoint_model(cfg)
    if env.is_main:  # a restarted loop starts over: steps of an earlier attempt would pass for this one's
        shutil.rmtree(steps_root, ignore_errors=True)
    if env.world_size > 1:
        dist.barrier()

    confirm_logits, confirm_labels = predict(base.model, base.dataset, CONFIRM, t.eval_batch_size, env)
    base_confirm = {"logits": confirm_logits, "labels": confirm_labels}
    base_logits, dev_labels = predict(base.model, base.dataset, "dev", t.eval_batch_size, env)
    _, choice_labels = (
        predict(base.model, base.dataset, CHOICE, t.eval_batch_size, env)
        if CHOICE in base.dataset.splits
        else (None, None)
    )
    for what, labels in (("selection", dev_labels), ("choice", choice_labels), ("confirmation", confirm_labels)):
        if labels is None:
            continue
        positives = int(labels.sum())
        if positives in (0, labels.numel()):
            raise DataError(
                f"the {what} split's {labels.numel()} rows are all {'negative' if positives == 0 else 'positive'}: "
                "its AUC is undefined, so no step can be tested (a larger dev split, or --selection-fraction F)"
            )
    dev = binary_metrics(base_logits, dev_labels)
    test = evaluate(base.model, base.dataset, "test", t.eval_batch_size, env)
    _, dev_se = auc_standard_error(base_logits.numpy(), dev_labels.numpy())
    resolution = {
        "selection_rows": int(dev_labels.numel()),
        "selection_auc_standard_error": dev_se,
        "max_auc_drop": p.max_auc_drop,
        "confidence": p.confidence,
    }
    if dev_se > p.max_auc_drop:
        resolution["warning"] = (
            f"the selection split ({dev_labels.numel()} rows) measures AUC to a standard error of {dev_se:.4f}, "
            f"larger than --max-auc-drop {p.max_auc_drop}: a drop that small cannot be told from noise, "
            "so pruning will stop early; a bigger selection split (--selection-fraction), or a looser bound, "
            "lets it go further"
        )
        if env.is_main:
            log.warning(resolution["warning"])
    base_bytes = _bytes(base.model, base.optimizer, base.configs)
    ckpt = save_checkpoint(
        steps_root / "iteration_000",
        0,
        base.model,
        base.optimizer,
        _meta(base_cfg, TrainState(), base.configs, env, base.dataset.full_schema),
        keep=1,
    )
    accepted = Candidate(base_cfg, base.model, base.optimizer, base.configs, base.dataset, ckpt, base_bytes)
    fields = list(base.dataset.schema.sparse_names)
    log_rows: List[Dict[str, Any]] = [
        {
            "iteration": 0,
            "removed": [],
            "kept": fields,
            "memory_ratio": 1.0,
            "embedding_bytes": base_bytes,
            "dev_auc": dev["auc"],
            "dev_logloss": dev["logloss"],
            "test_auc": test["auc"],
            "test_logloss": test["logloss"],
            "seconds": 0.0,
            "scoring_seconds": 0.0,
            "finetune_epochs_kept": 0,
            "accepted": True,
        }
    ]
    base_dev_auc = dev["auc"]
    if env.is_main:  # (the log, whatever --no-progress says: it hides progress bars only)
        log.info("base model: %d fields, dev AUC %.4f, test AUC %.4f", len(fields), dev["auc"], test["auc"])
    reason = None
    iteration = 0
    rejected: set = set()  # fields whose removal failed the stop test (not tried again)
    rejections_in_a_row = 0
    imp, scored_for = None, None
    while reason is None:
        kept = list(accepted.dataset.schema.sparse_names)
        if accepted.embedding_bytes <= p.target_memory * base_bytes:
            reason = "target_memory"
            break
        if len(kept) <= 1:
            reason = "one_field_left"
            break
        if p.max_iterations and iteration >= p.max_iterations:
            reason = "max_iterations"
            break
        iteration += 1
        start = time.perf_counter()
        if scored_for != accepted.checkpoint:  # after a rejection the model is the same: its scores too
            imp, scored_for = score(cfg, accepted.model, accepted.dataset, env), accepted.checkpoint
        field_bytes = {
            f: c.num_embeddings * c.embedding_dim * 4 for c in accepted.configs.values() for f in c.feature_names
        }
        candidates = [f for f in imp.removal_order(field_bytes, p.order, p.min_saving) if f not in rejected]
        removed = candidates[: min(p.fields_per_step, len(kept) - 1)]
        if iteration == 1 and env.is_main:  # the base model's ranking, for the report
            write_importance(imp, out_dir / "importance")
        if not removed:
            # Every field left frees less than --min-saving, or was tried and rejected (fewer
            # rejections in a row than --max-rejections: not the drop bound's stop).
            reason = "every_field_tried" if rejected else "min_saving"
            break
        if imp.means is None:  # random ranking: no lookups were made
            means = field_means(accepted.model, accepted.dataset, p.score_split, t.eval_batch_size, env)
        else:
            means = {f: imp.mean_of(f) for f in removed}
        pruned = prune_tables(
            accepted.model, accepted.optimizer, accepted.cfg, accepted.dataset, env, removed, accepted.checkpoint, means
        )
        dev, test, ckpt, epochs, (logits, labels) = finetune(
            cfg, pruned, env, steps_root / f"iteration_{iteration:03d}", iteration, show
        )
        nbytes = _bytes(pruned.model, pruned.optimizer, pruned.configs)
        if not torch.equal(labels, dev_labels):
            raise RuntimeError(
                f"iteration {iteration}: the selection split's labels changed order; "
                "the paired test needs the same rows"
            )
        decision = drop_test(
            paired_auc(logits.numpy(), base_logits.numpy(), labels.numpy()), p.max_auc_drop, p.confidence, iteration
        )
        ok = decision.accepted
        row = {
            "iteration": iteration,
            "removed": removed,
            "kept": list(pruned.dataset.schema.sparse_names),
            "memory_ratio": nbytes / base_bytes,
            "embedding_bytes": nbytes,
            "dev_auc": dev["auc"],
            "dev_logloss": dev["logloss"],
            "test_auc": test["auc"],
            "test_logloss": test["logloss"],
            "dev_auc_drop": decision.drop,
            "dev_auc_drop_standard_error": decision.standard_error,
            "dev_auc_drop_upper_bound": decision.upper_bound,
            "z": decision.z,
            "seconds": time.perf_counter() - start,
            "scoring_seconds": imp.scoring_seconds,
            "finetune_epochs_kept": epochs,
            "accepted": ok,
        }
        log_rows.append(row)
        if env.is_main:
            log.info(
                "iteration %d: removed %s -> memory %.3f, dev AUC %.4f "
                "(base %.4f; drop %.4f, upper bound %.4f at z %.2f), test AUC %.4f%s",
                iteration,
                ",".join(removed),
                row["memory_ratio"],
                dev["auc"],
                base_dev_auc,
                decision.drop,
                decision.upper_bound,
                decision.z,
                test["auc"],
                "" if ok else f"  [the drop may exceed {p.max_auc_drop}: keeping the previous model]",
            )
        if not ok:
            rejected.update(removed)
            rejections_in_a_row += 1
            if rejections_in_a_row >= p.max_rejections:
                reason = "max_auc_drop"
                break
            if env.is_main:
                shutil.rmtree(ckpt.parent, ignore_errors=True)  # the rejected candidate
            continue
        rejections_in_a_row = 0
        if env.is_main:  # every rank has loaded what it needed from the previous model
            shutil.rmtree(accepted.checkpoint.parent, ignore_errors=True)
        accepted = Candidate(
            pruned.cfg, pruned.model, pruned.optimizer, pruned.configs, pruned.dataset, ckpt, nbytes, pruned.plan
        )
    confirmed = confirmation_check(accepted.model, accepted.dataset, base_confirm, t.eval_batch_size, env)
    if env.is_main:  # (the log, whatever --no-progress says: it hides progress bars only)
        log.info(
            "confirmation split (%d rows, no decision read it): AUC %.4f against the base model's %.4f, "
            "drop %.4f (SE %.4f)",
            confirmed["rows"],
            confirmed["auc"],
            confirmed["base_auc"],
            confirmed["drop"],
            confirmed["standard_error"],
        )
    return (
        accepted,
        log_rows,
        reason,
        {
            "dev_auc": base_dev_auc,
            "test_auc": log_rows[0]["test_auc"],
            "embedding_bytes": base_bytes,
            "resolution": resolution,
            "confirmation": confirmed,
            "base_confirm": base_confirm,
        },
    )


def write_prune_log(rows: List[Dict[str, Any]], out_dir: Path) -> None:
    """Write prune_log.json, prune_log.csv and auc_vs_memory.png of the pruning loop.

    Args:
        rows: the loop's log rows (`prune_loop`).
        out_dir: the directory (existing).
    """
    (out_dir / "prune_log.json").write_text(json.dumps(rows, indent=2))
    keys = [
        "iteration",
        "removed",
        "memory_ratio",
        "dev_auc",
        "test_auc",
        "dev_logloss",
        "test_logloss",
        "dev_auc_drop",
        "dev_auc_drop_standard_error",
        "dev_auc_drop_upper_bound",
        "seconds",
        "scoring_seconds",
        "finetune_epochs_kept",
        "accepted",
    ]
    with open(out_dir / "prune_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([";".join(r[k]) if isinstance(r.get(k), list) else r.get(k, "") for k in keys])
    plot_prune_log(rows, out_dir / "auc_vs_memory.png")


def prune_job(cfg: JobConfig) -> Dict[str, Any]:
    """One rank of `shark prune`.

    Args:
        cfg: the validated config.

    Returns:
        The pruned model's metrics with the base model's and the loop's (also written to
        OUT_DIR/metrics.json), on every rank.
    """
    with job_rank(cfg, TRAIN_OUT_DIR) as (env, out_dir):
        base = base_model(cfg, env)
        accepted, rows, reason, base_metrics = prune_loop(cfg, env, base, out_dir)
        # The pruned model, as a checkpoint any shark command can start from.
        final_cfg = copy.deepcopy(accepted.cfg)
        final_cfg.run.out_dir = cfg.run.out_dir
        save_checkpoint(
            out_dir / "pruned",
            0,
            accepted.model,
            accepted.optimizer,
            _meta(final_cfg, TrainState(), accepted.configs, env, accepted.dataset.full_schema),
            keep=1,
        )
        if env.is_main and accepted.plan is not None:  # without the removed tables
            (out_dir / "pruned" / "sharding_plan.txt").write_text(str(accepted.plan))
        trained = TrainedModel(
            accepted.model,
            accepted.optimizer,
            accepted.dataset,
            env,
            accepted.configs,
            TrainState(),
            base.train_seconds,
        )
        metrics = final_metrics(final_cfg, trained)
        full = list(base.dataset.schema.sparse_names)
        kept = list(accepted.dataset.schema.sparse_names)
        metrics.update(
            base_test_auc=base_metrics["test_auc"],
            base_dev_auc=base_metrics["dev_auc"],
            base_embedding_bytes=base_metrics["embedding_bytes"],
            memory_ratio=metrics["embedding_bytes"] / base_metrics["embedding_bytes"],
            kept_fields=kept,
            pruned_fields=[f for f in full if f not in kept],
            stop_reason=reason,
            selection_resolution=base_metrics["resolution"],
            confirmation=base_metrics["confirmation"],
            iterations=rows,
            method=canonical_method(cfg.prune.method),
            field_removal=final_cfg.model.field_removal,  # the model's (a --checkpoint's), not the flag's
        )
        if env.is_main:
            write_prune_log(rows, out_dir)
            write_metrics(cfg, metrics)
    return metrics
