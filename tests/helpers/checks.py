"""Checks several test modules share: an export against its trained model, a row-group
store's row map, and a mixed-precision run against the plain-torch reference."""

import math

import torch

from helpers import mp_workers as W
from shark_torchrec.data import open_dataset
from shark_torchrec.jobs.export import export_inference_model, load_trained_model
from shark_torchrec.modules.inference import MixedPrecisionInferenceEmbeddingBagCollection
from shark_torchrec.modules.row_groups import RowGroupStore
from shark_torchrec.precision.priority import FP16, FP32, INT8, ROW_MAP_BYTES


def compare_export(ckpt, metrics):
    """Max |logit difference| of the export against the trained model on the test split, and
    the export's collection; its bytes and group rows must be the trained model's."""
    trained, cfg = load_trained_model(ckpt)
    exported, _ = export_inference_model(ckpt)
    ebc = exported.model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, MixedPrecisionInferenceEmbeddingBagCollection)
    rows = {k: metrics[k] for k in metrics if k.startswith("rows_")}
    assert ebc.group_rows() == rows
    # The trained rows' bytes, the int32 row map (ROW_MAP_BYTES a row; none for one tier) swapped for the ranked
    # map: 64-row blocks of bit planes and per-group bases, each table's start and fallback slot, the row count.
    n, tables = sum(rows.values()), ebc.table_fallback.numel()
    codes = sum(1 for v in rows.values() if v)
    stored = codes - int(rows["rows_dropped"] > 0)
    fallback_rows = int((ebc.table_fallback >= 0).sum())
    store = trained.model.sparse_arch.embedding_bag_collection.stores[0]
    trained_weights = metrics["embedding_bytes"] - (0 if store.identity_map else n * ROW_MAP_BYTES)
    if rows["rows_dropped"] or store.has_dropped:
        trained_weights -= (tables - fallback_rows) * 4 * ebc.dim  # only tables that drop rows keep theirs
    ranked = -(-n // 64) * (8 * math.ceil(math.log2(codes)) * (codes > 1) + 4 * stored) + 16 * tables + 8
    assert ebc.memory_bytes() == trained_weights + ranked
    # no training state is carried: weights, row map and lookup metadata only
    assert not [n for n, _ in ebc.named_buffers() if "momentum" in n or "priority" in n]
    data = open_dataset(cfg.dataset, cfg.train.seed)
    if cfg.model.kept_fields:
        data = data.with_fields(list(cfg.model.kept_fields))
    diff = 0.0
    with torch.no_grad():
        for batch in data.batches("test", 1024):
            _, (_, want, _, _) = trained(batch)
            _, (_, got, _, _) = exported(batch)
            diff = max(diff, (want - got).abs().max().item())
    return diff, ebc


def check_row_map(store: RowGroupStore) -> None:
    """Every row in exactly one group, in a slot of that group that no other row holds; a
    dropped row's slot is its table's fallback row, kept after the fp32 rows."""
    fallbacks = len(store.tables) if store.has_dropped else 0
    for g in range(len(store.capacity)):
        slots = store.row_slot[store.row_group == g].long()
        own = store.capacity[g] - (fallbacks if g == FP32 else 0)
        assert len(slots) == own
        assert len(torch.unique(slots)) == len(slots)
        assert len(slots) == 0 or (slots.min() >= 0 and slots.max() < own)
    dropped = (store.row_group == 5).nonzero().flatten()
    assert torch.equal(store.row_slot[dropped].long(), store.fallback_slot0 + store.table_of_rows(dropped))
    assert sum(store.capacity) - fallbacks + len(dropped) == store.num_rows


def assert_follows_the_reference(got: dict, want: dict, tiers=(FP32, FP16, INT8)) -> None:
    """A run (`sharded_run` / `unsharded_run`) against tests/reference.py on the same steps:
    outputs within 1e-5 (pooling and all-to-alls add in other orders), groups exactly (every
    4-column unit of a row alike), values within 1e-6. The same rounding noise and the same
    fp32 operations make the values equal bit for bit where a row's gradient is summed in the
    same order; data-parallel replicas sum their shares apart and all-reduce, which moves fp32
    values by a few ulps (and could flip a stochastic rounding only for a value within those
    ulps of its threshold: none here)."""
    assert want["moved_rows"] > 0  # reassignments moved rows (rounded to nearest)
    assert len(got["outputs"]) == len(want["outputs"])
    for step, (a, b) in enumerate(zip(got["outputs"], want["outputs"])):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5, step
    for n, _, _ in W.TABLES:
        groups = got["tables"][f"{n}.row_group"]
        assert (groups == groups[:, :1]).all(), n
        assert torch.equal(groups[:, 0], want["tables"][f"{n}.row_group"]), n
        assert all(int((groups[:, 0] == g).sum()) > 0 for g in tiers), n
        assert (got["tables"][f"{n}.weight"] - want["tables"][f"{n}.weight"]).abs().max() <= 1e-6, n


def int8_step(values: torch.Tensor) -> torch.Tensor:
    """The int8 step of each row of `values`: (max - min) / 255."""
    return (values.max(dim=1).values - values.min(dim=1).values) / 255
