"""Serve a shark-torchrec export with torch alone: raw CSV/TSV lines in, logits out.

Standalone: this file needs torch, the export's kernel library (`shark_kernels.so`, loaded with
`torch.ops.load_library`: the model's lookup op, built for the torch version `serving.json`
names) and the Python standard library, nothing of shark_torchrec, TorchRec or FBGEMM. (An
export of format version 1, before the library, calls FBGEMM's op instead: fbgemm_gpu then.) Every
export directory holds a copy as `serve.py`; its source is `shark_torchrec/serve.py`, copied
verbatim (so it must never import shark_torchrec).

    python serve.py EXPORT_DIR LINES_FILE [--batch-size N] [--probabilities]

prints one logit (or click probability) per data line of LINES_FILE. From Python:

    import serve
    model = serve.load("EXPORT_DIR")
    logits = model.score_lines(["1,400,962,5041,5047,5053,5055,5058,5067,5070,5243"])
    logits = model.score_file("test.csv")               # a headed file: its header is checked
    dense, values, lengths = model.encode_lines(lines)  # the tensors the model takes
    logits = model(dense, values, lengths)

The export directory holds (see its README.md):
- `serving_model.pt`: TorchScript, `forward(dense [B, Nd] float32, values [nnz] int64,
  lengths [F * B] int) -> logits [B]`; bag f * B + b is field f of sample b (feature-major, as
  TorchRec's KeyedJaggedTensor lays it out), fields in `serving.json`'s "fields" order;
- `shark_kernels.so`: the compiled lookup op (`torch.ops.shark.mixed_lookup_ranked`; exports
  before the ranked row map call `mixed_lookup`), for the torch version in `serving.json`'s "torch";
- `serving.json`: the fields, the raw-line layout ("parsing") and the encoding ("encoding");
- `vocab.json` (vocabulary encoding): per field, its values in row order (value k is row k + 1).

Raw lines are read exactly as training read them:
- the end of line is stripped; columns are split by the delimiter (quoting `csv`: Python's csv
  module, default dialect; `none`: a plain split, as for Criteo TSV);
- a line has all `num_columns` columns (the label's is ignored) or one fewer: no label column;
- dense: stripped; empty is 0; otherwise a finite float; `log1p_clamp0` then takes
  log(1 + max(x, 0)) (Criteo); the model gets float32;
- categorical values are stripped and encoded: `vocab`: the value's row in the field's
  vocabulary, 0 (the out-of-vocabulary row) for a value not in it (unseen in train, or seen
  fewer than min_count times); `hash`: zlib.crc32(f"{field_index}:{value}".encode()) % size,
  where field_index is the field's position among all categorical fields of the training data
  (a pruned model's removed fields keep their positions).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import zlib
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

FORMAT = "shark-torchrec serving export"
VERSION = 2
# The group ids of the served symmetric rows, by the manifest's row count: a library reads the ids
# below its `served_groups`.
SYMMETRIC_GROUPS = {"rows_int4s": 7, "rows_int2s": 8}
READS_VERSIONS = (1, 2)  # 1: the lookup was FBGEMM's op (no kernel library)


def _cpu_flags() -> Optional[set]:
    """This CPU's instruction-set flags (Linux), or None where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _one_bit_rows(export_dir: Path, manifest: dict) -> int:
    """The export's 1-bit rows: from serving.json, or (an export written before it recorded them)
    from export.json beside it; 0 when neither says."""
    rows = manifest.get("rows_int1")
    if rows is None:
        try:
            rows = json.loads((export_dir / "export.json").read_text()).get("rows_int1", 0)
        except (OSError, ValueError):
            rows = 0
    return int(rows)


