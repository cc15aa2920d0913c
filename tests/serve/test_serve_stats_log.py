"""knhk serve's periodic stats line: what it counts, when it is quiet, how it is configured."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import pytest

from knhk.otlp import encode_traces
from knhk.serve import Server
from knhk.serve.config import ConfigError, validate_config
from knhk.serve.server import JsonFormatter
from knhk.workload import WorkloadConfig, generate


def _server(interval: str) -> Server:
    cfg = {"receivers": {"otlp": {"protocols": {"http": {"endpoint": "localhost:0"}}}},
           "exporters": {"debug": {}},
           "service": {"telemetry": {"logs": {"stats_interval": interval}},
                       "pipelines": {"traces": {"receivers": ["otlp"],
                                                "exporters": ["debug"]}}}}
    validate_config(cfg)
    return Server(cfg)


def _post(server: Server, n: int, seed: int) -> None:
    address = server.built.listening[0][2]
    body = encode_traces(generate(n, WorkloadConfig(seed=seed)))
    req = urllib.request.Request(f"http://{address}/v1/traces", data=body,
                                 headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _wait_exported(server: Server, n: int) -> None:
    deadline = time.monotonic() + 10
    p = server.built.pipelines["traces"]
    while p.stats().exporters["debug"]["events_exported"] < n:
        assert time.monotonic() < deadline, p.stats()
        time.sleep(0.02)


def test_stats_line_counts_what_moved_and_quiet_pipelines_are_not_logged(caplog):
    server = _server("0s").start()  # 0: no thread; the test calls log_stats itself
    try:
        assert server._stats_thread is None
        with caplog.at_level(logging.INFO, logger="knhk.serve.server"):
            assert server.log_stats() == {}  # nothing moved since start
            _post(server, 700, seed=1)
            _post(server, 300, seed=2)
            _wait_exported(server, 1000)
            caplog.clear()
            lines = server.log_stats()
            assert list(lines) == ["traces"]
            line = lines["traces"]
            assert line["received"] == 1000 and line["processed"] == 1000
            assert line["exported"] == {"debug": 1000}
            assert line["dropped"] == 0 and line["export_failed"] == {}
            assert line["received_per_s"] > 0
            records = [r for r in caplog.records if r.name == "knhk.serve.server"]
            assert len(records) == 1
            msg = records[0].getMessage()
            assert "1,000 spans received" in msg and "exported: debug 1,000" in msg
            # the structured fields reach the JSON log line
            out = json.loads(JsonFormatter().format(records[0]))
            assert out["pipeline"] == "traces" and out["received"] == 1000
            caplog.clear()
            assert server.log_stats() == {}  # quiet again: no line
            assert not [r for r in caplog.records if r.name == "knhk.serve.server"]
    finally:
        assert server.shutdown(5.0)


def test_periodic_thread_logs_and_stops_at_shutdown(caplog):
    server = _server("50ms")
    with caplog.at_level(logging.INFO, logger="knhk.serve.server"):
        server.start()
        try:
            _post(server, 500, seed=3)
            _wait_exported(server, 500)
            deadline = time.monotonic() + 5
            while not any("500 spans received" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                time.sleep(0.02)
        finally:
            assert server.shutdown(5.0)
    server._stats_thread.join(2.0)
    assert not server._stats_thread.is_alive()


def test_stats_interval_is_checked():
    cfg = {"receivers": {"otlp": {"protocols": {"http": {"endpoint": "localhost:0"}}}},
           "exporters": {"debug": {}},
           "service": {"telemetry": {"logs": {"stats_interval": "soon"}},
                       "pipelines": {"traces": {"receivers": ["otlp"],
                                                "exporters": ["debug"]}}}}
    with pytest.raises(ConfigError, match=r"service\.telemetry\.logs\.stats_interval"):
        validate_config(cfg)


def test_stats_line_reports_what_a_queueing_exporter_sent_not_what_it_queued():
    cfg = {"receivers": {"otlp": {"protocols": {"http": {"endpoint": "localhost:0"}}}},
           "exporters": {"otlp": {"endpoint": "127.0.0.1:1", "timeout": "300ms",
                                  "tls": {"insecure": True},
                                  "retry_on_failure": {"initial_interval": "100ms",
                                                       "max_interval": "200ms",
                                                       "max_elapsed_time": "500ms"}}},
           "service": {"telemetry": {"logs": {"stats_interval": "0s"}},
                       "pipelines": {"traces": {"receivers": ["otlp"],
                                                "exporters": ["otlp"]}}}}
    validate_config(cfg)
    server = Server(cfg).start()
    try:
        server.log_stats()
        _post(server, 300, seed=4)
        otlp = server.built.pipelines["traces"].exporters[0]
        deadline = time.monotonic() + 15
        while otlp.spans_failed < 300:  # nothing listens on port 1: given up on
            assert time.monotonic() < deadline
            time.sleep(0.05)
        line = server.log_stats()["traces"]
        assert line["exported"] == {"otlp": 0}
        assert line["export_failed"] == {"otlp": 300}
    finally:
        server.shutdown(5.0)
