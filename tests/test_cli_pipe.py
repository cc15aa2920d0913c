"""``knhk ... | head -1``: a reader that goes away ends the command quietly."""

from __future__ import annotations

import os
import subprocess
import sys

from knhk.cli import main


def _run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.close(r)   # the reader is gone before the first write, as after `head -1` exits
    try:
        return subprocess.run([sys.executable, "-m", "knhk.cli", *args], stdout=w,
                              stderr=subprocess.PIPE, timeout=60, check=False)
    finally:
        os.close(w)


def test_info_into_a_closed_pipe_exits_1_without_a_message():
    proc = _run_into_closed_pipe("info")
    assert proc.stderr == b""
    assert proc.returncode == 1


def test_info_into_an_open_pipe_still_works():
    proc = subprocess.run([sys.executable, "-m", "knhk.cli", "info"], capture_output=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith(b"knhk ")


def test_a_broken_pipe_in_process_returns_1(monkeypatch, capsys):
    # In-process, so stdout is capsys' and has no file descriptor: the devnull
    # redirect must not fail on it. (A stand-in command raises the error; the real
    # pipe is the subprocess test above.)
    import knhk.cli as cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    args = cli.build_parser().parse_args(["info"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args, broken))
    assert main(["info"]) == 1
    assert capsys.readouterr().err == ""


class _Fixed:
    def __init__(self, args, func):
        self.args, self.args.func = args, func

    def parse_args(self, argv):
        return self.args


def test_other_os_errors_are_still_reported(monkeypatch, capsys):
    import knhk.cli as cli

    def fail(args):
        raise FileNotFoundError(2, "No such file or directory")

    args = cli.build_parser().parse_args(["info"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(args, fail))
    assert main(["info"]) == 2
    assert "No such file or directory" in capsys.readouterr().err
