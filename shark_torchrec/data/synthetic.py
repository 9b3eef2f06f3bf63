"""A seeded Criteo-like generator with planted field importance.

Every categorical field draws ids from a truncated Zipf law (exponent 1.1) whose ranks are
mapped to ids by a fixed permutation, so all fields share the same frequency law whatever
their role. The click probability is

    sigmoid(bias + sum_f strength_f * effect_f[id_f] + s_pair * M[id_a, id_b]
            + s_dense * z_d1)

with effects drawn N(0, 1) once per id, then labels are flipped with probability
`label_noise`. Noise fields have strength 0 but look like the others (cardinality, law).
Rows are produced in blocks of `BLOCK` rows, each from its own seeded generator, so any
row range can be produced without generating what precedes it (resume is O(1)).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

BLOCK = 4096
ZIPF_EXPONENT = 1.1
SPLITS = {"train": 0, "dev": 1, "test": 2}


@dataclass(frozen=True)
class PlantedField:
    """One categorical field of the generator: its name, table size, role (`strong`, `medium`,
    `weak`, `interaction` or `noise`) and the strength of its effect on the click logit."""

    name: str
    cardinality: int
    role: str  # strong | medium | weak | interaction | noise
    strength: float


# Cardinalities from tens to a million; roles deliberately not in the names.
DEFAULT_FIELDS: Tuple[PlantedField, ...] = (
    PlantedField("c1", 100, "strong", 1.2),
    PlantedField("c2", 20_000, "strong", 1.0),
    PlantedField("c3", 1_000, "medium", 0.6),
    PlantedField("c4", 200_000, "medium", 0.5),
    PlantedField("c5", 50, "weak", 0.2),
    PlantedField("c6", 5_000, "weak", 0.15),
    PlantedField("c7", 40, "interaction", 0.0),
    PlantedField("c8", 40, "interaction", 0.0),
    PlantedField("c9", 1_000_000, "noise", 0.0),
    PlantedField("c10", 50_000, "noise", 0.0),
    PlantedField("c11", 300, "noise", 0.0),
)
PAIR = ("c7", "c8")
PAIR_STRENGTH = 0.9
DENSE_NAMES = ("d1", "d2", "d3", "d4")
DENSE_STRENGTH = 0.5  # d1 carries signal; d2..d4 are noise
BIAS = -1.3
LABEL_NOISE = 0.05


def scaled_fields(scale: float, extra_noise_fields: int = 0) -> List[PlantedField]:
    """The default fields, then `extra_noise_fields` more noise fields (1,000 ids each before
    scaling): a wider model for the benchmarks whose cost grows with the field count.

    Args:
        scale: multiplies every field's cardinality (rounded, at least 10).
        extra_noise_fields: noise fields appended after the default ones (`c12`, `c13`, ...).

    Returns:
        The fields, in order.
    """
    extra = tuple(
        PlantedField(f"c{len(DEFAULT_FIELDS) + 1 + k}", 1_000, "noise", 0.0) for k in range(extra_noise_fields)
    )
    return [
        PlantedField(f.name, max(10, int(round(f.cardinality * scale))), f.role, f.strength)
        for f in DEFAULT_FIELDS + extra
    ]


class SyntheticGenerator:
    """The seeded generator of the module doc: fixed id permutations, per-id effects and the
    pair matrix drawn once from `seed`, then rows produced block by block.

    Args:
        seed: the seed of everything drawn.
        scale: multiplies every field's cardinality (`scaled_fields`).
        extra_noise_fields: noise fields after the default ones.
    """

    def __init__(self, seed: int, scale: float = 1.0, extra_noise_fields: int = 0) -> None:
        self.seed = seed
        self.fields = scaled_fields(scale, extra_noise_fields)
        root = np.random.default_rng([seed, 7919])
        self._cdf = {}
        self._perm = {}
        self._effect = {}
        for f in self.fields:
            p = 1.0 / np.arange(1, f.cardinality + 1, dtype=np.float64) ** ZIPF_EXPONENT
            cdf = np.cumsum(p)
            self._cdf[f.name] = cdf / cdf[-1]
            self._perm[f.name] = root.permutation(f.cardinality)
            self._effect[f.name] = root.standard_normal(f.cardinality).astype(np.float32)
        a, b = (self.card(n) for n in PAIR)
        self._pair = root.standard_normal((a, b)).astype(np.float32)

    def card(self, name: str) -> int:
        """The cardinality of the field called `name` (StopIteration when there is none).

        Args:
            name: the field's name (`c1`, `c2`, ...).

        Returns:
            Its cardinality (ids 0 .. cardinality - 1).
        """
        return next(f.cardinality for f in self.fields if f.name == name)

    def truth(self) -> Dict[str, object]:
        """Which fields are which: written beside a run so importance can be checked.

        Returns:
            A JSON-able dict: each field (name, cardinality, role, strength), the pair and its
            strength, the dense fields, the bias, the label noise, the Zipf exponent and the seed.
        """
        return {
            "fields": [asdict(f) for f in self.fields],
            "pair": {"fields": list(PAIR), "strength": PAIR_STRENGTH},
            "dense": {"informative": "d1", "strength": DENSE_STRENGTH, "noise": list(DENSE_NAMES[1:])},
            "bias": BIAS,
            "label_noise": LABEL_NOISE,
            "zipf_exponent": ZIPF_EXPONENT,
            "seed": self.seed,
        }

    def block(self, split: str, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [index*BLOCK, (index+1)*BLOCK) of a split: labels, dense, ids.

        Args:
            split: `train`, `dev` or `test`.
            index: the block's index.

        Returns:
            (labels float32 [BLOCK], dense float32 [BLOCK, 4], ids int64 [BLOCK, fields]).
        """
        rng = np.random.default_rng([self.seed, SPLITS[split], index])
        n = BLOCK
        ids = np.empty((n, len(self.fields)), np.int64)
        logit = np.full(n, BIAS, np.float32)
        for j, f in enumerate(self.fields):
            rank = np.searchsorted(self._cdf[f.name], rng.random(n), side="right")
            rank = np.minimum(rank, f.cardinality - 1)
            ids[:, j] = self._perm[f.name][rank]
            if f.strength:
                logit += f.strength * self._effect[f.name][ids[:, j]]
        ja, jb = (next(j for j, f in enumerate(self.fields) if f.name == n_) for n_ in PAIR)
        logit += PAIR_STRENGTH * self._pair[ids[:, ja], ids[:, jb]]
        z = rng.standard_normal((n, len(DENSE_NAMES))).astype(np.float32)
        logit += DENSE_STRENGTH * z[:, 0]
        # Counts like Criteo's integer columns, fed through the same log(1 + x).
        dense = np.log1p(np.exp(1.5 * z + 1.0)).astype(np.float32)
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        flip = rng.random(n) < LABEL_NOISE
        labels[flip] = 1.0 - labels[flip]
        return labels, dense, ids

    def rows(self, split: str, start: int, stop: int):
        """Rows [start, stop) of a split, from the blocks that hold them.

        Args:
            split: `train`, `dev` or `test`.
            start, stop: the row range (stop > start).

        Returns:
            (labels [n], dense [n, 4], ids [n, fields]).
        """
        first, last = start // BLOCK, (stop - 1) // BLOCK
        parts = [self.block(split, b) for b in range(first, last + 1)]
        labels, dense, ids = (np.concatenate([p[i] for p in parts]) for i in range(3))
        lo = start - first * BLOCK
        return labels[lo : lo + stop - start], dense[lo : lo + stop - start], ids[lo : lo + stop - start]


