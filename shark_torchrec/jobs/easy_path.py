"""What a TorchRec user gets without SHARK, beside what `shark compress` made: TorchRec's own
post-training quantization (`quantize_embeddings`) of the base fp32 model, int8 and int4, and
the choice of which to serve.

The choice is a decision, so it reads neither the confirmation split nor test
(`Dataset.decision_splits`): ours is tested on the choice split, which no earlier decision read,
TorchRec's models on the selection split (`CHOICE_SPLIT` says why). With `--fallback torchrec`
the candidates are TorchRec's int8 and int4 of the base model and ours, each judged by the stop
test (the one-sided upper confidence bound of its paired AUC drop from the base model within
`--max-auc-drop`): int8 first at the whole error rate; if it passes, int4 and ours by Holm's
step-down (`choose_served`). Of those accepted, the one with the fewest bytes is served. Every
accepted candidate is within the bound, all together, at the stated confidence, so the choice
among them spends nothing more. Without the flag ours is the only candidate, tested at the
whole rate. The figures the report gives for every model come from the confirmation split,
which no decision read, paired against the base model (DeLong). Bytes are as allocated:
TorchRec's rows padded to its row alignment, ours as the inference module holds them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from statistics import NormalDist
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from shark_torchrec.data import CHOICE, CONFIRM, Dataset
from shark_torchrec.distributed.env import DistEnv
from shark_torchrec.importance.significance import DropTest, PairedAUC, bound_test, drop_p_value, paired_auc
from shark_torchrec.jobs.evaluation import predict
from shark_torchrec.jobs.export import load_trained_model

SELECTION_SPLIT = "dev"  # the decision view's name for the selection split
Z_95 = NormalDist().inv_cdf(0.95)  # the one-sided 95% bound of a single confirmation figure
# Where each candidate's stop test reads. Ours was pruned and early-stopped on the selection
# split, so its drop there is optimistic (by 0.0016-0.0080 AUC on average in the pipeline
# benchmark's runs where it trained in the low tiers); it is tested on the choice split, which
# no earlier decision read. TorchRec's models are fixed functions of the base model: what the
# base model's early stopping on the selection split favours, they inherit, and it cancels in
# their paired drop (measured: its mean gap to the confirmation split's was -0.0005 to +0.0002
# per configuration), so they keep the selection split's rows.
CHOICE_SPLIT = {"final": CHOICE, "torchrec-int8": SELECTION_SPLIT, "torchrec-int4": SELECTION_SPLIT}
# quantize_embeddings' dtype per post-training tier (TorchRec maps them to FBGEMM's INT8 / INT4).
TORCHREC_POST_TRAINING = {"int8": torch.qint8, "int4": torch.quint4x2}


def quantized_collection(ebc: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """TorchRec's post-training quantization of an fp32 embedding collection
    (`quantize_embeddings`, as a TorchRec user would call it), in eval mode; `ebc` is kept.

    Args:
        ebc: a materialized fp32 `EmbeddingBagCollection`.
        dtype: `torch.qint8` (int8 rows) or `torch.quint4x2` (int4 rows).

    Returns:
        TorchRec's quantized collection.
    """
    from torchrec.inference.modules import quantize_embeddings

    return quantize_embeddings(torch.nn.Sequential(ebc), dtype=dtype, inplace=False)[0].eval()


def torchrec_quantized(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a loaded fp32 DLRM whose embedding collection is `quantized_collection` of its own.

    Args:
        model: a `DLRMTrainModule` as `load_trained_model` returns it (left unchanged).
        dtype: as for `quantized_collection`.

    Returns:
        The copy.
    """
    out = copy.deepcopy(model)
    arch = out.model.sparse_arch
    arch.embedding_bag_collection = quantized_collection(arch.embedding_bag_collection, dtype)
    return out


def allocated_bytes(module: torch.nn.Module) -> int:
    """Bytes of a TorchRec quantized collection's state (packed codes with scales, as allocated).

    Args:
        module: the quantized collection.

    Returns:
        The bytes of every tensor of its state dict.
    """
    total = 0
    for t in module.state_dict().values():
        total += t.view(torch.uint8).numel() if t.dtype == torch.uint8 else t.numel() * t.element_size()
    return total


# Ours, then TorchRec's of the base model; on equal bytes (TorchRec pads int4 and int8 rows to the
# same 16 B at small dims) this order decides which accepted candidate is served: ours first,
# then the more accurate int8.
CANDIDATES = ("final", "torchrec-int8", "torchrec-int4")
# The order of the tests, fixed before any data is read: TorchRec's int8 of the base model (the
# likeliest to pass) first, at the whole error rate; if it passes, int4 and ours share the rate.
TEST_ORDER = ("torchrec-int8", "torchrec-int4", "final")


