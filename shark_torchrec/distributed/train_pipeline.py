"""A TorchRec train pipeline that gives the mixed-precision collections their labels.

Paper Eq. 7 weighs a row's positive examples by alpha, so the rank that owns a row must know
the label of every sample whose id reached it. The label rides in the lowest mantissa bit of
the id's per-id weight (`shark_torchrec.precision.labels.tag_labels`) and travels with the id
through TorchRec's input all-to-all. `LabelTaggingTrainPipeline` tags every batch as it comes
from the data loader, so a training loop needs no step of its own:

    pipeline = LabelTaggingTrainPipeline(dmp, optimizer, device)
    while True:
        pipeline.progress(batches)       # batches: an iterator of TorchRec-style Batch objects

Without it (or `tag_labels`), the collections warn once and count every id as a negative.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.precision.labels import tag_labels


def tag_batch(batch: Any, labels_of: Callable[[Any], torch.Tensor], features: Optional[Sequence[str]] = None) -> Any:
    """A copy of `batch` whose KeyedJaggedTensor fields carry each sample's label in their ids'
    weights.

    Args:
        batch: a dataclass or object holding KJTs as attributes (TorchRec's `Batch` has
            `sparse_features` and `labels`).
        labels_of: returns the batch's labels [B] (0/1; > 0.5 counts as positive).
        features: names of the KJT attributes to tag (default: every KJT attribute). Tag only
            inputs of mixed-precision collections: a stock weighted collection would pool with
            the tagged weights (off by one unit in the last place).

    Returns:
        The same kind of object with tagged KJTs (the original is not modified).
    """
    labels = labels_of(batch)
    names = (
        list(features)
        if features is not None
        else [k for k, v in vars(batch).items() if isinstance(v, KeyedJaggedTensor)]
    )
    tagged = {name: tag_labels(getattr(batch, name), labels) for name in names}
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **tagged)
    out = copy.copy(batch)
    for name, kjt in tagged.items():
        setattr(out, name, kjt)
    return out


class LabelTaggingTrainPipeline(TrainPipelineSparseDist):
    """`TrainPipelineSparseDist` that tags each batch's ids with its labels (see module doc).

    Args:
        model, optimizer, device: as for `TrainPipelineSparseDist`.
        labels_of: the batch's labels (default: `batch.labels`).
        features: KJT attributes to tag (default: every KJT attribute of the batch).
        **kwargs: passed on to `TrainPipelineSparseDist`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        labels_of: Callable[[Any], torch.Tensor] = lambda batch: batch.labels,
        features: Optional[Sequence[str]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, optimizer, device, **kwargs)
        self._labels_of = labels_of
        self._features = features

    def _next_batch(self, dataloader_iter: Iterator[Any]) -> Optional[Any]:
        batch = super()._next_batch(dataloader_iter)
        return None if batch is None else tag_batch(batch, self._labels_of, self._features)
