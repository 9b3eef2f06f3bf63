"""Streaming readers for Criteo-format TSV and headed CSV/TSV files.

A split is read line by line, never loaded whole. Global batch k is the k-th block of
`global_batch` raw lines; rank r parses only the lines i of that block with i % world == r
and fills its fixed-size local batch, leaving padding where a line was bad or the file
ended. Every rank therefore sees the same number of batches whatever lines are skipped,
and the union of the ranks' batches is exactly the single-process batch.
"""

from __future__ import annotations

import csv
import itertools
import math
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from shark_torchrec.data.schema import DataError

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_SPARSE = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = 1 + len(CRITEO_DENSE) + len(CRITEO_SPARSE)

ParsedLine = Tuple[float, List[float], List[str]]


class BadLine(Exception):
    """A line that cannot be parsed; the reason is the message."""


@dataclass
class BadLineStats:
    """Counts skipped lines and keeps the first few as `file:line: reason`."""

    max_examples: int = 5
    count: int = 0
    examples: List[str] = field(default_factory=list)
    lines: int = 0  # lines read, good and bad

    def add(self, where: str, reason: str) -> None:
        """Count one skipped line (and keep it while fewer than `max_examples` are kept).

        Args:
            where: the line, as `file:line`.
            reason: why it was skipped.
        """
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {reason}")


# A split of which more than half the lines read are malformed is refused (once this many lines
# were read, or at the end of a shorter pass): a wrong --label or column layout, not a few bad
# lines to skip. Training on the rest would report figures of a handful of lines as a result.
MOSTLY_BAD_AFTER = 1000


def refuse_mostly_bad(where: str, stats: BadLineStats, done: bool = False) -> None:
    """Raise when more than half of the lines read from a split are malformed (see MOSTLY_BAD_AFTER).

    Args:
        where: the split's file (or files).
        stats: its lines read and malformed lines so far.
        done: the pass is over (a shorter file is judged then).

    Raises:
        DataError: naming the file, the counts and the first malformed line.
    """
    bad, lines = stats.count, stats.lines
    if (lines >= MOSTLY_BAD_AFTER or done) and 2 * bad > lines:
        raise DataError(
            f"{where}: {bad:,} of the {lines:,} lines read are malformed (first: {stats.examples[0]}); check "
            "--label and the columns (malformed lines are skipped only when they are few; --strict stops at the first)"
        )


def _read_header(path: Path, delimiter: str) -> List[str]:
    """The header line's names (stripped) of a CSV or TSV file.

    Raises:
        DataError: an empty file, or a header line the csv module cannot read (naming the file
            and line 1).
    """
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        header_line = f.readline()
    if not header_line.strip():
        raise DataError(f"{path}: empty file (a header line is expected)")
    try:
        header = next(csv.reader([header_line], delimiter=delimiter))
    except csv.Error as e:  # e.g. a column name longer than csv.field_size_limit()
        raise DataError(f"{path}:1: the header line cannot be read (csv: {e})") from None
    return [h.strip() for h in header]


def _no_header_hint(header: Sequence[str]) -> str:
    """A hint for a "header" that is a line of data: most of it numbers or empty, as the first
    line of Criteo's files (which have no header) is, read as `csv:` by mistake."""

    def looks_like_data(name: str) -> bool:
        try:
            float(name)
            return True
        except ValueError:
            return name == "" or (len(name) == 8 and all(c in "0123456789abcdef" for c in name))

    if sum(map(looks_like_data, header)) * 2 > len(header):
        return (
            ": the first line looks like data, not a header (files without one, as Criteo's .tsv, "
            "are read with --data criteo:DIR)"
        )
    return ""


def _parse_label(text: str) -> float:
    t = text.strip()
    if t in ("0", "1"):
        return float(t)
    try:
        v = float(t)
    except ValueError:
        raise BadLine(f"label {text!r} is not 0 or 1") from None
    if v not in (0.0, 1.0):
        raise BadLine(f"label {text!r} is not 0 or 1")
    return v


