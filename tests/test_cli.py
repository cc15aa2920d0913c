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


def test_generate_writes_a_deterministic_recording(tmp_path, capsys):
    import pyarrow as pa

    import knhk

    a, b = tmp_path / "a.arrow", tmp_path / "b.arrow"
    assert cli.main(["generate", "--spans", "3000", "--out", str(a), "--seed", "4"]) == 0
    assert cli.main(["generate", "--spans", "3000", "--out", str(b), "--seed", "4"]) == 0
    assert "wrote 3,000 spans" in capsys.readouterr().out
    ta = pa.ipc.open_file(str(a)).read_all()
    tb = pa.ipc.open_file(str(b)).read_all()
    assert ta.num_rows == 3000 and ta.schema.equals(knhk.SPAN_SCHEMA)
    assert ta.equals(tb)
    # generating again over an existing file replaces it
    assert cli.main(["generate", "--spans", "10", "--out", str(a), "--seed", "4"]) == 0
    assert pa.ipc.open_file(str(a)).read_all().num_rows == 10


def test_replay_prints_a_stats_table_and_accounts_for_every_span(tmp_path, capsys):
    path = tmp_path / "w.arrow"
    assert cli.main(["generate", "--spans", "5000", "--out", str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["replay", str(path), "--no-sampling"]) == 0
    out = capsys.readouterr().out
    rows = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1]
            for line in out.splitlines() if line.strip()}
    assert rows["spans read"] == "5,000"
    assert rows["events received"] == rows["events processed"] == "5,000"
    assert rows["events dropped"] == "0"
    assert rows["exported by count"] == "5,000"


def test_replay_of_a_damaged_file_fails_naming_it(tmp_path, capsys):
    path = tmp_path / "w.arrow"
    assert cli.main(["generate", "--spans", "30000", "--out", str(path),
                     "--batch-size", "5000"]) == 0
    data = path.read_bytes()
    damaged = tmp_path / "cut.arrow"
    damaged.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert cli.main(["replay", str(damaged)]) == 2
    captured = capsys.readouterr()
    assert str(damaged) in captured.err
    # the batches before the damage were still replayed and reported
    assert "spans read" in captured.out


def test_demo_runs_the_full_pipeline_on_embedded_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./registry here: the bundled one is used
    assert cli.main(["demo", "--spans", "20000", "--out-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "registry  (none found" not in out
    rows = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1]
            for line in out.splitlines() if line.startswith("  ") and "  " in line.strip()}
    assert rows["events received"] == rows["events processed"] == "21,000"
    # one in ten of the 1,000 workflow spans lacks its required workflow.pattern
    assert rows["validation errors"] == "100"
    assert list((tmp_path / "data").glob("demo-spans-*.arrow"))
    # the stream processor saw every span before sampling and reports the slowest
    assert "slowest operations" in out and " p99 " in out


def test_registry_check_of_the_repo_registry(capsys):
    assert cli.main(["registry", "check", "registry"]) == 0
    assert "OK" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert cli.main(["demo", "--registry", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knhk demo: error:") and "missing" in err
