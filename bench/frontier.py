"""AUC against embedding bytes: our row tiers beside TorchRec's own post-training quantization.

    .venv/bin/python bench/frontier.py --seeds 10 --dims 64,16 --out bench/results/frontier_frappe \\
        -- --data csv:../shared/data/frappe --label click --epochs 10 --early-stopping-patience 2
    .venv/bin/python bench/frontier.py --seeds 2 --cv 5 --dims 64,16 --out bench/results/frontier_criteo \\
        -- --data criteo:../shared/data/criteo_kaggle_8k --epochs 3 --early-stopping-patience 1

The benchmark of issue 10 ("Numbers to reach"). One invocation; per dim and per unit (a seed, or
with `--cv K` a (seed, fold) pair: K folds for each of `--seeds` seeds) every method sees the
same data splits, and the methods are paired:

- `fp32`: `shark train --precision fp32`, stock TorchRec fp32 tables (FBGEMM fused row-wise
  Adagrad), with the flags after `--` (early stopping on dev AUC as they say; the best dev model
  is kept). The reference: "AUC - fp32" is the per-unit difference to this run.
- `torchrec-fp16`, `torchrec-int8`, `torchrec-int4`, `torchrec-int2`: TorchRec's post-training
  quantization of that same fp32 model, nothing retrained. The checkpoint is loaded unsharded on
  CPU (`load_trained_model`), its EmbeddingBagCollection goes through
  `torchrec.inference.modules.quantize_embeddings(dtype=...)` with dtype `torch.half`,
  `torch.qint8`, `torch.quint4x2` or `torch.quint2x4` (TorchRec maps these to DataType
  FP16/INT8/INT4/INT2, `dtype_to_data_type`), the dense part is unchanged, and the model is
  evaluated on the test split with the same batches and the same AUC/log-loss code as
  `shark train` (`binary_metrics`, torchmetrics). Each quantized module is checked before use:
  its FBGEMM TBE's table types are the SparseType asked for, each state-dict row has FBGEMM's
  padded row size, and looking up every row once gives at most 2^bits distinct values per row
  (16 for int4, 4 for int2) within half a quantization step of the fp32 row.
- `shark-int4`, `shark-int2`: `shark train --precision int4|int2`, every row in that tier,
  trained in place from the start (stochastic rounding, no fp32 copy).
- `shark:TIER/TIER/...@BUDGET` (e.g. `shark:int8/int4/int2@0.12`): `--precision shark --tiers ...
  --memory-budget BUDGET`, rows ranked by Eq. 7 into those tiers; `shark-model:...` the same
  with `--budget-scope model` (one budget for all tables).
- `shark-paper>TIER/TIER/...@BUDGET` (e.g. `shark-paper>int8/int4/int2@0.125`): the unit's
  shark-paper model, its rows put into those tiers for serving by the priorities they had at the
  end of training, rounded to nearest, one budget for all tables (`shark export --tiers ...
  --memory-budget B`, `regroup_for_serving`); dropped rows read their table's mean row.
- `shark-paper`: `shark train --precision shark` trained from the start, our module with the
  paper's tiers (fp32/fp16/int8 rows chosen by priority, Eq. 7), at the default budget for the
  dim (0.35 at dim 64; 0.45 at dim 16 before the 4-byte row map, 0.43 after: each run's
  `budget` is in results.json), same seed as its fp32 twin (same initial values before
  rounding, same data order). `--budgets 0.3,0.5` adds `shark-paper@0.30`, `shark-paper@0.50`
  (budgets below a dim's int8 floor are skipped there).

Bytes, two ways, as fractions of the fp32 tables' bytes (rows x dim x 4):
- allocated: fp32 and ours, the metrics' `embedding_bytes` (for ours: weights, int8 scales and
  biases and the row map (5 bytes a row before commit "4-byte row map", 4 after), rows padded
  to 1 B on CPU); TorchRec's quantized module, the sum of its state-dict tensors (rows padded
  to 16 B by FBGEMM's row alignment). Its TBE buffer also aligns each table's start
  (`tbe_buffer_bytes` in results.json, a few hundred bytes more). A served method (`BASE>...`)
  is the inference module's `memory_bytes()`: since commit "ranked row map" its map is the
  ranked one (under 0.7 bytes a row), and its budget counts it.
- unpadded: codes + scales/biases (+ row map for ours), i.e. for TorchRec rows x (ceil(dim x
  bits / 8) + 4) (fp16/fp32: rows x dim x 2 or 4), for ours the sum over tiers of rows x row
  bytes plus the row map (`ROW_MAP_BYTES` of the code that ran).

Reported per method: mean test AUC and log loss, the mean paired AUC difference to fp32 with its
95% confidence interval (t distribution over the units; with --cv the folds of one seed share
data, so the interval is approximate) and its standard error, and both byte ratios; then paired
differences between each trained method and each TorchRec post-training int8/int4/int2. Per dim, written to
`<out>_d<dim>/`: `results.json` (every run, written as each finishes), `table.md` and
`auc_vs_bytes.png`. `--resume` keeps every finished run of an earlier invocation with the same
flags and computes only what is missing. Everything after `--` goes to `shark train`; each
training run is a fresh process (`runs/<method>-<unit>/`).

Adding a method: one entry in `methods_for()` (a `shark train` method with its flags, or a
post-training transform of the fp32 model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # shark_torchrec: the installed one, or PYTHONPATH's (code_provenance)

from common import paired, pyplot, shark_train, split_passthrough

FORMAT = 1


# ---------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "train": a `shark train` run; "post": a transform of the unit's fp32 model
    what: str  # one line for the table's notes
    flags: tuple[str, ...] = ()  # train: shark train flags (besides data, dim, seed, fold)
    qdtype: str = ""  # post: torch dtype name given to quantize_embeddings
    bits: int = 32
    budget: float | None = None
    base: str = ""  # serve: the trained method whose model is regrouped
    tiers: tuple[str, ...] = ()  # serve: the serving tiers
    rounding: str = "nearest"  # serve: integer rows' scale and bias (ServingTiers.rounding)


POST = {  # name: (torch dtype name, bits)
    "torchrec-fp16": ("half", 16),
    "torchrec-int8": ("qint8", 8),
    "torchrec-int4": ("quint4x2", 4),
    "torchrec-int2": ("quint2x4", 2),
}
# shark-paper trained with other priority settings: method -> (shark train flags, what).
SIGNAL_VARIANTS = {
    "shark-paper+eq7": (("--signal", "eq7"), "Eq. 7 as the paper sets it, run again at this commit"),
    "shark-paper+grad": (("--signal", "eq7-grad"), "Eq. 7 weighted by the row gradient norm, --signal eq7-grad"),
    "shark-paper+avg": (("--beta", "0.01"), "Eq. 7 with beta 0.01: a ~100-step average instead of the paper's recency"),
}
DROP_UNSEEN = "drop-unseen+int8"
DEFAULT_METHODS = ("fp32", "torchrec-fp16", "torchrec-int8", "torchrec-int4", "torchrec-int2", "shark-paper")


def methods_for(names: Sequence[str], dim: int, budgets: Sequence[float]) -> tuple[list[Method], list[str]]:
    """The methods to run at this dim (fp32 always first: every other one is paired with it)
    and notes on what was skipped."""
    from shark_torchrec.precision.priority import default_budget, min_budget

    out: list[Method] = [
        Method("fp32", "train", "stock TorchRec fp32 tables (shark train --precision fp32)", ("--precision", "fp32"))
    ]
    notes: list[str] = []
    for n in names:
        if n == "fp32":
            continue
        if n == DROP_UNSEEN:
            out.append(
                Method(
                    n,
                    "post",
                    "the fp32 model with every row never seen in training dropped (its lookups return the "
                    "table's fallback row, the mean of the dropped rows) and every seen row int8 (rounded to nearest), "
                    "served by our inference module: what dropping unseen rows alone gives",
                    bits=8,
                )
            )
        elif n in POST:
            dt, bits = POST[n]
            out.append(
                Method(
                    n,
                    "post",
                    f"TorchRec quantize_embeddings(dtype=torch.{dt}) of the fp32 model, post-training",
                    qdtype=dt,
                    bits=bits,
                )
            )
        elif n in ("shark-paper", *SIGNAL_VARIANTS):
            # shark-paper+SIGNAL: the same with the priority signal given explicitly (+eq7: the
            # paper's, a fresh run at this commit, the paired baseline of the other signals).
            b = default_budget([dim])
            flags, what = SIGNAL_VARIANTS.get(n, ((), "Eq. 7"))
            out.append(
                Method(
                    n,
                    "train",
                    f"our module, fp32/fp16/int8 rows by priority ({what}), trained from the start, "
                    f"the default budget (as each run recorded it: `budget` in results.json; {b:.2f} with this code)",
                    ("--precision", "shark", *flags),
                    budget=b,
                )
            )
            if n in SIGNAL_VARIANTS:
                continue
            for b in budgets:
                if abs(b - default_budget([dim])) < 1e-9:
                    notes.append(f"shark-paper@{b:.2f} at dim {dim} is shark-paper (the default budget): not run twice")
                    continue
                if b < min_budget(dim):
                    notes.append(
                        f"shark-paper@{b:.2f} skipped at dim {dim}: below the int8 floor {min_budget(dim):.3f}"
                    )
                    continue
                out.append(
                    Method(
                        f"shark-paper@{b:.2f}",
                        "train",
                        f"our module, fp32/fp16/int8 rows by priority, trained from the start, budget {b:.2f}",
                        ("--precision", "shark", "--memory-budget", f"{b}"),
                        budget=b,
                    )
                )
        elif ">" in n:
            # BASE>TIER/TIER/...@BUDGET: the unit's model of BASE (a trained method listed
            # before it: shark-paper, shark:..., shark-model:..., or fp32), its rows put into
            # these tiers for serving by their trained priorities (fp32: by their occurrences in
            # the training split), one budget for all tables, rounded to nearest:
            # `shark export --tiers ... --memory-budget B`.
            # A trailing ~fit: integer rows' scale and bias refit by least squares (--rounding fitted).
            base, _, rest = n.partition(">")
            rest, fit, _ = rest.partition("~fit")
            spec, _, b = rest.partition("@")
            tiers = tuple(spec.split("/"))
            if not any(m.name == base for m in out):
                raise SystemExit(f"{n}: list {base} before it in --methods (its model is the one served)")
            from shark_torchrec.jobs.export import served_min_budget

            floor = served_min_budget(dim, tiers)  # every row in the cheapest tier, plus the ranked map
            if float(b) < floor:
                notes.append(f"{n} skipped at dim {dim}: below the served {tiers[-1]} floor {floor:.3f}")
                continue
            rounding = "fitted" if fit else "nearest"
            ranked_by = (
                "by each row's occurrences in the training split (alpha per positive example, 1 per negative)"
                if base in ("fp32", "shark-int4", "shark-int2", "shark-int4+sgd")  # no priorities: counted
                else "by its trained priorities"
            )
            out.append(
                Method(
                    n,
                    "serve",
                    f"the {base} model served in {'/'.join(tiers)} rows chosen {ranked_by} "
                    f"(shark export --tiers {' '.join(tiers)} --memory-budget {b} --rounding {rounding}, "
                    "one budget for all tables)",
                    budget=float(b),
                    base=base,
                    tiers=tiers,
                    rounding=rounding,
                )
            )
        elif n in ("shark-int4", "shark-int2", "shark-int4+sgd", "shark-int4+bf16"):
            # +sgd: the rows' optimizer is plain SGD (no state a row) instead of row-wise Adagrad;
            # +bf16: row-wise Adagrad with its state a row in bf16 (2 bytes, stochastically rounded).
            tier, _, variant = n.split("-")[1].partition("+")
            flags = {
                "": ((), ""),
                "sgd": (("--emb-optimizer", "sgd"), ", SGD (--emb-optimizer sgd, no optimizer state)"),
                "bf16": (("--emb-optimizer-state", "bf16"), ", Adagrad state in bf16 (--emb-optimizer-state bf16)"),
            }[variant]
            out.append(
                Method(
                    n,
                    "train",
                    f"our module, every row {tier}, trained in place from the start (stochastic rounding)" + flags[1],
                    ("--precision", tier) + flags[0],
                )
            )
        elif n.startswith(("shark:", "shark-model:")):
            # shark:TIER/TIER/...@BUDGET: rows ranked by Eq. 7 into these tiers within the budget
            # (shark-model: one budget for all tables, --budget-scope model).
            scope, _, rest = n.partition(":")
            spec, _, b = rest.partition("@")
            tiers = spec.split("/")
            budget = float(b) if b else None
            from shark_torchrec.precision.priority import GROUP_NAMES

            floor = min_budget(dim, max(GROUP_NAMES.index(t) for t in tiers))
            if budget is not None and budget < floor:
                notes.append(f"{n} skipped at dim {dim}: below the {tiers[-1]} floor {floor:.3f}")
                continue
            model = scope == "shark-model"
            flags = (
                ("--precision", "shark", "--tiers", *tiers)
                + (("--memory-budget", b) if b else ())
                + (("--budget-scope", "model") if model else ())
            )
            out.append(
                Method(
                    n,
                    "train",
                    f"our module, {'/'.join(tiers)} rows by priority (Eq. 7), trained from the start, "
                    f"budget {b or 'default'} {'for all tables together' if model else 'per table'}",
                    flags,
                    budget=budget,
                )
            )
        else:
            raise SystemExit(
                f"unknown method {n!r} (known: fp32, {', '.join(POST)}, {DROP_UNSEEN}, shark-paper, "
                f"{', '.join(SIGNAL_VARIANTS)}, shark-int4, shark-int2, shark-int4+sgd, shark:TIER/TIER/...@BUDGET, "
                "shark-model:TIER/TIER/...@BUDGET, shark-paper>TIER/TIER/...@BUDGET)"
            )
    return out, notes


# ---------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    seed: int
    fold: int | None
    folds: int

    @property
    def key(self) -> str:
        return f"s{self.seed}" if self.fold is None else f"s{self.seed}f{self.fold}"

    def flags(self) -> list[str]:
        f = ["--seed", str(self.seed)]
        return f + (["--folds", str(self.folds), "--fold", str(self.fold)] if self.fold is not None else [])


def run_name(method: str, unit: Unit) -> str:
    """A trained method's run directory name for a unit."""
    return f"{method.replace(':', '_').replace('/', '-')}-{unit.key}"