def load_kernels(export_dir: Path, manifest: dict) -> None:
    """Register the ops the scripted model calls: the export's kernel library (built for one
    torch version, which must be this one), or FBGEMM's op for a version 1 export.

    Args:
        export_dir: the export directory.
        manifest: its serving.json.

    Raises:
        RuntimeError: the library was built for another torch version, CPU architecture or
            instruction sets than this machine's.
        FileNotFoundError: the library is missing.
    """
    library = manifest.get("kernels")
    if library is None:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm, which a version 1 model calls)

        return
    built_for = manifest.get("torch")
    if built_for is not None and built_for.split("+")[0] != torch.__version__.split("+")[0]:
        raise RuntimeError(
            f"{export_dir / library} was built for torch {built_for}; this is torch {torch.__version__}. "
            "Serve with that torch version, or export again under this one."
        )
    built = manifest.get("kernels_built_for") or {}
    if built.get("machine") and built["machine"] != platform.machine():
        raise RuntimeError(
            f"{export_dir / library} was compiled for {built['machine']} CPUs; this one is {platform.machine()}"
        )
    cpu_flags = _cpu_flags()
    missing = [f for f in built.get("isa", []) if cpu_flags is not None and f not in cpu_flags]
    if missing:
        raise RuntimeError(
            f"{export_dir / library} needs the CPU instructions {', '.join(missing)}, which this CPU lacks"
        )
    path = export_dir / library
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export's kernel library is missing")
    if hasattr(torch.ops.shark, "mixed_lookup_ranked"):
        # A library is loaded already (this one, or shark_torchrec's own): it must read this
        # export's 1-bit rows as they were written (1: scale and bias, 2: sign and an fp16
        # magnitude, 3: sign and a magnitude byte).
        have = int(torch.ops.shark.one_bit_layout()) if hasattr(torch.ops.shark, "one_bit_layout") else 1
        want = int(manifest.get("one_bit_layout", 1))
        if have != want and _one_bit_rows(export_dir, manifest):
            raise RuntimeError(
                f"{export_dir} holds 1-bit rows in layout {want}; the shark_kernels library loaded in this "
                f"process reads layout {have}: load {export_dir} in a fresh process"
            )
        groups = int(torch.ops.shark.served_groups()) if hasattr(torch.ops.shark, "served_groups") else 7
        unread = [k[5:] for k, g in SYMMETRIC_GROUPS.items() if g >= groups and int(manifest.get(k, 0))]
        if unread:
            raise RuntimeError(
                f"{export_dir} holds symmetric rows ({', '.join(unread)}); the shark_kernels library loaded in "
                f"this process predates them: load {export_dir} in a fresh process"
            )
        return
    if hasattr(torch.ops.shark, "mixed_lookup"):
        # An older library (before the ranked row map) is loaded: its ops cannot be registered twice.
        raise RuntimeError(
            "this process already loaded an older shark_kernels library without mixed_lookup_ranked; "
            f"load {export_dir} in a fresh process"
        )
    torch.ops.load_library(str(path))


