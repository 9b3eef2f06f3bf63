"""A run directory belongs to one run at a time, and a run finds out first thing whether it
can write where it must.

Lock: `OUT_DIR/.lock`, created with O_CREAT|O_EXCL by rank 0 of the job that writes into
OUT_DIR (`shark train`, `importance`, `prune`, `compress`) and removed when the job ends, however
it ends. It holds JSON naming its holder: host, pid, start time (UTC) and command. A second job
into the same OUT_DIR is refused, naming the holder. A run that was killed (os._exit, SIGKILL,
OOM) leaves its lock behind; the next job reclaims it, with a warning, when the holder was on
this host and its pid is gone. A lock of another host is never assumed stale: its pid says
nothing here.

`shark compress` holds one lock for its run directory; its stages (`base/`, `quantize/`, ...)
are calls of `fit` inside that job, not jobs, so they take no lock of their own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch.distributed as dist

from shark_torchrec.jobs.checkpoint import CheckpointError, broadcast_str, list_checkpoints

log = logging.getLogger("shark")

LOCK_FILE = ".lock"
# Files a job or an export writes at the top of its directory: one holding any of them holds a run.
RUN_FILES = ("config.toml", "metrics.json", "stages.json", "export.json", "serving.json")


class RunDirLocked(CheckpointError):
    """The run directory is held by another run that may still be alive."""


def default_out_dir(run: Any, pattern: str) -> str:
    """Give a run without `--out-dir` a new one named by the UTC time, the same on every rank.

    Args:
        run: the job's RunConfig; its `out_dir` is set in place when empty.
        pattern: a time.strftime pattern, e.g. "runs/%Y%m%d-%H%M%S".

    Returns:
        The run directory.
    """
    if not run.out_dir:
        # Every rank must agree on the name: rank 0's clock decides.
        run.out_dir = broadcast_str(time.strftime(pattern, time.gmtime()))
    return run.out_dir


@contextmanager
def run_dir_lock(out_dir: str | Path, is_main: bool) -> Iterator[None]:
    """Hold OUT_DIR/.lock while the body runs (OUT_DIR is created if needed).

    Only rank 0 takes the lock (under torchrun every rank writes into the same directory);
    every rank calls this, and every rank raises when rank 0 could not take it.

    Args:
        out_dir: the job's run directory.
        is_main: whether this process is rank 0.

    Raises:
        RunDirLocked: another run holds the directory (the message names it).
        CheckpointError: the directory cannot be created or written.
    """
    lock = Path(out_dir) / LOCK_FILE
    mine: Optional[str] = None
    failure = ("", "")
    # The directories this run made and left empty (a run refused before it wrote anything)
    # are removed at the end, so that a refusal leaves nothing behind.
    made = _missing_dirs(Path(out_dir)) if is_main else []
    if is_main:
        try:
            mine = _acquire(lock)
        except CheckpointError as e:
            failure = (type(e).__name__, str(e))
        except OSError as e:  # reported to every rank, which would otherwise wait for rank 0
            failure = (CheckpointError.__name__, f"cannot take {lock} ({e.strerror or e})")
    failure = _broadcast(failure)
    if failure[0]:
        raise (RunDirLocked if failure[0] == RunDirLocked.__name__ else CheckpointError)(failure[1])
    try:
        yield
    finally:
        if mine is not None:
            _release(lock, mine)
            _remove_if_empty(made)


def run_kind(out: Path) -> Optional[str]:
    """Which command's files a run directory holds, by the files each writes: `export`
    (export.json or serving.json), `compress` (stages.json, or a `base/` stage folder before
    stages.json is first written), `train` (its metrics.json or checkpoints), or None (none of
    them: a new directory, or a compression run refused before its first stage).

    Args:
        out: the directory.

    Returns:
        The command's name, or None.
    """
    if (out / "export.json").exists() or (out / "serving.json").exists():
        return "export"
    if (out / "stages.json").exists() or (out / "base").is_dir():  # base/: a compression run in its first stage
        return "compress"
    if (out / "metrics.json").exists() or list_checkpoints(out / "checkpoints"):
        return "train"
    return None


def refuse_earlier_run(out: Path, resume: bool, command: str = "train") -> None:
    """Refuse a job into a directory that holds another run's files (`RUN_FILES`: a training or
    compression run, an export) unless it resumes: it would overwrite them. (A training run
    with checkpoints is refused later, by its checkpoints, with or without these files.) A
    resumed job is refused too where the directory holds another command's run (`run_kind`):
    `shark train --resume` into a compression run rewrote its config and metrics (its targets
    gone), `shark compress --resume` into a training run ran the pipeline over it.

    Args:
        out: the job's run directory.
        resume: `--resume` was given.
        command: the job's command (`train`, `compress`); importance and prune runs are `train`'s kind.

    Raises:
        CheckpointError: naming the directory and the files found, or the command whose run it holds.
    """
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and list_checkpoints(out / "checkpoints"):
        found.append("checkpoints in checkpoints/")
    if found and not resume:
        raise CheckpointError(
            f"{out} already holds the files of another run ({', '.join(found)}): pass --resume to continue "
            "that run, or choose another --out (nothing was overwritten)"
        )
    kind = run_kind(out) if resume else None
    if kind is not None and kind != command:
        what = "an export (`shark export`), which no run resumes" if kind == "export" else f"a `shark {kind}` run"
        how = "" if kind == "export" else f" (`shark {kind} --resume --out {out}` continues it)"
        raise CheckpointError(
            f"{out} holds {what}, not a `shark {command}` run{how}: choose another --out (nothing was changed)"
        )


def check_writable(dirs: Mapping[str, Path]) -> None:
    """Refuse to start a run that could not save: create each directory and a file in it.

    Permissions alone do not tell (root writes into read-only directories; a path may run
    through a regular file), so this tries what saving will do. Every rank checks (on several
    nodes each needs the directory), and every rank raises the first problem any rank found.
    The directories it had to create are removed again once every rank has checked (saving
    creates them): a run refused later, on its data say, leaves none of them behind.

    Args:
        dirs: flag name (e.g. "--checkpoint-dir") -> the directory it names.

    Raises:
        CheckpointError: naming the flag, the directory and why it cannot be written.
    """
    problem = ""
    made: List[Path] = []
    for flag, d in dirs.items():
        try:
            missing = _missing_dirs(d)
            d.mkdir(parents=True, exist_ok=True)
            made += missing
            fd, probe = tempfile.mkstemp(dir=d, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            problem = f"{flag} {d} is not writable ({e.strerror or e}): nothing was trained"
            break
    several = dist.is_initialized() and dist.get_world_size() > 1
    if several:
        found: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), "")
    _remove_if_empty(sorted(made, key=lambda p: len(p.parts), reverse=True))  # deepest first
    if several:
        # Ranks that each found a directory missing each remove it: none may go on to make it
        # again (or write into it) while another is still removing it.
        dist.barrier()
    if problem:
        raise CheckpointError(problem)


@contextmanager
def staged_files(out: Path, stale: Sequence[str] = ()) -> Iterator[Path]:
    """Write a folder's files into a staging folder beside it, and move them into `out` only
    once every one is written. A write that fails (an error, a full disk, Ctrl-C) leaves `out`
    as it was, an earlier export's files whole, and no folder behind where there was none
    (`out` and parents this made).

    Args:
        out: the folder the files belong in; created, with its parents, when they go in.
        stale: names of files an earlier write may have left in `out` that this one need not
            write (an optional vocabulary, say): removed from `out` when the files go in.

    Yields:
        An empty staging folder in `out`'s parent: write the files (not folders) there. Each
        then replaces its namesake in `out` by a rename; other files of `out` stay.
    """
    made = _missing_dirs(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        out.mkdir(exist_ok=True)
        for name in stale:
            if not (staging / name).exists():
                (out / name).unlink(missing_ok=True)
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(made)  # after a failure, the parents it made hold nothing


def live_holder(out: Path) -> Optional[str]:
    """Who holds a run directory's lock while running (`run_dir_lock`), that directory's or a
    parent's, for commands that write into a directory without taking it (an export): None
    when no lock is there or its run is gone.

    Args:
        out: the directory.

    Returns:
        The holder's description (host, pid, since), or None.
    """
    lock = out / LOCK_FILE
    if lock.is_file():
        try:
            read = _read_holder(lock)
        except RunDirLocked:  # a lock without a record: someone is writing it, or it is left over
            return f"{lock} holds no run record"
        if read is not None and not _is_stale(read[1]):
            return f"{_describe(read[1])}, holding {out}"
    # A run's own folders too (a compression run writes RUN/export). A parent's `.lock` counts
    # only if it holds a run's record: other tools name their lock files so too (pytest does).
    for d in out.parents:
        try:
            holder = json.loads((d / LOCK_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(holder, dict) and {"host", "pid"} <= holder.keys() and not _is_stale(holder):
            return f"{_describe(holder)}, holding {d}"
    return None


def file_in_the_way(d: Path) -> Optional[Path]:
    """The file (not a directory) at `d` or at one of its parents, which keeps `d` from being a
    directory; None when there is none.

    Args:
        d: a directory path.

    Returns:
        That file's path, or None.
    """
    return next((a for a in (d, *d.parents) if a.exists() and not a.is_dir()), None)


def _missing_dirs(d: Path) -> List[Path]:
    """`d` and those of its parents that do not exist yet, deepest first (what mkdir(parents=True)
    would create)."""
    return [a for a in (d, *d.parents) if not a.exists()]


def _remove_if_empty(dirs: List[Path]) -> None:
    """rmdir each of `dirs` in order, leaving any that holds something (or is gone)."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _holder_record() -> str:
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        }
    )


