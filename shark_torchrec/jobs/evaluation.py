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
    model of its own).

    Args:
        values: this rank's values [n].
        valid: [n] bool, the entries to keep.
        world_size: the job's ranks.

    Returns:
        The valid entries of rank 0, then rank 1, ... (collective when gathering).
    """
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
    """AUC and mean log loss of logits against 0/1 labels (computed in float64).

    Args:
        logits: [n] logits.
        labels: [n] 0/1 labels.

    Returns:
        {"auc", "logloss", "count"}; NaN figures and count 0 when there are no samples.
    """
    if logits.numel() == 0:
        return {"auc": float("nan"), "logloss": float("nan"), "count": 0}
    logloss = F.binary_cross_entropy_with_logits(logits.double(), labels.double()).item()
    auc = binary_auroc(torch.sigmoid(logits.double()), labels.long()).item()
    return {"auc": auc, "logloss": logloss, "count": int(labels.numel())}


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: Dataset, split: str, global_batch: int, env: DistEnv, progress: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of every sample of a split, gathered from all ranks.

    Args:
        model: a `DLRMTrainModule` (sharded or not); left in its training mode.
        dataset: the data.
        split: the split's name.
        global_batch: samples per global batch.
        env: the ranks (collective when there are several).
        progress: show a progress bar (rank 0).

    Returns:
        (logits [n], labels [n]) of the real samples: rank 0's, then rank 1's, ... (`gather_valid`).
    """
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
    """`binary_metrics` of a model's predictions on a split (`predict`).

    Args:
        model, dataset, split, global_batch, env, progress: as for `predict`.

    Returns:
        {"auc", "logloss", "count"} over the whole split.
    """
    return binary_metrics(*predict(model, dataset, split, global_batch, env, progress))
