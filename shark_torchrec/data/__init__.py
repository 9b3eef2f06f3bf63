"""Data sources: `synthetic`, `criteo:DIR`, `csv:DIR`, all streamed as rank-aligned batches."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional

from shark_torchrec.config import ConfigError, DataConfig
from shark_torchrec.data.batch import Batch, make_batch
from shark_torchrec.data.files import BadLineStats, CsvLayout, FileSplit, FoldSplit, HashEncoder, VocabEncoder
from shark_torchrec.data.schema import DataError, Schema, kept_schema
from shark_torchrec.data.synthetic import DENSE_NAMES, SyntheticGenerator, SyntheticSplit

SPLIT_NAMES = ("train", "dev", "test")
SELECTION, CHOICE, CONFIRM = "selection", "choice", "confirm"  # carved splits (see `Dataset.decision_splits`)
SELECTION_MODULUS = 100  # --selection-fraction F carves train's lines i with i % 100 < 100 F


def carve_selection(splits: Dict[str, object], fraction: float) -> Dict[str, object]:
    """`splits` with `fraction` of train's lines moved to a `selection` split (none when 0).

    Args:
        splits: split name -> split (it needs `train`, which has `subset`).
        fraction: the share of train to carve, in hundredths: line i goes to `selection` when
            i % 100 < 100 x fraction.

    Returns:
        A new dict: `train` without the carved lines and `selection` with them; `splits` itself
        when nothing is carved.
    """
    k = round(SELECTION_MODULUS * fraction)
    if k == 0:
        return splits
    train = splits["train"]
    return {
        **splits,
        "train": train.subset(SELECTION_MODULUS, range(k, SELECTION_MODULUS)),
        SELECTION: train.subset(SELECTION_MODULUS, range(k)),
    }


__all__ = ["Batch", "DataError", "Dataset", "Schema", "open_dataset"]


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class Dataset:
    """A schema plus three splits that yield local batches for (rank, world)."""

    def __init__(
        self, schema: Schema, splits: Dict[str, object], encoder=None, truth=None, layout: Optional[CsvLayout] = None
    ) -> None:
        self.schema = schema
        self.splits = splits
        self.encoder = encoder
        self.truth = truth
        self.layout = layout  # how a raw line parses (files only; None for synthetic data)
        self.full_schema = schema  # every categorical field the files carry
        self.columns: Optional[List[int]] = None  # sparse columns kept (None: all)

    def with_fields(self, kept: List[str]) -> "Dataset":
        """The same data with only the `kept` categorical fields (a pruned model's input):
        the other columns are still read and checked, then dropped from every batch.

        Args:
            kept: the categorical fields to keep (names of the full schema's fields).

        Returns:
            A new Dataset over the same splits, with the kept fields' schema and their columns.
        """
        full = self.full_schema
        view = Dataset(kept_schema(full, kept), self.splits, self.encoder, self.truth, self.layout)
        view.full_schema = full
        view.columns = [full.sparse_names.index(f) for f in view.schema.sparse_names]
        return view

    def decision_splits(self) -> "Dataset":
        """The same data with the splits `shark prune` / `compress` use: `dev` is the selection
        split every training decision reads (the stop test, early stopping of fine-tuning),
        `choice` one that only the choice of the model to serve reads (our compressed model
        was early-stopped and pruned on the selection split, so its drop there is optimistic),
        `confirm` one no decision reads, for the final figure, and `test` as before (only
        logged). With `--selection-fraction F` the selection split is the carved part of train,
        dev's even lines choose and its odd lines confirm; without, dev's even lines select, and
        of its odd lines those with i % 4 == 1 choose and i % 4 == 3 confirm. Disjoint by
        construction: carved by line position, residues that do not overlap.

        Returns:
            A new Dataset with those splits (`train` and `test` as before); this one when it
            already has them.

        Raises:
            DataError: the selection, choice or confirmation split is empty.
        """
        if CONFIRM in self.splits:
            return self  # already the decision view (a second carving would cut dev again)
        splits = dict(self.splits)
        dev = self.splits["dev"]
        if SELECTION in splits:
            splits["dev"] = splits.pop(SELECTION)
            splits[CHOICE], splits[CONFIRM] = dev.subset(2, (0,)), dev.subset(2, (1,))
        else:
            splits["dev"], splits[CHOICE], splits[CONFIRM] = (
                dev.subset(2, (0,)),
                dev.subset(4, (1,)),
                dev.subset(4, (3,)),
            )
        for name, what in (("dev", "selection"), (CHOICE, "choice"), (CONFIRM, "confirmation")):
            try:
                rows = splits[name].num_lines()
            except DataError:
                rows = 0
            if rows == 0:
                raise DataError(
                    f"the {what} split is empty: dev has {self.splits['dev'].num_lines()} rows and "
                    f"--selection-fraction {'carves' if SELECTION in self.splits else 'is 0, so dev is cut in four'}; "
                    "prune and compress need rows in all three (a larger dev split, or --selection-fraction F)"
                )
        view = Dataset(self.schema, splits, self.encoder, self.truth, self.layout)
        view.full_schema, view.columns = self.full_schema, self.columns
        return view

    def num_batches(self, split: str, global_batch: int) -> int:
        """Global batches that cover a split (the last one may be partial).

        Args:
            split: the split's name (`train`, `dev`, `test`, or a carved one).
            global_batch: lines per global batch.

        Returns:
            ceil(lines / global_batch).
        """
        return -(-self.splits[split].num_lines() // global_batch)

    def batches(
        self, split: str, global_batch: int, rank: int = 0, world: int = 1, skip_batches: int = 0
    ) -> Iterator[Batch]:
        """This rank's share of each global batch of a split, in order, as `Batch`es of a fixed
        size (global_batch / world; padding where lines were bad or the split ended).

        Args:
            split: the split's name.
            global_batch: lines per global batch (over all ranks).
            rank, world: this rank and the number of ranks.
            skip_batches: global batches to skip first (a resumed epoch).

        Yields:
            Batches over this view's fields.

        Raises:
            ConfigError: `global_batch` (a batch size flag) is not divisible by `world`.
        """
        if global_batch % world:
            raise ConfigError(f"global batch {global_batch} is not divisible by {world} ranks")
        source = self.splits[split]
        if self.encoder is None:
            arrays = source.local_batches(global_batch, rank, world, skip_batches)
        else:
            arrays = source.local_batches(self.encoder, global_batch, rank, world, skip_batches)
        for labels, dense, ids, valid in arrays:
            if self.columns is not None:
                ids = ids[:, self.columns]
            yield make_batch(self.schema.sparse_names, labels, dense, ids, valid)

    def bad_lines(self, split: str) -> Optional[BadLineStats]:
        """The malformed lines this process skipped so far in a split (file splits only).

        Args:
            split: the split's name.

        Returns:
            Its counts and first examples, or None for a split without them (synthetic data).
        """
        return getattr(self.splits[split], "stats", None)


def _from_layout(cfg: DataConfig, root: Path, layout: CsvLayout, suffix: str, has_header: bool) -> Dataset:
    splits = {
        s: FileSplit(
            root / f"{s}{suffix}",
            layout.parse,
            has_header,
            len(layout.dense_names),
            len(layout.sparse_names),
            cfg.strict,
        )
        for s in SPLIT_NAMES
    }
    if cfg.folds:
        # k-fold cross-validation over the lines of all three files: fold `fold` is test, the
        # next one dev, the rest train.
        files = [splits[s] for s in SPLIT_NAMES]
        k, f = cfg.folds, cfg.test_fold
        splits = {
            "train": FoldSplit(files, k, [r for r in range(k) if r not in (f, (f + 1) % k)]),
            "dev": FoldSplit(files, k, [(f + 1) % k]),
            "test": FoldSplit(files, k, [f]),
        }
    splits = carve_selection(splits, cfg.selection_fraction)
    train = splits["train"]  # the vocabulary comes from the lines models train on
    if cfg.encoding == "hash":
        encoder = HashEncoder(cfg.hash_rows)
    else:
        cats = (c for _, _, c in train.parsed())
        encoder = VocabEncoder.build(cats, len(layout.sparse_names), cfg.min_count)
    sizes = [encoder.num_embeddings(j) for j in range(len(layout.sparse_names))]
    return Dataset(Schema(layout.dense_names, layout.sparse_names, sizes), splits, encoder, layout=layout)


def _csv(cfg: DataConfig, root: Path) -> Dataset:
    found = [p for p in (root / "train.csv", root / "train.tsv") if p.is_file()]
    if not found:
        raise DataError(f"missing split file: {root}/train.csv (or train.tsv)")
    train = found[0]
    layout = CsvLayout.from_header(train, cfg.label, _names(cfg.categorical), _names(cfg.dense), _names(cfg.drop))
    for split in SPLIT_NAMES:
        other = root / f"{split}{train.suffix}"
        if other != train and other.is_file():
            layout.check_header(other, train)
    return _from_layout(cfg, root, layout, train.suffix, has_header=True)


def _criteo(cfg: DataConfig, root: Path) -> Dataset:
    return _from_layout(cfg, root, CsvLayout.criteo(_names(cfg.drop)), ".tsv", has_header=False)


def _synthetic(cfg: DataConfig, seed: int) -> Dataset:
    if seed < 0:  # numpy's seed sequences take none (its error would not name the flag)
        raise ConfigError(f"train.seed={seed} (--seed): synthetic data needs a seed >= 0")
    gen = SyntheticGenerator(seed, cfg.synthetic_scale, cfg.synthetic_noise_fields)
    drop = set(_names(cfg.drop))
    known = {f.name for f in gen.fields} | set(DENSE_NAMES)
    if drop - known:
        raise DataError(f"--drop: unknown synthetic column(s) {', '.join(sorted(drop - known))}")
    keep = [j for j, f in enumerate(gen.fields) if f.name not in drop]
    dense_keep = [j for j, n in enumerate(DENSE_NAMES) if n not in drop]
    rows = {"train": cfg.synthetic_train_rows, "dev": cfg.synthetic_eval_rows, "test": cfg.synthetic_eval_rows}
    for s, n in rows.items():
        if n <= 0:
            raise DataError(f"synthetic: the {s} split must have at least one row")
    schema = Schema(
        [DENSE_NAMES[j] for j in dense_keep],
        [gen.fields[j].name for j in keep],
        [gen.fields[j].cardinality for j in keep],
    )
    splits = {s: SyntheticSplit(gen, s, n, keep, dense_keep) for s, n in rows.items()}
    return Dataset(schema, carve_selection(splits, cfg.selection_fraction), truth=gen.truth())


def open_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Open the data `cfg.data` names: `synthetic`, `criteo:DIR` or `csv:DIR`.

    Args:
        cfg: the `[dataset]` group.
        seed: the synthetic generator's seed (files ignore it).

    Returns:
        The dataset: schema, splits (k folds and a carved selection split as `cfg` says) and,
        for files, the encoder built from the train split.

    Raises:
        DataError: an unknown source, a missing directory or split file, columns the files do
            not have, or an empty synthetic split.
        ConfigError: synthetic data and a negative seed.
    """
    kind, _, arg = cfg.data.partition(":")
    if kind == "synthetic":
        return _synthetic(cfg, seed)
    if kind in ("criteo", "csv"):
        root = Path(arg)
        if not arg or not root.is_dir():
            raise DataError(f"--data {cfg.data}: directory {arg!r} not found")
        return _criteo(cfg, root) if kind == "criteo" else _csv(cfg, root)
    raise DataError(f"--data {cfg.data!r}: expected synthetic, criteo:DIR or csv:DIR")