class SyntheticSplit:
    """A split of `num_rows` synthetic rows, streamed as fixed-size local batches; with
    `modulus` and `residues`, only the rows i of those `num_rows` with i % modulus in
    `residues` (a split carved from another, as `files.LineSubset` carves file lines)."""

    def __init__(
        self,
        gen: SyntheticGenerator,
        split: str,
        num_rows: int,
        keep: List[int],
        dense_keep: List[int],
        modulus: int = 1,
        residues: Sequence[int] = (0,),
    ) -> None:
        self.gen, self.split, self.source_rows = gen, split, num_rows
        self.keep, self.dense_keep = keep, dense_keep
        self.modulus, self.residues = modulus, tuple(sorted(set(residues)))
        self.n = sum(len(range(r, num_rows, modulus)) for r in self.residues)

    def num_lines(self) -> int:
        """Rows of this split (after carving).

        Returns:
            The row count.
        """
        return self.n

    def subset(self, modulus: int, residues: Sequence[int]) -> "SyntheticSplit":
        """The rows j of this split (in its order) with j % modulus in `residues`.

        Args:
            modulus: the period of the carving.
            residues: the residues kept.

        Returns:
            A new SyntheticSplit over the same source rows.

        Raises:
            ValueError: this split is already carved.
        """
        if self.modulus != 1:
            raise ValueError("a carved synthetic split is not carved again")
        return SyntheticSplit(self.gen, self.split, self.source_rows, self.keep, self.dense_keep, modulus, residues)

    def _rows(self, start: int, stop: int):
        """Rows [start, stop) of this split: the source rows they map to."""
        if self.modulus == 1:
            return self.gen.rows(self.split, start, stop)
        j = np.arange(start, stop)
        per = len(self.residues)
        source = (j // per) * self.modulus + np.asarray(self.residues)[j % per]
        labels, dense, ids = self.gen.rows(self.split, int(source[0]), int(source[-1]) + 1)
        pick = source - source[0]
        return labels[pick], dense[pick], ids[pick]

    def local_batches(self, global_batch: int, rank: int, world: int, skip_batches: int = 0) -> Iterator:
        """This rank's local batches, as `FileSplit.local_batches` makes them from file lines.

        Args:
            global_batch: rows per global batch.
            rank, world: this rank and the number of ranks.
            skip_batches: global batches to skip first.

        Yields:
            (labels, dense, ids, valid) arrays of global_batch / world slots, the kept dense
            columns and fields only; the last batch is padded.
        """
        local = global_batch // world
        for k in range(skip_batches, -(-self.n // global_batch)):
            start, stop = k * global_batch, min((k + 1) * global_batch, self.n)
            labels, dense, ids = self._rows(start, stop)
            labels, dense, ids = labels[rank::world], dense[rank::world], ids[rank::world]
            m = labels.shape[0]
            valid = np.zeros(local, bool)
            valid[:m] = True
            pad = local - m
            yield (
                np.pad(labels, (0, pad)),
                np.pad(dense[:, self.dense_keep], ((0, pad), (0, 0))),
                np.pad(ids[:, self.keep], ((0, pad), (0, 0))),
                valid,
            )
