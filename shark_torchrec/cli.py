"""The `shark` console command: `shark <subcommand> [flags]`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from shark_torchrec.config import parse_cli, percentage_hint


def _is_main_rank() -> bool:
    """Under torchrun/TorchX every rank runs the command; only rank 0 prints the result."""
    return int(os.environ.get("RANK", "0")) == 0


INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (SIGINT), as shells report it


@dataclass(frozen=True)
class _Job:
    """A job function named by its module and name, imported only when it runs: the flags are
    parsed (and `--help` printed, or a bad flag refused) without importing torch and TorchRec,
    which took `shark train --help` about 4 s; and with `--nproc` the parent process, which
    only launches the ranks, never imports the job (each spawned rank does, unpickling this)."""

    module: str
    name: str

    def __call__(self, *args):
        return getattr(importlib.import_module(self.module), self.name)(*args)


def _run(prog: str, job: Callable, argv: List[str], doc: str) -> Tuple[Optional[dict], int]:
    """Parse flags, run `job` on --nproc ranks (or the torchrun world); a user error
    (`_user_error`: a bad config, data, checkpoint, budget or id, or a file system error) on
    any rank is one line on stderr, and exit status 2; Ctrl-C is one line saying how to
    continue, and INTERRUPTED; any other exception is ours and propagates with its traceback.
    Returns (metrics or None, exit status)."""
    command = prog.split()[-1]
    base = checkpoint_defaults(argv)
    if command in ("train", "compress"):
        base = {**base, **resumed_run_defaults(argv)}
    cfg = parse_cli(argv, prog=prog, description=doc, base=base, command=command)
    from shark_torchrec.distributed.env import launch  # torch: once the flags are known good

    with _noting_ctrl_c() as pressed:
        try:
            # Of several failed ranks, one with a user error is the cause: the others saw it leave.
            # User errors first, then a ValueError, then any: tests, so that the error types
            # (modules that import TorchRec) are imported only once a rank failed.
            return launch(job, cfg.run.nproc, cfg, prefer=(_user_error, lambda e: isinstance(e, ValueError))), 0
        except BaseException as e:
            failure = e
    if pressed or _interrupted(failure):
        # The checkpoints saved so far stay; a resume skips one left half-written (checksums).
        how = (
            f": `{_as_invoked(prog)} --resume --out {cfg.run.out_dir or 'DIR'}` continues from its newest checkpoint"
            if command in ("train", "compress")
            else ""
        )
        print(f"{prog}: interrupted{how}", file=sys.stderr)
        return None, INTERRUPTED
    if _user_error(failure):
        print(f"{prog}: error: {failure}", file=sys.stderr)
        return None, 2
    raise failure


def _as_invoked(prog: str) -> str:
    """`prog` ("shark train") as the user can type it again: with the path they ran the console
    script by (`.venv/bin/shark train`, as the README does) when `shark` is not on PATH there."""
    import shutil

    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) != "shark" or shutil.which("shark") == os.path.abspath(script):
        return prog
    return " ".join([script, *prog.split()[1:]])


@contextmanager
def _noting_ctrl_c() -> Iterator[List[int]]:
    """Note a SIGINT (Ctrl-C) while the body runs, then raise KeyboardInterrupt as Python does.
    What reaches the caller need not show it: an interrupt inside torch's checkpoint writer
    comes out as CheckpointException or as a RuntimeError of its C++ stream ("unexpected
    pos"), the KeyboardInterrupt gone. Installed only where Python's own handler is (the main
    thread; SIGINT not ignored), and restored after.

    Yields:
        A list that holds the signal once one arrived.
    """
    pressed: List[int] = []
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield pressed
        return

    def note(signum, frame):
        pressed.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupted(e: BaseException) -> bool:
    """Whether `e` is, or was raised while handling, Ctrl-C where `_noting_ctrl_c` could not
    note it: a KeyboardInterrupt, or the launcher's SignalException (it handles SIGINT itself
    while --nproc ranks run)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    seen = set()
    x: Optional[BaseException] = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, (KeyboardInterrupt, SignalException)):
            return True
        x = x.__cause__ or x.__context__
    return False


