"""knhk.serve.components and knhk.serve.server in-process: routing, stages, health, logs."""

from __future__ import annotations

import io
import json
import logging
import socket
import urllib.error
import urllib.request
from collections import Counter

import pytest
from serve_testing import id_pairs, recorded_spans, sdk_send

import knhk
from knhk.serve import Server, configure_logging
from knhk.serve.components import DebugExporter, ServiceGraphStage, build
from knhk.serve.config import ConfigError, default_config, validate_config
from knhk.serve.server import HealthServer, JsonFormatter
from knhk.workload import WorkloadConfig, generate


def _config(tmp_path, **extra):
    cfg = {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": "localhost:0"},
                                             "http": {"endpoint": "localhost:0"}}}},
        "exporters": {"file/t": {"path": str(tmp_path / "t")},
                      "file/m": {"path": str(tmp_path / "m"), "prefix": "m"}},
        "extensions": {"health_check": {"endpoint": "localhost:0", "path": "/health"}},
        "service": {"extensions": ["health_check"], "pipelines": {
            "traces": {"receivers": ["otlp"], "exporters": ["file/t"]},
            "metrics": {"receivers": ["otlp"], "exporters": ["file/m"]}}},
    }
    cfg.update(extra)
    validate_config(cfg)
    return cfg


def _reference_edges(batch) -> Counter:
    """Calls per (client, server) service pair, by a plain loop over the spans."""
    rows = batch.to_pylist()
    service = {(r["trace_id"], r["span_id"]): r["service"] for r in rows}
    calls: Counter = Counter()
    for r in rows:
        if r["parent_span_id"] is None:
            continue
        parent = service.get((r["trace_id"], r["parent_span_id"]))
        if parent is not None and parent != r["service"]:
            calls[(parent, r["service"])] += 1
    return calls


def test_service_graph_stage_matches_a_plain_reference():
    batch = generate(3000, WorkloadConfig(seed=7))
    stage = ServiceGraphStage(idle_timeout=0.01, max_wait=60)
    half = batch.num_rows // 2
    assert stage.process(batch.slice(0, half)) is None  # spans pass through unchanged
    assert stage.process(batch.slice(half)) is None
    stage.flush()
    edges = stage.edges()
    got = {(c, s): n for c, s, n in zip(edges.column("client").to_pylist(),
                                        edges.column("server").to_pylist(),
                                        edges.column("calls").to_pylist(), strict=True)}
    assert got == dict(_reference_edges(batch))
    assert stage.traces == len(set(batch.record_batch.column("trace_id").to_pylist()))


def test_service_graph_metrics_reach_the_pipeline_exporters():
    sink = knhk.InMemoryExporter()
    stage = ServiceGraphStage(idle_timeout=0.01, metrics_interval=0.01)
    pipeline = (knhk.TelemetryPipeline.builder().with_flush_interval(0.01).with_stage(stage)
                .with_exporter(sink).build())
    stage.pipeline = pipeline
    batch = generate(1000, WorkloadConfig(seed=3))
    pipeline.record_batch(batch)
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
            isinstance(b, knhk.MetricBatch) for b in sink.batches):
        time.sleep(0.02)
    pipeline.shutdown()
    metrics = [b for b in sink.batches if isinstance(b, knhk.MetricBatch)]
    assert metrics, "no service-graph metrics were recorded"
    names = set()
    total = 0
    for m in metrics:
        rows = m.to_pylist()
        names |= {r["name"] for r in rows}
        total += sum(r["int_value"] for r in rows
                     if r["name"] == "traces_service_graph_request_total")
    assert "traces_service_graph_request_total" in names
    assert total == sum(_reference_edges(batch).values())


def test_spans_and_metrics_are_routed_to_their_pipelines(tmp_path):
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    server = Server(_config(tmp_path)).start()
    try:
        http_at = next(a for _, p, a in server.built.listening if p == "OTLP/HTTP")
        sent = sdk_send(http_at, protocol="http", traces=5)
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"http://{http_at}/v1/metrics"),
            export_interval_millis=60_000)
        provider = MeterProvider(metric_readers=[reader])
        counter = provider.get_meter("t").create_counter("orders", unit="1")
        counter.add(5, {"shop": "a"})
        counter.add(2, {"shop": "b"})
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        assert server.shutdown(10.0)
    assert id_pairs(recorded_spans(str(tmp_path / "t"))) == sent
    from knhk.replay import read_batches

    points = [r for b in read_batches(str(tmp_path / "m")) for r in b.to_pylist()]
    assert {(p["name"], p["int_value"]) for p in points} == {("orders", 5), ("orders", 2)}
    assert not list((tmp_path / "t").glob("*-metrics-*"))