def units(seeds: int, cv: int) -> list[Unit]:
    if cv:
        return [Unit(s, f, cv) for s in range(seeds) for f in range(cv)]
    return [Unit(s, None, 0) for s in range(seeds)]


# ---------------------------------------------------------------------------------- bytes
def torchrec_unpadded_bytes(shapes: Sequence[tuple[int, int]], bits: int) -> int:
    """Codes + fp16 scale and bias per row (no alignment); fp16/fp32: the values only."""
    if bits >= 16:
        return sum(r * d * bits // 8 for r, d in shapes)
    return sum(r * (math.ceil(d * bits / 8) + 4) for r, d in shapes)


def shark_unpadded_bytes(metrics: dict, dim: int, row_map: bool = True) -> int:
    """Our module's bytes without alignment: per tier its rows x row bytes (int8: codes + fp16
    scale and bias), plus, with `row_map`, the row map for every row (a one-tier run keeps
    none)."""
    from shark_torchrec.precision.priority import ROW_MAP_BYTES

    per_row = {
        "fp32": 4 * dim,
        "fp16": 2 * dim,
        "int8": dim + 4,
        "int4": math.ceil(dim / 2) + 4,
        "int2": math.ceil(dim / 4) + 4,
        "dropped": 0,
    }
    tiers = {k[len("rows_") :]: v for k, v in metrics.items() if k.startswith("rows_") and isinstance(v, int)}
    unknown = set(tiers) - set(per_row)
    if unknown:
        raise SystemExit(f"shark_unpadded_bytes: no row size for tiers {sorted(unknown)}: add them")
    rows = metrics["fp32_embedding_bytes"] // (4 * dim)
    return sum(per_row[t] * n for t, n in tiers.items()) + (ROW_MAP_BYTES * rows if row_map else 0)


# ---------------------------------------------------------------------------------- runs
def run_train(method: Method, extra: list[str], dim: int, unit: Unit, run_dir: Path) -> dict:
    """One `shark train` run (reusing its metrics if an earlier invocation finished it)."""
    m_path = run_dir / "m.json"
    if m_path.is_file():
        m = json.loads(m_path.read_text())
    else:
        if run_dir.exists():  # an interrupted run: start it again
            shutil.rmtree(run_dir)
        flags = [*extra, *method.flags, "--embedding-dim", str(dim), *unit.flags()]
        m = shark_train(flags, run_dir)
    fp32_bytes = m["fp32_embedding_bytes"]
    alloc = m["embedding_bytes"]
    # Rows ranked into tiers (`--precision shark`) keep a row map; one tier (`--precision int4`) none.
    precision = method.flags[method.flags.index("--precision") + 1] if "--precision" in method.flags else "shark"
    unpadded = alloc if method.name == "fp32" else shark_unpadded_bytes(m, dim, precision in ("shark", "freq"))
    rec = {
        "test_auc": m["test_auc"],
        "test_logloss": m["test_logloss"],
        "dev_auc": m["dev_auc"],
        "bytes_allocated": alloc,
        "bytes_unpadded": unpadded,
        "fp32_bytes": fp32_bytes,
        "train_seconds": m["train_seconds"],
        "steps": m["steps"],
        "epochs_completed": m["epochs_completed"],
        "rows": {k[len("rows_") :]: v for k, v in m.items() if k.startswith("rows_")},
        "optimizer_bytes": m.get("optimizer_bytes"),
        "priority_bytes": m.get("priority_bytes"),
    }
    if method.budget is not None:
        rec["budget"] = method.budget
    return rec


class FP32Model:
    """A unit's trained fp32 model, loaded once for its post-training methods."""

    def __init__(self, run_dir: Path) -> None:
        import torch

        from shark_torchrec.data import open_dataset
        from shark_torchrec.jobs.export import load_trained_model

        self.model, self.cfg = load_trained_model(run_dir / "checkpoints")
        self.data = open_dataset(self.cfg.dataset, self.cfg.train.seed)
        if self.cfg.model.kept_fields:
            self.data = self.data.with_fields(list(self.cfg.model.kept_fields))
        self.ebc = self.model.model.sparse_arch.embedding_bag_collection
        self.configs = self.ebc.embedding_bag_configs()
        self.shapes = [(c.num_embeddings, c.embedding_dim) for c in self.configs]
        self.torch = torch
        self.counts = None  # training_priorities, counted once for the served points of a model without priorities

    def evaluate(self, ebc=None) -> dict:
        """Test AUC and log loss with `ebc` in place of the trained collection (same batches
        and metric code as `shark train`, one process)."""
        from shark_torchrec.jobs.evaluation import binary_metrics

        torch = self.torch
        arch = self.model.model.sparse_arch
        arch.embedding_bag_collection = ebc if ebc is not None else self.ebc
        try:
            logits, labels = [], []
            with torch.no_grad():
                for b in self.data.batches("test", self.cfg.train.eval_batch_size):
                    _, (_, out, y, w) = self.model(b)
                    keep = w > 0
                    logits.append(out.float()[keep])
                    labels.append(y[keep])
            return binary_metrics(torch.cat(logits), torch.cat(labels))
        finally:
            arch.embedding_bag_collection = self.ebc

    def row_blocks(self, block: int = 1 << 16):
        """(table config, feature, KJT) for every feature of every table, a block of `block`
        rows at a time: one bag per row of the block for that feature, empty bags for the others."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        torch = self.torch
        keys = [f for c in self.configs for f in c.feature_names]
        for c in self.configs:
            for f in c.feature_names:
                at = keys.index(f)
                for a in range(0, c.num_embeddings, block):
                    n = min(block, c.num_embeddings - a)
                    lengths = torch.zeros(len(keys) * n, dtype=torch.int32)
                    lengths[at * n : (at + 1) * n] = 1
                    yield c, f, KeyedJaggedTensor(keys=keys, values=torch.arange(a, a + n), lengths=lengths)


def quantize_checked(fp: FP32Model, method: Method):
    """TorchRec's post-training quantization of the fp32 collection, checked (see the module
    docstring); returns (quantized collection, check record)."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        rounded_row_size_in_bytes,
    )

    from shark_torchrec.jobs.easy_path import allocated_bytes, quantized_collection

    torch = fp.torch
    dtype = getattr(torch, method.qdtype)
    want = {16: SparseType.FP16, 8: SparseType.INT8, 4: SparseType.INT4, 2: SparseType.INT2}[method.bits]
    q = quantized_collection(fp.ebc, dtype)
    tbes = list(q._emb_modules)
    tys = {SparseType.from_int(int(t)) for tbe in tbes for t in tbe.weights_tys}
    if tys != {want}:
        raise SystemExit(f"{method.name}: quantize_embeddings built tables of {sorted(map(str, tys))}, not {want}")
    state = q.state_dict()
    for c in fp.configs:
        w = state[f"embedding_bags.{c.name}.weight"].view(torch.uint8)  # UInt4/UInt2Tensor: the packed bytes
        row = rounded_row_size_in_bytes(c.embedding_dim, want, getattr(tbes[0], "row_alignment", 16))
        if tuple(w.shape) != (c.num_embeddings, row):
            raise SystemExit(
                f"{method.name}: table {c.name} holds {tuple(w.shape)} bytes, expected ({c.num_embeddings}, {row})"
            )
    allocated = allocated_bytes(q)
    tbe_buffer = sum(
        int(getattr(tbe, n).numel() * getattr(tbe, n).element_size())
        for tbe in tbes
        for n in ("weights_host", "weights_dev", "weights_uvm")
    )
    # Every row looked up once, a table and a block of rows at a time (one batch of all rows
    # of all tables took 24 GB at 5 M rows): distinct values per row and the error against
    # the fp32 row.
    levels, rel_err = 0, 0.0
    for _, f, kjt in fp.row_blocks():
        with torch.no_grad():
            g, r = q(kjt).to_dict()[f].float(), fp.ebc(kjt).to_dict()[f].float()
        s = torch.sort(g, dim=1).values
        levels = max(levels, int(((s[:, 1:] != s[:, :-1]).sum(1) + 1).max()))
        span = (r.max(1).values - r.min(1).values).clamp_min(1e-12)
        # What fp16 scale and bias add to half a step: each rounded to fp16 (2^-11
        # relative, or 2^-25 absolute where the scale is subnormal, as for the tiny
        # ranges of rows a huge table never trained), the scale's error times the top code.
        top = 2**method.bits - 1 if method.bits <= 8 else 1
        fp16_err = top * torch.clamp(span / top * 2.0**-11, min=2.0**-25) + r.min(1).values.abs() * 2.0**-11
        rel_err = max(rel_err, float((((g - r).abs().max(1).values - fp16_err) / span).max()))
    if method.bits <= 8:
        bound = 0.5 / (2**method.bits - 1)
        if levels > 2**method.bits or rel_err > 1.05 * bound + 2e-3:
            raise SystemExit(
                f"{method.name}: {levels} distinct values in a row (at most {2**method.bits}), "
                f"largest error beyond fp16's rounding {rel_err:.4f} of a row's range (bound {bound:.4f})"
            )
    return q, {
        "sparse_type": str(want),
        "max_levels_per_row": levels,
        "max_rel_err_beyond_fp16": rel_err,
        "bytes_allocated": allocated,
        "tbe_buffer_bytes": tbe_buffer,
    }


