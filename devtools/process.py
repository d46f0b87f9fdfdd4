"""The one subprocess wrapper of the dev tooling, the tests and the bench.

A ``Child`` is a process whose output goes to a log file (and, for ``make run``, to the
terminal too, each line prefixed with its name), that can be waited for by a line of its
output, signalled, stopped (SIGTERM, then SIGKILL) and measured (RSS).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

STOP_TIMEOUT_S = 20.0
POLL_S = 0.05


@dataclass
class Child:
    """``argv`` run with ``env`` (None: ours) in ``cwd``, its output appended to ``log_path``.

    ``echo``: also copy each output line, prefixed with ``name``, to our stdout.
    ``new_session``: its own process group, so a Ctrl-C on our terminal does not reach it.
    """

    name: str
    argv: list[str]
    log_path: Path | None = None
    env: dict[str, str] | None = field(default=None, repr=False)  # may hold credentials
    cwd: Path | None = None
    echo: bool = False
    new_session: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Child:
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.echo:
            out = subprocess.PIPE
        elif self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=self.new_session,
        )
        if not isinstance(out, int):
            out.close()  # the child has its own copy
        if self.echo:
            threading.Thread(target=self._pump, daemon=True).start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float) -> bool:
        """Whether ``text`` appeared in the log within ``timeout_s`` (False at once if it exits)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log_text():
            if not self.alive() or time.monotonic() > deadline:
                return text in self.log_text()
            time.sleep(POLL_S)
        return True

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (after a SIGCONT, should it be stopped), then SIGKILL if it does not exit in time."""
        if not self.alive():
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        self.wait(timeout_s)

    def wait(self, timeout_s: float) -> None:
        """Wait for it to exit; SIGKILL it if it has not within ``timeout_s``."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return kb / 1024

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        log = open(self.log_path, "ab") if self.log_path is not None else None  # noqa: SIM115
        try:
            for line in self.proc.stdout:
                if log is not None:
                    log.write(line)
                    log.flush()
                sys.stdout.write(f"{self.name:<9}| {line.decode(errors='replace')}")
                sys.stdout.flush()
        finally:
            if log is not None:
                log.close()
