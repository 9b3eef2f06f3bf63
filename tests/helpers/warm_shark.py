"""`shark` commands for the tests, forked from a process that has imported everything once.

A `shark` process spends about 4 s importing torch, TorchRec, FBGEMM, torchmetrics and our
package before it reads its first flag, and the tests run many. Each pytest worker therefore
starts one *warm* process (this file run as a script) that imports all of that and then, for
each command, forks a child that runs `shark_torchrec.cli.run` with the command's arguments,
in its folder, with the caller's environment and its standard output and error in files, and
that ends as the console script does (its `atexit` handlers, then its exit status). A fork
shares nothing with the next command: each starts from the same just-imported state. Ranks
that a command spawns (`--nproc 2`) start fresh interpreters, as they do from the console
script.

Where a test changed the environment after the warm process started (variables that imports
read, say), `WarmShark.usable` is False and conftest runs the real console script instead; so
does every command when SHARK_TESTS_COLD=1. The docs tests always run the real one.

Protocol (one JSON object a line): request {"argv", "cwd", "env", "stdout", "stderr"}; the warm
process answers {"pid"} once forked and {"returncode"} when the child has ended.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

# Variables no import reads, which pytest and torch's elastic launcher set in a worker as it
# runs tests (a launch from the worker itself sets the latter): the child gets their current
# values, and a difference in them does not make the warm process's imports stale.
IGNORED_VARIABLES = ("PYTEST_CURRENT_TEST", "TORCHELASTIC_SIGNALS_TO_HANDLE")


def _environment() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in IGNORED_VARIABLES}


class WarmShark:
    """A warm process of one pytest worker, started on first use (see the module doc)."""

    def __init__(self) -> None:
        self.environment = _environment()
        self.process = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=self.environment
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
            timeout: seconds before the command (and what it spawned) is killed.

        Returns:
            What `subprocess.run(argv, capture_output=True, text=True)` returns.

        Raises:
            subprocess.TimeoutExpired: the command ran past `timeout`.
        """
        stdout, stderr = out_dir / "stdout", out_dir / "stderr"
        request = {"argv": argv, "cwd": str(cwd), "env": dict(os.environ), "stdout": str(stdout), "stderr": str(stderr)}
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        pid = self._answer(60.0)["pid"]
        try:
            code = self._answer(timeout)["returncode"]
        except subprocess.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)  # the child leads its own group: its ranks go too
            self._answer(60.0)
            raise subprocess.TimeoutExpired(argv, timeout) from None
        return subprocess.CompletedProcess(argv, code, stdout.read_text(), stderr.read_text())

    def _answer(self, timeout: float) -> dict:
        """The warm process's next line (unbuffered: `select` sees only what is unread)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise subprocess.TimeoutExpired("warm shark", timeout)
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the warm shark process ended ({self.process.wait()})")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        """End the warm process."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _child(request: dict) -> None:
    """The forked command: as the console script, then `os._exit` with its status."""
    code: Optional[int] = 1
    try:
        os.setpgid(0, 0)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = list(request["argv"])
        from shark_torchrec.cli import run

        try:
            run()
            code = 0
        except SystemExit as e:  # what the interpreter does with it
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 (printed as an uncaught exception would be)
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


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
    protocol = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            sys.stdin.close()
            _child(request)
        protocol.write(json.dumps({"pid": pid}) + "\n")
        protocol.flush()
        _, status = os.waitpid(pid, 0)
        protocol.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        protocol.flush()


if __name__ == "__main__":
    _serve()
