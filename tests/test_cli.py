"""The knhk command: each subcommand run in-process through cli.main."""

from __future__ import annotations

import subprocess
import sys

import pytest

from knhk import cli
from knhk._build import CORE_MODULES


def test_info_lists_every_compiled_kernel_and_library(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    import knhk

    assert out.startswith(f"knhk {knhk.__version__}")
    for name in CORE_MODULES:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert "MISSING" not in line and ".so" in line
    for lib in ("numpy", "pyarrow", "grpcio", "opentelemetry-proto", "lz4"):
        assert lib in out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "knhk.cli", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "compiled kernels" in out


def test_missing_build_is_a_clear_import_error(monkeypatch):
    from knhk._build import load_core
    from knhk.errors import BuildError

    monkeypatch.setitem(sys.modules, "knhk._core._span", None)
    with pytest.raises(ImportError) as info:
        load_core("_span")
    assert isinstance(info.value, BuildError)
    assert "pip install" in str(info.value) and "knhk._core._span" in str(info.value)


def test_bad_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
