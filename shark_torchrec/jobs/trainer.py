"""The training job behind `shark train`: data, DMP model, pipeline, evaluation, checkpoints."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from shark_torchrec.config import ConfigError, JobConfig, config_to_dict, save_config, with_absolute_paths
from shark_torchrec.data import Dataset, open_dataset
from shark_torchrec.distributed.env import DistEnv, init_distributed, shutdown_distributed
from shark_torchrec.distributed.memory import embedding_memory
from shark_torchrec.distributed.mixed_precision import ShardedMixedPrecisionModule
from shark_torchrec.distributed.sharding import (
    build_optimizer,
    embedding_configs,
    init_embedding_weights,
    shard_model,
)
from shark_torchrec.distributed.train_pipeline import LabelTaggingTrainPipeline
from shark_torchrec.jobs.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    resolve_checkpoint_on_rank0,
    save_checkpoint,
    table_shapes,
)
from shark_torchrec.jobs.evaluation import evaluate
from shark_torchrec.jobs.run_dir import check_writable, default_out_dir, refuse_earlier_run, run_dir_lock
from shark_torchrec.models.build import model_from_config
from shark_torchrec.modules.model_budget import share_model_budget

log = logging.getLogger("shark")

TRAIN_OUT_DIR = "runs/%Y%m%d-%H%M%S"  # a run without --out-dir: a new directory per run (UTC)


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides the tensors."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_dev_auc: float = float("-inf")
    evals_since_best: int = 0
    stopped_early: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    """Seconds spent in the training loop up to this state, over every resumed part (a resumed
    run reported only its own part: 3e-06 s for a finished run resumed)."""


@dataclass
class TrainedModel:
    """What later stages (importance, pruning, compression) start from."""

    model: torch.nn.Module
    optimizer: Any
    dataset: Dataset
    env: DistEnv
    configs: Dict[str, Any]
    state: TrainState
    train_seconds: float = 0.0


def _report_bad_lines(dataset: Dataset, env: DistEnv) -> Dict[str, int]:
    counts = {}
    for split in ("train", "dev", "test"):
        stats = dataset.bad_lines(split)
        if stats is None:
            continue
        n = torch.tensor([stats.count])
        examples = [stats.examples]
        if env.world_size > 1:
            dist.all_reduce(n)
            gathered: List[Any] = [None] * env.world_size
            dist.all_gather_object(gathered, stats.examples)
            examples = gathered
        counts[split] = int(n.item())
        if counts[split] and env.is_main:
            first = [e for ex in examples for e in ex][: stats.max_examples]
            log.warning("skipped %d malformed line(s) in %s; first: %s", counts[split], split, "; ".join(first))
    return counts


def build_sharded_model(cfg: JobConfig, dataset: Dataset, env: DistEnv):
    """The config's model sharded over the ranks by TorchRec's planner, its rows initialised,
    and its optimizer.

    Args:
        cfg: the job's config.
        dataset: the data (a view over the kept fields for a pruned config).
        env: the ranks.

    Returns:
        (the DistributedModelParallel model, its optimizer, the tables' configs, the plan).
    """
    model = model_from_config(cfg, dataset.full_schema)
    configs = embedding_configs(model)
    dmp, plan = shard_model(model, env, cfg.train)
    # --budget-scope model: one budget over every mixed-precision collection (before the rows
    # are written, so they start in the tiers the shared budget gives them).
    shared = share_model_budget(dmp)
    # Our sharded modules were filled from this law and seed when built: only a shared budget,
    # which may have moved their rows between tiers since, makes them write it again.
    init_embedding_weights(dmp, configs, cfg.train.seed, skip_fresh_mixed=shared is None)
    optimizer = build_optimizer(dmp, cfg.train)
    return dmp, optimizer, configs, plan


def _meta(cfg: JobConfig, state: TrainState, configs, env: DistEnv, schema) -> Dict[str, Any]:
    """What a checkpoint says about itself; `schema` (the data's full field list, in order)
    lets a model be rebuilt from the checkpoint alone (export)."""
    return {
        **asdict(state),
        "tables": table_shapes(configs),
        "world_size": env.world_size,
        "config": config_to_dict(with_absolute_paths(cfg)),
        "schema": asdict(schema),
    }


def fit(cfg: JobConfig, env: DistEnv, dataset: Optional[Dataset] = None) -> TrainedModel:
    """Train (or resume) a model as the config says; returns it with its state.

    The model starts from `--checkpoint` (weights and optimizer), `--init-from` (weights
    converted to this precision) or fresh rows; `--resume` continues this run's newest
    checkpoint. With early stopping the best dev model is restored at the end; the final state
    is always saved as a checkpoint. Collective: every rank calls it.

    Args:
        cfg: the job's config (`run.out_dir` is set when empty).
        env: the ranks.
        dataset: the data (default: `open_dataset` of the config); a view not narrowed yet is
            narrowed to `model.kept_fields`.

    Returns:
        The trained model, its optimizer, data, table configs, progress and training seconds.

    Raises:
        ConfigError: batch sizes not divisible by the number of ranks.
        CheckpointError: the checkpoint directory holds an earlier run's checkpoints (without
            `--resume`), a directory cannot be written, or a checkpoint does not fit the model.
    """
    t, run = cfg.train, cfg.run
    uneven = [
        f"{flag} {size}"
        for flag, size in (("--batch-size", t.batch_size), ("--eval-batch-size", t.eval_batch_size))
        if size % env.world_size
    ]
    if uneven:
        raise ConfigError(
            f"{' and '.join(uneven)} must be divisible by the {env.world_size} ranks (global batches, shared out)"
        )
    default_out_dir(run, TRAIN_OUT_DIR)
    ckpt_root = cfg.checkpoint_dir
    if not run.resume and list_checkpoints(ckpt_root):
        raise CheckpointError(
            f"{ckpt_root} already holds checkpoints of an earlier run: pass --resume to continue "
            "it, or choose another --out-dir / --checkpoint-dir (nothing was overwritten)"
        )
    # Before any work: a place that cannot be written would otherwise fail the first save.
    places = {"--out-dir": Path(run.out_dir), "--checkpoint-dir": ckpt_root}
    if run.metrics_out:  # its folder too: a bad one failed only after training (File exists: ...)
        places["--metrics-out"] = Path(run.metrics_out).parent
    check_writable(places)
    dataset = dataset or open_dataset(cfg.dataset, t.seed)
    if cfg.model.kept_fields and dataset.columns is None:
        dataset = dataset.with_fields(list(cfg.model.kept_fields))
    out_dir = Path(run.out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dmp, optimizer, configs, plan = build_sharded_model(cfg, dataset, env)
    shapes = table_shapes(configs)
    state = TrainState()
    best_root = ckpt_root / "best"
    steps_per_epoch = dataset.num_batches("train", t.batch_size)
    loaded_from = None
    if run.resume and list_checkpoints(ckpt_root):
        path = resolve_checkpoint_on_rank0(ckpt_root)
        meta = load_checkpoint(path, dmp, optimizer, shapes, cfg.quant.precision, t.emb_optimizer_state)
        state = TrainState(**{k: meta[k] for k in asdict(TrainState()) if k in meta})
        if env.is_main:
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d of %d)",
                path,
                state.step,
                state.epoch,
                state.batch_in_epoch,
                steps_per_epoch,
            )
    elif run.checkpoint:
        loaded_from = resolve_checkpoint_on_rank0(run.checkpoint)
        loaded_meta = load_checkpoint(loaded_from, dmp, optimizer, shapes, cfg.quant.precision)
    elif run.init_from:
        loaded_from = resolve_checkpoint_on_rank0(run.init_from)
        loaded_meta = load_weights(loaded_from, dmp, shapes, optimizer)
    elif run.resume and env.is_main:
        log.info("nothing to resume in %s: starting at step 0", ckpt_root)
    if loaded_from and env.is_main:
        # (the checkpoint's own step: this run counts its steps from 0)
        log.info("loaded %s (saved at step %s)", loaded_from, loaded_meta.get("step"))
    if env.is_main:
        # The run's record, once its model and checkpoint fit each other: a resume that fails
        # (say, with the data flags forgotten) leaves the record of the run it did not continue.
        save_config(with_absolute_paths(cfg), out_dir / "config.toml")
        if dataset.truth is not None:
            (out_dir / "synthetic_fields.json").write_text(json.dumps(dataset.truth, indent=2))
        (out_dir / "sharding_plan.txt").write_text(str(plan))

    show = run.progress and env.is_main

    def trained_seconds() -> float:
        """The training loop's seconds so far, a resumed run's earlier parts included."""
        return trained_before + time.perf_counter() - start

    def checkpoint() -> None:
        state.train_seconds = trained_seconds()
        save_checkpoint(
            ckpt_root,
            state.step,
            dmp,
            optimizer,
            _meta(cfg, state, configs, env, dataset.full_schema),
            run.keep_checkpoints,
        )

    def dev_eval() -> bool:
        """Evaluate on dev; True when early stopping says stop."""
        m = evaluate(dmp, dataset, "dev", t.eval_batch_size, env, show)
        improved = m["auc"] > state.best_dev_auc
        if improved:
            state.best_dev_auc, state.evals_since_best = m["auc"], 0
            if t.early_stopping_patience:
                # Early stopping returns the best model, so keep it as it is now.
                state.train_seconds = trained_seconds()
                save_checkpoint(
                    best_root, state.step, dmp, optimizer, _meta(cfg, state, configs, env, dataset.full_schema), keep=1
                )
        else:
            state.evals_since_best += 1
        state.history.append(
            {"step": state.step, "epoch": state.epoch, "dev_auc": m["auc"], "dev_logloss": m["logloss"]}
        )
        if show:
            tqdm.write(f"step {state.step}: dev auc {m['auc']:.4f} logloss {m['logloss']:.4f}")
        return bool(t.early_stopping_patience and state.evals_since_best >= t.early_stopping_patience)

    start = time.perf_counter()
    trained_before = state.train_seconds  # a resumed run's earlier parts
    if run.init_from and t.early_stopping_patience and state.step == 0 and not state.history:
        # A converted model is a candidate as it is: fine-tuning a trained model on data it
        # has seen can only make it worse, and early stopping then keeps the conversion.
        dev_eval()
    done = state.stopped_early or (t.max_steps and state.step >= t.max_steps)
    while not done and state.epoch < t.epochs:
        batches = dataset.batches("train", t.batch_size, env.rank, env.world_size, state.batch_in_epoch)
        pipeline = train_pipeline(dmp, optimizer, env.device, cfg.quant.precision)
        bar = tqdm(
            total=steps_per_epoch, initial=state.batch_in_epoch, desc=f"train epoch {state.epoch}", disable=not show
        )
        for _ in pipeline_steps(pipeline, batches, bar):  # (the loop is entered below max_steps)
            state.step += 1
            state.batch_in_epoch += 1
            if t.eval_every and state.step % t.eval_every == 0:
                pipeline.detach()
                stop = dev_eval()
                pipeline.attach(dmp)
                if stop:
                    state.stopped_early = done = True
            if run.checkpoint_every and state.step % run.checkpoint_every == 0:
                checkpoint()
            if run.fail_at_step and state.step == run.fail_at_step:
                os._exit(17)  # testing aid: die as a killed job would, without cleanup
            if t.max_steps and state.step >= t.max_steps:
                done = True
            if done:
                break
        pipeline.detach()
        bar.close()
        if state.batch_in_epoch >= steps_per_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0
            if not t.eval_every and not done and dev_eval():
                state.stopped_early = done = True
    train_seconds = trained_seconds()
    if t.early_stopping_patience and list_checkpoints(best_root):
        best = resolve_checkpoint_on_rank0(best_root)
        load_checkpoint(best, dmp, optimizer, shapes, cfg.quant.precision)
        if env.is_main:
            # (Restored whether or not the run stopped early: the last model need not be the best.)
            what = "stopped early" if state.stopped_early else "ran to its end"
            log.info("early stopping: the run %s; restored the best dev model (%s)", what, best.name)
    checkpoint()
    return TrainedModel(dmp, optimizer, dataset, env, configs, state, train_seconds)


def train_steps(
    model,
    optimizer,
    batches,
    env: DistEnv,
    precision: str,
    total: int = 0,
    desc: str = "train",
    show: bool = False,
    max_steps: int = 0,
) -> int:
    """Train over `batches` (already this rank's share) with TorchRec's pipeline, for at most
    `max_steps` steps (0: all of them).

    Args:
        model, optimizer: the sharded model and its optimizer.
        batches: an iterator of this rank's batches.
        env: the ranks (their device).
        precision: the model's `--precision` (`train_pipeline`).
        total: batches expected, for the progress bar (0: unknown).
        desc: the progress bar's label.
        show: show the progress bar.
        max_steps: the most steps to take (0: no limit).

    Returns:
        The steps taken.
    """
    pipeline = train_pipeline(model, optimizer, env.device, precision)
    steps = 0
    with tqdm(total=total or None, desc=desc, disable=not show, leave=False) as bar:
        for _ in pipeline_steps(pipeline, batches, bar):
            steps += 1
            if max_steps and steps >= max_steps:
                break
    pipeline.detach()
    return steps


def pipeline_steps(pipeline: TrainPipelineSparseDist, batches, bar: tqdm) -> Iterator[torch.Tensor]:
    """The one training loop: step TorchRec's `pipeline` over `batches` until they run out,
    each step shown on the progress bar; the caller stops early by leaving the loop.

    Args:
        pipeline: the train pipeline (its model and optimizer step in `progress`).
        batches: this rank's batches.
        bar: the progress bar to advance.

    Yields:
        Each step's loss, after the step.
    """
    while True:
        try:
            loss, _, _, weights = pipeline.progress(batches)  # the model output: (loss, logits, labels, weights)
        except StopIteration:
            return
        bar.update(1)
        bar.set_postfix(loss=f"{sample_mean_loss(loss, weights):.4f}", refresh=False)
        yield loss


def sample_mean_loss(loss: torch.Tensor, weights: torch.Tensor) -> float:
    """A step's loss per real sample, as the progress bar shows it. The loss the model trains
    on divides by the batch's slots, padding included (`DLRMTrainModule`), so a last, partial
    batch of an epoch would read several times lower than the steps before it.

    Args:
        loss: the step's loss (the weighted sum over the batch's slots / their number).
        weights: the batch's sample weights (0 for padding).

    Returns:
        The loss over the real samples (0.0 for a batch of padding only).
    """
    real = float(weights.sum())
    return float(loss) * weights.numel() / real if real > 0 else 0.0


def train_pipeline(model, optimizer, device: torch.device, precision: str) -> TrainPipelineSparseDist:
    """TorchRec's pipeline; for our mixed-precision tables the one that gives them the labels
    (stock fp32 tables would pool with the tagged weights, so they get the plain one).

    Args:
        model, optimizer: the sharded model and its optimizer.
        device: the rank's device.
        precision: the model's `--precision` (`fp32`: stock tables).

    Returns:
        The pipeline (it runs every batch, `execute_all_batches`).
    """
    if precision == "fp32":
        return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
    return LabelTaggingTrainPipeline(model, optimizer, device, features=["sparse_features"], execute_all_batches=True)


def peak_rss_bytes(env: DistEnv) -> int:
    """The largest peak resident set size over the ranks (Linux reports KiB).

    Args:
        env: the ranks (collective when there are several).

    Returns:
        Bytes.
    """
    import resource

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.float64)
    if env.world_size > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return int(peak.item())


def final_metrics(cfg: JobConfig, trained: TrainedModel) -> Dict[str, Any]:
    """A trained model's figures (metrics.json): test and dev AUC and log loss, time and
    steps, embedding, optimizer and priority bytes (`embedding_memory`), rows per group, the
    mixed-precision overhead, skipped lines, world size, peak memory and the dev history.
    Collective: every rank calls it.

    Args:
        cfg: the config it was trained with.
        trained: what `fit` returned.

    Returns:
        The figures, on every rank.
    """
    env, t = trained.env, cfg.train
    show = cfg.run.progress and env.is_main
    test = evaluate(trained.model, trained.dataset, "test", t.eval_batch_size, env, show)
    dev = evaluate(trained.model, trained.dataset, "dev", t.eval_batch_size, env, show)
    memory = embedding_memory(trained.model, trained.optimizer, trained.configs)
    bad = _report_bad_lines(trained.dataset, env)
    overhead = {"priority_seconds": 0.0, "reassign_seconds": 0.0}
    for m in trained.model.modules():
        if isinstance(m, ShardedMixedPrecisionModule):
            for k, v in m.overhead_seconds().items():
                overhead[k] += v
    return {
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "dev_auc": dev["auc"],
        "dev_logloss": dev["logloss"],
        "train_seconds": trained.train_seconds,
        "steps": trained.state.step,
        "epochs_completed": trained.state.epoch,
        "stopped_early": trained.state.stopped_early,
        "embedding_bytes": memory["embedding_bytes"],
        "optimizer_bytes": memory["optimizer_bytes"],
        "fp32_embedding_bytes": memory["fp32_embedding_bytes"],
        "priority_bytes": memory["priority_bytes"],
        **{k: memory[k] for k in memory if k.startswith("rows_")},
        "precision": cfg.quant.precision,
        **overhead,
        "tables": memory["tables"],
        "bad_lines": bad,
        "world_size": env.world_size,
        "peak_rss_bytes": peak_rss_bytes(env),
        "dev_history": trained.state.history,
    }


def write_metrics(cfg: JobConfig, metrics: Dict[str, Any]) -> None:
    """Write metrics as JSON to OUT_DIR/metrics.json and, when given, to `--metrics-out`.

    Args:
        cfg: the job's config (`run.out_dir`, `run.metrics_out`).
        metrics: JSON-able figures.
    """
    text = json.dumps(metrics, indent=2)
    Path(cfg.run.out_dir, "metrics.json").write_text(text)
    if cfg.run.metrics_out:
        p = Path(cfg.run.metrics_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def quiet_libraries() -> None:
    """Keep our progress readable: TorchRec/torch deprecation chatter is not for users."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    # Importing fbgemm_gpu calls logging.info, which sets the root logger up first (WARNING, bare
    # format): force ours, and let our own INFO lines (resume point, early stopping) through.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("shark").setLevel(logging.INFO)
    for noisy in ("torchrec", "torch", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@contextmanager
def job_rank(cfg: JobConfig, default_out: str, command: str = "train") -> Iterator[Tuple[DistEnv, Path]]:
    """What every job does first and last on each of its ranks: quiet the libraries, join the
    process group, name the run directory (`default_out`, a strftime pattern, when `--out` is
    not given) and hold its lock; leave the process group however the job ends.

    Args:
        cfg: the job's config (its `run.out_dir` is set when empty).
        default_out: the run directory's pattern without `--out`.
        command: the job's command (`train`, `compress`): a resumed job refuses another's run
            directory (`refuse_earlier_run`).

    Yields:
        (this rank's environment, the run directory).
    """
    quiet_libraries()
    env = init_distributed()
    try:
        out = Path(default_out_dir(cfg.run, default_out))
        with run_dir_lock(out, env.is_main):
            refuse_earlier_run(out, cfg.run.resume, command)
            yield env, out
    finally:
        shutdown_distributed()


def train_job(cfg: JobConfig) -> Dict[str, Any]:
    """One rank of `shark train`.

    Args:
        cfg: the validated config.

    Returns:
        The run's metrics (`final_metrics`), on every rank.
    """
    with job_rank(cfg, TRAIN_OUT_DIR) as (env, out):
        trained = fit(cfg, env)
        metrics = {"out_dir": str(out), **final_metrics(cfg, trained)}  # where the run wrote, named
        if env.is_main:
            write_metrics(cfg, metrics)
    return metrics