def run_serve(method: Method, base: FP32Model) -> dict:
    """A trained model (ours, or stock fp32 tables) regrouped for serving (`regroup_for_serving`)."""
    from shark_torchrec.jobs.export import ServingTiers, counted_priorities, regroup_for_serving

    t0 = time.perf_counter()
    arch = base.model.model.sparse_arch
    try:
        serving = ServingTiers(method.tiers, method.budget, "model", method.rounding)
        if base.counts is None:
            # An fp32 base has no trained priorities: one pass over its training split, shared by its served points.
            base.counts = counted_priorities(base.model, base.data)
        regroup_for_serving(base.model, serving, base.data, base.counts)
        ebc = arch.embedding_bag_collection
    finally:
        arch.embedding_bag_collection = base.ebc
    return {**served_record(base, ebc), "budget": method.budget, "seconds": time.perf_counter() - t0}


def served_record(model: FP32Model, ebc) -> dict:
    """Test AUC and log loss of `model` with our collection `ebc` in place of its own, and the
    bytes and rows per tier of its serving module (allocated = unpadded on CPU: 1-byte rows)."""
    from shark_torchrec.modules.inference import MixedPrecisionInferenceEmbeddingBagCollection

    m = model.evaluate(ebc)
    served = (  # `regroup_for_serving` with 1-bit rows gives the inference module itself
        ebc
        if isinstance(ebc, MixedPrecisionInferenceEmbeddingBagCollection)
        else MixedPrecisionInferenceEmbeddingBagCollection.from_trained(ebc)
    )
    return {
        "test_auc": m["auc"],
        "test_logloss": m["logloss"],
        "bytes_allocated": served.memory_bytes(),
        "bytes_unpadded": served.memory_bytes(),
        "fp32_bytes": sum(r * d * 4 for r, d in model.shapes),
        "rows": served.group_rows(),
    }


