"""Which exceptions describe the user's input rather than a fault of ours: the command line
reports them in one line with exit status 2 (`shark_torchrec.cli`), and a new compression run
that fails on one in its first stage leaves nothing behind (`jobs.compress`)."""

from __future__ import annotations

from typing import Tuple


def user_error_types() -> Tuple[type, ...]:
    """The exception types that describe the user's input rather than a fault of ours.

    Returns:
        A flag or config value (ConfigError), data contents (DataError), a budget
        (BudgetError), an id in the data (IdError), a checkpoint or run directory
        (CheckpointError), and the file system (OSError: a missing file, a permission, a full
        disk). Not a plain ValueError: Python and torch raise those for faults of ours too ("too
        many values to unpack"). Imported when asked (TorchRec comes with them), so that a
        command's flags are parsed without it.
    """
    from shark_torchrec.config import ConfigError
    from shark_torchrec.data.schema import DataError
    from shark_torchrec.jobs.checkpoint import CheckpointError
    from shark_torchrec.modules.row_groups import IdError
    from shark_torchrec.precision.priority import BudgetError

    return (ConfigError, DataError, BudgetError, IdError, CheckpointError, OSError)
