"""knhk serve with the loadbalancing exporter: config checks, building, and two real
``knhk serve`` backends behind a third on loopback (static set, then a run-time change)."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest
from knhk_testing import ref_endpoint, ref_trace_key
from serve_testing import ServeProcess, id_pairs, recorded_spans, sdk_send

from knhk.exporters.loadbalancing import LoadBalancingExporter
from knhk.serve.components import build
from knhk.serve.config import ConfigError, load_config, parse_config

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")

def expected_endpoint(trace_id: bytes, endpoints: list[str]) -> str:
    return ref_endpoint(ref_trace_key(trace_id), endpoints)


# -- configuration ---------------------------------------------------------------------

LB = """\
receivers:
  otlp:
    protocols:
      grpc: {endpoint: "localhost:0"}
processors:
  batch: {send_batch_size: 256, timeout: 50ms}
exporters:
  loadbalancing:
    routing_key: traceID
    protocol:
      otlp:
        timeout: 2s
        tls: {insecure: true}
        compression: gzip
        sending_queue: {queue_size: 100, num_consumers: 2}
    resolver:
RESOLVER
extensions:
  health_check: {endpoint: "localhost:0"}
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [loadbalancing]
  shutdown_timeout: 15s
"""

BACKEND = """\
receivers:
  otlp:
    protocols:
      grpc: {endpoint: "localhost:0"}
processors:
  batch: {send_batch_size: 256, timeout: 50ms}
exporters:
  file: {path: "${env:TEST_DATA_DIR}", compression: lz4}
extensions:
  health_check: {endpoint: "localhost:0"}
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [file]
  shutdown_timeout: 10s