def seen_rows(fp: FP32Model) -> dict:
    """table -> bool [rows]: the rows some training batch of the unit looked up."""
    torch = fp.torch
    seen = {c.name: torch.zeros(c.num_embeddings, dtype=torch.bool) for c in fp.configs}
    table_of = {f: c.name for c in fp.configs for f in c.feature_names}
    for b in tqdm(fp.data.batches("train", 65536), desc="seen rows", file=sys.stderr, leave=False):
        kjt = b.sparse_features
        for f, jt in kjt.to_dict().items():
            if f in table_of:
                seen[table_of[f]][jt.values()] = True
    return seen


def run_drop_unseen(method: Method, fp: FP32Model) -> dict:
    """The `drop-unseen+int8` baseline (see its description)."""
    import dataclasses

    from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.precision.priority import DROPPED, INT8

    torch = fp.torch
    t0 = time.perf_counter()
    seen = seen_rows(fp)
    policy = PrecisionPolicy(
        mode="shark", tiers=("int8", "dropped"), row_fractions=(1.0,), optimizer="sgd", learning_rate=0.1, eps=1e-8
    )
    ebc = MixedPrecisionEmbeddingBagCollection(
        tables=[dataclasses.replace(c) for c in fp.configs], precision_policy=policy, device=torch.device("cpu")
    )
    state = fp.ebc.state_dict()
    weights = {c.name: state[f"embedding_bags.{c.name}.weight"].float() for c in fp.configs}
    ebc.load_state_dict({f"embedding_bags.{n}.weight": w for n, w in weights.items()}, strict=False)
    for store in ebc.stores:
        groups = torch.cat([torch.where(seen[t.name], INT8, DROPPED).to(torch.int8) for t in store.tables])
        store.set_groups(groups)
        for i, t in enumerate(store.tables):
            lo = int(store.table_base[i])
            unseen = ~seen[t.name]
            if bool(unseen.any()):
                store.set_fallback_rows(i, weights[t.name][unseen].mean(dim=0))
            # Seen rows rounded to nearest from their fp32 values (the load had put every row in int8).
            rows = seen[t.name].nonzero().flatten()
            store.write_rows(rows + lo, weights[t.name][rows])
    seen_fraction = {name: float(v.float().mean()) for name, v in seen.items()}
    return {**served_record(fp, ebc), "seen_fraction": seen_fraction, "seconds": time.perf_counter() - t0}