def choose_served(
    candidates: Sequence[Tuple[str, int, PairedAUC]], max_auc_drop: float, confidence: float
) -> Tuple[Optional[str], Dict[str, DropTest]]:
    """The model to serve. The first candidate is tested at the whole error rate, alpha = 1 -
    `confidence`; if it fails, nothing is served. If it passes, the others are tested by Holm's
    step-down at alpha: the one with the smallest p-value (`drop_p_value`) at alpha / k, and
    while they pass the next at alpha / (k - 1), and so on; the first to fail ends it (the rest
    fail at that rate too). Of the accepted, the one with the fewest bytes is served (on a tie,
    the earliest in `CANDIDATES`, then in the given order).

    Every accepted candidate is within the bound, all together, at least at `confidence` (a
    gatekeeper before a Holm family: a closed test of weighted Bonferroni tests). So neither of
    int4 and ours blocks the other, and the choice among the accepted spends nothing.

    Args:
        candidates: (name, bytes, `paired_auc(candidate, base, labels)` on its choice split),
            the gatekeeper first (fixed before the data is read: `TEST_ORDER`).
        max_auc_drop: the largest AUC drop from the base model to accept.
        confidence: over all the tests.

    Returns:
        (the chosen name, None when the first test failed; {name: DropTest} of the tests run,
        in the order they ran).
    """
    alpha = 1.0 - confidence
    tests: Dict[str, DropTest] = {}
    accepted = []

    def rank(name: str, i: int):
        return (CANDIDATES.index(name) if name in CANDIDATES else len(CANDIDATES), i)

    name, nbytes, paired = candidates[0]
    tests[name] = bound_test(paired, max_auc_drop, alpha)
    if not tests[name].accepted:
        return None, tests
    accepted.append((nbytes, *rank(name, 0), name))
    family = sorted(range(1, len(candidates)), key=lambda i: (drop_p_value(candidates[i][2], max_auc_drop), i))
    for step, i in enumerate(family):
        level = alpha / (len(family) - step)
        name, nbytes, paired = candidates[i]
        tests[name] = bound_test(paired, max_auc_drop, level)
        if not tests[name].accepted:
            for j in family[step + 1 :]:
                tests[candidates[j][0]] = bound_test(candidates[j][2], max_auc_drop, level)
            break
        accepted.append((nbytes, *rank(name, i), name))
    return min(accepted)[-1], tests


