"""Labels that travel with the ids.

F-Quantization counts, for every row, the positive and negative examples that contain it.
The row may live on another rank, so the label must travel with the id through TorchRec's
input all-to-all. We put it in the lowest mantissa bit of the id's fp32 weight: tables
without real per-id weights get weight 1.0 tagged with the label, tables with real weights
keep them to within one unit in the last place. The row-group kernel reads the tag as a
count and, for unweighted tables, never uses the weight for pooling.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def tag_labels(kjt: KeyedJaggedTensor, labels: torch.Tensor) -> KeyedJaggedTensor:
    """The KJT with each id's weight carrying its sample's label (0/1) in the lowest bit.

    Args:
        kjt: the ids (weighted or not).
        labels: [B] the samples' labels (> 0.5 counts as positive).

    Returns:
        A new KJT: the same keys, ids and lengths, weights 1.0 (or the old weights) with the
        lowest mantissa bit set to the label.
    """
    per_sample = (labels > 0.5).to(torch.int32).repeat(len(kjt.keys()))
    tag = torch.repeat_interleave(per_sample, kjt.lengths())
    base = kjt.weights_or_none()
    if base is None:
        base = torch.ones_like(kjt.values(), dtype=torch.float32)
    bits = (base.float().contiguous().view(torch.int32) & ~1) | tag
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values(),
        lengths=kjt.lengths(),
        weights=bits.view(torch.float32),
    )


def split_tagged(weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-id weights with the tag bit cleared, labels 0/1 as float32).

    Args:
        weights: float32 weights tagged by `tag_labels`.

    Returns:
        (the weights without the tag, the labels).
    """
    bits = weights.contiguous().view(torch.int32)
    return (bits & ~1).view(torch.float32), (bits & 1).to(torch.float32)
