"""AUC and log loss over a split, each rank's predictions counted once."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from tqdm import tqdm

from shark_torchrec.data import Dataset
from shark_torchrec.distributed.env import DistEnv


def gather_valid(values: torch.Tensor, valid: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's valid entries, in rank order (uneven counts allowed). A job of
    `world_size` 1 gathers nothing, also inside a multi-process group (one rank evaluating a
    model of its own)."""
    local = values[valid]
    if world_size == 1 or not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    n = torch.tensor([local.numel()], dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    size = int(max(c.item() for c in counts))
    padded = torch.zeros(size, dtype=local.dtype)
    padded[: local.numel()] = local
    out = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(c.item())] for o, c in zip(out, counts)])


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    if logits.numel() == 0:
        return {"auc": float("nan"), "logloss": float("nan"), "count": 0}
    logloss = F.binary_cross_entropy_with_logits(logits.double(), labels.double()).item()
    auc = binary_auroc(torch.sigmoid(logits.double()), labels.long()).item()
    return {"auc": auc, "logloss": logloss, "count": int(labels.numel())}


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: Dataset, split: str, global_batch: int, env: DistEnv, progress: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every sample of a split, gathered from all ranks."""
    was_training = model.training
    model.eval()
    logits, labels, valid = [], [], []
    batches = dataset.batches(split, global_batch, env.rank, env.world_size)
    total = dataset.num_batches(split, global_batch)
    for batch in tqdm(batches, total=total, desc=f"eval {split}", disable=not (progress and env.is_main), leave=False):
        _, (_, out, y, w) = model(batch.to(env.device))
        logits.append(out.float().cpu())
        labels.append(y.cpu())
        valid.append(w.cpu() > 0)
    model.train(was_training)
    v = torch.cat(valid)
    return gather_valid(torch.cat(logits), v, env.world_size), gather_valid(torch.cat(labels), v, env.world_size)


def evaluate(
    model, dataset: Dataset, split: str, global_batch: int, env: DistEnv, progress: bool = False
) -> Dict[str, float]:
    return binary_metrics(*predict(model, dataset, split, global_batch, env, progress))