def easy_path(
    base_checkpoint: str | Path,
    final: torch.nn.Module,
    final_fields: Optional[Sequence[str]],
    data: Dataset,
    eval_batch: int,
    final_bytes: int,
    max_auc_drop: float,
    confidence: float,
    fallback_dir: Optional[Path] = None,
) -> Dict[str, Any]:
    """Our compressed model beside TorchRec's post-training int8 and int4 of the base model, and
    which of them to serve.

    Args:
        base_checkpoint: the base fp32 model's checkpoint.
        final: the compressed (pruned, mixed-precision) model as exported (`export/model.pt`).
        final_fields: the fields it reads (None: all of the data's).
        data: the decision-split view of the pipeline's data (`dev` the selection split,
            `choice`, `confirm` the confirmation split; all fields).
        eval_batch: global batch of the evaluation (one process).
        final_bytes: the compressed model's embedding bytes as served (the export's).
        max_auc_drop: the largest AUC drop from the base model a served model may have.
        confidence: the confidence over all the tests of the choice (`choose_served`).
        fallback_dir: with `--fallback torchrec`, where to save TorchRec's model when it is the
            one to serve (`torch.save` of the whole DLRM, `torchrec_<int4|int8>_model.pt`);
            None: ours is the only candidate.

    Returns:
        {"split", "rows", "choice_rows", "base", "final", "torchrec-int8", "torchrec-int4",
        "recommended", "exported_model", "exported", "exported_within_bound"}: per model its
        confirmation-split AUC, bytes, memory and paired drop from the base model with its
        standard error and one-sided 95% upper bound (TorchRec's also their paired difference
        to ours, theirs - ours), the same on test ("test", logged only), and per candidate its
        drop on its choice split with, when it was tried, its stop test ("choice").
        "recommended": the accepted candidate with the fewest bytes (None: none was);
        "fallback_would_serve": what the choice over all three would serve (`--fallback torchrec`);
        "exported_model": the one served (ours, or the recommended TorchRec model); "exported":
        the path of a saved TorchRec model or None; "exported_within_bound": whether the served
        model passed its stop test.
    """
    env = DistEnv(0, 1, torch.device("cpu"), "none")
    base, bcfg = load_trained_model(base_checkpoint)
    final = final.eval()
    # Each model reads its own fields (a base given by --checkpoint may itself be pruned).
    base_data = data.with_fields(list(bcfg.model.kept_fields)) if bcfg.model.kept_fields else data
    final_data = data.with_fields(list(final_fields)) if final_fields else data
    ebc = base.model.sparse_arch.embedding_bag_collection
    fp32_bytes = sum(c.num_embeddings * c.embedding_dim * 4 for c in ebc.embedding_bag_configs())
    quantized = {name: torchrec_quantized(base, dtype) for name, dtype in TORCHREC_POST_TRAINING.items()}
    models = {"base": (base, base_data, fp32_bytes), "final": (final, final_data, final_bytes)}
    for name, q in quantized.items():
        models[f"torchrec-{name}"] = (q, base_data, allocated_bytes(q.model.sparse_arch.embedding_bag_collection))
    logits: Dict[str, Dict[str, torch.Tensor]] = {SELECTION_SPLIT: {}, CHOICE: {}, CONFIRM: {}, "test": {}}
    labels: Dict[str, torch.Tensor] = {}
    for split, by_model in logits.items():
        for key, (model, model_data, _) in models.items():
            if split in (SELECTION_SPLIT, CHOICE) and key != "base" and CHOICE_SPLIT[key] != split:
                continue  # each candidate is tested on its own split only
            by_model[key], y = predict(model, model_data, split, eval_batch, env)
            if split in labels and not torch.equal(labels[split], y):
                raise RuntimeError(f"the {split} split's labels differ between the base model and {key}")
            labels[split] = y

    def paired(split: str, key: str, against: str = "base"):
        return paired_auc(logits[split][key].numpy(), logits[split][against].numpy(), labels[split].numpy())

    out: Dict[str, Any] = {
        "split": CONFIRM,
        "rows": int(labels[CONFIRM].numel()),
        "choice_rows": {split: int(labels[split].numel()) for split in (SELECTION_SPLIT, CHOICE)},
    }
    for key, (_, _, nbytes) in models.items():
        p = paired(CONFIRM, key)
        out[key] = {
            "auc": p.auc_a,
            "bytes": nbytes,
            "memory": nbytes / fp32_bytes,
            "drop": -p.difference,
            "drop_standard_error": p.standard_error,
            "drop_upper_bound_95": p.upper_bound(Z_95),
        }
        t = paired("test", key)  # logged beside the others, as every stage logs test; it decides nothing
        out[key]["test"] = {"auc": t.auc_a, "drop": -t.difference, "drop_standard_error": t.standard_error}
        if key.startswith("torchrec-"):
            vs = paired(CONFIRM, key, "final")
            out[key].update(minus_final=vs.difference, minus_final_standard_error=vs.standard_error)
    # The choice (`choose_served`): TorchRec's int8 first, then int4 and ours by Holm, each on its
    # split (`CHOICE_SPLIT`); the accepted one with the fewest bytes is served. Models not tried
    # get their drop and standard error there as figures, not a test.
    on_choice = {key: paired(CHOICE_SPLIT[key], key) for key in CANDIDATES}
    for key, p in on_choice.items():
        out[key]["choice"] = {
            "split": CHOICE_SPLIT[key],
            "drop": -p.difference,
            "standard_error": p.standard_error,
            "test_index": None,
        }
    # What --fallback torchrec would serve (the same test over all three): with the flag, the
    # choice itself; without it, the report's advice, and ours is tested alone.
    out["fallback_would_serve"], tests = choose_served(
        [(k, out[k]["bytes"], on_choice[k]) for k in TEST_ORDER], max_auc_drop, confidence
    )
    out["recommended"] = out["fallback_would_serve"]
    if fallback_dir is None:
        out["recommended"], tests = choose_served(
            [("final", out["final"]["bytes"], on_choice["final"])], max_auc_drop, confidence
        )
    for index, (key, test) in enumerate(tests.items(), start=1):
        out[key]["choice"].update(test_index=index, z=test.z, upper_bound=test.upper_bound, accepted=test.accepted)
    exported, out["exported"] = "final", None
    if out["recommended"] not in (None, "final"):  # a TorchRec model: only tried with fallback_dir
        exported = out["recommended"]
        name = exported.removeprefix("torchrec-")
        path = fallback_dir / f"torchrec_{name}_model.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(quantized[name], path)
        out["exported"] = str(path)
    out["exported_model"] = exported
    out["exported_within_bound"] = out["recommended"] is not None
    return out
