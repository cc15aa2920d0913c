"""knhk serve as a real subprocess: real OTLP senders in, SIGTERM, every span on disk."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest
from serve_testing import ServeProcess, id_pairs, recorded_spans, sdk_send

import knhk
from knhk import workload

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")

CONFIG = """\
receivers:
  otlp:
    protocols:
      grpc: {endpoint: "localhost:0"}
      http: {endpoint: "localhost:0"}
processors:
  batch: {send_batch_size: 1024, timeout: 50ms}
  knhk_validation: {}
  red_windows: {window: 10s}
exporters:
  file/arrow: {path: "${env:TEST_DATA_DIR}", compression: lz4}
extensions:
  health_check: {endpoint: "localhost:0"}
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch, knhk_validation, red_windows]
      exporters: [file/arrow]
  telemetry: {logs: {level: info, encoding: json}}
  shutdown_timeout: 10s
"""


def _generate(endpoint: str, spans: int, seed: int, protocol: str = "grpc") -> str:
    r = subprocess.run([sys.executable, "-m", "knhk.cli", "generate", "--spans", str(spans),
                        "--seed", str(seed), "--otlp", endpoint, "--otlp-protocol", protocol],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _generated_ids(spans: int, seed: int) -> set[tuple[bytes, bytes]]:
    config = workload.WorkloadConfig(seed=seed, services=8, error_rate=0.01, slow_rate=0.02)
    out = set()
    for b in workload.generate_batches(spans, config=config, batch_size=512):
        out |= id_pairs(b.record_batch)
    return out


def _serve_and_send(tmp_path, send):
    """Start serve on CONFIG, ``send(grpc_at, http_at)``, SIGTERM; return what was recorded."""
    cfg = tmp_path / "knhk.yaml"
    cfg.write_text(CONFIG)
    data = tmp_path / "data"
    serve = ServeProcess(cfg, env={"TEST_DATA_DIR": str(data)})
    try:
        with urllib.request.urlopen(serve.address("health"), timeout=5) as r:
            assert r.status == 200 and json.load(r)["status"] == "Server available"
        expected = send(serve.address("OTLP/gRPC"), serve.address("OTLP/HTTP"))
    finally:
        rc, out, err = serve.terminate()
    assert rc == 0, err
    assert "SIGTERM received" in out
    table = recorded_spans(str(data))
    assert table.num_rows == len(expected), out + err[-2000:]
    assert id_pairs(table) == expected
    return table, out, err


def test_serve_records_every_span_the_opentelemetry_sdk_sends(tmp_path):
    def send(grpc_at, http_at):
        sent = sdk_send(grpc_at, protocol="grpc", traces=15)
        sent |= sdk_send(http_at, protocol="http", traces=10, service="sdk-http")
        assert len(sent) == 100
        return sent

    table, out, err = _serve_and_send(tmp_path, send)
    # the SDK's resource became the span's service
    assert set(table.column("service").to_pylist()) == {"sdk-app", "sdk-http"}
    # structured logs: every stderr line is one JSON object
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    done = [r for r in records if r["msg"].startswith("shutdown complete")]
    assert done and done[0]["traces"]["events_received"] == 100
    assert done[0]["traces"]["exported"] == {"file/arrow": 100}
    assert "traces: exported by file/arrow  100" in out


def test_serve_records_every_span_knhk_generate_sends(tmp_path):
    def send(grpc_at, http_at):
        out = _generate(grpc_at, 3000, seed=1)
        assert f"sent 3,000 of 3,000 spans to {grpc_at}" in out
        out = _generate(http_at, 1500, seed=2, protocol="http/protobuf")
        assert "sent 1,500 of 1,500 spans" in out
        return _generated_ids(3000, 1) | _generated_ids(1500, 2)

    table, _, _ = _serve_and_send(tmp_path, send)
    assert table.num_rows == 4500


def test_example_knhk_yaml_serves_health_and_prometheus(tmp_path):
    data = tmp_path / "data"
    env = {"KNHK_GRPC_ENDPOINT": "localhost:0", "KNHK_HTTP_ENDPOINT": "localhost:0",
           "KNHK_PROMETHEUS_ENDPOINT": "localhost:0", "KNHK_HEALTH_ENDPOINT": "localhost:0",
           "KNHK_DATA_DIR": str(data)}
    serve = ServeProcess(os.path.join(EXAMPLES, "knhk.yaml"), env=env, cwd=str(tmp_path))
    try:
        # error roots are always kept by the adaptive sampler, so something is written
        sent = sdk_send(serve.address("OTLP/gRPC"), traces=30, errors=3)
        metrics_url = serve.address("Prometheus")
        import time

        deadline = time.monotonic() + 5
        while True:  # the pipeline processes asynchronously: wait for the spans to show
            with urllib.request.urlopen(metrics_url, timeout=5) as r:
                assert r.status == 200
                text = r.read().decode()
            if "sdk-app" in text or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert "sdk-app" in text
        with urllib.request.urlopen(serve.address("health"), timeout=5) as r:
            body = json.load(r)
        assert body["pipelines"]["traces"]["events_received"] == len(sent)
    finally:
        rc, out, err = serve.terminate()
    assert rc == 0, err
    assert "traces: spans received" in out
    # adaptive sampling decides what is written; everything written was sent
    table = recorded_spans(str(data))
    assert 3 <= table.num_rows <= len(sent)
    assert id_pairs(table) <= sent
    assert sum(1 for c in table.column("status_code").to_pylist() if c == 2) == 3


def test_example_otlp_forward_sends_sampled_traces_upstream(tmp_path):
    from knhk.receivers import OtlpGrpcReceiver

    upstream_sink = knhk.InMemoryExporter()
    upstream = knhk.TelemetryPipeline.builder().with_exporter(upstream_sink).build()
    receiver = OtlpGrpcReceiver(upstream, endpoint="localhost:0").start()
    data = tmp_path / "fwd"
    env = {"KNHK_GRPC_ENDPOINT": "localhost:0", "KNHK_HEALTH_ENDPOINT": "localhost:0",
           "KNHK_UPSTREAM": f"localhost:{receiver.port}", "KNHK_DATA_DIR": str(data),
           "KNHK_DECISION_WAIT": "200ms"}
    try:
        serve = ServeProcess(os.path.join(EXAMPLES, "otlp-forward.yaml"), env=env)
        try:
            _generate(serve.address("OTLP/gRPC"), 4000, seed=3)
        finally:
            rc, _, err = serve.terminate()
        assert rc == 0, err
    finally:
        receiver.stop()
        upstream.shutdown()
    forwarded = id_pairs(recorded_spans(str(data)))
    got = set()
    for b in upstream_sink.batches:
        got |= id_pairs(b.record_batch)
    # what went upstream is exactly what was recorded: the tail-sampled traces, whole
    assert got == forwarded
    generated = _generated_ids(4000, 3)
    assert 0 < len(got) < len(generated) and got <= generated


def test_user_mistakes_are_one_line_exit_2_without_traceback(tmp_path):
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "busy.yaml"
        cfg.write_text(CONFIG.replace('grpc: {endpoint: "localhost:0"}',
                                      f'grpc: {{endpoint: "localhost:{port}"}}'))
        r = subprocess.run([sys.executable, "-m", "knhk.cli", "serve", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, "TEST_DATA_DIR": str(tmp_path / "d")})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert f"receivers.otlp.protocols.grpc: cannot listen on localhost:{port}" in r.stderr
    assert "already in use" in r.stderr


@pytest.mark.parametrize(("edit", "words"), [
    (("file/arrow: {", "fil/arrow: {"), "exporters.fil/arrow: unknown exporter type 'fil'"),
    (("compression: lz4", "compression: brotli"), "exporters.file/arrow.compression"),
])
def test_config_mistakes_exit_2_naming_the_key(tmp_path, edit, words):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(CONFIG.replace(*edit))
    r = subprocess.run([sys.executable, "-m", "knhk.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "TEST_DATA_DIR": str(tmp_path / "d")})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_unwritable_data_directory_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = tmp_path / "knhk.yaml"
    cfg.write_text(CONFIG)
    r = subprocess.run([sys.executable, "-m", "knhk.cli", "serve", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "TEST_DATA_DIR": str(blocker / "data")})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "exporters.file/arrow.path: cannot write to" in r.stderr


def test_health_endpoint_404_for_other_paths(tmp_path):
    cfg = tmp_path / "knhk.yaml"
    cfg.write_text(CONFIG)
    serve = ServeProcess(cfg, env={"TEST_DATA_DIR": str(tmp_path / "d")})
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(serve.address("health") + "nope", timeout=5)
        assert info.value.code == 404
        info.value.close()
    finally:
        rc, _, err = serve.terminate()
    assert rc == 0, err


def test_print_config_is_the_embedded_default_and_validates(tmp_path):
    r = subprocess.run([sys.executable, "-m", "knhk.cli", "serve", "--print-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    from knhk.serve.config import DEFAULT_CONFIG, parse_config

    assert parse_config(r.stdout, environ={}) == DEFAULT_CONFIG
    (tmp_path / "d.yaml").write_text(r.stdout)
    v = subprocess.run([sys.executable, "-m", "knhk.cli", "validate-config",
                        str(tmp_path / "d.yaml")], capture_output=True, text=True, timeout=30)
    assert v.returncode == 0 and "OK" in v.stdout


def test_serve_doc_lists_every_component_type():
    import knhk.serve
    from knhk.serve.config import EXPORTERS, EXTENSIONS, PROCESSORS, RECEIVERS

    doc = textwrap.dedent(knhk.serve.__doc__)
    for name in [*RECEIVERS, *PROCESSORS, *EXPORTERS, *EXTENSIONS]:
        assert f"``{name}``" in doc, name
