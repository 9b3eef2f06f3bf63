"""The old name of `shark_torchrec.jobs` (before the package said what it holds): importing
it, or any of its old modules (`shark_torchrec.train.pruning` is now `shark_torchrec.jobs.prune`),
still works, with a DeprecationWarning naming the new place."""

import importlib
import sys
import warnings

MOVED = {
    "checkpoint": "checkpoint",
    "compress": "compress",
    "easy_path": "easy_path",
    "evaluation": "evaluation",
    "export": "export",
    "pruning": "prune",
    "run_dir": "run_dir",
    "trainer": "trainer",
}

warnings.warn(
    "shark_torchrec.train is now shark_torchrec.jobs (shark_torchrec.train.pruning: shark_torchrec.jobs.prune); "
    "the old name will go",
    DeprecationWarning,
    stacklevel=2,
)
for _old, _new in MOVED.items():
    _module = importlib.import_module(f"shark_torchrec.jobs.{_new}")
    sys.modules[f"{__name__}.{_old}"] = _module
    globals()[_old] = _module
