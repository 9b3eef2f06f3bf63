"""`shark` commands for the tests, forked from a process that has imported everything once.

A `shark` process spends about 4 s importing torch, TorchRec, FBGEMM, torchmetrics and our
package before it reads its first flag, and the tests run many. Each pytest worker therefore
starts one *warm* process (this file run as a script) that imports all of that and then, for
each command, forks a child that runs `shark_torchrec.cli.run` with the command's arguments,
in its folder, with the caller's environment and its standard output and error in files. Its
SystemExit (or an uncaught exception) ends the child as the interpreter ends any script: the
same teardown as the console script's. A fork shares nothing with the next command: each
starts from the same just-imported state. Ranks that a command spawns (`--nproc 2`) start
fresh interpreters, as from the console script, except that multiprocessing has them import
this file (as `__mp_main__`, which imports nothing heavy at the top) where it would import
the console script.

Where a test changed the environment after the warm process started (variables that imports
read, say), `WarmShark.usable` is False and conftest runs the real console script instead; so
does every command when SHARK_TESTS_COLD=1. The docs tests always run the real one.

Protocol (one JSON object a line): request {"argv", "cwd", "env", "timeout", "stdout",
"stderr"}; the warm process answers {"pid"} once forked and {"returncode", "timed_out"} when
the child has ended or was killed at its deadline.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

# Variables no import reads, which pytest, torch's elastic launcher and a world of one
# (`init_distributed`: LOCAL_WORLD_SIZE) set in a worker as it runs tests: the child gets their
# current values, and a difference in them does not make the warm process's imports stale.
IGNORED_VARIABLES = ("PYTEST_CURRENT_TEST", "TORCHELASTIC_SIGNALS_TO_HANDLE", "LOCAL_WORLD_SIZE")


def _environment() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in IGNORED_VARIABLES}


class WarmShark:
    """A warm process of one pytest worker, started on first use (see the module doc)."""

    def __init__(self) -> None:
        self.environment = _environment()
        # Its own output (a crash at import, say) goes to a file the errors below quote.
        self.log = tempfile.NamedTemporaryFile(prefix="warm-shark-", suffix=".log")
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            bufsize=0,
            env=self.environment,
        )
        self.pending = b""  # read from the warm process, not yet answered

    def usable(self) -> bool:
        """Whether a command can run here: the warm process lives and the environment is the
        one it imported under."""
        return self.process.poll() is None and _environment() == self.environment

    def run(self, argv: List[str], cwd: Path, out_dir: Path, timeout: float) -> subprocess.CompletedProcess:
        """Run `shark *argv[1:]` as a fork of the warm process.

        Args:
            argv: the command line, argv[0] the console script's path.
            cwd: the folder it runs in.
            out_dir: a folder for its standard output and error files.
            timeout: seconds before the command (and the ranks it spawned) is killed.

        Returns:
            What `subprocess.run(argv, capture_output=True, text=True)` returns.

        Raises:
            subprocess.TimeoutExpired: the command ran past `timeout` (the warm process stays).
            Anything else that stops the exchange (an interrupt, a dead warm process): raised
            after the command and the warm process are killed, so none outlives the test.
        """
        stdout, stderr = out_dir / "stdout", out_dir / "stderr"
        request = {"argv": argv, "cwd": str(cwd), "env": dict(os.environ), "timeout": timeout}
        request.update(stdout=str(stdout), stderr=str(stderr))
        pid = None
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            pid = self._answer(120.0)["pid"]
            answer = self._answer(timeout + 120.0)  # the warm process keeps the deadline
        except BaseException:
            self._abandon(pid)
            raise
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout)
        return subprocess.CompletedProcess(argv, answer["returncode"], stdout.read_text(), stderr.read_text())

    def _answer(self, timeout: float) -> dict:
        """The warm process's next line (unbuffered: `select` sees only what is unread)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"the warm shark process did not answer in {timeout:.0f} s")
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                self.log.seek(0)
                log = self.log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"the warm shark process ended ({self.process.wait()}):\n{log}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def _abandon(self, pid: Optional[int]) -> None:
        """Kill the command's process group (when it was forked) and the warm process."""
        if pid is not None:
            _kill_group(pid)
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """End the warm process (its stdin closes; no command runs between calls)."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _kill_group(pid: int) -> None:
    """Kill a forked command and the ranks it spawned (its process group), if still there."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _child(request: dict, protocol) -> None:
    """The forked command: the console script's `run`, whose SystemExit (or uncaught
    exception) ends this process as the interpreter ends any script."""
    protocol.close()  # this copy only: the warm process keeps its own
    os.setpgid(0, 0)  # a group of its own, so that a timeout kills the ranks it spawns too
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # sys.stdin (fd 0, nothing buffered) now reads an empty file
    os.close(devnull)
    sys.argv = list(request["argv"])
    from shark_torchrec.cli import run

    run()


def _wait(pid: int, deadline: float) -> dict:
    """The forked command's answer: its exit status, or None and timed_out once it ran past
    `deadline` (its group killed). When the tests' end closes stdin first, the command is
    killed and the warm process ends."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False}
        closed, _, _ = select.select([sys.stdin], [], [], 0.05)  # readable only at EOF here
        if closed or time.monotonic() > deadline:
            _kill_group(pid)
            os.waitpid(pid, 0)
            if closed:
                os._exit(0)
            return {"returncode": None, "timed_out": True}


def _serve() -> None:
    """The warm process: import, then fork a child per request until stdin closes."""
    import shark_torchrec.cli  # noqa: F401
    import shark_torchrec.distributed.env  # noqa: F401
    import shark_torchrec.jobs.compress  # noqa: F401
    import shark_torchrec.jobs.export  # noqa: F401
    import shark_torchrec.jobs.prune  # noqa: F401
    import shark_torchrec.jobs.trainer  # noqa: F401
    import shark_torchrec.report  # noqa: F401
    from shark_torchrec.kernels import load

    load()  # the compiled library, once, before any fork
    # Answers go on a private copy of stdout; what anything prints goes to stderr (the log).
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # a SystemExit or an exception from here ends the child, never the loop
            _child(request, protocol)
            os._exit(1)  # not reached: `run` always raises SystemExit
        protocol.write(json.dumps({"pid": pid}) + "\n")
        protocol.flush()
        answer = _wait(pid, time.monotonic() + request["timeout"])
        protocol.write(json.dumps(answer) + "\n")
        protocol.flush()


if __name__ == "__main__":
    _serve()