class ServedModel:
    """An export directory loaded: the scripted model and the rules that encode raw lines.

    Args:
        export_dir: the directory `shark export` or `shark compress` wrote.
    """

    def __init__(self, export_dir: str | Path) -> None:
        self.export_dir = Path(export_dir)
        manifest_path = self.export_dir / "serving.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: {export_dir} is not a serving export")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") not in READS_VERSIONS:
            raise ValueError(
                f"{manifest_path}: format {self.manifest.get('format')!r} version {self.manifest.get('version')!r}, "
                f"this recipe reads {FORMAT!r} versions {', '.join(map(str, READS_VERSIONS))}"
            )
        load_kernels(self.export_dir, self.manifest)
        self.fields: List[str] = list(self.manifest["fields"])
        self.dense_names: List[str] = list(self.manifest["dense"])
        self.module = torch.jit.load(str(self.export_dir / self.manifest["model"]), map_location="cpu")
        self.module.eval()
        self.parsing = self.manifest.get("parsing")
        self._encoders: Optional[List[Callable[[str], int]]] = None
        self._columns: List[int] = []
        # The training files' header, with and without the label column (either may head a file).
        self._headers: Tuple[List[str], ...] = ()
        if self.parsing is not None:
            self._columns, self._encoders = self._field_encoders(self.manifest["encoding"])
            header = self.parsing["header"]
            if header:
                label = self.parsing["label_column"]
                self._headers = (header, [h for i, h in enumerate(header) if i != label])

    def _field_encoders(self, encoding: dict) -> Tuple[List[int], List[Callable[[str], int]]]:
        """Per served field: its column in a raw line and its value -> row id function."""
        index = {c["name"]: (j, c["column"]) for j, c in enumerate(self.parsing["categorical"])}
        missing = [f for f in self.fields if f not in index]
        if missing:
            raise ValueError(f"serving.json: field(s) {', '.join(missing)} have no column in 'parsing'")
        columns = [index[f][1] for f in self.fields]
        if encoding["kind"] == "hash":
            size = int(encoding["size"])

            def hashed(j: int) -> Callable[[str], int]:
                prefix = f"{j}:"
                return lambda value: zlib.crc32(f"{prefix}{value}".encode()) % size

            return columns, [hashed(index[f][0]) for f in self.fields]
        if encoding["kind"] == "vocab":
            vocab_path = self.export_dir / encoding["file"]
            values = json.loads(vocab_path.read_text())
            encoders = []
            for f in self.fields:
                if f not in values:
                    raise ValueError(f"{vocab_path}: no vocabulary for field {f}")
                rows = {v: k + 1 for k, v in enumerate(values[f])}
                oov = int(encoding["oov_row"])
                encoders.append(lambda value, rows=rows, oov=oov: rows.get(value, oov))
            return columns, encoders
        raise ValueError(f"serving.json: unknown encoding kind {encoding['kind']!r}")

    # ------------------------------------------------------------------ raw lines
    def _split(self, line: str, where: str = "line") -> List[str]:
        line = line.rstrip("\r\n")
        if self.parsing["quoting"] == "none":
            return line.split(self.parsing["delimiter"])
        try:
            return next(csv.reader([line], delimiter=self.parsing["delimiter"]), [])
        except csv.Error as e:  # e.g. a field longer than csv.field_size_limit(), as training names it
            raise ValueError(f"{where}: the line cannot be read (csv: {e})") from None

    def _columns_of(self, cols: List[str], where: str) -> Callable[[int], str]:
        """Column i of the training layout in `cols`, which may lack the label column."""
        n, label = self.parsing["num_columns"], self.parsing["label_column"]
        if len(cols) == n:
            return cols.__getitem__
        if len(cols) == n - 1:
            return lambda i: cols[i if i < label else i - 1]
        raise ValueError(f"{where}: expected {n} columns (or {n - 1} without the label), got {len(cols)}")

    def parse_line(self, line: str, where: str = "line") -> Tuple[List[float], List[int]]:
        """One raw line -> (dense values, one row id per served field).

        Args:
            line: a data line (not a header), with or without its label column.
            where: how errors name the line (e.g. `file:12`).

        Returns:
            The dense values (transformed as in training) and the served fields' row ids.
        """
        if self.parsing is None or self._encoders is None:
            raise ValueError(
                "this export has no raw-line layout (its model was trained on synthetic data): "
                "call the model with encoded tensors instead"
            )
        cols = self._split(line, where)
        if self._headers and [c.strip() for c in cols] in self._headers:
            # Its column names would be scored as values (a categorical name is just an unseen value).
            raise ValueError(f"{where}: this is the header line, not data (score_file skips it; give data lines only)")
        column = self._columns_of(cols, where)
        dense = []
        for d in self.parsing["dense"]:
            text = column(d["column"]).strip()
            value = 0.0
            if text:
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{where}: column {d['name']}: {text!r} is not a number") from None
                if not math.isfinite(value):
                    raise ValueError(f"{where}: column {d['name']}: {text!r} is not finite")
            if self.parsing["dense_transform"] == "log1p_clamp0":
                value = math.log1p(max(value, 0.0))
            dense.append(value)
        ids = [encode(column(c).strip()) for c, encode in zip(self._columns, self._encoders)]
        return dense, ids

    def encode_lines(
        self, lines: Sequence[str], first_line: int = 1, source: Optional[str] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw lines -> the model's inputs.

        Args:
            lines: data lines (no header).
            first_line: the number of the first line, for error messages.
            source: the lines' file, for error messages (`FILE:LINE`; else `line N`).

        Returns:
            dense [B, Nd] float32, values [F * B] int64 (feature-major: field f of sample b is
            at f * B + b), lengths [F * B] int32 (all 1: one value per field and sample).
        """
        parsed = [
            self.parse_line(line, f"{source}:{first_line + k}" if source else f"line {first_line + k}")
            for k, line in enumerate(lines)
        ]
        B, F = len(parsed), len(self.fields)
        dense = torch.tensor([d for d, _ in parsed], dtype=torch.float32).reshape(B, len(self.dense_names))
        values = torch.tensor([ids for _, ids in parsed], dtype=torch.int64).reshape(B, F).t().reshape(-1)
        lengths = torch.ones(F * B, dtype=torch.int32)
        return dense, values, lengths

    def __call__(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The model on encoded tensors (see `encode_lines`): logits [B]."""
        if dense.shape[0] == 0:
            return torch.empty(0)
        with torch.no_grad():
            return self.module(dense, values, lengths)

    def score_lines(self, lines: Sequence[str], first_line: int = 1, source: Optional[str] = None) -> torch.Tensor:
        """Logits [len(lines)] of raw data lines (label column optional).

        Args:
            lines: data lines (no header).
            first_line: the number of the first line, for error messages.
            source: the lines' file, for error messages (`FILE:LINE`; else `line N`).

        Returns:
            [len(lines)] float32 logits, in line order.
        """
        return self(*self.encode_lines(lines, first_line, source))

    def score_file(self, path: str | Path, batch_size: int = 4096) -> torch.Tensor:
        """Logits of every data line of a CSV/TSV file in the training files' format (with
        their header, if they had one; the label column may be absent).

        Args:
            path: the file.
            batch_size: lines scored per model call.

        Returns:
            [data lines] float32 logits, in file order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        out: List[torch.Tensor] = []
        # utf-8-sig: a byte-order mark is not part of the header (as training reads it).
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            lineno = 1
            header = self.parsing and self.parsing["header"]
            if header:
                self._check_header(self._split(f.readline(), f"{path}:1"), header, path)
                lineno = 2
            batch: List[str] = []
            for line in f:
                batch.append(line)
                if len(batch) == batch_size:
                    out.append(self.score_lines(batch, lineno, str(path)))
                    lineno += len(batch)
                    batch = []
            if batch:
                out.append(self.score_lines(batch, lineno, str(path)))
        return torch.cat(out) if out else torch.empty(0)

    def _check_header(self, names: List[str], header: List[str], path) -> None:
        names = [n.strip() for n in names]
        if names not in self._headers:
            raise ValueError(f"{path}: header {names} is not the training files' {header} (with or without the label)")


def load(export_dir: str | Path) -> ServedModel:
    """Load an export directory (see `ServedModel`).

    Args:
        export_dir: the directory `shark export` or `shark compress` wrote.

    Returns:
        The served model.
    """
    return ServedModel(export_dir)


def main(argv: Optional[Iterable[str]] = None) -> int:
    """`python serve.py EXPORT_DIR LINES_FILE [--batch-size N] [--probabilities]`: print one
    logit (or probability) per data line.

    Args:
        argv: the command line after the script's name (default: `sys.argv[1:]`).

    Returns:
        The exit code: 0, or 2 after a one-line error (a missing file, a bad line or export).
    """
    parser = argparse.ArgumentParser(description="Score raw CSV/TSV lines with a shark-torchrec export.")
    parser.add_argument("export_dir", help="the export directory (holds serving.json)")
    parser.add_argument("lines_file", help="a file in the training files' format (header, if they had one)")
    parser.add_argument("--batch-size", type=int, default=4096, help="lines per model call")
    parser.add_argument("--probabilities", action="store_true", help="print sigmoid(logit) instead of the logit")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        model = load(args.export_dir)
        instead = model.manifest.get("served_instead")
        if instead:  # `shark compress --fallback torchrec` chose a TorchRec model over this one
            why = model.manifest.get("served_instead_why", "see the run's report")
            print(
                f"serve.py: warning: the compression run chose {instead} over this model ({why}; README.md in this "
                "folder says how to load it); scoring this model as asked",
                file=sys.stderr,
            )
        scores = model.score_file(args.lines_file, args.batch_size)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: the kernel library does not fit this machine
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    if args.probabilities:
        scores = torch.sigmoid(scores)
    sys.stdout.write("".join(f"{float(s):.9g}\n" for s in scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