"""


def lb_config(resolver: str) -> str:
    return LB.replace("RESOLVER", "\n".join("      " + line for line in resolver.splitlines()))


def test_the_example_validates_and_builds(tmp_path):
    backends = tmp_path / "backends.txt"
    backends.write_text("localhost:14317\nlocalhost:24317\n")
    env = {"KNHK_BACKENDS_FILE": str(backends), "KNHK_GRPC_ENDPOINT": "localhost:0",
           "KNHK_HEALTH_ENDPOINT": "localhost:0"}
    config = load_config(os.path.join(EXAMPLES, "loadbalancing.yaml"), environ=env)
    built = build(config)
    try:
        (lb,) = built.exporters["traces"]
        assert isinstance(lb, LoadBalancingExporter)
        assert lb.endpoints == ("localhost:14317", "localhost:24317")
        # every endpoint's OTLP exporter carries the protocol template
        for ex in lb._members.exporters:
            c = ex.config
            assert (c.protocol, c.timeout, c.insecure, c.compression, c.queue_size,
                    c.consumers) == ("grpc", 5.0, True, "gzip", 1000, 2)
        assert c.endpoint == "localhost:24317"
        (line,) = [w for label, w in built.writing if label == "traces loadbalancing"]
        assert "by traceID" in line and str(backends) in line
    finally:
        assert built.shutdown(5.0)


@pytest.mark.parametrize(("resolver", "words"), [
    ("static: {hostnames: [localhost:1, 'a b']}",
     ":16: exporters.loadbalancing.resolver: static.hostnames: item 1: an endpoint must not "
     "contain blanks"),
    ("static: {hostnames: []}", "static.hostnames: expected a non-empty list"),
    ("static: {hostnames: [localhost:1]}\ndns: {hostname: localhost}",
     "name exactly one resolver (static, dns or file), got ['dns', 'static']"),
    ("dns: {hostname: localhost, interval: often}", "dns.interval: expected a duration"),
    ("file: {path: x, every: 1s}", "file.every: unknown key; known keys: interval, path"),
])
def test_resolver_mistakes_name_file_line_and_path(resolver, words):
    with pytest.raises(ConfigError) as err:
        parse_config(lb_config(resolver), source="lb.yaml")
    assert str(err.value).startswith("lb.yaml:")
    assert words in str(err.value)


def test_protocol_and_routing_key_mistakes():
    text = lb_config("static: {hostnames: [localhost:1]}")
    with pytest.raises(ConfigError, match=r"lb.yaml:12: exporters.loadbalancing.protocol.otlp."
                                          r"endpoint: unknown key"):
        parse_config(text.replace("timeout: 2s", "endpoint: x:1"), source="lb.yaml")
    with pytest.raises(ConfigError, match=r"lb.yaml:9: exporters.loadbalancing.routing_key: "
                                          r"expected one of 'traceID', 'service', 'metric'"):
        parse_config(text.replace("routing_key: traceID", "routing_key: spanID"),
                     source="lb.yaml")
    with pytest.raises(ConfigError, match="routing_key: 'metric' cannot route the traces"):
        parse_config(text.replace("routing_key: traceID", "routing_key: metric"))
    config = parse_config(text)
    del config["exporters"]["loadbalancing"]["resolver"]
    with pytest.raises(ConfigError, match=r"exporters\.loadbalancing\.resolver: required"):
        build(config)


# -- two knhk serve backends behind a third --------------------------------------------


def health(serve: ServeProcess) -> dict:
    with urllib.request.urlopen(serve.address("health"), timeout=5) as r:
        return json.load(r)


def received(serve: ServeProcess) -> int:
    return health(serve)["pipelines"]["traces"]["events_received"]


def wait_until(predicate, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Tier:
    """Two backends (file exporters in their own directories) and a load balancer."""

    def __init__(self, tmp_path, resolver_for) -> None:
        self.tmp_path = tmp_path
        cfg = tmp_path / "backend.yaml"
        cfg.write_text(BACKEND)
        self.dirs = [tmp_path / "a", tmp_path / "b"]
        self.backends: list[ServeProcess] = []
        self.lb: ServeProcess | None = None
        try:
            for d in self.dirs:
                self.backends.append(ServeProcess(cfg, env={"TEST_DATA_DIR": str(d)}))
            self.endpoints = [b.address("OTLP/gRPC") for b in self.backends]
            lb_cfg = tmp_path / "lb.yaml"
            lb_cfg.write_text(lb_config(resolver_for(self.endpoints)))
            self.lb = ServeProcess(lb_cfg)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> tuple[str, list]:
        """SIGTERM the balancer (it flushes to the backends), then the backends."""
        rc, out, err = self.lb.terminate()
        assert rc == 0, err
        for b in self.backends:
            brc, _, berr = b.terminate()
            assert brc == 0, berr
        return out, [id_pairs(recorded_spans(str(d))) if d.exists() else set()
                     for d in self.dirs]

    def kill(self) -> None:
        for p in [*self.backends, self.lb]:
            if p is not None:
                p.kill()


def test_two_serve_backends_behind_a_third_get_whole_traces_each_span_once(tmp_path):
    tier = Tier(tmp_path, lambda eps: f"static: {{hostnames: [{eps[0]}, {eps[1]}]}}")
    try:
        at = tier.lb.address("OTLP/gRPC")
        sent = sdk_send(at, traces=40, children=3)
        sent |= sdk_send(at, traces=20, children=1, service="other-app")
        wait_until(lambda: sum(received(b) for b in tier.backends) == len(sent),
                   what="the backends to receive every span")
        out, got = tier.stop()
    finally:
        tier.kill()
    assert "load balancing by traceID over OTLP/gRPC (static" in out
    assert "exported by loadbalancing  200" in out
    # every span exactly once
    assert len(got[0]) + len(got[1]) == len(sent) == 200
    assert got[0] | got[1] == sent
    # every trace wholly on one backend, the one the hash names; both got a share
    traces = [{t for t, _ in g} for g in got]
    assert not traces[0] & traces[1]
    assert all(traces)
    for endpoint, trace_ids in zip(tier.endpoints, traces, strict=True):
        assert all(expected_endpoint(t, tier.endpoints) == endpoint for t in trace_ids)


def test_adding_a_backend_at_run_time_through_the_file_resolver(tmp_path):
    backends_file = tmp_path / "backends.txt"

    def resolver(eps):
        backends_file.write_text(eps[0] + "\n")
        return f"file: {{path: {backends_file}, interval: 100ms}}"

    tier = Tier(tmp_path, resolver)
    a, b = tier.backends
    try:
        at = tier.lb.address("OTLP/gRPC")
        before = sdk_send(at, traces=20)
        wait_until(lambda: received(a) == len(before), what="backend a")
        # the operator adds the second backend: a new file renamed over the old
        tmp = tmp_path / "backends.txt.new"
        tmp.write_text("\n".join(tier.endpoints) + "\n")
        os.replace(tmp, backends_file)
        probes: set = set()
        deadline = time.monotonic() + 15
        while received(b) == 0:  # until the balancer routes by the new set
            assert time.monotonic() < deadline, "the second backend never got a span"
            probes |= sdk_send(at, traces=5)
            sent_so_far = len(before) + len(probes)
            wait_until(lambda n=sent_so_far: received(a) + received(b) == n, what="the probes")
        after = sdk_send(at, traces=30)
        total = len(before) + len(probes) + len(after)
        wait_until(lambda: received(a) + received(b) == total, what="every span")
        _, got = tier.stop()
    finally:
        tier.kill()
    assert len(got[0]) + len(got[1]) == total  # nothing lost, nothing twice
    assert got[0] | got[1] == before | probes | after
    traces = [{t for t, _ in g} for g in got]
    assert not traces[0] & traces[1]
    # before the change: all on the first backend; after: split by the hash over both
    assert {t for t, _ in before} <= traces[0]
    after_traces = {t for t, _ in after}
    assert after_traces & traces[0] and after_traces & traces[1]
    for endpoint, trace_ids in zip(tier.endpoints, traces, strict=True):
        assert all(expected_endpoint(t, tier.endpoints) == endpoint
                   for t in trace_ids & after_traces)


def test_validate_config_requires_a_resolver(tmp_path):
    path = tmp_path / "lb.yaml"
    path.write_text("receivers: {otlp: {protocols: {grpc: {endpoint: 'localhost:0'}}}}\n"
                    "exporters:\n"
                    "  loadbalancing:\n"
                    "    protocol: {otlp: {tls: {insecure: true}}}\n"
                    "service: {pipelines: {traces: {receivers: [otlp],"
                    " exporters: [loadbalancing]}}}\n")
    with pytest.raises(ConfigError, match=r"lb\.yaml:3: exporters\.loadbalancing: resolver: "
                                          r"required"):
        load_config(str(path))


def test_validate_config_checks_the_routing_key_against_the_pipeline(tmp_path):
    path = tmp_path / "lb.yaml"
    path.write_text("receivers: {otlp: {protocols: {grpc: {endpoint: 'localhost:0'}}}}\n"
                    "exporters:\n"
                    "  loadbalancing:\n"
                    "    routing_key: metric\n"
                    "    resolver: {static: {hostnames: ['a:4317']}}\n"
                    "service: {pipelines: {traces: {receivers: [otlp],"
                    " exporters: [loadbalancing]}}}\n")
    with pytest.raises(ConfigError, match=r"lb\.yaml:4: exporters\.loadbalancing\.routing_key: "
                                          r"'metric' cannot route the traces"):
        load_config(str(path))
