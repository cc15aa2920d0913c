"""The child processes of the testbed (``knhk serve``, the system under test): stdout
piped to the parent, stderr to a log file, and the two ways they end."""

from __future__ import annotations

import subprocess


class ChildProcess:
    """``cmd`` started with its stdout piped and its stderr written to ``log_path``."""

    def __init__(self, cmd: list[str], log_path: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (the child writes to it)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL)

    def log(self) -> str:
        """The last 4,000 bytes of the child's stderr."""
        with open(self.log_path, "rb") as f:
            return f.read()[-4000:].decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush (a crash)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