def resumed_run_defaults(argv: List[str]) -> Dict[str, dict]:
    """`shark train|compress --resume --out DIR`: the settings DIR's run was started with (its
    config.toml), as defaults, so that the resumed run needs no flag again (a resumed train run
    forgot its data flags, found no table of the checkpoint in its synthetic model, and failed).
    Flags still override them; in `shark compress` a flag that changes one is refused by the
    job (`compress.resume_differences`). Empty without --resume or a readable DIR/config.toml.

    Args:
        argv: the command's flags.

    Returns:
        group -> its table in the saved config, without the run's own `resume` and
        `fail_at_step` (a testing aid that must not kill the resumed run again).
    """
    import tomllib
    from pathlib import Path

    from shark_torchrec.config import _flag_value

    if "--resume" not in argv:
        return {}
    out = _flag_value(argv, "--out") or _flag_value(argv, "--out-dir")
    if not out or not (Path(out) / "config.toml").is_file():
        return {}
    try:
        saved = tomllib.loads((Path(out) / "config.toml").read_text())
    except (OSError, ValueError):
        return {}
    groups = {g: dict(v) for g, v in saved.items() if isinstance(v, dict)}
    for key in ("resume", "fail_at_step"):
        groups.get("run", {}).pop(key, None)
    return groups


def checkpoint_defaults(argv: List[str]) -> Dict[str, dict]:
    """The settings of the checkpoint `--checkpoint` / `--init-from` names, as defaults: a
    command started from a trained model reads the data and builds the model it was trained
    with (`--checkpoint`: in its precision too; `--init-from` converts to the precision the
    flags give), unless flags (or --config) say otherwise. Empty when no readable checkpoint is
    named (the job then reports what is wrong with it).

    Args:
        argv: the command's flags.

    Returns:
        group -> its table in the checkpoint's saved config: `dataset`, `model` and (for
        `--checkpoint`) `quant`.
    """
    from shark_torchrec.config import _flag_value

    path, groups = _flag_value(argv, "--checkpoint"), ("dataset", "model", "quant")
    if not path:
        path, groups = _flag_value(argv, "--init-from"), ("dataset", "model")
    if not path:
        return {}
    from shark_torchrec.jobs.checkpoint import CheckpointError, read_meta, resolve_checkpoint  # torch

    try:
        saved = read_meta(resolve_checkpoint(path)).get("config", {})
    except (CheckpointError, OSError, ValueError):
        return {}
    out = {group: dict(saved[group]) for group in groups if isinstance(saved.get(group), dict)}
    quant = out.get("quant", {})
    if quant.get("precision", "fp32") not in ("shark", "freq"):
        quant.pop("tiers", None)  # never used by that run (older checkpoints may record one)
    return out


def _user_error(e: BaseException) -> bool:
    """Whether `e` describes the user's input or files (`jobs.user_errors.user_error_types`,
    imported once a command failed): one line, exit status 2. Anything else is a fault of ours,
    whose traceback is what to report."""
    from shark_torchrec.jobs.user_errors import user_error_types

    return isinstance(e, user_error_types())


def _job_main(prog: str, job: Callable, argv: List[str], doc: str, keys: tuple) -> int:
    """Run a job command; on success rank 0 prints `keys` of its metrics as JSON (exit 0), a
    user error is one line on stderr (exit 2)."""
    metrics, status = _run(prog, job, argv, doc)
    if metrics is None:
        return _leave(status)
    if _is_main_rank():
        print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    return _leave(0)


