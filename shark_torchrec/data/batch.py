"""The batch the training pipeline moves around, and its construction from numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One rank's share of a global batch.

    Local batches have a fixed size (global batch / world size). Slots left empty by skipped
    bad lines or by the end of a split are padding: their `sample_weights` is 0 and their
    features are empty, so they add nothing to the loss, the gradients or the metrics.
    """

    dense_features: torch.Tensor  # [B, num_dense] float32
    sparse_features: KeyedJaggedTensor  # one key per categorical field, unweighted
    labels: torch.Tensor  # [B] float32
    sample_weights: torch.Tensor  # [B] float32, 1 for a real sample, 0 for padding

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """The batch with every tensor moved to `device` (TorchRec's `Pipelineable`).

        Args:
            device: where the tensors go.
            non_blocking: copy asynchronously where the source allows (pinned memory).

        Returns:
            A new Batch.
        """
        return Batch(
            self.dense_features.to(device=device, non_blocking=non_blocking),
            self.sparse_features.to(device=device, non_blocking=non_blocking),
            self.labels.to(device=device, non_blocking=non_blocking),
            self.sample_weights.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor as used on `stream` (TorchRec's `Pipelineable`).

        Args:
            stream: the stream that uses the batch.
        """
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)
        self.sample_weights.record_stream(stream)

    def pin_memory(self) -> "Batch":
        """The batch with every tensor in pinned memory (TorchRec's `Pipelineable`).

        Returns:
            A new Batch.
        """
        return Batch(
            self.dense_features.pin_memory(),
            self.sparse_features.pin_memory(),
            self.labels.pin_memory(),
            self.sample_weights.pin_memory(),
        )

    @property
    def num_samples(self) -> int:
        """Real samples in the batch (padding not counted)."""
        return int(self.sample_weights.sum().item())

    def id_label_weights(self) -> KeyedJaggedTensor:
        """The sparse features with each id weighted by its sample's label.

        This is how a per-id label reaches the rank that owns the id's row: the weights
        travel with the ids through TorchRec's input all-to-all.

        Returns:
            A weighted KJT: the same keys, values and lengths, and float32 weights, one per id.
        """
        kjt = self.sparse_features
        per_sample = self.labels.repeat(len(kjt.keys()))
        weights = torch.repeat_interleave(per_sample, kjt.lengths())
        return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights)


def make_batch(
    keys: List[str],
    labels: np.ndarray,
    dense: np.ndarray,
    ids: np.ndarray,
    valid: np.ndarray,
) -> Batch:
    """Build a Batch from per-sample arrays of single-valued categorical fields.

    labels [B], dense [B, Nd], ids [B, Ns] (int64), valid [B] bool (False = padding).

    Args:
        keys: the categorical fields, in the order of `ids`' columns (the KJT's keys).
        labels: [B] 0/1 labels.
        dense: [B, Nd] dense features.
        ids: [B, Ns] one row id per sample and field.
        valid: [B] False for padding slots: their weight, label and dense features are 0 and
            their bags empty.

    Returns:
        The batch.
    """
    B = labels.shape[0]
    mask = np.broadcast_to(valid[None, :], (len(keys), B))  # key-major, as KJT lays out
    lengths = mask.astype(np.int32).reshape(-1)
    values = ids.T[mask]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
        lengths=torch.from_numpy(lengths),
    )
    w = valid.astype(np.float32)
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32) * w[:, None]),
        sparse_features=kjt,
        labels=torch.from_numpy(labels.astype(np.float32) * w),
        sample_weights=torch.from_numpy(w),
    )


def empty_arrays(batch_size: int, num_dense: int, num_sparse: int):
    """Zeroed arrays of one local batch, every slot padding until a reader fills it.

    Args:
        batch_size: slots of the local batch.
        num_dense, num_sparse: dense and categorical columns.

    Returns:
        (labels float32 [B], dense float32 [B, Nd], ids int64 [B, Ns], valid bool [B], all False).
    """
    return (
        np.zeros(batch_size, np.float32),
        np.zeros((batch_size, num_dense), np.float32),
        np.zeros((batch_size, num_sparse), np.int64),
        np.zeros(batch_size, bool),
    )
