"""Catastrophic regular expressions in CEP and tail-sampling rules (issue 11, §3).

A rule such as ``(a+)+$`` over a span name of 4,000 ``a`` and a ``!`` takes
about 2**4000 steps in a backtracking engine (Python's ``re``); knhk runs user
patterns with RE2 (:mod:`knhk._regex`), in time linear in the input. Pass: a
batch of hostile spans goes through a pipeline with such rules in well under
the bound, the decisions equal an independent reference (written without
regular expressions), and ``knhk serve`` with such a tail-sampling policy keeps
answering and delivers exactly the matching traces. Each run sits in a child
process with a timeout, so a regression fails instead of hanging CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from knhk.testbed import ScenarioResult
from knhk.testbed.serve import ServeProcess, serve_config

BOUND_S = 2.0
_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

# span names / attribute values: the hostile ones first, then ones that match; as code,
# since the child process builds them too (an argument list of them is too long)
DATA = """
NAMES = ["a" * (3000 + i) + "!" for i in range(150)] + ["b" + "a" * i for i in range(1, 51)]
USERS = (["a" * (3000 + i) + "!" for i in range(150)] + ["a" * i for i in range(1, 50)]
         + ["a" * 5000])
"""
_data: dict = {}
exec(DATA, _data)
NAMES: list[str] = _data["NAMES"]
USERS: list[str] = _data["USERS"]


def name_matches(v: str) -> bool:
    """``(a+)+$`` searched: the name ends in an ``a``."""
    return v.endswith("a")


def user_matches(v: str) -> bool:
    """``^(a|aa)+$``: only a's; a match must lie in the first 4096 characters (the cap)."""
    return 0 < len(v) <= 4096 and set(v) == {"a"}


def _row(report, sid, title, passed, sent, details, duration):
    report.add(ScenarioResult(sid, title, "linear-time matching: the batch in under "
                              f"{BOUND_S:.0f} s, decisions equal to the reference",
                              passed=passed, kind="hostile", load="rule", sent=sent,
                              details=details, duration_s=round(duration, 3)))


def _run_child(code: str, timeout: float = 60.0) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the pipeline did not finish within {timeout} s: backtracking regex?")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_catastrophic_regex_in_cep_and_tail_sampling_pipeline(report):
    out = _run_child(f"""
        import json, re, time
        import knhk
        from knhk.exporters.memory import InMemoryExporter
        from knhk.stream import StreamProcessor
        from knhk.stream.cep import CepAction, CepPattern, CepRule, Matcher
        from knhk.tail_sampling import Policy, TailSamplingConfig

        exec({DATA!r})
        names, users = NAMES, USERS
        spans = [knhk.Span(n, trace_id=i + 1, span_id=i + 1, start_time_ns=10**9 + i,
                           duration_ns=1000, attributes={{"user": u}})
                 for i, (n, u) in enumerate(zip(names, users))]
        batch = knhk.SpanBatch.from_spans(spans)
        proc = StreamProcessor()
        proc.add_cep_rule(CepRule("name-rx", CepPattern.count_threshold(
            Matcher(name_regex=r"(a+)+$"), 1, within=60, by="name"),
            CepAction.alert("info", "{{key}}")))
        proc.add_cep_rule(CepRule("user-rx", CepPattern.count_threshold(
            Matcher(attributes={{"user": re.compile(r"^(a|aa)+$")}}), 1, within=60,
            by="attributes.user"), CepAction.alert("info", "{{key}}")))
        sink = InMemoryExporter()
        tail = TailSamplingConfig(policies=[Policy.string_attribute(
            "hostile", "user", [r"^(a|aa)+$"], enabled_regex_matching=True)],
            decision_wait=0.2, idle_timeout=0.1)
        pipeline = (knhk.TelemetryPipeline.builder().with_flush_interval(0.01)
                    .with_stage(proc).with_tail_sampling(tail).with_exporter(sink).build())
        t0 = time.perf_counter()
        pipeline.record_batch(batch)
        flushed = pipeline.shutdown(30)
        took = time.perf_counter() - t0
        st = pipeline.stats()
        print(json.dumps({{"seconds": took, "flushed": flushed,
                          "alerts": [[a.rule, a.key[0]] for a in proc.alerts],
                          "exported": sink.spans().attribute("user").to_pylist(),
                          "received": st.events_received, "stage_errors": st.stage_errors}}))
    """)
    want_alerts = sorted([["name-rx", n] for n in NAMES if name_matches(n)]
                         + [["user-rx", u] for u in USERS if user_matches(u)])
    got_alerts = sorted(out["alerts"])
    want_kept = sorted(u for u in USERS if user_matches(u))
    passed = (out["seconds"] < BOUND_S and out["flushed"] and got_alerts == want_alerts
              and sorted(out["exported"]) == want_kept and out["stage_errors"] == 0)
    _row(report, "hostile-catastrophic-regex-pipeline",
         "catastrophic regex (a+)+$ / ^(a|aa)+$ in CEP and tail-sampling rules (pipeline)",
         passed, len(NAMES),
         f"{len(NAMES)} spans with 3,000-5,000-character names and values in "
         f"{out['seconds']:.3f} s; {len(got_alerts)} alerts (reference {len(want_alerts)}), "
         f"{len(out['exported'])} spans kept (reference {len(want_kept)})", out["seconds"])
    assert out["seconds"] < BOUND_S, out["seconds"]
    assert out["flushed"] and out["received"] == len(NAMES) and out["stage_errors"] == 0
    assert got_alerts == want_alerts
    assert sorted(out["exported"]) == want_kept


