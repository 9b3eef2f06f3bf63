"""Runs that do not collide or lose work: the run-directory lock, checkpoint checksums, an
unwritable place found before training, and where a resumed run picked up."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, run_shark
from shark_torchrec.config import ConfigError
from shark_torchrec.data.schema import DataError
from shark_torchrec.jobs import checkpoint as ckpt_module
from shark_torchrec.jobs.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from shark_torchrec.jobs.run_dir import RUN_FILES, _take_away
from shark_torchrec.modules.row_groups import IdError
from shark_torchrec.precision.priority import BudgetError

# 3000 train rows: 24 steps an epoch. Checkpoints every 5 steps; killed after step 16, the
# run leaves step_10 and step_15 (two are kept) and its lock.
SMALL = [*TINY, "--synthetic-train-rows", "3000", "--checkpoint-every", "5"]
KILL_AT = "16"


def lock_of(out: Path) -> dict:
    return json.loads((out / ".lock").read_text())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A `shark train` run killed hard (os._exit) after step 16: checkpoints and a stale lock."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = run_shark("train", *SMALL, "--out-dir", str(out), "--fail-at-step", KILL_AT, check=False)
    assert proc.returncode == 17
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------------------------------
# The run-directory lock


def test_killed_run_leaves_a_stale_lock_that_resume_reclaims(killed_run, tmp_path):
    out = copy_of(killed_run, tmp_path)
    holder = lock_of(out)
    assert holder["host"] == socket.gethostname() and not pid_alive(holder["pid"])
    proc = run_shark("train", *SMALL, "--out-dir", str(out), "--resume", "--metrics-out", str(tmp_path / "m.json"))
    assert f"reclaiming {out / '.lock'} from a run that is gone (pid {holder['pid']} on {holder['host']}" in proc.stderr
    # The log says where the resumed run picked up.
    steps = json.loads((tmp_path / "m.json").read_text())["steps"]
    assert (
        f"resumed from {out / 'checkpoints' / 'step_00000015'} at step 15 (epoch 0, batch 15 of {steps})" in proc.stderr
    )
    # Its training time counts the killed part too (it counted only the resumed part).
    killed_part = json.loads((killed_run / "checkpoints" / "step_00000015" / "meta.json").read_text())["train_seconds"]
    assert json.loads((tmp_path / "m.json").read_text())["train_seconds"] > killed_part > 0
    assert not (out / ".lock").exists()  # released at the end of the run
    # A run that fails (here: refused, its checkpoint directory is taken) releases it too.
    refused = run_shark("train", *SMALL, "--out-dir", str(out), check=False)
    assert refused.returncode == 2 and "(config.toml, metrics.json, checkpoints in checkpoints/)" in refused.stderr
    assert not (out / ".lock").exists()


def test_resume_reads_the_runs_settings_and_a_failed_one_rewrites_nothing(killed_run, tmp_path):
    """`--resume --out-dir R` alone continues R with the settings in R/config.toml (before,
    the forgotten flags fell back to their defaults: another model, refused by the checkpoint);
    a resume the checkpoint refuses leaves R's record as it was (config.toml and the plan were
    rewritten before the checkpoint was read)."""
    out = copy_of(killed_run, tmp_path)
    record = {name: (out / name).read_bytes() for name in ("config.toml", "sharding_plan.txt")}
    refused = run_shark("train", "--out-dir", str(out), "--resume", "--embedding-dim", "24", check=False)
    assert refused.returncode == 2 and "does not match this model" in refused.stderr, refused.stderr[-2000:]
    assert {name: (out / name).read_bytes() for name in record} == record
    resumed = run_shark("train", "--out-dir", str(out), "--resume", "--metrics-out", str(tmp_path / "m.json"))
    assert f"resumed from {out / 'checkpoints' / 'step_00000015'} at step 15 (epoch 0," in resumed.stderr
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["dataset"]["synthetic_train_rows"] == 3000 and saved["run"]["fail_at_step"] == 0


def test_a_run_started_from_a_checkpoint_resumes_with_its_own_command(killed_run, tmp_path):
    """A run started with --checkpoint and killed is continued by its command plus --resume
    (before, --resume beside --checkpoint was refused, and without --checkpoint the run's
    data settings were lost)."""
    start = ["train", *SMALL, "--checkpoint", str(killed_run / "checkpoints"), "--out-dir", str(tmp_path / "b")]
    assert run_shark(*start, "--fail-at-step", "6", check=False).returncode == 17
    resumed = run_shark(*start, "--resume")
    assert f"resumed from {tmp_path / 'b' / 'checkpoints' / 'step_00000005'} at step 5 (epoch 0," in resumed.stderr


def test_kept_fields_beside_a_checkpoint_are_refused_not_dropped(killed_run, tmp_path):
    """`shark prune --checkpoint C --kept-fields ...` took C's model as it is and silently ran
    on all its fields, a field that does not exist included."""
    proc = run_shark(
        "prune", "--checkpoint", str(killed_run / "checkpoints"), "--kept-fields", "c0", "nosuch",
        "--out", str(tmp_path / "p"), "--no-progress", check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.kept_fields (--kept-fields c0 nosuch): the model of --checkpoint" in proc.stderr
    assert "is taken as it is, with all its fields" in proc.stderr


@pytest.mark.parametrize("command", ["train", "importance", "prune", "compress"])
def test_out_dir_of_a_live_run_is_refused(tmp_path, command):
    out = tmp_path / "busy"
    out.mkdir()
    # This test's own process: alive, on this host.
    record = json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "started": "2030-01-02T03:04:05Z", "command": "pytest"}
    )
    (out / ".lock").write_text(record)
    proc = run_shark(command, *TINY, "--out-dir", str(out), check=False)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error == (
        f"shark {command}: error: {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
        f"started 2030-01-02T03:04:05Z): wait for it to end or choose another --out-dir; if that run is gone, "
        f"delete {out / '.lock'}"
    )
    assert (out / ".lock").read_text() == record  # the holder's lock is left alone
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


def test_lock_of_another_host_is_never_taken_as_stale(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a pid that is gone here, which says nothing about the other host
    assert not pid_alive(pid)
    (out / ".lock").write_text(json.dumps({"host": "another-host.example", "pid": pid, "started": "s"}))
    proc = run_shark("train", *TINY, "--out-dir", str(out), check=False)
    assert proc.returncode == 2 and f"(pid {pid} on another-host.example, started s)" in proc.stderr
    assert lock_of(out)["host"] == "another-host.example"


def test_second_run_cannot_mix_its_config_into_a_running_one(tmp_path):
    """Run A trains; run B, started into A's directory while A runs (resuming from A's
    checkpoint with another learning rate), is refused: A's config.toml and A's checkpoints
    stay A's. Without the lock B would rewrite config.toml and save its own checkpoints there."""
    out = tmp_path / "shared"
    shark = Path(sys.executable).parent / "shark"
    a_args = [*TINY, "--epochs", "50", "--checkpoint-every", "5", "--lr", "0.05"]
    log_a = tmp_path / "a.log"
    with open(log_a, "w") as sink:
        first = subprocess.Popen(
            [str(shark), "train", *a_args, "--out-dir", str(out)], cwd=ROOT, stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(out / "checkpoints"):
            assert first.poll() is None, log_a.read_text()[-4000:]
            assert time.monotonic() < deadline, "run A saved no checkpoint in 300 s"
            time.sleep(0.5)
        second = run_shark(
            "train", *TINY, "--lr", "0.5", "--resume", "--max-steps", "1", "--out-dir", str(out), check=False
        )
        assert first.poll() is None, "run A ended before run B was tried: the test proves nothing"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.pid} on {socket.gethostname()}" in second.stderr
    assert tomllib.loads((out / "config.toml").read_text())["train"]["lr"] == 0.05
    for ckpt in list_checkpoints(out / "checkpoints"):
        assert json.loads((ckpt / "meta.json").read_text())["config"]["train"]["lr"] == 0.05, ckpt