def test_health_is_200_serving_then_503_while_shutting_down(tmp_path, monkeypatch):
    server = Server(_config(tmp_path)).start()
    url = server.health.url
    assert url.endswith("/health")
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert r.status == 200 and body["status"] == "Server available"
    assert set(body["pipelines"]) == {"traces", "metrics"}
    seen = {}
    original = server.built.stop_receivers

    def spy(*args, **kwargs):  # the real endpoint, asked at the moment shutdown begins
        try:
            urllib.request.urlopen(url, timeout=5)
        except urllib.error.HTTPError as exc:
            seen["code"], seen["body"] = exc.code, json.load(exc)
            exc.close()
        return original(*args, **kwargs)

    monkeypatch.setattr(server.built, "stop_receivers", spy)
    assert server.shutdown(10.0)
    assert seen == {"code": 503, "body": seen["body"]}
    assert seen["body"]["status"] == "Server shutting down"
    with pytest.raises(OSError):  # and afterwards nothing listens
        urllib.request.urlopen(url, timeout=2)


def test_port_in_use_is_a_config_error_naming_the_receiver(tmp_path):
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _config(tmp_path)
        cfg["receivers"]["otlp"]["protocols"]["http"]["endpoint"] = f"localhost:{port}"
        with pytest.raises(ConfigError) as info:
            Server(cfg).start()
    msg = str(info.value)
    assert msg.startswith("receivers.otlp.protocols.http: cannot listen on") and \
        "already in use" in msg


def test_health_port_in_use_is_a_config_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        cfg = _config(tmp_path)
        cfg["extensions"]["health_check"]["endpoint"] = f"localhost:{busy.getsockname()[1]}"
        with pytest.raises(ConfigError, match=r"extensions\.health_check\.endpoint"):
            Server(cfg).start()


def test_unwritable_file_exporter_path(tmp_path):
    (tmp_path / "f").write_text("x")
    cfg = _config(tmp_path)
    cfg["exporters"]["file/t"]["path"] = str(tmp_path / "f" / "sub")
    with pytest.raises(ConfigError, match=r"exporters\.file/t\.path: cannot write to"):
        build(cfg)


def test_missing_registry_is_named(tmp_path):
    cfg = _config(tmp_path, processors={"knhk_validation": {"registry": str(tmp_path / "no")}})
    cfg["service"]["pipelines"]["traces"]["processors"] = ["knhk_validation"]
    with pytest.raises(ConfigError, match=r"processors\.knhk_validation\.registry"):
        build(cfg)


