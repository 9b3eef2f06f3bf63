"""Helpers the benchmark scripts share: arguments after `--`, and one `shark train` run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple


def split_passthrough(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the script's own arguments, the ones after `--` for `shark train`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def shark_train(args: Sequence[str], out: Path) -> Dict:
    """Run `shark train ARGS` in a fresh process writing into `out`; return its metrics."""
    cmd = [str(Path(sys.executable).parent / "shark"), "train", *args, "--no-progress",
           "--out-dir", str(out), "--metrics-out", str(out / "m.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads((out / "m.json").read_text())
