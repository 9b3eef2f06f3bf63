"""Helpers the benchmark scripts share: arguments after `--`, one `shark train` run, and the
statistics of paired differences and of error rates."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple


class FirstRows:
    """A dataset's splits cut to their first `rows` rows (whole batches, at least one): what the
    serving benchmarks rank rows by (`training_priorities` counts over `batches`)."""

    def __init__(self, data, rows: int) -> None:
        self.data, self.rows = data, rows

    def batches(self, split: str, batch_size: int):
        """The split's first batches of `batch_size`, `rows` rows in all."""
        from itertools import islice

        return islice(self.data.batches(split, batch_size), max(1, self.rows // batch_size))


def pyplot():
    """matplotlib's pyplot on the Agg backend (plots go to files; no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_table(out: Path, lines: Sequence[str], name: str = "table.md") -> str:
    """Write a markdown table (its lines) to OUT/NAME and print it.

    Args:
        out: the results folder.
        lines: the table's lines, header first.
        name: the file name.

    Returns:
        The table's text.
    """
    text = "\n".join(lines) + "\n"
    (out / name).write_text(text)
    print(text)
    return text


def split_passthrough(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the script's own arguments, the ones after `--` for `shark train`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def flags_of(command: str, args: Sequence[str]) -> List[str]:
    """The flags in `args` (each with the values after it) that `shark COMMAND` takes: a
    benchmark that passes one set of flags to several commands gives each its own."""
    from shark_torchrec.config import command_fields

    names = command_fields(command) | {"out"}  # --out: RunConfig.out_dir's alias
    out: List[str] = []
    keep = True
    for a in args:
        if a.startswith("--"):
            name = a[2:].split("=")[0].replace("-", "_")
            keep = name in names or (name.startswith("no_") and name[3:] in names)
        if keep:
            out.append(a)
    return out


def shark_train(args: Sequence[str], out: Path) -> Dict:
    """Run `shark train ARGS` in a fresh process writing into `out`; return its metrics."""
    cmd = [
        str(Path(sys.executable).parent / "shark"),
        "train",
        *args,
        "--no-progress",
        "--out-dir",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads((out / "m.json").read_text())


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Numerical Recipes)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + aa / c
            c = c if abs(c) > 1e-300 else 1e-300
            h *= d * c
            if aa < 0 and abs(d * c - 1.0) < 1e-15:
                return h
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for p in (0.5, 1), by bisection on the CDF."""

    def cdf(t: float) -> float:
        return 1.0 - 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired(diffs: Sequence[float]) -> dict:
    n = len(diffs)
    mean = statistics.mean(diffs) if diffs else float("nan")
    if n < 2:
        return {"mean": mean, "se": float("nan"), "ci": (float("nan"), float("nan")), "n": n}
    se = statistics.stdev(diffs) / math.sqrt(n)
    h = t_quantile(0.975, n - 1) * se
    return {"mean": mean, "se": se, "ci": (mean - h, mean + h), "n": n}


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided interval of a binomial rate from k of n.

    Args:
        k: events (runs over the bound).
        n: trials (runs).
        confidence: of the interval.

    Returns:
        (lower, upper).
    """
    alpha = 1.0 - confidence

    def beta_quantile(p: float, a: float, b: float) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _betainc(a, b, mid) < p else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else beta_quantile(alpha / 2, k, n - k + 1)
    upper = 1.0 if k == n else beta_quantile(1 - alpha / 2, k + 1, n - k)
    return lower, upper