def run_post(method: Method, fp: FP32Model) -> dict:
    if method.name == DROP_UNSEEN:
        return run_drop_unseen(method, fp)
    t0 = time.perf_counter()
    q, check = quantize_checked(fp, method)
    m = fp.evaluate(q)
    fp32_bytes = sum(r * d * 4 for r, d in fp.shapes)
    return {
        "test_auc": m["auc"],
        "test_logloss": m["logloss"],
        "bytes_allocated": check.pop("bytes_allocated"),
        "bytes_unpadded": torchrec_unpadded_bytes(fp.shapes, method.bits),
        "fp32_bytes": fp32_bytes,
        "check": check,
        "seconds": time.perf_counter() - t0,
    }


def summarize(records: list[dict], methods: list[Method]) -> tuple[list[dict], list[dict]]:
    by = {(r["method"], r["unit"]): r for r in records}
    base = {u: r for (m, u), r in by.items() if m == "fp32"}
    rows = []
    for method in methods:
        rs = [r for r in records if r["method"] == method.name]
        if not rs:
            continue
        diff = paired([r["test_auc"] - base[r["unit"]]["test_auc"] for r in rs if r["unit"] in base])
        rows.append(
            {
                "method": method.name,
                "kind": method.kind,
                "n": len(rs),
                "test_auc": statistics.mean(r["test_auc"] for r in rs),
                "test_logloss": statistics.mean(r["test_logloss"] for r in rs),
                "alloc_ratio": statistics.mean(r["bytes_allocated"] / r["fp32_bytes"] for r in rs),
                "unpadded_ratio": statistics.mean(r["bytes_unpadded"] / r["fp32_bytes"] for r in rs),
                "diff": diff,
            }
        )
    pairs = []
    for a in (m for m in methods if m.kind in ("train", "serve") and m.name != "fp32"):
        for b in (m for m in methods if m.kind == "post" and m.bits <= 8):
            common = sorted(
                {r["unit"] for r in records if r["method"] == a.name}
                & {r["unit"] for r in records if r["method"] == b.name}
            )
            if common:
                d = paired([by[(a.name, u)]["test_auc"] - by[(b.name, u)]["test_auc"] for u in common])
                pairs.append({"a": a.name, "b": b.name, "diff": d})
    # Each signal against the paper's Eq. 7 run at the same commit, trained and served alike.
    names = {m.name for m in methods}
    for a in (m for m in methods if m.name.startswith("shark-paper+") and not m.name.startswith("shark-paper+eq7")):
        variant = a.name.split(">")[0]
        twin = a.name.replace(variant, "shark-paper+eq7", 1)
        if twin in names:
            common = sorted(
                {r["unit"] for r in records if r["method"] == a.name}
                & {r["unit"] for r in records if r["method"] == twin}
            )
            if common:
                pairs.append(
                    {
                        "a": a.name,
                        "b": twin,
                        "diff": paired([by[(a.name, u)]["test_auc"] - by[(twin, u)]["test_auc"] for u in common]),
                    }
                )
    return rows, pairs


