"""What a TorchRec user gets without SHARK, beside what `shark compress` made: TorchRec's own
post-training quantization (`quantize_embeddings`) of the base fp32 model, int8 and int4.

The comparison is read on the confirmation split (`Dataset.decision_splits`), which no
decision of the pipeline read, and paired (DeLong): each model against the base model, and
TorchRec's int4 against the compressed model. "No worse" means not below by more than one
standard error (the frontier benchmark's rule). Bytes are as allocated: TorchRec's rows padded
to its row alignment, ours as the inference module holds them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from shark_torchrec.data import CONFIRM, Dataset
from shark_torchrec.distributed.env import DistEnv
from shark_torchrec.importance.significance import paired_auc
from shark_torchrec.train.evaluation import predict
from shark_torchrec.train.export import load_trained_model, to_inference

# quantize_embeddings' dtype per post-training tier (TorchRec maps them to FBGEMM's INT8 / INT4).
TORCHREC_POST_TRAINING = {"int8": torch.qint8, "int4": torch.quint4x2}


def quantized_collection(ebc: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """TorchRec's post-training quantization of an fp32 embedding collection
    (`quantize_embeddings`, as a TorchRec user would call it), in eval mode; `ebc` is kept."""
    from torchrec.inference.modules import quantize_embeddings

    return quantize_embeddings(torch.nn.Sequential(ebc), dtype=dtype, inplace=False)[0].eval()


def torchrec_quantized(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a loaded fp32 DLRM whose embedding collection is `quantized_collection` of its own."""
    out = copy.deepcopy(model)
    arch = out.model.sparse_arch
    arch.embedding_bag_collection = quantized_collection(arch.embedding_bag_collection, dtype)
    return out


def allocated_bytes(module: torch.nn.Module) -> int:
    """Bytes of a TorchRec quantized collection's state (packed codes with scales, as allocated)."""
    total = 0
    for t in module.state_dict().values():
        total += t.view(torch.uint8).numel() if t.dtype == torch.uint8 else t.numel() * t.element_size()
    return total


def easy_path(base_checkpoint: str | Path, final_checkpoint: str | Path, data: Dataset, eval_batch: int,
              final_bytes: int, fallback_to: Optional[Path] = None) -> Dict[str, Any]:
    """Our compressed model beside TorchRec's post-training int8 and int4 of the base model.

    Args:
        base_checkpoint: the base fp32 model's checkpoint.
        final_checkpoint: the compressed (pruned, mixed-precision) model's checkpoint.
        data: the decision-split view of the pipeline's data (with the `confirm` split, all fields).
        eval_batch: global batch of the evaluation (one process).
        final_bytes: the compressed model's embedding bytes as served (the export's).
        fallback_to: where to save TorchRec's int4 model (`torch.save` of the whole DLRM) when
            it is no worse and smaller (`--fallback torchrec`); None: never saved.

    Returns:
        {"split", "rows", "base": {...}, "final": {...}, "torchrec-int8": {...},
        "torchrec-int4": {...}, "torchrec_int4_no_worse_and_smaller": bool, "exported": the
        path of the saved fallback or None}: per model its
        AUC, bytes, and the paired drop from the base model with its standard error; TorchRec's
        entries also their paired difference to the final model (theirs - ours) and its SE.
    """
    env = DistEnv(0, 1, torch.device("cpu"), "none")
    base, bcfg = load_trained_model(base_checkpoint)
    final, fcfg = load_trained_model(final_checkpoint)
    final = to_inference(final)
    # Each model reads its own fields (a base given by --checkpoint may itself be pruned).
    base_data = data.with_fields(list(bcfg.model.kept_fields)) if bcfg.model.kept_fields else data
    final_data = data.with_fields(list(fcfg.model.kept_fields)) if fcfg.model.kept_fields else data
    base_logits, labels = predict(base, base_data, CONFIRM, eval_batch, env)
    final_logits, final_labels = predict(final, final_data, CONFIRM, eval_batch, env)
    if not torch.equal(labels, final_labels):
        raise RuntimeError("the confirmation split's labels differ between the base and the final model")
    y = labels.numpy()
    ebc = base.model.sparse_arch.embedding_bag_collection
    fp32_bytes = sum(c.num_embeddings * c.embedding_dim * 4 for c in ebc.embedding_bag_configs())

    def entry(logits: torch.Tensor, nbytes: int) -> Dict[str, Any]:
        p = paired_auc(logits.numpy(), base_logits.numpy(), y)
        return {"auc": p.auc_a, "bytes": nbytes, "memory": nbytes / fp32_bytes, "drop": -p.difference,
                "drop_standard_error": p.standard_error}

    out: Dict[str, Any] = {"split": CONFIRM, "rows": int(labels.numel()), "base": entry(base_logits, fp32_bytes),
                           "final": entry(final_logits, final_bytes)}
    quantized = {}
    for name, dtype in TORCHREC_POST_TRAINING.items():
        q = quantized[name] = torchrec_quantized(base, dtype)
        logits, _ = predict(q, base_data, CONFIRM, eval_batch, env)
        rec = entry(logits, allocated_bytes(q.model.sparse_arch.embedding_bag_collection))
        vs = paired_auc(logits.numpy(), final_logits.numpy(), y)
        rec.update(minus_final=vs.difference, minus_final_standard_error=vs.standard_error)
        out[f"torchrec-{name}"] = rec
    int4 = out["torchrec-int4"]
    out["torchrec_int4_no_worse_and_smaller"] = bool(
        int4["bytes"] <= final_bytes and int4["minus_final"] >= -int4["minus_final_standard_error"]
    )
    out["exported"] = None
    if fallback_to is not None and out["torchrec_int4_no_worse_and_smaller"]:
        fallback_to.parent.mkdir(parents=True, exist_ok=True)
        torch.save(quantized["int4"], fallback_to)
        out["exported"] = str(fallback_to)
    return out