def _request(spans: list[tuple[bytes, bytes, str, str]]) -> bytes:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    def kv(k: str, v: str) -> common_pb2.KeyValue:
        return common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=v))

    out = [trace_pb2.Span(trace_id=tid, span_id=sid, name=name,
                          start_time_unix_nano=1_700_000_000_000_000_000,
                          end_time_unix_nano=1_700_000_000_001_000_000,
                          attributes=[kv("user", user)])
           for tid, sid, name, user in spans]
    req = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(
        resource=resource_pb2.Resource(attributes=[kv("service.name", "hostile")]),
        scope_spans=[trace_pb2.ScopeSpans(spans=out)])])
    return req.SerializeToString()


def test_catastrophic_regex_in_serve_tail_sampling(sinks, tmp_path, report):
    sink = sinks("grpc")
    cfg = serve_config(0, 0, [("grpc", sink.endpoint)])
    cfg["processors"]["tail_sampling"] = {
        "decision_wait": "300ms", "num_traces": 1000,
        "policies": [{"name": "hostile", "type": "string_attribute", "string_attribute": {
            "key": "user", "values": [r"^(a|aa)+$", r"(x+x+)+y"],
            "enabled_regex_matching": True}}]}
    cfg["service"]["pipelines"]["traces"]["processors"] = ["batch", "tail_sampling"]
    proc = ServeProcess(cfg, str(tmp_path))
    channel = grpc.insecure_channel(proc.grpc_endpoint)
    try:
        call = channel.unary_unary(_METHOD)
        spans = [(i.to_bytes(16, "big"), i.to_bytes(8, "big"), n, u)
                 for i, (n, u) in enumerate(zip(NAMES, USERS, strict=True), start=1)]
        spans += [((999_000 + i).to_bytes(16, "big"), (999_000 + i).to_bytes(8, "big"),
                   "x", "x" * (3000 + i)) for i in range(20)]
        t0 = time.monotonic()
        call(_request(spans), timeout=30)
        hostile_s = time.monotonic() - t0
        # the server keeps answering at once, while it decides the hostile traces
        t1 = time.monotonic()
        call(_request([(b"\x07" * 16, b"\x07" * 8, "ok", "a")]), timeout=30)
        answer_s = time.monotonic() - t1
        want = {sid for _, sid, _, u in spans if user_matches(u)} | {b"\x07" * 8}
        arrived = sink.wait_for(len(want), timeout=20)
        delivered_s = time.monotonic() - t0
        summary = proc.terminate()
    finally:
        channel.close()
        proc.kill()
    got = sink.ids()
    tracebacks = proc.log().count("Traceback")
    # delivery waits for the policy's decision_wait (0.3 s) and the batch timeout
    passed = (arrived and got == want and hostile_s < BOUND_S and answer_s < BOUND_S
              and delivered_s < 5.0 and tracebacks == 0)
    _row(report, "hostile-catastrophic-regex-serve",
         "catastrophic regex in a tail_sampling policy of knhk serve (OTLP/gRPC)", passed,
         len(spans), f"request of {len(spans)} hostile spans answered in {hostile_s:.2f} s, "
         f"the next in {answer_s:.2f} s; decided and delivered after {delivered_s:.2f} s "
         f"(decision_wait 0.3 s); backend got {len(got)} spans, exactly the "
         f"{len(want)} matching: {got == want}; received "
         f"{summary.get('traces: spans received')}; {tracebacks} tracebacks",
         delivered_s)
    assert hostile_s < BOUND_S and answer_s < BOUND_S, (hostile_s, answer_s)
    assert delivered_s < 5.0, delivered_s
    assert got == want, (len(got), len(want))
    assert tracebacks == 0, proc.log()