def _ci(d: dict) -> str:
    if d["n"] < 2:
        return f"{d['mean']:+.4f} (n={d['n']})"
    return f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


def markdown(
    dim: int, rows: list[dict], pairs: list[dict], methods: list[Method], notes: list[str], command: str, data: str
) -> str:
    lines = [
        f"### {data}, dim {dim}",
        "",
        f"`{command}`",
        "",
        "| method | bytes / fp32 (allocated) | bytes / fp32 (unpadded) | test AUC | log loss | "
        "AUC - fp32, mean [95% CI] | SE | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        d, ref = s["diff"], s["method"] == "fp32"
        diff, se = ("(reference)", "") if ref else (_ci(d), f"{d['se']:.4f}")
        lines.append(
            f"| {s['method']} | {s['alloc_ratio']:.3f} | {s['unpadded_ratio']:.3f} | {s['test_auc']:.4f} | "
            f"{s['test_logloss']:.4f} | {diff} | {se} | {s['n']} |"
        )
    if pairs:
        lines += ["", "| paired difference (test AUC) | mean [95% CI] | SE | n |", "|---|---|---|---|"]
        for p in pairs:
            lines.append(f"| {p['a']} - {p['b']} | {_ci(p['diff'])} | {p['diff']['se']:.4f} | {p['diff']['n']} |")
    lines += ["", *[f"- `{m.name}`: {m.what}" for m in methods], *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot(dim: int, rows: list[dict], path: Path, data: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"train": "o", "post": "s", "serve": "^"}  # trained (ours in place, fp32), TorchRec post-training, served
    for i, s in enumerate(rows):
        d, color = s["diff"], plt.cm.tab20(i % 20)
        y = 0.0 if s["method"] == "fp32" else d["mean"]
        err = None
        if s["method"] != "fp32" and d["n"] > 1:
            err = [[y - d["ci"][0]], [d["ci"][1] - y]]
        x_a, x_u = 100 * s["alloc_ratio"], 100 * s["unpadded_ratio"]
        marker = markers.get(s["kind"], "o")
        ax.errorbar([x_a], [y], yerr=err, fmt=marker, color=color, capsize=3, label=f"{s['method']} (n={s['n']})")
        if abs(x_u - x_a) > 1e-9:
            ax.plot([x_u, x_a], [y, y], color=color, lw=0.8, ls=":")
            ax.plot([x_u], [y], marker=marker, mfc="none", color=color, ls="none")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xscale("log")
    ticks = [5, 10, 15, 20, 30, 50, 100]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel("embedding bytes, % of fp32 (log; filled: as allocated, hollow: unpadded)")
    ax.set_ylabel("test AUC - fp32 (paired mean, 95% CI)")
    ax.set_title(
        f"{data}, dim {dim}: AUC against embedding bytes (o trained, s TorchRec post-training, ^ served)", fontsize=9
    )
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main
def data_name(extra: list[str]) -> str:
    data = "synthetic"
    for i, a in enumerate(extra):
        if a == "--data" and i + 1 < len(extra):
            data = extra[i + 1]
        elif a.startswith("--data="):
            data = a.split("=", 1)[1]
    kind, _, arg = data.partition(":")
    return Path(arg).name if arg else kind


def code_provenance() -> dict:
    """Which shark_torchrec the runs use (this process and `shark train` import the same one): its
    folder, and the git commit with whether its files differ from it, or a snapshot's COMMIT file."""
    import subprocess

    import shark_torchrec

    pkg = Path(shark_torchrec.__file__).resolve().parent
    out: dict = {"shark_torchrec": str(pkg)}
    stamp = pkg.parent / "COMMIT"
    if stamp.is_file():
        out["commit"] = stamp.read_text().strip()
        out["snapshot"] = True
        return out
    try:
        git = ["git", "-C", str(pkg.parent)]
        out["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        out["dirty"] = bool(
            subprocess.run(
                [*git, "status", "--porcelain", "--", "shark_torchrec"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main() -> None:
    argv = sys.argv[1:]
    own, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument(
        "--cv", type=int, default=0, help="k-fold cross-validation: every seed runs every fold (seeds x folds units)"
    )
    p.add_argument("--dims", default="64,16")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated (default {','.join(DEFAULT_METHODS)})"
    )
    p.add_argument("--budgets", default="", help="extra budgets for shark-paper, e.g. 0.35,0.5")
    p.add_argument(
        "--out", default="", help="output prefix: writes <out>_d<dim>/ (default bench/results/frontier_<data>)"
    )
    p.add_argument("--resume", action="store_true", help="keep an earlier invocation's finished runs (same flags)")
    args = p.parse_args(own)
    data = data_name(extra)
    prefix = args.out or str(ROOT / "bench" / "results" / f"frontier_{data}")
    dims = [int(d) for d in args.dims.split(",") if d]
    names = [m for m in args.methods.split(",") if m]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    command = "bench/frontier.py " + " ".join(argv)
    all_units = units(args.seeds, args.cv)

    code = code_provenance()
    if code.get("dirty"):
        tqdm.write(
            f"warning: {code['shark_torchrec']} differs from commit {code['commit']} (uncommitted changes)",
            file=sys.stderr,
        )
    plan = {}
    for dim in dims:
        out = Path(f"{prefix}_d{dim}")
        path = out / "results.json"
        methods, notes = methods_for(names, dim, budgets)
        records: list[dict] = []
        if path.exists():
            old = json.loads(path.read_text())
            if not args.resume:
                raise SystemExit(f"{path} exists: pass --resume to keep its runs, or choose another --out")
            if old.get("shark_train_flags") != extra or old.get("cv") != args.cv:
                raise SystemExit(
                    f"{path} was written with other flags ({old.get('shark_train_flags')}, cv {old.get('cv')}): "
                    "its runs would not be paired with these; choose another --out"
                )
            records = old["records"]
            if old.get("code", {}).get("commit") != code.get("commit"):
                tqdm.write(
                    f"warning: {path}'s runs used shark_torchrec at {old.get('code', {}).get('commit')}, "
                    f"this invocation {code.get('commit')}",
                    file=sys.stderr,
                )
        out.mkdir(parents=True, exist_ok=True)
        done = {(r["method"], r["unit"]) for r in records}
        todo = [(u, m) for u in all_units for m in methods if (m.name, u.key) not in done]
        plan[dim] = (out, path, methods, notes, records, todo)

    total = sum(len(v[-1]) for v in plan.values())
    texts = []
    start = time.perf_counter()
    with tqdm(total=total, desc="runs", file=sys.stderr) as bar:
        for dim, (out, path, methods, notes, records, todo) in plan.items():
            meta = {
                "format": FORMAT,
                "command": command,
                "shark_train_flags": extra,
                "cv": args.cv,
                "dim": dim,
                "data": data,
                "code": code,
            }

            def save(out=out, path=path, meta=meta, records=records, methods=methods, notes=notes, dim=dim) -> None:
                write_json(path, {**meta, "records": records})
                rows, pairs = summarize(records, methods)
                (out / "table.md").write_text(markdown(dim, rows, pairs, methods, notes, command, data))
                plot(dim, rows, out / "auc_vs_bytes.png", data)

            for unit in all_units:
                mine = [m for u, m in todo if u == unit]
                fp: FP32Model | None = None
                served: dict = {}
                for method in mine:
                    bar.set_postfix_str(f"d{dim} {unit.key} {method.name}")
                    rec = {"method": method.name, "unit": unit.key, "seed": unit.seed, "fold": unit.fold, "dim": dim}
                    if method.kind == "train":
                        rec.update(run_train(method, extra, dim, unit, out / "runs" / run_name(method.name, unit)))
                    elif method.kind == "serve":
                        if method.base not in served:
                            served[method.base] = FP32Model(out / "runs" / run_name(method.base, unit))
                            base_rec = next(r for r in records if r["method"] == method.base and r["unit"] == unit.key)
                            again = served[method.base].evaluate()
                            if abs(again["auc"] - base_rec["test_auc"]) > 1e-4:
                                raise SystemExit(
                                    f"{method.base} {unit.key}: re-evaluated test AUC {again['auc']:.6f} is not "
                                    f"shark train's {base_rec['test_auc']:.6f}: the evaluations differ"
                                )
                        rec.update(run_serve(method, served[method.base]))
                    else:
                        if fp is None:
                            fp = FP32Model(out / "runs" / f"fp32-{unit.key}")
                            fp32_rec = next(r for r in records if r["method"] == "fp32" and r["unit"] == unit.key)
                            again = fp.evaluate()
                            # Our evaluation of the loaded fp32 model against shark train's own figure.
                            fp32_rec["reevaluated_test_auc"] = again["auc"]
                            if abs(again["auc"] - fp32_rec["test_auc"]) > 1e-4:
                                raise SystemExit(
                                    f"fp32 {unit.key}: re-evaluated test AUC {again['auc']:.6f} is not "
                                    f"shark train's {fp32_rec['test_auc']:.6f}: the evaluations differ"
                                )
                        rec.update(run_post(method, fp))
                    records.append(rec)
                    save()
                    bar.update(1)
                    tqdm.write(
                        f"d{dim} {unit.key} {method.name}: test AUC {rec['test_auc']:.4f}, "
                        f"bytes {rec['bytes_allocated'] / rec['fp32_bytes']:.3f} of fp32",
                        file=sys.stderr,
                    )
            save()
            texts.append((out / "table.md").read_text())
    print("\n".join(texts))
    print(f"wall time {time.perf_counter() - start:.0f} s ({total} runs)")


if __name__ == "__main__":
    main()
