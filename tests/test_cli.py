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


# -- serve, validate-config, stats, replay --config, generate --otlp ---------------------

_SERVE_CONFIG = """\
receivers:
  otlp: {protocols: {grpc: {endpoint: "localhost:0"}}}
processors:
  batch: {send_batch_size: 2000}
  red_windows: {window: 60s}
  service_graph: {idle_timeout: 10ms}
exporters:
  file/out: {path: "${env:KNHK_TEST_OUT}", compression: zstd}
service:
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch, red_windows, service_graph]
      exporters: [file/out]
  telemetry: {logs: {level: error}}
"""


def _rows(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("  ") and "  " in line.strip():
            key, value = line.strip().split("  ", 1)
            rows[key.strip()] = value.strip()
    return rows


def test_validate_config_accepts_the_examples(capsys):
    import glob

    paths = sorted(glob.glob("examples/*.yaml"))
    assert len(paths) >= 2
    assert cli.main(["validate-config", *paths]) == 0
    out = capsys.readouterr().out
    assert all(f"{p}: OK" in out for p in paths)


def test_validate_config_error_is_one_line_naming_file_line_and_key(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("KNHK_TEST_OUT", str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text(_SERVE_CONFIG.replace("file/out: {", "file/out: {rotate: 3, "))
    assert cli.main(["validate-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"knhk validate-config: error: {bad}:8: exporters.file/out.rotate: "
                          "unknown key")


def test_stats_summarises_a_recording_like_an_independent_reader(tmp_path, capsys):
    import numpy as np
    import pyarrow as pa

    path = tmp_path / "w.arrow"
    assert cli.main(["generate", "--spans", "4000", "--out", str(path), "--seed", "5",
                     "--error-rate", "0.05"]) == 0
    capsys.readouterr()
    assert cli.main(["stats", str(path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    df = pa.ipc.open_file(str(path)).read_all().to_pandas()
    assert rows["spans"] == f"{len(df):,}"
    assert rows["traces"] == f"{df.trace_id.nunique():,}"
    assert rows["services"] == f"{df.service.nunique():,}"
    assert rows["error rate"] == f"{(df.status_code == 2).mean():.2%}"
    df["ms"] = (df.end_time_ns - df.start_time_ns) / 1e6
    p99 = df.groupby(["service", "name"], observed=True).ms.apply(
        lambda s: np.percentile(s, 99)).sort_values(ascending=False)
    (service, name), worst = p99.index[0], p99.iloc[0]
    assert f"{service} {name}" in out and f"p99 {worst:10.2f} ms" in out
    assert "top operations by p99" in out


def test_stats_fallback_agrees_with_the_analysis_dataset(tmp_path):
    from knhk.analysis import open_dataset

    path = tmp_path / "w.arrow"
    assert cli.main(["generate", "--spans", "3000", "--out", str(path), "--seed", "6"]) == 0
    mine = cli._recording_summary([str(path)])
    theirs = open_dataset(str(path)).summary()
    for key in ("spans", "traces", "services", "start_ns", "end_ns", "error_rate"):
        assert mine[key] == theirs[key], key
    a, b = mine["top_operations"].slice(0, 10), theirs["top_operations"].slice(0, 10)
    assert a.column("name").to_pylist() == b.column("name").to_pylist()
    assert a.column("p99_ms").to_pylist() == pytest.approx(b.column("p99_ms").to_pylist())


def test_stats_and_replay_of_a_glob_matching_nothing_exit_2(tmp_path, capsys):
    for cmd in ("stats", "replay"):
        assert cli.main([cmd, str(tmp_path / "none-*.arrow")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no files match" in err


def test_replay_with_a_serve_config_runs_its_pipeline(tmp_path, capsys, monkeypatch):
    from knhk.replay import read_batches

    path = tmp_path / "w.arrow"
    assert cli.main(["generate", "--spans", "6000", "--out", str(path), "--seed", "8"]) == 0
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_SERVE_CONFIG)
    monkeypatch.setenv("KNHK_TEST_OUT", str(tmp_path / "out"))
    capsys.readouterr()
    assert cli.main(["replay", str(path), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows["spans read"] == "6,000"
    assert rows["events processed"] == "6,000"
    assert rows["exported by file/out"] == "6,000"
    assert "slowest operations" in out and "busiest service-graph edges" in out
    # replay does not listen: the config's receiver never bound a port
    assert "listening" not in out
    assert sum(b.num_rows for b in read_batches(str(tmp_path / "out"))) == 6000


def test_generate_otlp_sends_every_span_to_a_real_receiver(capsys):
    import knhk
    from knhk import workload
    from knhk.receivers import OtlpGrpcReceiver, OtlpHttpReceiver

    for receiver_type, protocol in ((OtlpGrpcReceiver, "grpc"),
                                    (OtlpHttpReceiver, "http/protobuf")):
        sink = knhk.InMemoryExporter()
        pipeline = knhk.TelemetryPipeline.builder().with_exporter(sink).build()
        with pipeline, receiver_type(pipeline, endpoint="localhost:0") as receiver:
            assert cli.main(["generate", "--spans", "2500", "--seed", "9", "--otlp",
                             f"localhost:{receiver.port}", "--otlp-protocol", protocol]) == 0
        assert f"sent 2,500 of 2,500 spans to localhost:{receiver.port}" in \
            capsys.readouterr().out
        got = {(t, s) for b in sink.batches for t, s in zip(
            b.record_batch.column("trace_id").to_pylist(),
            b.record_batch.column("span_id").to_pylist(), strict=True)}
        want = set()
        # --otlp sends batches of 512, and the workload depends on the batch size
        for b in workload.generate_batches(2500, config=workload.WorkloadConfig(seed=9),
                                           batch_size=512):
            want |= set(zip(b.record_batch.column("trace_id").to_pylist(),
                            b.record_batch.column("span_id").to_pylist(), strict=True))
        assert got == want


def test_generate_otlp_to_nothing_listening_fails_counted(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        assert cli.main(["generate", "--spans", "50", "--otlp", f"localhost:{port}",
                         "--otlp-protocol", "http/protobuf", "--otlp-retry-for", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "sent 0 of 50 spans" in out and "50 not delivered" in out


def test_generate_needs_a_destination(capsys):
    assert cli.main(["generate", "--spans", "10"]) == 2
    assert "--out FILE, --otlp HOST:PORT" in capsys.readouterr().err


def test_replay_speed_paces_across_files(tmp_path, capsys):
    """--speed keeps one clock over every file: a gap between two recordings is replayed
    as a gap (each file used to start its own clock)."""
    import time

    import knhk
    from knhk.exporters.ipc import IpcExporter

    def one_file(name: str, start_ns: int) -> str:
        rec = IpcExporter(str(tmp_path / name))
        rec.export(knhk.SpanBatch.from_spans(
            [knhk.Span("op", trace_id=start_ns + i, span_id=i + 1, start_time_ns=start_ns + i,
                       end_time_ns=start_ns + i + 1000) for i in range(10)]))
        rec.shutdown()
        return rec.files[0]

    t0 = 1_700_000_000_000_000_000
    first, second = one_file("a", t0), one_file("b", t0 + 600_000_000)  # 600 ms later
    began = time.monotonic()
    assert cli.main(["replay", first, second, "--speed", "2", "--no-sampling"]) == 0
    assert time.monotonic() - began >= 0.3 - 0.005  # 600 ms at twice the speed
    rows = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1]
            for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["files"] == "2" and rows["spans read"] == "20"
