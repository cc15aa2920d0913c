"""LoadBalancingExporter: rendezvous routing against a plain-Python reference, minimal
re-routing, resolvers, membership changes and drains, counters, and real OTLP peers."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from knhk_testing import ref_digest, ref_endpoint, ref_trace_key

import knhk
from knhk.exporters._retry import RetryConfig
from knhk.exporters.loadbalancing import (
    DnsResolver,
    FileResolver,
    LoadBalancingExporter,
    ResolveError,
    StaticResolver,
    endpoint_seeds,
    normalize_endpoint,
    rendezvous_assign,
    string_keys,
    trace_id_keys,
)
from knhk.exporters.memory import InMemoryExporter
from knhk.exporters.otlp import OtlpConfig
from knhk.receivers import OtlpGrpcReceiver, OtlpHttpReceiver
from knhk.testbed.serve import free_port
from knhk.workload import WorkloadConfig, generate


def ids_of(batch) -> list[bytes]:
    return batch.record_batch.column("trace_id").to_pylist()


trace_ids = st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=60)
endpoint_names = st.lists(
    st.from_regex(r"[a-z][a-z0-9.-]{0,12}:[1-9][0-9]{0,3}", fullmatch=True),
    min_size=1, max_size=8, unique=True)


def sinks_for(endpoints):
    sinks = {e: InMemoryExporter() for e in endpoints}
    return sinks, sinks.__getitem__


def workload_batch(n: int, seed: int):
    return generate(n, WorkloadConfig(seed=seed))


# -- the hash --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(trace_ids, endpoint_names)
def test_vectorized_routing_equals_the_plain_python_reference(ids, endpoints):
    keys = trace_id_keys(pa.array(ids, pa.binary(16)))
    assert keys.tolist() == [ref_trace_key(t) for t in ids]
    ordered = sorted(endpoints)
    winner = rendezvous_assign(keys, endpoint_seeds(ordered))
    assert [ordered[w] for w in winner] == [ref_endpoint(ref_trace_key(t), endpoints)
                                            for t in ids]


def test_trace_id_keys_read_a_sliced_array_at_its_offset():
    ids = [bytes([i]) * 16 for i in range(10)]
    arr = pa.array(ids, pa.binary(16)).slice(3, 4)
    assert trace_id_keys(arr).tolist() == [ref_trace_key(t) for t in ids[3:7]]
    with pytest.raises(TypeError, match="fixed_size_binary"):
        trace_id_keys(pa.array([b"x" * 8], pa.binary(8)))


def test_string_keys_hash_each_value_and_nulls_as_empty():
    arr = pa.array(["cart", None, "auth", "cart"]).dictionary_encode()
    keys = string_keys(arr)
    assert keys.tolist() == [ref_digest(b"cart"), ref_digest(b""), ref_digest(b"auth"),
                             ref_digest(b"cart")]
    assert string_keys(pa.array(["cart"])).tolist() == [ref_digest(b"cart")]


@settings(max_examples=40, deadline=None)
@given(endpoint_names, st.data())
def test_removing_an_endpoint_moves_exactly_its_keys(endpoints, data):
    if len(endpoints) < 2:
        endpoints = [*endpoints, "extra:1"]
    rng = np.random.default_rng(len(endpoints))
    keys = rng.integers(0, 1 << 63, 5000, dtype=np.int64).astype(np.uint64) * np.uint64(3)
    ordered = sorted(endpoints)
    gone = data.draw(st.sampled_from(ordered))
    rest = [e for e in ordered if e != gone]
    before = np.array(ordered)[rendezvous_assign(keys, endpoint_seeds(ordered))]
    after = np.array(rest)[rendezvous_assign(keys, endpoint_seeds(rest))]
    stayed = before != gone
    assert np.array_equal(after[stayed], before[stayed])  # nobody else moved
    assert not np.any(after == gone)


@settings(max_examples=40, deadline=None)
@given(endpoint_names, st.from_regex(r"new-[a-z0-9]{1,8}:[1-9][0-9]{0,3}", fullmatch=True))
def test_adding_an_endpoint_moves_about_one_in_n_plus_one_all_to_it(endpoints, new):
    keys = trace_id_keys(workload_batch(20_000, seed=5).record_batch.column("trace_id"))
    keys = np.unique(keys)
    ordered = sorted(endpoints)
    grown = sorted([*ordered, new])
    before = np.array(ordered)[rendezvous_assign(keys, endpoint_seeds(ordered))]
    after = np.array(grown)[rendezvous_assign(keys, endpoint_seeds(grown))]
    moved = before != after
    assert np.all(after[moved] == new)
    # binomial(K, 1/(N+1)): 8 standard deviations cannot be missed by chance
    k, p = len(keys), 1 / (len(ordered) + 1)
    assert abs(moved.mean() - p) < 8 * np.sqrt(p * (1 - p) / k)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_distribution_is_even_chi_square(n):
    rng = np.random.default_rng(n)
    keys = trace_id_keys(pa.array([rng.bytes(16) for _ in range(40_000)], pa.binary(16)))
    endpoints = [f"knhk-{i}.tail.svc:4317" for i in range(n)]
    counts = np.bincount(rendezvous_assign(keys, endpoint_seeds(sorted(endpoints))),
                         minlength=n)
    expected = len(keys) / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = n - 1
    # mean df, sd sqrt(2 df): a fixed key set, so this is a fact, not a coin toss
    assert chi2 < df + 8 * np.sqrt(2 * df), counts


def test_seeds_do_not_depend_on_the_process():
    # fixed values: BLAKE2b-64 of the endpoint, never Python's salted hash()
    assert endpoint_seeds(["localhost:4317"]).tolist() == [ref_digest(b"localhost:4317")]
    code = ("from knhk.exporters.loadbalancing import endpoint_seeds;"
            "print(endpoint_seeds(['localhost:4317'])[0])")
    import subprocess
    import sys
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(s)}, timeout=60
                           ).stdout.strip() for s in (1, 2)}
    assert outs == {str(ref_digest(b"localhost:4317"))}


# -- endpoints ------------------------------------------------------------------------


def test_normalize_endpoint_accepts_collector_forms_and_names_bad_ones():
    assert normalize_endpoint("backend") == "backend:4317"
    assert normalize_endpoint("[::1]") == "[::1]:4317"
    assert normalize_endpoint("http://b:4318") == "http://b:4318"
    for bad, words in [("", "expected 'host:port'"), ("a b:1", "blanks"),
                       ("a:0", "port 1-65535"), ("a:70000", "port 1-65535"),
                       ("::1:4317", "brackets"), ("[zz]:1", "not an IPv6"),
                       ("ftp://a:1", "http"), (":4317", "host:port"), (17, "host:port")]:
        with pytest.raises(ValueError, match=words):
            normalize_endpoint(bad, "hostnames[3]")
    with pytest.raises(ValueError, match=r"^hostnames\[3\]"):
        normalize_endpoint("a:x", "hostnames[3]")


def test_static_resolver_and_constructor_checks():
    assert StaticResolver(["b:1", "a:1", "a:1"]).resolve() == ["a:1", "b:1"]
    with pytest.raises(ValueError, match="at least one"):
        StaticResolver([])
    with pytest.raises(TypeError, match="list of endpoints"):
        StaticResolver("a:1")
    with pytest.raises(ValueError, match="routing_key"):
        LoadBalancingExporter(["a:1"], routing_key="metric")
    with pytest.raises(ValueError, match="not both"):
        LoadBalancingExporter(["a:1"], resolver=StaticResolver(["a:1"]))
    with pytest.raises(ValueError, match="leave endpoint"):
        LoadBalancingExporter(["a:1"], protocol=OtlpConfig(endpoint="x:1"))


# -- routing through the exporter ------------------------------------------------------


def test_every_trace_is_whole_on_one_endpoint_within_and_across_batches():
    endpoints = ["a:4317", "b:4317", "c:4317"]
    sinks, factory = sinks_for(endpoints)
    lb = LoadBalancingExporter(endpoints, exporter_factory=factory)
    batch = workload_batch(6000, seed=11)
    # the same traces cut across three batches
    for part in (batch.slice(0, 2500), batch.slice(2500, 1000), batch.slice(3500)):
        assert lb.export(part) is knhk.ExportResult.SUCCESS
    owner: dict[bytes, str] = {}
    total = 0
    for ep, sink in sinks.items():
        for tid in ids_of(sink.spans()):
            assert owner.setdefault(tid, ep) == ep
            total += 1
        assert ep == min(endpoints) or sink.spans().num_rows > 0
    assert total == 6000
    assert all(owner[t] == ref_endpoint(ref_trace_key(t), endpoints) for t in owner)
    # rows keep their order within an endpoint's sub-batch
    got = sinks["a:4317"].spans().record_batch.column("span_id").to_pylist()
    mask = [owner[t] == "a:4317" for t in ids_of(batch)]
    assert got == [s for s, m in zip(batch.record_batch.column("span_id").to_pylist(), mask,
                                     strict=True) if m]
    st_ = lb.stats()
    assert st_["spans_routed"] == 6000
    assert {e: v["spans_routed"] for e, v in st_["endpoints"].items()} == \
        {e: s.spans().num_rows for e, s in sinks.items()}
    lb.shutdown(1.0)


def test_route_by_service_keeps_services_together():
    endpoints = ["a:1", "b:1", "c:1", "d:1"]
    sinks, factory = sinks_for(endpoints)
    lb = LoadBalancingExporter(endpoints, exporter_factory=factory, routing_key="service")
    lb.export(workload_batch(3000, seed=2))
    seen: dict[str, str] = {}
    for ep, sink in sinks.items():
        for svc in sink.spans().record_batch.column("service").to_pylist():
            assert seen.setdefault(svc, ep) == ep
    assert all(seen[s] == ref_endpoint(ref_digest(s.encode()), endpoints) for s in seen)
    lb.shutdown(1.0)


def _metrics(n: int) -> knhk.MetricBatch:
    from knhk.metrics import _check, metric_batch

    rows = []
    for i in range(n):
        row = _check(knhk.MetricPoint(f"m{i % 7}", float(i), service=f"svc{i % 5}"))
        rows.append(row)
    return knhk.MetricBatch(metric_batch(rows))


@pytest.mark.parametrize("key,column", [("service", "service"), ("metric", "name")])
def test_metric_points_route_by_service_or_metric_name(key, column):
    endpoints = ["a:1", "b:1", "c:1"]
    sinks, factory = sinks_for(endpoints)
    lb = LoadBalancingExporter(endpoints, exporter_factory=factory, metric_routing_key=key)
    assert lb.export(_metrics(70)) is knhk.ExportResult.SUCCESS
    n = 0
    for ep, sink in sinks.items():
        for b in sink.metric_batches():
            assert isinstance(b, knhk.MetricBatch)
            for v in b.record_batch.column(column).to_pylist():
                assert ref_endpoint(ref_digest(v.encode()), endpoints) == ep
                n += 1
    assert n == 70 and lb.stats()["metric_points_routed"] == 70
    lb.shutdown(1.0)


def test_no_endpoints_counts_the_batch_as_failed_never_raises(caplog):
    lb = LoadBalancingExporter()
    with caplog.at_level(logging.WARNING, "knhk.exporters.loadbalancing"):
        assert lb.export(workload_batch(100, seed=1)) is knhk.ExportResult.FAILURE
    assert lb.spans_failed == 100 and lb.export_errors == 1
    assert lb.errors_by_reason == {"no_endpoints": 1}
    assert "no_endpoints" in caplog.text
    assert lb.export("not a batch") is knhk.ExportResult.FAILURE
    assert lb.errors_by_reason["unsupported_signal"] == 1
    assert lb.export(knhk.SpanBatch.empty()) is knhk.ExportResult.SUCCESS
    lb.shutdown(1.0)
    assert lb.export(workload_batch(10, seed=1)) is knhk.ExportResult.FAILURE
    assert lb.errors_by_reason["shutdown"] == 1


def test_set_endpoints_switches_atomically_and_drains_the_removed(caplog):
    endpoints = ["a:1", "b:1", "c:1"]
    sinks, factory = sinks_for(endpoints)
    lb = LoadBalancingExporter(["a:1", "b:1"], exporter_factory=factory)
    first = workload_batch(3000, seed=3)
    lb.export(first)
    with caplog.at_level(logging.INFO, "knhk.exporters.loadbalancing"):
        assert lb.set_endpoints(["c:1", "a:1"]) is True
        assert lb.set_endpoints(["a:1", "c:1", "a:1"]) is False  # the same set
    assert "added ['c:1'], removed ['b:1']" in caplog.text
    assert lb.endpoints == ("a:1", "c:1")
    second = workload_batch(3000, seed=4)
    lb.export(second)
    deadline = time.monotonic() + 5
    while lb.stats()["endpoints"]["b:1"]["active"] or sinks["b:1"]._stopped is False:
        assert time.monotonic() < deadline, "b:1 was not shut down"
        time.sleep(0.01)
    # the first batch went by {a, b}, the second by {a, c}, as the reference says
    for batch, members in ((first, ["a:1", "b:1"]), (second, ["a:1", "c:1"])):
        want = {ep: sum(ref_endpoint(ref_trace_key(t), members) == ep for t in ids_of(batch))
                for ep in endpoints}
        mine = set(ids_of(batch))
        got = {ep: sum(1 for t in ids_of(sinks[ep].spans()) if t in mine) for ep in endpoints}
        assert got == want
    # keys of a, the endpoint that stayed, either stayed or went to the new one
    a_first = {t for t in ids_of(first) if ref_endpoint(ref_trace_key(t), ["a:1", "b:1"]) ==
               "a:1"}
    assert {ref_endpoint(ref_trace_key(t), ["a:1", "c:1"]) for t in a_first} <= {"a:1", "c:1"}
    assert all(ref_endpoint(ref_trace_key(t), ["a:1", "c:1"]) == "a:1" for t in a_first
               if ref_endpoint(ref_trace_key(t), ["a:1", "b:1", "c:1"]) != "c:1")
    assert lb.stats()["membership_changes"] == 2  # the initial set, then the change
    with pytest.raises(ValueError, match=r"endpoints\[1\]"):
        lb.set_endpoints(["a:1", "bad endpoint"])
    assert lb.endpoints == ("a:1", "c:1")
    lb.shutdown(1.0)


def test_a_factory_that_fails_leaves_the_table_as_it_was():
    made = []

    def factory(ep):
        if ep.startswith("bad"):
            raise ValueError(f"cannot build {ep}")
        made.append(InMemoryExporter())
        return made[-1]

    lb = LoadBalancingExporter(["a:1"], exporter_factory=factory)
    with pytest.raises(ValueError, match="cannot build bad:1"):
        lb.set_endpoints(["a:1", "b:1", "bad:1"])
    assert lb.endpoints == ("a:1",)
    assert made[1]._stopped  # b:1's exporter, built before the failure, was closed
    lb.shutdown(1.0)


# -- resolvers ------------------------------------------------------------------------


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def write_atomically(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def test_file_resolver_follows_the_file_and_keeps_the_set_on_a_bad_one(tmp_path, caplog):
    path = tmp_path / "backends.txt"
    write_atomically(path, "a:1\n")
    _, factory = sinks_for(["a:1", "b:1"])
    lb = LoadBalancingExporter(resolver=FileResolver(path, interval=0.02),
                               exporter_factory=factory)
    assert lb.endpoints == ("a:1",)
    write_atomically(path, "# two now\na:1\nb:1   # new\n")
    wait_for(lambda: lb.endpoints == ("a:1", "b:1"))
    with caplog.at_level(logging.WARNING, "knhk.exporters.loadbalancing"):
        write_atomically(path, "a:1\nb:1\nnot an endpoint\n")
        wait_for(lambda: lb.resolve_errors >= 1)
        time.sleep(0.1)
    assert lb.endpoints == ("a:1", "b:1")
    assert f"{path}:3" in caplog.text
    # logged once, though every check fails the same way
    assert caplog.text.count(f"{path}:3") == 1
    os.unlink(path)
    wait_for(lambda: lb.resolve_errors >= 2)
    assert lb.endpoints == ("a:1", "b:1")
    write_atomically(path, "")
    wait_for(lambda: lb.endpoints == ())
    assert lb.export(workload_batch(10, seed=1)) is knhk.ExportResult.FAILURE
    assert lb.errors_by_reason["no_endpoints"] == 1
    lb.shutdown(1.0)


def test_file_resolver_missing_at_start_starts_empty_and_counts_it(tmp_path):
    lb = LoadBalancingExporter(resolver=FileResolver(tmp_path / "nope.txt", interval=60),
                               exporter_factory=lambda ep: InMemoryExporter())
    assert lb.endpoints == () and lb.resolve_errors == 1
    with pytest.raises(ResolveError, match=r"nope\.txt"):
        FileResolver(tmp_path / "nope.txt").resolve()
    lb.shutdown(1.0)


def test_dns_resolver_resolves_localhost_and_keeps_the_set_on_failure():
    found = DnsResolver("localhost", 4317).resolve()
    assert "127.0.0.1:4317" in found
    assert all(e.endswith(":4317") for e in found)
    with pytest.raises(ResolveError, match=r"no-such-host\.invalid"):
        DnsResolver("no-such-host.invalid", 4317, timeout=2.0).resolve()
    with pytest.raises(ValueError, match="without a port"):
        DnsResolver("localhost:4317")
    with pytest.raises(ValueError, match="port"):
        DnsResolver("localhost", 70000)

    class Flaky(DnsResolver):
        fail = False

        def resolve(self):
            if self.fail:
                raise ResolveError("DNS lookup of 'localhost' failed: test")
            return super().resolve()

    resolver = Flaky("localhost", 4317, interval=60)
    lb = LoadBalancingExporter(resolver=resolver, exporter_factory=lambda e: InMemoryExporter())
    assert "127.0.0.1:4317" in lb.endpoints
    before = lb.endpoints
    resolver.fail = True
    assert lb.refresh() is False
    assert lb.endpoints == before and lb.resolve_errors == 1
    lb.shutdown(1.0)


# -- real OTLP peers -------------------------------------------------------------------


class Backend:
    """A real OTLP receiver (gRPC or HTTP) feeding a pipeline into memory."""

    def __init__(self, http: bool = False):
        self.sink = InMemoryExporter()
        self.pipeline = (knhk.TelemetryPipeline.builder().with_batch_size(512)
                         .with_flush_interval(0.02).with_exporter(self.sink).build())
        kind = OtlpHttpReceiver if http else OtlpGrpcReceiver
        self.receiver = kind(self.pipeline, endpoint="127.0.0.1:0").start()
        self.endpoint = f"127.0.0.1:{self.receiver.port}"

    def close(self):
        if isinstance(self.receiver, OtlpGrpcReceiver):
            self.receiver.stop(0.5)
        else:
            self.receiver.stop()
        self.pipeline.shutdown(5.0)
        return self.sink.spans()


PROTOCOL = OtlpConfig(protocol="grpc", insecure=True, timeout=5.0,
                      retry=RetryConfig(initial_interval=0.05, max_elapsed_time=5.0))


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf", "http/json"])
def test_end_to_end_to_two_real_otlp_receivers_every_span_once(protocol):
    backends = [Backend(http=protocol != "grpc"), Backend(http=protocol != "grpc")]
    lb = LoadBalancingExporter([b.endpoint for b in backends],
                               protocol=replace(PROTOCOL, protocol=protocol))
    batch = workload_batch(4000, seed=21)
    for part in (batch.slice(0, 2000), batch.slice(2000)):
        assert lb.export(part) is knhk.ExportResult.SUCCESS
    assert lb.force_flush(10.0)
    lb.shutdown(5.0)
    got = [b.close() for b in backends]
    endpoints = [b.endpoint for b in backends]
    sent = set(zip(ids_of(batch), batch.record_batch.column("span_id").to_pylist(),
                   strict=True))
    pairs = [list(zip(ids_of(g), g.record_batch.column("span_id").to_pylist(), strict=True))
             for g in got]
    assert sum(len(p) for p in pairs) == 4000 and set(pairs[0]) | set(pairs[1]) == sent
    for b, g in zip(backends, got, strict=True):
        assert g.num_rows > 0
        assert all(ref_endpoint(ref_trace_key(t), endpoints) == b.endpoint for t in ids_of(g))
    st_ = lb.stats()
    assert lb.spans_exported == 4000 and lb.spans_failed == 0
    assert {e: v["spans_exported"] for e, v in st_["endpoints"].items()} == \
        {b.endpoint: g.num_rows for b, g in zip(backends, got, strict=True)}


def test_a_removed_real_endpoint_still_gets_what_was_queued_for_it():
    backends = [Backend(), Backend()]
    lb = LoadBalancingExporter([b.endpoint for b in backends], protocol=PROTOCOL,
                               drain_timeout=10.0)
    batch = workload_batch(3000, seed=8)
    lb.export(batch)
    lb.set_endpoints([backends[0].endpoint])  # at once, while b's queue may still hold it
    after = workload_batch(1000, seed=9)
    lb.export(after)
    lb.shutdown(10.0)
    got = [b.close() for b in backends]
    assert got[0].num_rows + got[1].num_rows == 4000
    assert set(ids_of(after)) <= set(ids_of(got[0]))
    s = lb.stats()
    assert s["endpoints"][backends[1].endpoint]["active"] is False
    assert s["endpoints"][backends[1].endpoint]["spans_exported"] == got[1].num_rows > 0
    assert lb.spans_exported == 4000


def test_an_unreachable_endpoint_is_counted_per_endpoint_and_the_other_gets_its_share():
    live = Backend()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nobody listens once closed
    proto = OtlpConfig(protocol="grpc", insecure=True, timeout=0.5,
                       retry=RetryConfig(enabled=False))
    lb = LoadBalancingExporter([live.endpoint, dead], protocol=proto)
    batch = workload_batch(2000, seed=4)
    lb.export(batch)
    lb.shutdown(5.0)
    got = live.close()
    s = lb.stats()
    assert s["endpoints"][live.endpoint]["spans_exported"] == got.num_rows > 0
    assert s["endpoints"][dead]["spans_failed"] == 2000 - got.num_rows > 0
    assert any(r.startswith("grpc:") for r in s["endpoints"][dead]["errors_by_reason"])
    assert lb.spans_failed == 2000 - got.num_rows


def test_in_a_pipeline_the_exporter_is_counted_like_any_other():
    endpoints = ["a:1", "b:1"]
    sinks, factory = sinks_for(endpoints)
    lb = LoadBalancingExporter(endpoints, exporter_factory=factory)
    with knhk.TelemetryPipeline.builder().with_batch_size(500).with_exporter(lb).build() as p:
        p.record_batch(workload_batch(2000, seed=6).record_batch)
    assert sum(s.spans().num_rows for s in sinks.values()) == 2000
    assert p.stats().exporters["loadbalancing"]["events_exported"] == 2000
    assert all(s._stopped for s in sinks.values())  # the pipeline's shutdown reached them


def test_what_a_removed_endpoint_still_queues_is_sent_when_it_comes_back_within_drain():
    live = Backend()
    port = free_port()
    late = f"127.0.0.1:{port}"  # nobody listens yet: its exporter retries
    proto = replace(PROTOCOL, retry=RetryConfig(initial_interval=0.05, max_interval=0.2,
                                                max_elapsed_time=20.0))
    lb = LoadBalancingExporter([live.endpoint, late], protocol=proto, drain_timeout=15.0)
    batch = workload_batch(2000, seed=12)
    lb.export(batch)
    lb.set_endpoints([live.endpoint])
    time.sleep(0.3)
    assert lb.stats()["endpoints"][late]["spans_exported"] == 0  # still queued, retrying
    sink = InMemoryExporter()
    pipeline = knhk.TelemetryPipeline.builder().with_exporter(sink).build()
    receiver = OtlpGrpcReceiver(pipeline, endpoint=late).start()
    try:
        wait_for(lambda: not lb._draining, timeout=15.0)
    finally:
        receiver.stop(0.5)
        pipeline.shutdown(5.0)
    lb.shutdown(5.0)
    got_live = live.close()
    assert sink.spans().num_rows == lb.stats()["endpoints"][late]["spans_routed"] > 0
    assert got_live.num_rows + sink.spans().num_rows == 2000
    assert lb.spans_exported == 2000 and lb.spans_failed == 0


def test_a_removed_endpoint_that_never_answers_is_given_up_after_drain_timeout():
    dead = f"127.0.0.1:{free_port()}"
    sinks = {"a:1": InMemoryExporter()}
    proto = replace(PROTOCOL, retry=RetryConfig(initial_interval=0.05, max_elapsed_time=60.0))

    def factory(ep):
        if ep in sinks:
            return sinks[ep]
        from knhk.exporters.loadbalancing import otlp_exporter_factory
        return otlp_exporter_factory(proto)(ep)

    lb = LoadBalancingExporter(["a:1", dead], exporter_factory=factory, drain_timeout=0.3)
    lb.export(workload_batch(1000, seed=13))
    on_dead = lb.stats()["endpoints"][dead]["spans_routed"]
    assert on_dead > 0
    started = time.monotonic()
    lb.set_endpoints(["a:1"])
    wait_for(lambda: not lb._draining, timeout=5.0)
    assert time.monotonic() - started < 3.0
    s = lb.stats()["endpoints"][dead]
    assert s["active"] is False and s["spans_failed"] == on_dead and s["spans_exported"] == 0
    assert s["errors_by_reason"].get("shutdown", 0) >= 1
    lb.shutdown(1.0)


def test_a_hanging_dns_lookup_does_not_pile_up_threads(monkeypatch):
    """A resolver that hangs (no real DNS server can be made to hang here, so
    getaddrinfo is replaced by one that waits) times out, and later refreshes do not
    start more lookups while it is still stuck."""
    import threading

    import knhk.exporters._lb_resolvers as resolvers

    release = threading.Event()
    real = resolvers.socket.getaddrinfo

    def stuck(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(resolvers.socket, "getaddrinfo", stuck)
    r = DnsResolver("localhost", 4317, timeout=0.1)
    with pytest.raises(resolvers.ResolveError, match="took longer"):
        r.resolve()
    for _ in range(3):
        with pytest.raises(resolvers.ResolveError, match="still running"):
            r.resolve()
    assert sum(t.name == "knhk-lb-dns" for t in threading.enumerate()) == 1
    release.set()
    r._pending.join(5)
    assert "127.0.0.1:4317" in r.resolve()


def test_a_synchronous_endpoint_retrying_does_not_block_changes_or_shutdown():
    """Endpoints that send on the caller's thread (serve's sending_queue.enabled: false)
    retry inside export(): removing the dead one and shutting down must not wait for it."""
    import threading

    proto = OtlpConfig(protocol="grpc", insecure=True, timeout=0.5, synchronous=True,
                       retry=RetryConfig(initial_interval=0.2, max_interval=0.5,
                                         max_elapsed_time=6.0))
    lb = LoadBalancingExporter(["127.0.0.1:1"], protocol=proto)  # nothing listens on 1
    batch = generate(50, WorkloadConfig(seed=1))
    done = []
    sender = threading.Thread(target=lambda: done.append(lb.export(batch)))
    sender.start()
    time.sleep(0.4)  # the export is retrying now
    began = time.monotonic()
    assert lb.set_endpoints(["127.0.0.1:2"])
    assert time.monotonic() - began < 1.0
    began = time.monotonic()
    lb.shutdown(1.0)
    assert time.monotonic() - began < 2.0
    sender.join(10)
    assert done == [knhk.ExportResult.FAILURE]
    assert lb.stats()["spans_failed"] == 50  # counted once, by the endpoint that had them


@pytest.mark.parametrize("spellings", [
    ["a:4317", "a"], ["Backend:4317", "backend:4317"], ["[::1]:4317", "[0:0::1]:4317"],
    ["a:4317", "a:04317"], ["http://a:4318", "http://a:4318/", "http://A:4318/v1/traces"],
])
def test_spellings_of_one_backend_are_one_endpoint(spellings):
    """Routing hashes the endpoint string: two spellings of one backend would give it
    double weight and move its traces when one spelling goes."""
    lb = LoadBalancingExporter(spellings, exporter_factory=lambda ep: InMemoryExporter())
    try:
        assert len(lb.endpoints) == 1
    finally:
        lb.shutdown(1.0)
