"""The whole model as one TorchScript module on plain tensors, for serving without this package
or TorchRec (torch, plus our kernel library for the lookup op, `torch.ops.load_library`):

    forward(dense [B, Nd] float32, values [nnz] int64, lengths [F * B] int) -> logits [B]

`values` and `lengths` are the model's categorical fields laid out feature-major, as a
KeyedJaggedTensor lays them out (bag f * B + b is field f of sample b); a pruned model takes its
kept fields only. The logits are those of the exported `DLRMTrainModule` on the same batch.

Two parts, compiled two ways:
- the lookup (`MixedPrecisionPooledLookup`) is scripted: its shapes depend on the ids;
- the dense part (bottom MLP, interaction, top MLP, and a `constant` pruned model's vectors for
  the removed fields) is traced: it has no data-dependent control flow, and tracing records its
  tensor ops whatever TorchRec's modules are written with (DLRM_DCN's `LowRankCrossNet` does not
  script: it indexes a ParameterList with a loop variable). The batch size stays symbolic in
  the trace; `serving_model` checks that on a batch of another size.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.models.dlrm import DLRMTrainModule
from shark_torchrec.models.pruned import DLRMWithConstantFields, fill_constant_fields
from shark_torchrec.modules.inference import MixedPrecisionPooledLookup

TRACE_BATCH = 3  # batch size of the dense part's trace example
CHECK_BATCH = 5  # another size, to check the trace did not fix the batch size


class DenseTower(nn.Module):
    """DLRM (or DLRM_DCN, or a `constant` pruned DLRM) after its sparse arch: pooled
    embeddings [B, F, D] and dense features [B, Nd] -> logits [B]."""

    def __init__(self, dlrm: nn.Module) -> None:
        super().__init__()
        self.dense_arch = dlrm.dense_arch
        self.inter_arch = dlrm.inter_arch
        self.over_arch = dlrm.over_arch
        self.fills_removed = isinstance(dlrm, DLRMWithConstantFields)
        if self.fills_removed:
            self.register_buffer("field_constants", dlrm.field_constants.clone())
            self.register_buffer("field_order", dlrm._order.clone())

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        embedded_dense = self.dense_arch(dense)
        if self.fills_removed:
            sparse = fill_constant_fields(sparse, self.field_constants, self.field_order)
        concatenated = self.inter_arch(dense_features=embedded_dense, sparse_features=sparse)
        return self.over_arch(concatenated).squeeze(-1)


class ServingDLRM(nn.Module):
    """The scripted whole: lookup, then the traced dense part. See the module docstring."""

    def __init__(self, lookup: MixedPrecisionPooledLookup, tower: torch.jit.ScriptModule, num_dense: int) -> None:
        super().__init__()
        self.lookup = lookup
        self.tower = tower
        self.num_dense: int = num_dense
        self.num_fields: int = len(lookup.feature_names)
        self.dim: int = lookup.dim
        self.feature_names = list(lookup.feature_names)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits of a batch.

        Args:
            dense: [B, num_dense] float32 dense features (already transformed as in training).
            values: [nnz] int64 row ids, feature-major (see the module docstring).
            lengths: [num_fields * B] ids per bag (1 for single-valued fields).

        Returns:
            [B] float32 logits.
        """
        if dense.dim() != 2 or dense.size(1) != self.num_dense:
            raise ValueError(f"dense of shape {list(dense.shape)}: expected [batch, {self.num_dense}]")
        B = dense.size(0)
        if lengths.dim() != 1 or lengths.numel() != self.num_fields * B:
            raise ValueError(f"lengths of shape {list(lengths.shape)}: expected [{self.num_fields} fields * batch {B}]")
        pooled = self.lookup.pooled(values, lengths, B).view(B, self.num_fields, self.dim)
        return self.tower(dense.to(torch.float32), pooled)


def serving_model(model: DLRMTrainModule, num_dense: int) -> torch.jit.ScriptModule:
    """The model as one TorchScript module on plain tensors (see the module docstring).

    Args:
        model: an inference model (`to_inference` / `export_inference_model`): its DLRM's
            collection is a `MixedPrecisionPooledLookup`. Nothing of it is changed.
        num_dense: dense features the model takes.

    Returns:
        The scripted module (`torch.jit.save` writes it; `torch.jit.load` reads it back with
        torch and our kernel library), already checked against `model` on a random batch.

    Raises:
        TypeError: the model's collection is not our inference collection.
        RuntimeError: the scripted module disagrees with the model on the check batch.
    """
    dlrm = model.model
    ebc = dlrm.sparse_arch.embedding_bag_collection
    if not isinstance(ebc, MixedPrecisionPooledLookup):
        raise TypeError(
            f"serving_model: the model's collection is {type(ebc).__name__}, not the inference collection "
            "(convert it with shark_torchrec.jobs.export.to_inference first)"
        )
    lookup = ebc.plain_lookup()
    F, D = len(lookup.feature_names), lookup.dim
    # A copy: the serving weights need no gradients, and the model keeps its own flags.
    tower = copy.deepcopy(DenseTower(dlrm)).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        example = (
            torch.randn(TRACE_BATCH, num_dense, generator=generator),
            torch.randn(TRACE_BATCH, F, D, generator=generator),
        )
        traced = torch.jit.trace(tower, example, check_trace=False)
    scripted = torch.jit.script(ServingDLRM(lookup, traced, num_dense))
    _check_against(model, scripted, lookup, num_dense, generator)
    return scripted


def _check_against(model, scripted, lookup: MixedPrecisionPooledLookup, num_dense: int, generator) -> None:
    """Scripted and eager logits on a random batch of CHECK_BATCH samples, bags of 0 to 2 ids."""
    F, B = len(lookup.feature_names), CHECK_BATCH
    lengths = torch.randint(0, 3, (F * B,), generator=generator)
    limit = torch.repeat_interleave(lookup.feature_rows.repeat_interleave(B), lengths)
    values = (torch.rand(int(lengths.sum()), generator=generator) * limit).long()
    dense = torch.randn(B, num_dense, generator=generator)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(lookup.feature_names), values=values, lengths=lengths)
    with torch.no_grad():
        want = model.model(dense, kjt).squeeze(-1)
        got = scripted(dense, values, lengths)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=1e-5):
        raise RuntimeError(
            f"serving_model: the scripted model's logits {got.tolist()} differ from the model's {want.tolist()} "
            "on a check batch"
        )