def _leave(code: int) -> int:
    """The exit code, or under torchrun / TorchX (an elastic agent's worker) the exit itself once
    the output is flushed: such a rank, its job done and its results written and printed, was
    seen to abort while the interpreter tore down ("terminate called without an active
    exception", SIGABRT, after the process group was destroyed; once, in a clean-clone CI run
    of the README's torchx block on the 2-core machine; cause not found), which fails the whole
    job. Leaving with os._exit skips that teardown; nothing is left to write."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return code
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_main(argv: List[str]) -> int:
    """Train DLRM under DistributedModelParallel (TorchRec planner, TrainPipelineSparseDist)."""
    keys = (
        "out_dir",
        "test_auc",
        "test_logloss",
        "train_seconds",
        "embedding_bytes",
        "optimizer_bytes",
        "fp32_embedding_bytes",
    )
    return _job_main(
        "shark train", _Job("shark_torchrec.jobs.trainer", "train_job"), argv, train_main.__doc__ or "", keys
    )


def importance_main(argv: List[str]) -> int:
    """Rank feature fields by importance (F-Permutation's Taylor score, Permutation, random)."""
    return _job_main(
        "shark importance",
        _Job("shark_torchrec.jobs.prune", "importance_job"),
        argv,
        importance_main.__doc__ or "",
        ("method", "model_dev_auc", "model_test_auc", "scoring_seconds", "ranking"),
    )


def prune_main(argv: List[str]) -> int:
    """Prune feature fields iteratively (score, remove, fine-tune, evaluate; paper Algorithm 1)."""
    keys = ("base_test_auc", "test_auc", "memory_ratio", "kept_fields", "pruned_fields", "stop_reason")
    return _job_main(
        "shark prune", _Job("shark_torchrec.jobs.prune", "prune_job"), argv, prune_main.__doc__ or "", keys
    )


def compress_main(argv: List[str]) -> int:
    """Compress a model: train (or --checkpoint), prune fields (F-P), quantize rows (F-Q), evaluate."""
    keys = (
        "out_dir",
        "base_test_auc",
        "test_auc",
        "memory_ratio",
        "prune_memory_ratio",
        "quant_budget",
        "kept_fields",
        "pruned_fields",
        "targets",  # the served model's memory and AUC drop against --target-memory and --max-auc-drop
    )
    return _job_main(
        "shark compress", _Job("shark_torchrec.jobs.compress", "compress_job"), argv, compress_main.__doc__ or "", keys
    )


def report_main(argv: List[str]) -> int:
    """Write RUN_DIR/report.md (tables and plots) for a `shark compress` run directory.

    Args:
        argv: the command's arguments: the run directory alone.

    Returns:
        The exit code: 0 (the report's path printed), 2 for a usage error, a directory that is
        not such a run or a file of it that cannot be read (0 for -h / --help).
    """
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: shark report RUN_DIR", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from shark_torchrec.report import RecordError, write_report

    try:
        print(write_report(argv[0]))
    except Exception as e:
        # A directory that is not a compression run's, or a file of it that cannot be read (a
        # user error, as the jobs' are: `_user_error`); anything else is ours, with its traceback.
        if not (_user_error(e) or isinstance(e, RecordError)):
            raise
        print(f"shark report: error: {e}", file=sys.stderr)
        return 2
    return 0


def _fraction(text: str) -> float:
    """argparse type of a budget: a float; `6%` is refused with the fraction it means."""
    hint = percentage_hint("", text)
    if hint:
        raise argparse.ArgumentTypeError(hint)
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def export_main(argv: List[str]) -> int:
    """Export a mixed-precision checkpoint for serving (inference model, TorchScript model, vocabularies, serve.py)."""
    parser = argparse.ArgumentParser(prog="shark export", description=export_main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoint directory, or a directory of them (the newest is taken)")
    parser.add_argument(
        "--out",
        required=True,
        help="the export directory (created; one that holds files is refused unless --overwrite)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the export files of an earlier export in --out"
    )
    parser.add_argument(
        "--base-checkpoint", default="", help="the uncompressed model's checkpoint, for the bytes beside it"
    )
    parser.add_argument(
        "--tiers",
        nargs="+",
        default=None,
        help="serve in these tiers (e.g. int8 int4 int2 dropped, or int4 int2 int1: int1 is 1-bit rows, +a or "
        "-a by each value's sign, served only, for the rows the other tiers cannot hold; int4s and int2s, "
        "symmetric int4 and int2 rows with a one-byte scale, also served only, above int1: int4s int2s int1), "
        "rows ranked by their "
        "trained priorities (a model of stock fp32 tables: by their occurrences in one pass of the training "
        "split) and rounded as --rounding says; needs --memory-budget (default: the rows as trained)",
    )
    parser.add_argument(
        "--memory-budget",
        type=_fraction,
        default=None,
        help="with --tiers: embedding bytes / fp32 bytes to serve in (a fraction: 0.06 for 6%%)",
    )
    parser.add_argument(
        "--budget-scope",
        choices=("table", "model"),
        default=None,
        help="with --tiers: one budget per table or for all (default model)",
    )
    parser.add_argument(
        "--rounding",
        choices=("fitted", "nearest"),
        default=None,
        help="with --tiers: int8/int4/int2 rows' scale and bias refit by least squares for a smaller error "
        "(fitted, the default) or from the row's min/max (nearest, as TorchRec's quantize_embeddings); "
        "1-bit and symmetric (int4s, int2s) rows are the same either way (their one byte is always fitted)",
    )
    parser.add_argument(
        "--data",
        default="",
        help="where the model's data is now (csv:DIR or criteo:DIR), when its folder moved since training "
        "(default: where the checkpoint's run read it); the same data, checked against the model's tables",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the priority pass)")
    args = parser.parse_args(argv)
    if (args.tiers is None) != (args.memory_budget is None):
        parser.error("--tiers and --memory-budget go together")
    if args.tiers is None and (args.budget_scope or args.rounding):
        # Without --tiers the rows are served as trained: these would be ignored.
        parser.error("--budget-scope and --rounding go with --tiers (the rows are served as trained without it)")
    args.budget_scope, args.rounding = args.budget_scope or "model", args.rounding or "fitted"
    from pathlib import Path

    from shark_torchrec.jobs.export import ServingTiers, export_checkpoint
    from shark_torchrec.jobs.run_dir import file_in_the_way, live_holder
    from shark_torchrec.jobs.trainer import quiet_libraries
    from shark_torchrec.modules.precision_policy import split_tiers

    quiet_libraries()
    if args.tiers is not None and len(split_tiers(args.tiers)) < 2:
        parser.error(
            f"--tiers ranks rows into 2 or more tiers, got {' '.join(args.tiers)} (e.g. --tiers int8 int4, or int4 "
            "int1); every row in one tier is TorchRec's quantize_embeddings of the model"
        )
    out = Path(args.out)
    blocker = file_in_the_way(out)
    if blocker == out:
        print(f"shark export: error: --out {out} is a file, not a directory (nothing was written)", file=sys.stderr)
        return 2
    if blocker is not None:
        print(f"shark export: error: --out {out} runs through {blocker}, a file (nothing was written)", file=sys.stderr)
        return 2
    holder = live_holder(out)
    if holder is not None:  # --overwrite included: its files would go into a live run's directory
        print(
            f"shark export: error: --out {out} is in use by a run ({holder}): choose another --out "
            "(nothing was written)",
            file=sys.stderr,
        )
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(
            f"shark export: error: {out} already holds files: pass --overwrite to replace them, "
            "or choose another --out (nothing was written)",
            file=sys.stderr,
        )
        return 2
    try:
        serving = None
        if args.tiers is not None:
            serving = ServingTiers(split_tiers(args.tiers), args.memory_budget, args.budget_scope, args.rounding)
        with _noting_ctrl_c() as pressed:
            try:
                record = export_checkpoint(
                    Path(args.checkpoint),
                    Path(args.out),
                    args.base_checkpoint or None,
                    serving,
                    progress=not args.no_progress,
                    data_source=args.data or None,
                )
            except BaseException as e:
                if not (pressed or _interrupted(e)):
                    raise
                # Its files go into --out only once all are written: an earlier export there stays
                # whole (unless the interrupt came as they were being moved in, a moment's window).
                print(
                    f"shark export: interrupted: its files go into {args.out} only once all are written",
                    file=sys.stderr,
                )
                return INTERRUPTED
    except Exception as e:
        # A model the export cannot serve (tables of several dims) is named as a user error too.
        if not (_user_error(e) or isinstance(e, NotImplementedError)):
            raise
        # Nothing of this export is in --out: its files go in only once all are written.
        print(f"shark export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, **record}, indent=2))
    return 0


COMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "train": train_main,
    "importance": importance_main,
    "prune": prune_main,
    "compress": compress_main,
    "export": export_main,
    "report": report_main,
}


def main(argv: Optional[List[str]] = None) -> int:
    """The `shark` console command: run the subcommand `argv[0]` names on the rest of `argv`.

    Args:
        argv: the command line after `shark` (default: `sys.argv[1:]`).

    Returns:
        The exit code: the subcommand's; without one (or with -h / --help), 0 after the list of
        subcommands; 2 for an unknown one.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = argv[:1] in ([], ["-h"], ["--help"])
        print(
            "usage: shark {" + ",".join(COMMANDS) + "} [flags]   (shark CMD --help for flags)",
            file=None if known else sys.stderr,
        )
        for name, fn in COMMANDS.items():
            print(f"  {name:12s} {(fn.__doc__ or '').strip().splitlines()[0]}", file=None if known else sys.stderr)
        if known:
            return 0
        import difflib

        near = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        print(f"shark: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


def run() -> None:
    """The console script: `main()`, then exit with its code, without the interpreter's last
    garbage collections (about 1.2 s a process; `skip_exit_collections` says why that is safe)."""
    from shark_torchrec.distributed.process_exit import skip_exit_collections  # not env: it imports torch

    code = main()
    skip_exit_collections()
    sys.exit(code)


if __name__ == "__main__":
    run()