def test_reclaiming_a_stale_lock_never_removes_a_fresh_one(tmp_path):
    """Two runs may find the same stale lock; the slower one must not take away the lock the
    faster one has just written in its place."""
    lock = tmp_path / ".lock"
    lock.write_text('{"pid": 2, "host": "h"}')  # the faster run's, written after we read the stale one
    _take_away(lock, '{"pid": 1, "host": "h"}')
    assert lock.read_text() == '{"pid": 2, "host": "h"}'
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    _take_away(lock, '{"pid": 2, "host": "h"}')
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# An unwritable place is found before training


def unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot write into. Root writes through permissions, so as
    root it is a path under a regular file (which no one can create); otherwise a directory
    made read-only."""
    if os.geteuid() == 0:
        blocker = tmp_path / "a_regular_file"
        blocker.write_text("")
        return blocker / "dir"
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


@pytest.mark.parametrize("flag", ["--out-dir", "--checkpoint-dir", "--metrics-out"])
def test_unwritable_directory_is_an_error_before_training(tmp_path, flag):
    """(--metrics-out's folder was found only when the metrics were written, after training,
    as an OSError not naming the flag.)"""
    bad = unwritable(tmp_path)
    out = bad if flag == "--out-dir" else tmp_path / "run"
    extra = {
        "--out-dir": [],
        "--checkpoint-dir": ["--checkpoint-dir", str(bad)],
        "--metrics-out": ["--metrics-out", str(bad / "m.json")],
    }[flag]
    proc = run_shark("train", *TINY, "--out-dir", str(out), *extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"shark train: error: {flag} {bad} ") and (
        "not writable" in error or "cannot be created" in error
    )
    if os.geteuid() == 0 and flag == "--out-dir":  # the path runs through a file: named
        assert error.endswith(f"cannot be created ({bad.parent} is a file)"), error
    if flag != "--out-dir":  # refused before anything was written: no config, no lock, no directory
        assert not out.exists()


def test_a_run_refused_on_its_data_leaves_no_directory_behind(tmp_path):
    """The directories a refused run made (its run directory, their parents, the checkpoint
    directory its write check made) are gone; a run directory that was there before stays."""
    out = tmp_path / "new" / "parents" / "run"
    proc = run_shark(
        "train", "--data", f"csv:{tmp_path / 'none'}", "--label", "click", "--out-dir", str(out), check=False
    )
    assert proc.returncode == 2 and "not found" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    out.mkdir(parents=True)
    run_shark("train", "--data", f"csv:{tmp_path / 'none'}", "--label", "click", "--out-dir", str(out), check=False)
    assert out.is_dir() and sorted(p.name for p in out.iterdir()) == []


@pytest.mark.parametrize("found", [("stages.json", "config.toml"), ("serving.json", "export.json")])
def test_a_job_into_another_runs_folder_is_refused(tmp_path, found):
    """`shark train --out` a compression run's folder or an export's (no checkpoints there) is
    refused, naming the files, and they stay as they were; with --resume it is not this check
    that stops it."""
    out = tmp_path / "other"
    out.mkdir()
    for name in found:
        (out / name).write_text("theirs")
    proc = run_shark("train", *TINY, "--max-steps", "2", "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"already holds the files of another run ({', '.join(sorted(found, key=RUN_FILES.index))})" in proc.stderr
    assert all((out / name).read_text() == "theirs" for name in found)
    assert sorted(p.name for p in out.iterdir()) == sorted(found)


def test_no_rank_makes_a_directory_again_while_another_removes_it(tmp_path):
    """Every rank removes the directories its write check made; a rank that went on at once to
    make one again and write into it lost its file to a slower rank's removal (once in CI:
    `File exists: .../base`). The ranks now wait for each other's removals."""
    from helpers.light_workers import write_after_the_write_check
    from shark_torchrec.distributed.env import launch

    assert launch(write_after_the_write_check, 2, str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------
# Checkpoint checksums


def test_resume_falls_back_past_a_truncated_checkpoint(killed_run, tmp_path):
    out = copy_of(killed_run, tmp_path)
    newest = out / "checkpoints" / "step_00000015"
    data = newest / "__0_0.distcp"
    size = data.stat().st_size
    os.truncate(data, size // 2)
    # Named explicitly, a corrupt checkpoint is an error naming its file.
    proc = run_shark("train", *SMALL, "--checkpoint", str(newest), "--out-dir", str(tmp_path / "other"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"shark train: error: checkpoint {newest} is corrupt: {data} has {size // 2} bytes, {size} were written "
        "(truncated or overwritten)"
    )
    # --resume takes the newest one that passes, and says which one it skipped and why.
    proc = run_shark("train", *SMALL, "--out-dir", str(out), "--resume")
    assert f"skipping corrupt checkpoint {newest}: {data} has {size // 2} bytes" in proc.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_00000010'} at step 10 (epoch 0," in proc.stderr
    assert resolve_checkpoint(out / "checkpoints").name == "step_00000024"  # the run's end, valid


@pytest.fixture
def two_checkpoints(tmp_path):
    """step_1 and step_2 of a small model, as a new process sees them (nothing known good)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 1))
    opt = torch.optim.Adagrad(model.parameters())
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        save_checkpoint(root, step, model, opt, {"tables": {}}, keep=3)
    ckpt_module._checked.clear()
    return root, model, opt


def largest_file(ckpt: Path) -> Path:
    return max((f for f in ckpt.iterdir() if f.name != "meta.json"), key=lambda f: f.stat().st_size)


def flip_a_bit(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "meta"])
def test_corrupt_newest_checkpoint_is_skipped_and_named(two_checkpoints, caplog, damage):
    root, _, _ = two_checkpoints
    newest = root / "step_00000002"
    data = largest_file(newest)
    if damage == "flip":
        flip_a_bit(data)
        why = f"{data} fails its CRC-32 check"
    elif damage == "truncate":
        os.truncate(data, data.stat().st_size - 1)
        why = f"{data} has {data.stat().st_size} bytes, {data.stat().st_size + 1} were written"
    elif damage == "delete":
        data.unlink()
        why = f"{data} is missing"
    else:
        (newest / "meta.json").write_text('{"step": 2, "tab')
        why = f"{newest / 'meta.json'} cannot be read"
    with caplog.at_level(logging.WARNING, logger="shark"):
        assert resolve_checkpoint(root) == root / "step_00000001"
    assert f"skipping corrupt checkpoint {newest}: {why}" in caplog.text
    with pytest.raises(CheckpointError, match="^" + re.escape(f"checkpoint {newest} is corrupt: {why}")):
        resolve_checkpoint(newest)


def test_no_valid_checkpoint_is_an_error(two_checkpoints):
    root, _, _ = two_checkpoints
    for ckpt in list_checkpoints(root):
        flip_a_bit(largest_file(ckpt))
    with pytest.raises(CheckpointError, match=re.escape(f"no valid checkpoint at {root}: all 2 fail their check")):
        resolve_checkpoint(root)


def test_checkpoint_without_checksums_still_loads(two_checkpoints):
    """Checkpoints saved before checksums existed load as they did, unchecked."""
    root, model, opt = two_checkpoints
    newest = root / "step_00000002"
    meta = json.loads((newest / "meta.json").read_text())
    del meta["files"]
    (newest / "meta.json").write_text(json.dumps(meta))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    assert resolve_checkpoint(root) == newest
    load_checkpoint(resolve_checkpoint(newest), model, opt, {})
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_checkpoint_records_every_file_it_wrote(two_checkpoints):
    root, _, _ = two_checkpoints
    ckpt = root / "step_00000002"
    files = json.loads((ckpt / "meta.json").read_text())["files"]
    assert sorted(files) == sorted(f.name for f in ckpt.iterdir() if f.name != "meta.json")
    assert {".metadata"} < set(files)
    for name, entry in files.items():
        assert entry["bytes"] == (ckpt / name).stat().st_size and len(entry["crc32"]) == 8


def test_a_torchrun_rank_exits_with_its_status_and_its_output_flushed(tmp_path):
    """`exit_without_teardown` (what apps/*.py end with under torchrun): the status comes
    through, and what was printed and logged is written, though Python's teardown is skipped."""
    import os
    import subprocess
    import sys

    log = tmp_path / "job.log"
    script = f"""
import logging, sys
import torch, torch.distributed as dist
from shark_torchrec.distributed.env import exit_without_teardown
logging.basicConfig(filename={str(log)!r}, level=logging.INFO)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
dist.all_reduce(torch.ones(3))
dist.destroy_process_group()
logging.getLogger("shark").info("job done")
sys.stdout.write("no newline at the end")
exit_without_teardown(3)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as in a job
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout.endswith("no newline at the end")
    assert "job done" in log.read_text()


def test_ctrl_c_is_one_line_saying_how_to_continue(tmp_path):
    """SIGINT mid-run: exit status 130 and one line naming the command that continues the run
    (no traceback); the lock is released and the checkpoints saved so far stay."""
    import signal

    out = tmp_path / "run"
    argv = [str(Path(sys.executable).parent / "shark"), "train", *TINY, "--epochs", "1000", "--checkpoint-every", "5"]
    proc = subprocess.Popen(
        [*argv, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Python turns SIGINT into KeyboardInterrupt only where SIGINT is not ignored at its start.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list_checkpoints(out / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    typed = "shark" if shutil.which("shark") == argv[0] else argv[0]  # as run: on PATH or by its path
    assert err.strip().splitlines()[-1] == (
        f"shark train: interrupted: `{typed} train --resume --out {out}` continues from its newest checkpoint"
    )
    assert "Traceback" not in err and not (out / ".lock").exists() and list_checkpoints(out / "checkpoints")


def test_ctrl_c_is_told_even_where_what_it_interrupted_hides_it(capsys):
    """An interrupt inside torch's checkpoint writer comes out as a RuntimeError of its C++
    stream, the KeyboardInterrupt gone (seen in the test above, 1 run in 10 under load): the
    command notes the signal itself, so it still says how to continue."""
    import signal

    from shark_torchrec import cli

    def job(cfg):  # Ctrl-C, then what torch's writer raised instead
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 206 vs 0")

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a command's process
    try:
        assert cli._run("shark train", job, ["--out", "runs/x"], "") == (None, cli.INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "shark train: interrupted: `shark train --resume --out runs/x` continues from its newest checkpoint"
    )


# ---------------------------------------------------------------------------------------
# What the command reports as the user's error, and what as ours


def test_a_fault_of_ours_is_a_traceback_not_the_users_error(tmp_path, capsys):
    """A plain ValueError inside a job (here Python's own, from an unpacking of ours) is a
    fault of ours, not the user's input: it propagates as it was raised, and the command ends
    with its traceback and exit status 1, never the one `error:` line that blames the input."""
    from shark_torchrec import cli

    def job(cfg):
        width, depth = [cfg.model.embedding_dim] * 3  # a fault of ours
        return {"size": width * depth}

    with pytest.raises(ValueError, match="too many values to unpack"):
        cli._run("shark train", job, ["--out", "runs/x"], "")
    assert "error:" not in capsys.readouterr().err
    script = (
        "import sys\n"
        "from shark_torchrec import cli\n"
        "from shark_torchrec.jobs import trainer\n"
        "def job(cfg):\n"
        "    width, depth = [cfg.model.embedding_dim] * 3\n"
        "    return {'size': width * depth}\n"
        "trainer.train_job = job\n"
        "sys.exit(cli.main(['train', '--out', 'run']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "error:" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: too many values to unpack (expected 2)"


@pytest.mark.parametrize(
    "failure",
    [
        ConfigError("train.lr=0.0 (--lr) must be > 0"),
        DataError("train.csv:3: expected 5 columns, got 4"),
        BudgetError("memory budget 0.1 is below what tables of dim 16 can reach"),
        IdError("feature 'c1': id 99 is outside table 't_c1' (rows 0..9)"),
        CheckpointError("no checkpoint found at runs/nowhere"),
        FileNotFoundError(2, "No such file or directory", "runs/missing.csv"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_error_in_the_users_input_is_one_line_and_exit_status_2(failure, capsys):
    """What describes the user's flags, config, data, budget, ids, checkpoints or files: one
    line naming it, exit status 2, no traceback."""
    from shark_torchrec import cli

    def job(cfg):
        raise failure

    assert cli._run("shark train", job, ["--out", "runs/x"], "") == (None, 2)
    assert capsys.readouterr().err.strip().splitlines() == [f"shark train: error: {failure}"]


def test_a_fault_of_ours_on_a_spawned_rank_shows_that_ranks_traceback():
    """Re-raised in the launching process, an exception of a spawned rank carries the rank's
    own traceback (the launcher's says nothing of where it failed), shown where it propagates;
    its message, what a user error's one line shows, is unchanged."""
    from helpers.light_workers import unpack_on_rank_1
    from shark_torchrec.distributed.env import launch

    with pytest.raises(ValueError) as raised:
        launch(unpack_on_rank_1, 2)
    assert str(raised.value) == "too many values to unpack (expected 2)"
    (note,) = raised.value.__notes__
    assert note.startswith("raised on rank 1:\nTraceback") and "in unpack_on_rank_1" in note


def test_a_user_error_on_one_rank_outranks_a_fault_on_another(tmp_path, capsys):
    """With several ranks failed, a user error (here rank 1's bad flag) is what the command
    reports, before a ValueError of a lower rank (rank 0's, which the user could not act on):
    the CLI ranks user errors first, then ValueError, then any. A flat list of types took the
    first rank that any of them matched, and showed rank 0's traceback."""
    from helpers.light_workers import fault_on_0_user_error_on_1
    from shark_torchrec import cli

    argv = ["--out", str(tmp_path), "--nproc", "2"]
    assert cli._run("shark train", fault_on_0_user_error_on_1, argv, "") == (None, 2)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "shark train: error: train.lr=0.0 (--lr) must be > 0"


def test_resume_refuses_another_commands_run_directory(tmp_path):
    """`shark train --resume` into a compression run rewrote its config and metrics (its
    targets gone); `shark compress --resume` into a training run ran the pipeline over it; a
    resumed train into an export folder trained into it (a newcomer's walkthrough). Each is
    refused, naming the command whose run the directory holds; a run of the same command, a
    compression run refused before its first stage, and a new directory still resume."""
    from shark_torchrec.jobs.checkpoint import CheckpointError
    from shark_torchrec.jobs.run_dir import refuse_earlier_run

    def run(name, *files):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_text("{}")
        return d

    compress_run = run("c", "config.toml", "stages.json", "metrics.json")
    (tmp_path / "c_in_base").mkdir()  # a compression run stopped in its first stage: no stages.json yet
    (tmp_path / "c_in_base" / "config.toml").write_text("")
    (tmp_path / "c_in_base" / "base" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"holds a `shark compress` run, not a `shark train` run"):
        refuse_earlier_run(tmp_path / "c_in_base", True, "train")
    refuse_earlier_run(tmp_path / "c_in_base", True, "compress")
    train_run = run("t", "config.toml", "metrics.json")
    export_dir = run("e", "export.json")
    with pytest.raises(
        CheckpointError, match=r"holds a `shark compress` run, not a `shark train` run .*shark compress --resume"
    ):
        refuse_earlier_run(compress_run, True, "train")
    with pytest.raises(CheckpointError, match=r"holds a `shark train` run, not a `shark compress` run"):
        refuse_earlier_run(train_run, True, "compress")
    for command in ("train", "compress"):
        with pytest.raises(CheckpointError, match=r"holds an export \(`shark export`\), which no run resumes"):
            refuse_earlier_run(export_dir, True, command)
    refuse_earlier_run(compress_run, True, "compress")
    refuse_earlier_run(train_run, True, "train")
    refuse_earlier_run(run("early", "config.toml"), True, "compress")  # refused before its first stage
    refuse_earlier_run(tmp_path / "new", True, "train")


def test_ctrl_c_during_an_export_is_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C in `shark export` printed KeyboardInterrupt's traceback and exit status 1 where
    train and compress say one line and exit 130 (a newcomer's walkthrough); it now says so
    too, and that nothing went into --out (its files go in only once all are written)."""
    import signal

    from shark_torchrec import cli
    from shark_torchrec.jobs import export

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    monkeypatch.setattr(export, "export_checkpoint", interrupted)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a command's process
    try:
        assert cli.main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e")]) == cli.INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"shark export: interrupted: its files go into {tmp_path / 'e'} only once all are written"
    ]


def test_an_export_refuses_a_directory_a_live_run_holds(tmp_path, capsys):
    """`shark export --overwrite --out DIR` wrote its files into a training run's directory
    while that run was writing there (a newcomer's walkthrough; train and compress refuse a
    held directory). A live holder's directory is refused, --overwrite or not; a lock whose
    run is gone is not in the way."""
    from shark_torchrec.cli import main
    from shark_torchrec.jobs import run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / run_dir.LOCK_FILE).write_text(run_dir._holder_record())  # this live process holds it
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is in use by a run (" in err and "nothing was written" in err
    assert sorted(p.name for p in out.iterdir()) == [run_dir.LOCK_FILE, "metrics.json"]
    # Its own folders too: a compression run writes RUN/export itself.
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(out / "export"), "--overwrite"]) == 2
    assert f"holding {out}" in capsys.readouterr().err
    assert not (out / "export").exists()
    gone = json.loads(run_dir._holder_record())
    gone["pid"] = 2**22 + 12345  # no such process
    (out / run_dir.LOCK_FILE).write_text(json.dumps(gone))
    assert run_dir.live_holder(out) is None


def test_the_ctrl_c_hint_names_the_command_as_it_was_run(monkeypatch, tmp_path):
    """The README runs `.venv/bin/shark`, which is not on PATH: the hint's `shark train
    --resume ...` could not be typed as given (a newcomer's walkthrough). It now uses the path
    the command was run by, unless that is the `shark` on PATH."""
    from shark_torchrec import cli

    script = tmp_path / ".venv" / "bin" / "shark"
    monkeypatch.setattr(sys, "argv", [str(script), "train"])
    assert cli._as_invoked("shark train") == f"{script} train"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/python", "-m", "pytest"])
    assert cli._as_invoked("shark train") == "shark train"