def _parse_number(text: str, column: str) -> float:
    t = text.strip()
    if not t:
        return 0.0
    try:
        v = float(t)
    except ValueError:
        raise BadLine(f"column {column}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise BadLine(f"column {column}: {text!r} is not finite")
    return v


@dataclass
class CsvLayout:
    """Which columns of a headed CSV/TSV are label, dense and categorical."""

    delimiter: str
    num_columns: int
    label_index: int
    dense_names: List[str]
    dense_index: List[int]
    sparse_names: List[str]
    sparse_index: List[int]
    log_dense: bool = False
    """Criteo: dense values become log(1 + max(x, 0))."""
    header: Optional[List[str]] = None
    """The files' header names (stripped); None: the files have no header line."""

    @staticmethod
    def from_header(
        path: Path,
        label: str,
        categorical: Sequence[str],
        dense: Sequence[str],
        drop: Sequence[str],
    ) -> "CsvLayout":
        """The layout of a headed CSV (`,`) or TSV (`.tsv`: tab) file, from its header line.

        Args:
            path: the file (its first line is the header).
            label: the label column's name.
            categorical: the categorical columns; empty: every column that is not the label,
                dense or dropped.
            dense: the numeric columns.
            drop: columns to ignore.

        Returns:
            The layout, with the header's names.

        Raises:
            DataError: an empty file, a header line the csv module cannot read (naming the file
                and line 1), a named column not in the header, a column given twice or in two
                roles, or no categorical column.
        """
        delimiter = "\t" if path.suffix == ".tsv" else ","
        header = _read_header(path, delimiter)
        index = {h: i for i, h in enumerate(header)}

        def lookup(names: Sequence[str], what: str) -> List[int]:
            missing = [n for n in names if n not in index]
            if missing:
                shown = ", ".join(header) if len(header) <= 20 else ", ".join(header[:20]) + f", ... ({len(header)})"
                raise DataError(
                    f"{path}: {what} column(s) {', '.join(missing)} not in header ({shown}){_no_header_hint(header)}"
                )
            return [index[n] for n in names]

        (label_index,) = lookup([label], "label")
        dense_index = lookup(dense, "dense")
        lookup(drop, "dropped")
        if categorical:
            sparse = list(categorical)
        else:
            taken = {label, *dense, *drop}
            sparse = [h for h in header if h not in taken]
        sparse_index = lookup(sparse, "categorical")
        for what, names in (("categorical", sparse), ("dense", dense)):
            if label in names:
                raise DataError(f"{path}: the label column {label!r} is also given as a {what} column")
            if len(set(names)) != len(names):
                raise DataError(f"{path}: a {what} column is named twice ({', '.join(names)})")
        overlap = set(sparse) & set(dense)
        if overlap:
            raise DataError(f"{path}: column(s) {', '.join(sorted(overlap))} both dense and categorical")
        if not sparse:
            raise DataError(f"{path}: no categorical columns selected")
        return CsvLayout(
            delimiter, len(header), label_index, list(dense), dense_index, sparse, sparse_index, header=header
        )

    def check_header(self, path: Path, first: Path) -> None:
        """Refuse a split file whose header is not the first file's: every split's lines are
        read by position, so a file with its columns in another order (or other columns) would
        be read as the wrong fields, without an error (a dev split with two columns swapped
        read dev AUC 0.50 where 0.93 was right).

        Args:
            path: another split's file.
            first: the file the layout was read from (for the message).

        Raises:
            DataError: naming both files and how their headers differ.
        """
        if self.header is None:
            return
        header = _read_header(path, self.delimiter)
        if header == self.header:
            return
        if sorted(header) == sorted(self.header):
            how = "the same columns in another order"
        else:
            missing = [h for h in self.header if h not in header]
            extra = [h for h in header if h not in self.header]
            parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
                [f"has {', '.join(extra)} besides"] if extra else []
            )
            how = "; ".join(parts) or "columns named twice"
        raise DataError(
            f"{path}: its header ({', '.join(header)}) is not {first.name}'s ({', '.join(self.header)}): {how}. "
            "The split files' columns are read by position: give them the same header"
        )

    @staticmethod
    def criteo(drop: Sequence[str] = ()) -> "CsvLayout":
        """Criteo's fixed 40 columns: label, I1..I13, C1..C26 (no header).

        Args:
            drop: column names (I1..I13, C1..C26) left out of the fields.

        Returns:
            The layout.

        Raises:
            DataError: a name in `drop` that is no Criteo column.
        """
        unknown = set(drop) - set(CRITEO_DENSE) - set(CRITEO_SPARSE)
        if unknown:
            raise DataError(f"--drop: unknown Criteo column(s) {', '.join(sorted(unknown))}")
        dense = [(1 + i, c) for i, c in enumerate(CRITEO_DENSE) if c not in drop]
        sparse = [(14 + i, c) for i, c in enumerate(CRITEO_SPARSE) if c not in drop]
        return CsvLayout(
            "\t",
            CRITEO_COLUMNS,
            0,
            [c for _, c in dense],
            [i for i, _ in dense],
            [c for _, c in sparse],
            [i for i, _ in sparse],
            log_dense=True,
        )

    def parse(self, line: str) -> ParsedLine:
        """One raw line of the file.

        Args:
            line: the line (its end of line is stripped).

        Returns:
            (label 0.0 or 1.0, dense values (empty: 0; Criteo's log(1 + max(x, 0))), the
            categorical values as stripped strings).

        Raises:
            BadLine: a line the csv module cannot read (a field longer than
                `csv.field_size_limit()`), the wrong number of columns, a label other than 0/1,
                or a dense value that is not a finite number.
        """
        line = line.rstrip("\r\n")
        if self.log_dense:  # Criteo: plain tab-separated, no quoting
            cols = line.split("\t")
        else:
            try:
                cols = next(csv.reader([line], delimiter=self.delimiter), [])
            except csv.Error as e:  # e.g. a field longer than csv.field_size_limit()
                raise BadLine(f"the line cannot be read (csv: {e})") from None
        if len(cols) != self.num_columns:
            raise BadLine(f"expected {self.num_columns} columns, got {len(cols)}")
        label = _parse_label(cols[self.label_index])
        dense = [_parse_number(cols[i], n) for i, n in zip(self.dense_index, self.dense_names)]
        if self.log_dense:
            dense = [math.log1p(max(v, 0.0)) for v in dense]
        return label, dense, [cols[i].strip() for i in self.sparse_index]

    def describe(self) -> Dict[str, Any]:
        """The parsing rules of `parse` as JSON-able data, for a serving export (whose recipe,
        `shark_torchrec/serve.py`, applies them to raw lines).

        Returns:
            delimiter, quoting (`csv`: Python's csv module, default dialect; `none`: a plain
            split), header (names or None), num_columns, label_column, dense (name and column
            of each dense feature), dense_transform (`log1p_clamp0`: log(1 + max(x, 0)), or
            `none`), categorical (name and column of every categorical field, in field-index
            order: the index the hash encoding mixes in).
        """
        return {
            "delimiter": self.delimiter,
            "quoting": "none" if self.log_dense else "csv",
            "header": self.header,
            "num_columns": self.num_columns,
            "label_column": self.label_index,
            "dense": [{"name": n, "column": i} for n, i in zip(self.dense_names, self.dense_index)],
            "dense_transform": "log1p_clamp0" if self.log_dense else "none",
            "categorical": [{"name": n, "column": i} for n, i in zip(self.sparse_names, self.sparse_index)],
        }


