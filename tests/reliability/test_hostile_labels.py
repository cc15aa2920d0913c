"""Label injection against a running ``knhk serve`` (issue 11, §3).

``knhk serve`` runs with the Prometheus exporter on a free port. Over OTLP it
receives spans whose service name and span name (both become labels of the
span metrics) and attribute values, and metric points whose attribute values
(labels of the point's series), try to break out of a label value: a quote and
brace followed by an exposition line, backslashes, newlines, a ``# TYPE`` line,
NUL, a 20,000-character value, and invalid UTF-8 in the protobuf string field.
A real Prometheus server (Debian's ``/usr/bin/prometheus``) then scrapes knhk.

Pass: no injected series exists in Prometheus, ``promtool check metrics``
accepts the scraped text, and every label value read back through the
Prometheus query API equals what was sent; invalid UTF-8 is either refused
with INVALID_ARGUMENT (the request as a whole) or read back with each bad byte
as U+FFFD (the documented sanitised form), nothing else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from knhk.testbed import ScenarioResult
from knhk.testbed.serve import ServeProcess, free_port

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
DEADLINE_S = 20.0

HOSTILE = {
    "exposition line": 'x"} 1\nfake_metric 1',
    "backslashes": "\\ \\\\ \\n \\\" end\\",
    "newline": "a\nb\r\nc",
    "TYPE line": '"}\n# TYPE fake_metric counter\nfake_metric{a="b"} 1\n',
    "braces and quotes": '"}{=,"{',
    "NUL": "a\x00b",
    "long (20,000 chars)": "L" * 20_000,
    "non-ASCII": "é€😀\u2028",
}
# invalid UTF-8 put into the protobuf string field (the library refuses to write it, so
# a same-length placeholder is swapped for the bytes after serialising)
BAD_UTF8 = b"bad\xff\xfe\xc3(end!"
PLACEHOLDER = "PLACEHOLDER"


def _kv(key: str, value: str) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def _traces(items: list[tuple[str, str, str]], start: int) -> bytes:
    """One resource per (service, span name, attribute value), one span each."""
    now = time.time_ns()
    rs = []
    for i, (service, name, attr) in enumerate(items, start=start):
        span = trace_pb2.Span(trace_id=i.to_bytes(16, "big"), span_id=i.to_bytes(8, "big"),
                              name=name, kind=trace_pb2.Span.SPAN_KIND_SERVER,
                              start_time_unix_nano=now - 5_000_000, end_time_unix_nano=now,
                              attributes=[_kv("hostile", attr)])
        rs.append(trace_pb2.ResourceSpans(
            resource=resource_pb2.Resource(attributes=[_kv("service.name", service)]),
            scope_spans=[trace_pb2.ScopeSpans(spans=[span])]))
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=rs).SerializeToString()


def _metrics(values: list[str], start: int) -> bytes:
    """A gauge ``hostile_points`` with one point per value: attributes v=<value>, i=<index>."""
    now = time.time_ns()
    points = [metrics_pb2.NumberDataPoint(time_unix_nano=now, as_double=float(i),
                                          attributes=[_kv("v", v), _kv("i", str(i))])
              for i, v in enumerate(values, start=start)]
    metric = metrics_pb2.Metric(name="hostile_points", gauge=metrics_pb2.Gauge(data_points=points))
    req = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[
        metrics_pb2.ResourceMetrics(
            resource=resource_pb2.Resource(attributes=[_kv("service.name", "labels")]),
            scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])])])
    return req.SerializeToString()


def _with_bad_utf8(body: bytes) -> bytes:
    assert len(PLACEHOLDER) == len(BAD_UTF8) and PLACEHOLDER.encode() in body
    return body.replace(PLACEHOLDER.encode(), BAD_UTF8)


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read()


def _poll(fn, ready, deadline_s: float = DEADLINE_S):
    deadline = time.monotonic() + deadline_s
    result = None
    while time.monotonic() < deadline:
        try:
            result = fn()
        except OSError:  # still starting
            result = None
        if result is not None and ready(result):
            return result
        time.sleep(0.25)
    return result


def _serve_config(prom_port: int) -> dict:
    return {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": "127.0.0.1:0"},
                                             "http": {"endpoint": "127.0.0.1:0"}}}},
        "processors": {"batch": {"send_batch_size": 512, "timeout": "50ms"}},
        "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{prom_port}"}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                             "exporters": ["prometheus"]}},
                    "telemetry": {"logs": {"level": "warn"}}, "shutdown_timeout": "10s"},
    }


def _post_json(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


# OTLP/JSON may spell NUL and a lone surrogate (valid JSON escapes; the second is not
# Unicode text); service and name are JSON string bodies, escapes as written
def _json_span(service: bytes, name: bytes, i: int) -> bytes:
    now = time.time_ns()
    return (b'{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":'
            b'{"stringValue":"%s"}}]},"scopeSpans":[{"spans":[{"traceId":"%032x",'
            b'"spanId":"%016x","name":"%s","kind":2,"startTimeUnixNano":"%d",'
            b'"endTimeUnixNano":"%d"}]}]}]}' % (service, i, i, name, now - 1000, now))


def _call(channel: grpc.Channel, method: str, body: bytes) -> str:
    try:
        channel.unary_unary(method)(body, timeout=10)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def test_label_injection_through_knhk_serve_and_a_real_prometheus(prometheus, tmp_path, report):
    prom_port = free_port()
    proc = ServeProcess(_serve_config(prom_port), str(tmp_path))
    channel = grpc.insecure_channel(proc.grpc_endpoint)
    rows: dict[str, tuple[bool, str]] = {}
    try:
        values = list(HOSTILE.values())
        # service, span name and attribute all hostile; one resource per value
        answers = {"valid": [_call(channel, TRACES, _traces([(v, v, v) for v in values], 1)),
                             _call(channel, METRICS, _metrics(values, 0))]}
        # invalid UTF-8 in each string field, each in a request of its own
        n = len(values)
        answers["invalid UTF-8"] = [
            _call(channel, TRACES, _with_bad_utf8(_traces([(PLACEHOLDER, "ok-name", "x")],
                                                          n + 1))),
            _call(channel, TRACES, _with_bad_utf8(_traces([("ok-service", PLACEHOLDER, "x")],
                                                          n + 2))),
            _call(channel, TRACES, _with_bad_utf8(_traces([("ok-service", "ok-name-2",
                                                            PLACEHOLDER)], n + 3))),
            _call(channel, METRICS, _with_bad_utf8(_metrics([PLACEHOLDER], n))),
        ]
        json_answer = [
            _post_json(proc.http_url, _json_span(b"json-nul", b'json\\u0000\\"}\\n fake_metric 1',
                                                 0xFFFE)),
            _post_json(proc.http_url, _json_span(b"json\\ud800lone", b"json-surrogate",
                                                 0xFFFF))]
        assert answers["valid"] == ["OK", "OK"], answers
        assert set(answers["invalid UTF-8"]) <= {"OK", "INVALID_ARGUMENT"}, answers

        # what knhk serves, once the hostile points are in
        text = _poll(lambda: _scrape(prom_port),
                     lambda t: b"hostile_points" in t and b"calls_total" in t)
        assert text is not None, proc.log()
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                               capture_output=True, timeout=30)
        rows["promtool"] = (check.returncode == 0,
                            f"promtool check metrics on {len(text):,} bytes scraped from knhk: "
                            f"exit {check.returncode} {check.stderr.decode()[:200]}")

        query = prometheus(prom_port)
        up = _poll(lambda: query('up{job="knhk"}'), lambda r: r and r[0]["value"][1] == "1")
        assert up, (tmp_path / "prometheus.log").read_text()
        # the last scrape must hold everything: wait until the gauge has all its series
        gauge = _poll(lambda: query("hostile_points"), lambda r: len(r) >= n)
        calls = _poll(lambda: query("calls_total"),
                      lambda r: len(r) >= n + json_answer.count(200))
        names = {s["metric"]["__name__"] for s in query('{__name__=~".+"}')}
        injected = sorted(m for m in names if "fake" in m)
        rows["no injected series"] = (
            not injected and not query("fake_metric"),
            f"{len(names)} metric names in Prometheus, injected: {injected or 'none'}")

        # label values read back equal what was sent
        got_v = {s["metric"]["i"]: s["metric"].get("v") for s in gauge}
        sent_v = {str(i): v for i, v in enumerate(values)}
        bad_v = {HOSTILE_NAME[sent_v[i]]: got_v.get(i) for i in sent_v
                 if got_v.get(i) != sent_v[i]}
        span_names = {s["metric"].get("span_name") for s in calls}
        services = {s["metric"].get("service") for s in calls}
        missing_names = [HOSTILE_NAME[v] for v in values if v not in span_names]
        missing_services = [HOSTILE_NAME[v] for v in values if v not in services]
        rows["label values read back"] = (
            not bad_v and not missing_names and not missing_services,
            f"{len(values)} hostile values as metric-point label, span_name and service: "
            f"differing {bad_v or 'none'}, span names missing {missing_names or 'none'}, "
            f"services missing {missing_services or 'none'}")

        # invalid UTF-8: refused whole, or read back with U+FFFD for each bad byte
        sanitised = BAD_UTF8.decode("utf-8", "replace")
        seen = {s["metric"].get("span_name") for s in query("calls_total")} | \
            {s["metric"].get("service") for s in query("calls_total")} | \
            {s["metric"].get("v") for s in query("hostile_points")}
        odd = sorted(v for v in seen if v and "bad" in v and v != sanitised)
        accepted = answers["invalid UTF-8"].count("OK")
        found = sanitised in seen
        # a refused request is refused whole: its valid parts are not there either
        half = sorted({"ok-name", "ok-name-2", "ok-service"} & seen) if accepted == 0 else []
        rows["invalid UTF-8"] = (
            not odd and (accepted == 0 or found) and not half,
            f"answers {answers['invalid UTF-8']} (span service, span name, span attribute, "
            f"metric attribute); read back as {sanitised!r}: {found}; other forms: "
            f"{odd or 'none'}; parts of refused requests present: {half or 'none'}")
        # OTLP/JSON: NUL and an injection read back as sent; a lone surrogate accepted
        # as U+FFFD, or the request refused whole
        json_services = {s["metric"].get("service") for s in query("calls_total")}
        json_names = {s["metric"].get("span_name") for s in query("calls_total")}
        nul_ok = json_answer[0] == 200 and 'json\x00"}\n fake_metric 1' in json_names
        lone_ok = (json_answer[1] == 400 and "json-surrogate" not in json_names) or (
            json_answer[1] == 200 and "json\ufffdlone" in json_services)
        rows["NUL and a lone surrogate in OTLP/JSON"] = (
            nul_ok and lone_ok, f"HTTP answers {json_answer} (NUL + injection in the name; "
                                f"lone surrogate in the service); NUL name read back as sent: "
                                f"{nul_ok}; surrogate: refused whole or read back as U+FFFD: "
                                f"{lone_ok}")
        alive = _call(channel, TRACES, _traces([("after", "after", "after")], 10_000)) == "OK"
        rows["server alive"] = (alive, "a valid request afterwards is accepted: "
                                       f"{alive}; log tracebacks: "
                                       f"{proc.log().count('Traceback')}")
    finally:
        channel.close()
        proc.kill()
    for title, (passed, details) in rows.items():
        report.add(ScenarioResult(
            "hostile-label-injection-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-"),
            f"label injection over OTLP into knhk serve's Prometheus endpoint: {title}",
            "no injected series; promtool passes; label values read back as sent",
            passed=passed, kind="hostile", load="OTLP -> Prometheus",
            sent=len(HOSTILE), details=details))
    failed = {t: d for t, (p, d) in rows.items() if not p}
    assert not failed, failed


HOSTILE_NAME = {v: k for k, v in HOSTILE.items()}
