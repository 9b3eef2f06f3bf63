"""Rank functions for the pruning tests (run by `launch` on 1 or 2 processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from shark_torchrec.config import JobConfig
from shark_torchrec.distributed.env import init_distributed, shutdown_distributed
from shark_torchrec.importance.model_scoring import FieldView, score_fields
from shark_torchrec.jobs.checkpoint import resolve_checkpoint, save_checkpoint
from shark_torchrec.jobs.evaluation import evaluate
from shark_torchrec.jobs.remove_tables import prune_tables
from shark_torchrec.jobs.trainer import fit, quiet_libraries, train_steps


def tiny_config(out: str, precision: str = "fp32", removal: str = "slice") -> JobConfig:
    cfg = JobConfig()
    d, m, t = cfg.dataset, cfg.model, cfg.train
    d.synthetic_train_rows, d.synthetic_eval_rows, d.synthetic_scale = 4000, 1000, 0.02
    t.batch_size, t.eval_batch_size = 128, 512
    m.embedding_dim, m.dense_arch, m.over_arch = 8, (16,), (16,)
    m.field_removal = removal
    cfg.quant.precision = precision
    if precision == "shark":
        cfg.quant.memory_budget, cfg.quant.reassign_every = 0.7, 10
    cfg.run.out_dir, cfg.run.progress = out, False
    return cfg.validate()


def prune_and_compare(out: str, precision: str, removal: str, removed: List[str], feed_full: bool = False) -> Dict:
    """Train, remove `removed`, and compare the pruned model's logits with the old model's
    head fed v_i = 0 (slice) or E[v_i] (constant); then fine-tune the pruned model.

    `feed_full`: the pruned model gets batches that still carry the removed features (instead
    of the pruned dataset view) for comparison, evaluation and training."""
    quiet_libraries()
    env = init_distributed()
    try:
        cfg = tiny_config(out, precision, removal)
        tm = fit(cfg, env)
        imp = score_fields(tm.model, tm.dataset, "taylor-abs", "dev", 512, env)
        ckpt = resolve_checkpoint(Path(out) / "checkpoints")
        pruned = prune_tables(
            tm.model, tm.optimizer, cfg, tm.dataset, env, removed, ckpt, {f: imp.mean_of(f) for f in removed}
        )
        # The pruned model as it starts, before any fine-tuning, for the caller to compare.
        save_checkpoint(Path(out) / "pruned", 0, pruned.model, pruned.optimizer, {}, keep=1)
        planned = sorted({t for per_module in pruned.plan.plan.values() for t in per_module})
        old = FieldView(tm.model, has_dense=True)
        tm.model.eval()
        pruned.model.eval()
        diff = 0.0
        with torch.no_grad():
            full = tm.dataset.batches("dev", 512, env.rank, env.world_size)
            data = tm.dataset if feed_full else pruned.dataset
            view = data.batches("dev", 512, env.rank, env.world_size)
            for batch, small in zip(full, view):
                kept = [f for f in old.sparse_names if f not in removed]
                assert small.sparse_features.keys() == (old.sparse_names if feed_full else kept)
                v = old.lookup(batch)
                for f in removed:
                    i = 1 + old.sparse_names.index(f)
                    v[:, i] = 0.0 if removal == "slice" else imp.mean_of(f)
                want = old.head(v)
                _, (_, got, _, _) = pruned.model(small)
                diff = max(diff, (got - want).abs().max().item())
        before = evaluate(pruned.model, data, "dev", 512, env)
        pruned.model.train()
        batches = data.batches("train", 128, env.rank, env.world_size)
        steps = train_steps(pruned.model, pruned.optimizer, batches, env, precision)
        after = evaluate(pruned.model, data, "dev", 512, env)
        return {
            "planned": planned,
            "max_diff": diff,
            "steps": steps,
            "auc_before": before["auc"],
            "auc_after": after["auc"],
        }
    finally:
        shutdown_distributed()