class Encoder:
    """Maps a categorical string of field j to a row id."""

    def num_embeddings(self, j: int) -> int:
        """Rows of field j's table.

        Args:
            j: the field's index among the categorical fields.

        Returns:
            The table's rows.
        """
        raise NotImplementedError

    def encode(self, j: int, value: str) -> int:
        """The row id of a value of field j.

        Args:
            j: the field's index among the categorical fields.
            value: the raw (stripped) value.

        Returns:
            A row of field j's table.
        """
        raise NotImplementedError


class HashEncoder(Encoder):
    """Hashes each value into a table of `size` rows (every field the same size): crc32 of
    `"{j}:{value}"` modulo `size`.

    Args:
        size: rows per table.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def num_embeddings(self, j: int) -> int:
        """`size`, for every field.

        Args:
            j: the field's index among the categorical fields (every field alike).

        Returns:
            The hash table's rows.
        """
        return self.size

    def encode(self, j: int, value: str) -> int:
        """The value's hash row: crc32 of `"{j}:{value}"` modulo `size`.

        Args:
            j: the field's index among the categorical fields.
            value: the raw value.

        Returns:
            A row in [0, size).
        """
        # crc32 is stable across processes and Python versions, unlike hash().
        return zlib.crc32(f"{j}:{value}".encode()) % self.size

    def describe(self, fields: Sequence[str]) -> Dict[str, Any]:
        """The encoding as JSON-able data (for a serving export).

        Args:
            fields: ignored (one rule for every field).

        Returns:
            {"kind": "hash", "size", "rule"}: the rule as Python source.
        """
        return {"kind": "hash", "size": self.size, "rule": "zlib.crc32(f'{field_index}:{value}'.encode()) % size"}


class VocabEncoder(Encoder):
    """Vocabulary per field from the train split; row 0 is the out-of-vocabulary row."""

    def __init__(self, vocabs: List[dict]) -> None:
        self.vocabs = vocabs

    @staticmethod
    def build(values: Iterator[List[str]], num_fields: int, min_count: int) -> "VocabEncoder":
        """Count the values of every field and number those kept from row 1, most frequent
        first (ties by value).

        Args:
            values: the categorical values of each line (of the train split).
            num_fields: the categorical fields.
            min_count: values seen fewer times are left out (they map to row 0).

        Returns:
            The encoder.
        """
        counters = [Counter() for _ in range(num_fields)]
        for cats in values:
            for c, v in zip(counters, cats):
                c[v] += 1
        vocabs = []
        for c in counters:
            kept = sorted((v for v, n in c.items() if n >= min_count), key=lambda v: (-c[v], v))
            vocabs.append({v: i + 1 for i, v in enumerate(kept)})
        return VocabEncoder(vocabs)

    def num_embeddings(self, j: int) -> int:
        """Field j's vocabulary size plus the out-of-vocabulary row.

        Args:
            j: the field's index among the categorical fields.

        Returns:
            The table's rows.
        """
        return len(self.vocabs[j]) + 1

    def encode(self, j: int, value: str) -> int:
        """The value's row in field j's vocabulary, 0 when it is not in it.

        Args:
            j: the field's index among the categorical fields.
            value: the raw value.

        Returns:
            Its row (0: out of vocabulary).
        """
        return self.vocabs[j].get(value, 0)

    def describe(self, fields: Sequence[str]) -> Dict[str, Any]:
        """The encoding as JSON-able data (for a serving export).

        Args:
            fields: the categorical field names, in field-index order.

        Returns:
            kind `vocab` and, per field, its values in row order: value k of the list is row
            k + 1 (row 0, the out-of-vocabulary row, takes every other value).
        """
        if len(fields) != len(self.vocabs):
            raise ValueError(f"{len(fields)} field names for {len(self.vocabs)} vocabularies")
        values = {}
        for name, vocab in zip(fields, self.vocabs):
            ordered = sorted(vocab, key=vocab.__getitem__)
            if [vocab[v] for v in ordered] != list(range(1, len(ordered) + 1)):
                raise ValueError(f"vocabulary of field {name}: rows are not 1..{len(ordered)}")
            values[name] = ordered
        return {"kind": "vocab", "oov_row": 0, "values": values}


class FileSplit:
    """One split file, streamed into fixed-size local batches."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[str], ParsedLine],
        has_header: bool,
        num_dense: int,
        num_sparse: int,
        strict: bool,
        max_examples: int = 5,
    ) -> None:
        if not path.is_file():
            raise DataError(f"missing split file: {path}")
        self.path = path
        self.parse = parse
        self.has_header = has_header
        self.num_dense = num_dense
        self.num_sparse = num_sparse
        self.strict = strict
        self.stats = BadLineStats(max_examples)
        self._num_lines: Optional[int] = None

    def num_lines(self) -> int:
        """Data lines in the file (a cheap byte scan, cached).

        Returns:
            The lines, the header not counted.
        """
        if self._num_lines is None:
            n = 0
            last = b"\n"
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 22):
                    n += chunk.count(b"\n")
                    last = chunk[-1:]
            if last != b"\n":
                n += 1
            self._num_lines = n - (1 if self.has_header and n > 0 else 0)
            if self._num_lines <= 0:
                raise DataError(f"empty split: {self.path} has no data lines")
        return self._num_lines

    def _numbered_lines(self) -> Iterator[Tuple[int, str]]:
        # utf-8-sig: a byte-order mark (as some editors write) is not part of the first line.
        f = open(self.path, newline="", encoding="utf-8-sig", errors="replace")
        with f:
            start = 1
            if self.has_header:
                f.readline()
                start = 2
            yield from enumerate(f, start)

    def _where(self, lineno) -> str:
        return f"{self.path}:{lineno}"

    def describe(self) -> str:
        """The split's file, as errors name it.

        Returns:
            The file's path.
        """
        return str(self.path)

    def subset(self, modulus: int, residues: Sequence[int]) -> "LineSubset":
        """The lines i of this split (in its order) with i % modulus in `residues`.

        Args:
            modulus: the number of parts the lines are dealt into.
            residues: the parts kept.

        Returns:
            The subset, reading this split's file.
        """
        return LineSubset(self, modulus, residues)

    def parsed(self) -> Iterator[ParsedLine]:
        """Every good line of the file (for vocabulary building).

        Yields:
            Each good line, parsed, in file order.

        Raises:
            DataError: with `strict` the first bad line; more than half the lines bad
                (`refuse_mostly_bad`).
        """
        stats = BadLineStats(max_examples=1)  # this pass's own: `stats` counts the batches' lines
        for lineno, line in self._numbered_lines():
            stats.lines += 1
            try:
                yield self.parse(line)
            except BadLine as e:
                if self.strict:
                    raise DataError(f"{self._where(lineno)}: {e}") from None
                stats.add(self._where(lineno), str(e))
                if stats.lines % MOSTLY_BAD_AFTER == 0:
                    refuse_mostly_bad(self.describe(), stats)
        if stats.count:
            refuse_mostly_bad(self.describe(), stats, done=True)

    def local_batches(
        self,
        encoder: Encoder,
        global_batch: int,
        rank: int,
        world: int,
        skip_batches: int = 0,
    ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """This rank's local batches (see the module doc): global batch k is the k-th block of
        `global_batch` lines, of which this rank parses lines rank, rank + world, ...

        Args:
            encoder: maps categorical values to row ids.
            global_batch: lines per global batch.
            rank, world: this rank and the number of ranks.
            skip_batches: global batches to skip first (a resumed epoch).

        Yields:
            (labels, dense, ids, valid) arrays of global_batch / world slots (`empty_arrays`);
            a bad line leaves its slot as padding (counted in `stats`).

        Raises:
            DataError: an empty split, with `strict` the first bad line (naming file and line),
                or more than half the lines bad (`refuse_mostly_bad`).
        """
        from shark_torchrec.data.batch import empty_arrays

        self.num_lines()  # refuses an empty split before any batch is made
        local = global_batch // world
        lines = self._numbered_lines()
        if skip_batches:
            lines = itertools.islice(lines, skip_batches * global_batch, None)
        stats = self.stats
        while True:
            block = list(itertools.islice(lines, global_batch))
            if not block:
                if stats.count:
                    refuse_mostly_bad(self.describe(), stats, done=True)
                return
            if stats.count:
                refuse_mostly_bad(self.describe(), stats)
            labels, dense, ids, valid = empty_arrays(local, self.num_dense, self.num_sparse)
            for slot, (lineno, line) in enumerate(block[rank::world]):
                stats.lines += 1
                try:
                    label, dense_values, cats = self.parse(line)
                except BadLine as e:
                    if self.strict:
                        raise DataError(f"{self._where(lineno)}: {e}") from None
                    stats.add(self._where(lineno), str(e))
                    continue
                labels[slot] = label
                dense[slot] = dense_values
                ids[slot] = [encoder.encode(j, v) for j, v in enumerate(cats)]
                valid[slot] = True
            yield labels, dense, ids, valid


def residue_count(total: int, modulus: int, residues: Sequence[int]) -> int:
    """How many of the indices 0..total-1 have index % modulus in `residues`.

    Args:
        total: the number of indices.
        modulus: the modulus.
        residues: the residues kept (duplicates count once).

    Returns:
        The count.
    """
    return sum(len(range(r, total, modulus)) for r in set(residues))


class LineSubset(FileSplit):
    """The lines i (counted in `source`'s order) of a split with i % modulus in `residues`: a
    split carved from another, disjoint from the subset of the other residues by construction."""

    def __init__(self, source: FileSplit, modulus: int, residues: Sequence[int]) -> None:
        super().__init__(
            source.path, source.parse, source.has_header, source.num_dense, source.num_sparse, source.strict
        )
        self.source = source
        self.modulus = modulus
        self.residues = frozenset(residues)

    def num_lines(self) -> int:
        """Lines of the source with i % modulus in `residues` (cached).

        Returns:
            The lines.

        Raises:
            DataError: no line falls in the residues.
        """
        if self._num_lines is None:
            self._num_lines = residue_count(self.source.num_lines(), self.modulus, self.residues)
            if self._num_lines <= 0:
                raise DataError(
                    f"{self.source.path}: carving residues {sorted(self.residues)} of {self.modulus} "
                    f"from {self.source.num_lines()} lines leaves none"
                )
        return self._num_lines

    def _numbered_lines(self):
        for i, (lineno, line) in enumerate(self.source._numbered_lines()):
            if i % self.modulus in self.residues:
                yield lineno, line

    def _where(self, lineno) -> str:
        return self.source._where(lineno)


class FoldSplit(FileSplit):
    """One part of a k-fold split over the lines of several files, taken in order: line i
    (counted over all files) belongs here when i % folds is in `residues`."""

    def __init__(self, sources: Sequence[FileSplit], folds: int, residues: Sequence[int]) -> None:
        first = sources[0]
        super().__init__(first.path, first.parse, first.has_header, first.num_dense, first.num_sparse, first.strict)
        self.sources = list(sources)
        self.folds = folds
        self.residues = set(residues)

    def num_lines(self) -> int:
        """Lines of all the files with i % folds in `residues` (cached).

        Returns:
            The lines.

        Raises:
            DataError: no line falls in the residues.
        """
        if self._num_lines is None:
            total = sum(s.num_lines() for s in self.sources)
            self._num_lines = sum(
                1 for r in range(self.folds) if r in self.residues for _ in range(r, total, self.folds)
            )
            if self._num_lines <= 0:
                raise DataError(f"fold of {self.folds} over {total} lines is empty")
        return self._num_lines

    def _numbered_lines(self):
        i = 0
        for src in self.sources:
            for lineno, line in src._numbered_lines():
                if i % self.folds in self.residues:
                    yield (src.path, lineno), line
                i += 1

    def _where(self, lineno) -> str:
        path, n = lineno
        return f"{path}:{n}"

    def describe(self) -> str:
        """The fold's files, as errors name them.

        Returns:
            "fold of " and the files' paths.
        """
        return f"fold of {', '.join(str(s.path) for s in self.sources)}"