def _describe(holder: Dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _acquire(lock: Path) -> str:
    """Create `lock` holding this process's record; returns that record (to release it by)."""
    out = lock.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = file_in_the_way(out)
        why = f"{blocker} is a file" if blocker is not None else e.strerror or e
        raise CheckpointError(f"--out-dir {out} cannot be created ({why})") from e
    record = _holder_record()
    # A stale lock is taken away and creation tried again; the bound only stops a livelock
    # with runs that keep taking and leaving the directory.
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            read = _read_holder(lock)
            if read is None:
                continue  # its run ended between our attempt and the read: try again
            text, holder = read
            if not _is_stale(holder):
                raise RunDirLocked(
                    f"{out} is in use by another run ({_describe(holder)}): wait for it to end or choose "
                    f"another --out-dir; if that run is gone, delete {lock}"
                ) from None
            log.warning("reclaiming %s from a run that is gone (%s)", lock, _describe(holder))
            _take_away(lock, text)
            continue
        except OSError as e:
            raise CheckpointError(f"--out-dir {out} is not writable ({e.strerror or e})") from e
        try:
            with os.fdopen(fd, "w") as f:
                f.write(record)
        except OSError:
            lock.unlink(missing_ok=True)  # an empty lock would block every later run
            raise
        return record
    raise RunDirLocked(f"{out}: could not take {lock}, other runs keep taking it")


def _read_holder(lock: Path) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The lock's text and record, or None when the lock is gone. A lock just created may not
    hold its record yet (create and write are two steps), so an unreadable one is read again."""
    for _ in range(20):
        try:
            text = lock.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        if isinstance(holder, dict):
            return text, holder
        time.sleep(0.05)
    raise RunDirLocked(f"{lock} exists but holds no run record: if no run uses {lock.parent}, delete it")


def _is_stale(holder: Dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process is gone."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, under another user
    return False


def _take_away(lock: Path, stale_text: str) -> None:
    """Remove the stale lock whose text we read, and only that one: another run may have
    reclaimed it and written its own since we read it."""
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, aside)  # atomic: we now own whatever lock was there
    except FileNotFoundError:
        return
    if aside.read_text() != stale_text:
        try:
            os.link(aside, lock)  # a live run's fresh lock: put it back
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def _release(lock: Path, mine: str) -> None:
    try:
        if lock.read_text() == mine:
            lock.unlink()
    except FileNotFoundError:
        pass
