"""How a finished process ends. Imports nothing heavy: the `shark` command calls it after
commands that never import torch too (its list of subcommands, for one: 0.14 s, where importing
`distributed.env` to reach this made it 1.8 s)."""

import gc


def skip_exit_collections() -> None:
    """Let a process whose work is done end without Python's last garbage collections.

    Interpreter teardown runs several full collections over every object alive, and torch,
    torchrec and fbgemm leave about 400,000 from their imports alone: a collection takes
    0.23-0.26 s here and the teardown about 1.2 s, in every process (the `shark` command and
    each rank it spawns; a two-rank run paid it three times). Objects moved to the permanent
    generation (`gc.freeze`) are not traversed. `atexit` handlers still run, the standard
    streams and the logs are flushed and modules cleared as before, and the memory goes back
    to the system at exit either way. What no longer runs is the finalizer (`__del__`, a
    weakref callback) of an object caught in a reference cycle: a file left open in one would
    lose its unflushed writes (Python never promised `__del__` at exit; our writers close their
    files with `with`).

    Call it only when the process is about to end: objects that exist now are never collected
    afterwards.
    """
    gc.freeze()
