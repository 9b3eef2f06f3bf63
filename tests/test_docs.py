"""Every command the user-facing docs quote runs as written (README.md and docs/*.md).

What runs: each ```bash block, as one bash script (`set -euo pipefail`), top to bottom per
file, in a scratch folder beside the checkout (so `../shared/data/...` resolves) that links the
checkout's `.venv`, `apps`, `examples`, `scripts` and `.torchxconfig`. Output folders the
commands name (`runs/...`) land in the scratch folder, so later commands of the same file read
what earlier ones wrote.

So that CI stays short, a few substitutions shrink the work without changing what is checked
(flags parse, paths resolve, data loads, every stage runs, artefacts appear):
- `shark train|importance|prune|compress` get `--max-steps 3 --no-progress` appended (the
  pruning loop then fine-tunes 3 steps an iteration);
- `torchx run ... -j NxM` runs `-j 1x2`, with the same appended flags after the app's `--`;
- `bash scripts/setup.sh && ...` keeps what follows (CI has just run the setup), and
  `bash scripts/test.sh` is skipped (it is this test run);
- a job (`torchx run`, `shark train|importance|prune|compress`) written differently from an
  earlier one of the same file but shrunk to the same (`-j 1x2` and `-j 2x8`) is not run
  again: it would check nothing new. (Other commands always run: each block is its own shell,
  so a block's `source .venv/bin/activate` must run in it.)
```console and ```text blocks are not run (cluster launches, outputs). A ```python block must
be an excerpt of a file in examples/ (every line of it appears there), which tests run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = (".venv", "apps", "examples", "scripts", ".torchxconfig")
SHRINK = " --max-steps 3 --no-progress"
SHARK_JOB = re.compile(r"(?:^|\s)(?:\S*/)?shark (train|importance|prune|compress)\b")


def blocks(path: Path, language: str) -> list[str]:
    """The fenced blocks of a markdown file in `language`."""
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    out, pending = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return [c for c in out if c.strip()]


def shrunk(command: str) -> str:
    """The command as the docs test runs it (see the module doc)."""
    text, _, comment = command.partition("  #")
    text = text.rstrip()
    if text.startswith("#") or not text:
        return command
    if text.startswith("bash scripts/test.sh"):
        return ": skipped, this is the test run"
    text = re.sub(r"^bash scripts/setup.sh && ", "", text)
    if text.startswith("torchx run"):
        text = re.sub(r"-j \d+x\d+", "-j 1x2", text)
        if "--help" not in text:
            text += SHRINK if " -- " in text else " --" + SHRINK
    elif SHARK_JOB.search(text) and "--help" not in text:
        text += SHRINK
    return text


def once(command: str, first_written: dict) -> str:
    """`shrunk(command)`, or a no-op where an earlier, differently written command of the same
    file shrank to the same (the module doc); records the command in `first_written`."""
    text = shrunk(command)
    if not (text.startswith("torchx run") or SHARK_JOB.search(text)):
        return text
    written = command.partition("  #")[0].strip()
    if first_written.setdefault(text, written) != written:
        return ": shrunk, this is " + shlex.quote(first_written[text]) + " again"
    return text


def scratch_dir() -> Path:
    """A folder beside the checkout, linked to what the commands use."""
    where = Path(tempfile.mkdtemp(prefix=".docs-run-", dir=ROOT.parent))
    for name in LINKED:
        if (ROOT / name).exists():
            (where / name).symlink_to(ROOT / name)
    return where


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_documented_commands_run(doc):
    scripts = [b for b in blocks(doc, "bash")]
    if not scripts:
        pytest.skip(f"{doc.name} quotes no bash commands")
    where = scratch_dir()
    try:
        # A crash in native code (an abort) prints every thread's Python stack, so a rare one
        # seen in CI says where it happened.
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1"}
        first_written: dict = {}  # shrunk command -> the first command of this file shrunk to it
        for block in scripts:
            script = "set -euo pipefail\n" + "\n".join(once(c, first_written) for c in commands(block)) + "\n"
            proc = subprocess.run(
                ["bash", "-c", script], cwd=where, capture_output=True, text=True, timeout=900, env=env
            )
            assert proc.returncode == 0, (
                f"{doc.name}: this block failed ({proc.returncode}):\n{script}\n"
                f"stdout (end):\n{proc.stdout[-1500:]}\nstderr (end):\n{proc.stderr[-6000:]}"
            )
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_python_snippets_are_excerpts_of_tested_examples():
    examples = "\n".join(p.read_text() for p in (ROOT / "examples").glob("*.py"))
    known = {line.strip() for line in examples.splitlines()}
    for doc in DOCS:
        for block in blocks(doc, "python"):
            missing = [
                ln
                for ln in block.splitlines()
                if ln.strip() and not ln.strip().startswith("#") and ln.strip() not in known
            ]
            assert not missing, f"{doc.name}: python lines not in examples/*.py (so never run): {missing}"


def test_shrinking_keeps_the_command():
    assert shrunk(".venv/bin/shark train --epochs 3  # note") == ".venv/bin/shark train --epochs 3" + SHRINK
    assert shrunk("torchx run dist.ddp -j 2x8 apps/train.py") == "torchx run dist.ddp -j 1x2 apps/train.py --" + SHRINK
    assert shrunk("torchx run dist.ddp -j 2x8 --script apps/compress.py -- --out runs/c") == (
        "torchx run dist.ddp -j 1x2 --script apps/compress.py -- --out runs/c" + SHRINK
    )
    assert shrunk("bash scripts/setup.sh && .venv/bin/shark train") == ".venv/bin/shark train" + SHRINK
    assert shrunk(".venv/bin/shark train --help") == ".venv/bin/shark train --help"
    assert shrunk(".venv/bin/shark report runs/c") == ".venv/bin/shark report runs/c"
    seen: dict = {}
    small = "torchx run dist.ddp -j 1x2 apps/train.py"
    assert once(small, seen) == small + " --" + SHRINK
    assert once("torchx run dist.ddp -j 2x8 apps/train.py", seen).startswith(": shrunk")
    assert once(small + "  # again, written the same", seen) == small + " --" + SHRINK
    activate = "source .venv/bin/activate"
    assert once("bash scripts/setup.sh && " + activate, seen) == activate
    assert once(activate, seen) == activate  # not a job: a later block needs it in its own shell