def test_default_config_builds_every_component(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = default_config()
    for proto in ("grpc", "http"):
        cfg["receivers"]["otlp"]["protocols"][proto]["endpoint"] = "localhost:0"
    cfg["exporters"]["prometheus"]["endpoint"] = "localhost:0"
    cfg["extensions"]["health_check"]["endpoint"] = "localhost:0"
    # keep everything, so what is written can be compared with what was sent
    cfg["processors"]["adaptive_sampling"]["base_rate"] = 1.0
    server = Server(cfg).start()
    try:
        protocols = [p for _, p, _ in server.built.listening]
        assert protocols == ["OTLP/gRPC", "OTLP/HTTP", "Prometheus"]
        grpc_at = server.built.listening[0][2]
        sent = sdk_send(grpc_at, traces=10)
        pipeline = server.built.pipelines["traces"]
        assert pipeline.force_flush(10.0)
        assert pipeline.validator is not None  # validation against the repo's registry
        prom_url = server.built.listening[2][2]
        with urllib.request.urlopen(prom_url, timeout=5) as r:
            text = r.read().decode()
        assert "sdk-app" in text
    finally:
        assert server.shutdown(10.0)
    stats = server.summary()["traces"]
    assert stats["events_received"] == stats["events_processed"] == len(sent)
    assert stats["events_sampled_out"] == 0
    assert list((tmp_path / "knhk-data").glob("knhk-spans-*.arrow"))
    assert id_pairs(recorded_spans(str(tmp_path / "knhk-data"))) == sent
    windows = next(iter(server.built.stream_processors.values()))
    results = windows.get_results(as_table=True)
    assert sum(results.column("count").to_pylist()) == len(sent)


def test_json_formatter_and_configure_logging():
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("info", "json", stream=stream)
    try:
        logging.getLogger("knhk.test").info("hello %s", "there", extra={"knhk": {"n": 2}})
        logging.getLogger("knhk.test").debug("not shown")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["msg"] == "hello there" and rec["n"] == 2 and rec["level"] == "info"
    assert isinstance(JsonFormatter(), logging.Formatter)
    with pytest.raises(ValueError):
        configure_logging("loud")


def test_health_server_alone():
    state = {"ok": True}
    health = HealthServer("localhost:0", "/", lambda: (state["ok"], {"status": "x"})).start()
    try:
        with urllib.request.urlopen(health.url, timeout=5) as r:
            assert r.status == 200
        state["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(health.url, timeout=5)
        assert info.value.code == 503
        info.value.close()
    finally:
        health.stop()


def test_debug_exporter_logs_counts(caplog):
    exporter = DebugExporter("normal")
    batch = generate(200, WorkloadConfig(seed=1))
    with caplog.at_level(logging.INFO, logger="knhk.serve.components"):
        exporter.export(batch)
    assert exporter.spans == 200
    rec = caplog.records[-1]
    assert rec.knhk["rows"] == 200
    assert sum(rec.knhk["by_service"].values()) == 200


def test_no_registry_found_turns_validation_off_and_says_so(tmp_path, monkeypatch):
    # where knhk is installed without a registry beside it (the lookup itself is
    # exercised by the default-config test, which finds the repo's registry/)
    import knhk.serve.components as components

    monkeypatch.setattr(components, "default_registry", lambda: None)
    cfg = _config(tmp_path, processors={"knhk_validation": {}})
    cfg["service"]["pipelines"]["traces"]["processors"] = ["knhk_validation"]
    built = build(cfg)
    try:
        assert built.pipelines["traces"].validator is None
        assert any("validation off" in what for _, what in built.writing)
    finally:
        assert built.shutdown(5.0)


@pytest.mark.parametrize(("value", "expected"), [("90s", 90.0), (0, None), ("0s", None)])
def test_prometheus_metric_expiration_is_configurable(tmp_path, value, expected):
    cfg = _config(tmp_path)
    cfg["exporters"]["prometheus"] = {"endpoint": "localhost:0", "metric_expiration": value}
    cfg["service"]["pipelines"]["traces"]["exporters"].append("prometheus")
    validate_config(cfg)
    built = build(cfg)
    try:
        prom = [w.exporter for w in built.pipelines["traces"]._workers
                if type(w.exporter).__name__ == "PrometheusExporter"]
        assert [p.metric_expiration for p in prom] == [expected]
    finally:
        built.shutdown(5.0)


def test_prometheus_metric_expiration_must_be_a_duration(tmp_path):
    cfg = _config(tmp_path)
    cfg["exporters"]["prometheus"] = {"metric_expiration": "soon"}
    cfg["service"]["pipelines"]["traces"]["exporters"].append("prometheus")
    with pytest.raises(ConfigError, match=r"exporters\.prometheus\.metric_expiration"):
        validate_config(cfg)


def test_a_receiver_in_two_traces_pipelines_feeds_both(tmp_path):
    cfg = _config(tmp_path)
    pipelines = cfg["service"]["pipelines"]
    pipelines["traces/copy"] = {"receivers": ["otlp"], "exporters": ["file/c"]}
    cfg["exporters"]["file/c"] = {"path": str(tmp_path / "c"), "prefix": "c"}
    validate_config(cfg)
    server = Server(cfg).start()
    try:
        sent = sdk_send(server.built.listening[0][2], traces=12)
    finally:
        assert server.shutdown(10.0)
    got = {name: id_pairs(recorded_spans(str(tmp_path / name))) for name in ("t", "c")}
    assert got["t"] == got["c"] == sent and len(sent) > 0
    stats = server.summary()
    assert stats["traces"]["events_received"] == stats["traces/copy"]["events_received"]


def test_fan_out_takes_a_request_only_when_the_first_pipeline_does():
    from knhk.serve.components import _Router

    first = knhk.TelemetryPipeline.builder().build()
    side_sink = knhk.InMemoryExporter()
    side = knhk.TelemetryPipeline.builder().with_exporter(side_sink).build()
    router = _Router([first, side], [])
    batch = generate(100, WorkloadConfig(seed=4))
    assert router.try_record_batch(batch) == 100
    first.shutdown()
    # the first pipeline refuses (here: shut down): nothing is taken anywhere, so the
    # client's retry cannot duplicate spans in the side pipeline
    assert router.try_record_batch(batch) is None
    assert side.shutdown()
    assert sum(b.num_rows for b in side_sink.batches) == 100


def test_file_exporter_compression_level(tmp_path):
    cfg = _config(tmp_path)
    cfg["exporters"]["file/t"]["compression_level"] = 6
    validate_config(cfg)
    built = build(cfg)
    try:
        [ipc] = [w.exporter for w in built.pipelines["traces"]._workers]
        assert (ipc.compression, ipc.compression_level) == ("lz4", 6)
    finally:
        built.shutdown(5.0)
    cfg["exporters"]["file/t"].update(compression="none")
    with pytest.raises(ConfigError, match=r"exporters\.file/t: compression_level needs"):
        build(cfg)
