"""The Jaeger encoder kernel (knhk._core._jaeger) against a plain-Python reference.

The reference below works on ``batch.to_pylist()`` rows and writes the Thrift
compact bytes itself: grouping by process and trace, the OpenTelemetry ->
Jaeger mapping, cutting values of a span too large for a datagram (bisection on
the value cap) and packing whole traces. Hypothesis holds the kernel's
datagrams byte-equal to it, over arbitrary spans: every attribute type, events,
links, empty, huge and non-ASCII strings.
"""

from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import knhk
from knhk.exporters import jaeger
from knhk.exporters.jaeger import any_to_json, encode_batch

OVERHEAD = 40
KINDS = {2: "server", 3: "client", 4: "producer", 5: "consumer"}


# -- a plain-Python Thrift compact writer -----------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def zigzag(v: int) -> bytes:
    return varint(((v << 1) ^ (v >> 63)) & 0xFFFFFFFFFFFFFFFF)


def i64(be: bytes) -> int:
    return struct.unpack(">q", be)[0]


def list_header(count: int, elem: int = 12) -> bytes:
    return bytes([(count << 4) | elem]) if count < 15 else bytes([0xF0 | elem]) + varint(count)


def binary(b: bytes) -> bytes:
    return varint(len(b)) + b


def cut(value: bytes, cap: int | None, text: bool, cuts: list[int]) -> bytes:
    if cap is None or len(value) <= cap:
        return value
    cuts[0] += 1
    k = cap
    while text and k > 0 and (value[k] & 0xC0) == 0x80:
        k -= 1
    return value[:k]


def tag(key: str, vtype: int, value) -> bytes:
    out = b"\x18" + binary(key.encode()) + b"\x15" + zigzag(vtype)
    if vtype == 0:
        out += b"\x18" + binary(value)
    elif vtype == 1:
        out += b"\x27" + struct.pack("<d", value)
    elif vtype == 2:
        out += b"\x31" if value else b"\x32"
    elif vtype == 3:
        out += b"\x46" + zigzag(value)
    else:
        out += b"\x58" + binary(value)
    return out + b"\x00"


def attr_tag(a: dict, cap, cuts) -> bytes:
    t = a["type"]
    if t == 2:
        return tag(a["key"], 2, a["bool"])
    if t == 3:
        return tag(a["key"], 3, a["int"])
    if t == 4:
        return tag(a["key"], 1, a["double"])
    if t == 7:
        return tag(a["key"], 4, cut(a["bytes"], cap, False, cuts))
    if t == 1:
        text = a["str"].encode()
    elif t in (5, 6):
        text = any_to_json(a["any"]).encode()
    else:
        text = b""
    return tag(a["key"], 0, cut(text, cap, True, cuts))


def str_tag(key: str, value: str, cap, cuts) -> bytes:
    return tag(key, 0, cut(value.encode(), cap, True, cuts))


def process_bytes(row: dict, cap, no_tags: bool, cuts) -> bytes:
    out = b"\x18" + binary(cut(row["service"].encode(), cap, True, cuts))
    tags = [] if no_tags else [
        attr_tag(a, cap, cuts) for a in row["resource_attributes"]
        if not (a["type"] == 1 and a["key"] == "service.name")]
    if tags:
        out += b"\x19" + list_header(len(tags)) + b"".join(tags)
    return out + b"\x00"


def us(ns: int) -> int:
    return ns // 1000 if ns >= 0 else -((-ns) // 1000)


def ref_bytes(kind: int, trace_id: bytes, span_id: bytes) -> bytes:
    return (b"\x15" + zigzag(kind) + b"\x16" + zigzag(i64(trace_id[8:])) + b"\x16"
            + zigzag(i64(trace_id[:8])) + b"\x16" + zigzag(i64(span_id)) + b"\x00")


def span_bytes(r: dict, cap, cuts) -> bytes:
    tid = r["trace_id"]
    parent = r["parent_span_id"]
    out = (b"\x16" + zigzag(i64(tid[8:])) + b"\x16" + zigzag(i64(tid[:8]))
           + b"\x16" + zigzag(i64(r["span_id"]))
           + b"\x16" + zigzag(i64(parent) if parent is not None else 0)
           + b"\x18" + binary(cut(r["name"].encode(), cap, True, cuts)))
    refs = ([ref_bytes(0, tid, parent)] if parent is not None else []) + [
        ref_bytes(1, ln["trace_id"], ln["span_id"]) for ln in r["links"]]
    last = 5
    if refs:
        out += b"\x19" + list_header(len(refs)) + b"".join(refs)
        last = 6
    duration = max(0, r["end_time_ns"] - r["start_time_ns"]) // 1000
    out += bytes([((7 - last) << 4) | 5]) + zigzag(1)
    out += b"\x16" + zigzag(us(r["start_time_ns"])) + b"\x16" + zigzag(duration)
    last = 9
    status = r["status_code"] if r["status_code"] in (1, 2) else 0
    tags = [attr_tag(a, cap, cuts) for a in r["attributes"]]
    if r["scope_name"]:
        tags += [str_tag("otel.scope.name", r["scope_name"], cap, cuts),
                 str_tag("otel.library.name", r["scope_name"], cap, cuts)]
    if r["scope_version"]:
        tags += [str_tag("otel.scope.version", r["scope_version"], cap, cuts),
                 str_tag("otel.library.version", r["scope_version"], cap, cuts)]
    tags += [attr_tag(a, cap, cuts) for a in r["scope_attributes"]]
    if r["kind"] in KINDS:
        tags.append(tag("span.kind", 0, KINDS[r["kind"]].encode()))
    if status:
        tags.append(tag("otel.status_code", 0, b"OK" if status == 1 else b"ERROR"))
        if r["status_message"]:
            tags.append(str_tag("otel.status_description", r["status_message"], cap, cuts))
    if status == 2:
        tags.append(tag("error", 2, True))
    for key in ("attributes", "events", "links"):
        if r[f"dropped_{key}_count"]:
            tags.append(tag(f"otel.dropped_{key}_count", 3, r[f"dropped_{key}_count"]))
    if r["trace_state"]:
        tags.append(str_tag("w3c.tracestate", r["trace_state"], cap, cuts))
    if tags:
        out += b"\x19" + list_header(len(tags)) + b"".join(tags)
        last = 10
    if r["events"]:
        out += bytes([((11 - last) << 4) | 9]) + list_header(len(r["events"]))
        for ev in r["events"]:
            fields = []
            if not any(a["key"] == "event" for a in ev["attributes"]):
                fields.append(str_tag("event", ev["name"], cap, cuts))
            fields += [attr_tag(a, cap, cuts) for a in ev["attributes"]]
            if ev["dropped_attributes_count"]:
                fields.append(tag("otel.event.dropped_attributes_count", 3,
                                  ev["dropped_attributes_count"]))
            out += (b"\x16" + zigzag(us(ev["time_unix_nano"])) + b"\x19"
                    + list_header(len(fields)) + b"".join(fields) + b"\x00")
    return out + b"\x00"


def fit(encode, budget: int, full: int) -> int | None:
    """Largest cap with len(encode(cap)) <= budget, None if even cap 0 is too long."""
    if len(encode(0)) > budget:
        return None
    lo, hi = 0, full
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        if len(encode(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _akey(attrs: list[dict]) -> tuple:
    out = []
    for a in attrs:
        t = a["type"]
        v = {1: a["str"], 2: a["bool"], 3: a["int"], 7: a["bytes"]}.get(t)
        if t == 4:
            v = struct.pack("<d", a["double"])
        elif t in (5, 6):
            v = any_to_json(a["any"])
        out.append((a["key"], t, v))
    return tuple(out)


def reference(batch: knhk.SpanBatch, max_packet: int, seq0: int = 0):
    """(datagrams, counters) as the kernel should produce them."""
    rows = batch.to_pylist()
    counters = dict.fromkeys(("spans_truncated", "values_truncated",
                              "spans_dropped_too_large", "processes_truncated"), 0)
    procs: dict = {}
    for r in rows:
        pkey = (r["service"], _akey(r["resource_attributes"]))
        traces = procs.setdefault(pkey, (r, {}))[1]
        traces.setdefault(r["trace_id"], []).append(r)
    datagrams = []
    seq = seq0
    for first, traces in procs.values():
        pb = process_bytes(first, None, False, [0])
        if len(pb) > max_packet // 2 - OVERHEAD:
            counters["processes_truncated"] += 1
            budget, full = max_packet // 2 - OVERHEAD, len(pb)
            cap = fit(lambda c, r=first: process_bytes(r, c, False, [0]), budget, full)
            if cap is not None:
                pb = process_bytes(first, cap, False, [0])
            else:
                cap = fit(lambda c, r=first: process_bytes(r, c, True, [0]), budget, full)
                pb = process_bytes(first, cap or 0, True, [0])
        sbudget = max_packet - OVERHEAD - len(pb)
        encoded = []
        for spans in traces.values():
            enc = []
            for r in spans:
                b = span_bytes(r, None, [0])
                if len(b) > sbudget:
                    cap = fit(lambda c, r=r: span_bytes(r, c, [0]), sbudget, len(b))
                    if cap is None:
                        counters["spans_dropped_too_large"] += 1
                        continue
                    cuts = [0]
                    b = span_bytes(r, cap, cuts)
                    counters["spans_truncated"] += 1
                    counters["values_truncated"] += cuts[0]
                enc.append(b)
            encoded.append(enc)

        def flush(spans: list[bytes], pb: bytes = pb) -> None:
            nonlocal seq
            datagrams.append(
                b"\x82\x81" + varint(seq & 0x7FFFFFFF) + b"\x09emitBatch" + b"\x1c\x1c" + pb
                + b"\x19" + list_header(len(spans)) + b"".join(spans) + b"\x16" + zigzag(seq)
                + b"\x00\x00")
            seq += 1

        current: list[bytes] = []
        used = 0
        for enc in encoded:
            size = sum(map(len, enc))
            if used + size <= sbudget:
                current += enc
                used += size
            elif size <= sbudget:
                if current:
                    flush(current)
                current, used = list(enc), size
            else:
                for b in enc:
                    if used + len(b) > sbudget and current:
                        flush(current)
                        current, used = [], 0
                    current.append(b)
                    used += len(b)
        if current:
            flush(current)
    return datagrams, counters


def kernel(batch: knhk.SpanBatch, max_packet: int, seq0: int = 0):
    data, off, spans, counters = jaeger._encode(batch, max_packet, seq0)
    counters.pop("invalid_utf8_replaced")
    return [data[off[k]:off[k + 1]] for k in range(off.size - 1)], spans, counters


# -- strategies ---------------------------------------------------------------------------

texts = st.one_of(st.text(max_size=8), st.text(max_size=300),
                  st.sampled_from(["", "é", "日本語", "a" * 70, "😀" * 40]))
scalars = st.one_of(
    texts, st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=64))
values = st.one_of(
    scalars, st.lists(scalars, max_size=4),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
    st.builds(knhk.AttributeValue.double, st.integers(-5, 5)))
attrs = st.dictionaries(st.sampled_from(["a", "b", "event", "http.route", "é", "k" * 20]),
                        values, max_size=5)


@st.composite
def spans(draw):
    n = draw(st.integers(1, 12))
    services = draw(st.lists(st.sampled_from(["svc-a", "svc-b", "ü"]), min_size=1, max_size=2))
    resources = draw(st.lists(attrs, min_size=1, max_size=2))
    trace_ids = draw(st.lists(st.integers(1, 2**128 - 1), min_size=1, max_size=3))
    out = []
    for i in range(n):
        start = draw(st.integers(0, 2**62))
        events = [knhk.SpanEvent(draw(texts), draw(st.integers(0, 2**62)), draw(attrs))
                  for _ in range(draw(st.integers(0, 2)))]
        links = [knhk.SpanLink(draw(st.integers(1, 2**128 - 1)),
                               draw(st.integers(1, 2**64 - 1)))
                 for _ in range(draw(st.integers(0, 2)))]
        out.append(knhk.Span(
            draw(texts), trace_id=draw(st.sampled_from(trace_ids)), span_id=i + 1,
            parent_span_id=draw(st.none() | st.integers(1, 2**64 - 1)),
            start_time_ns=start, duration_ns=draw(st.integers(0, 10**12)),
            kind=draw(st.integers(0, 5)), status=draw(st.integers(0, 2)),
            status_message=draw(st.none() | texts), service=draw(st.sampled_from(services)),
            attributes=draw(attrs), events=events or None, links=links or None,
            trace_state=draw(st.none() | st.just("a=1,b=2")),
            resource_attributes=draw(st.sampled_from(resources)) or None,
            scope_name=draw(st.none() | st.just("lib")),
            scope_version=draw(st.none() | st.just("1.0"))))
    return knhk.SpanBatch.from_spans(out)


def with_counts(batch: knhk.SpanBatch, seed: int) -> knhk.SpanBatch:
    """``batch`` with dropped counts and scope attributes set (the Span API has neither)."""
    rb = batch.record_batch
    rng = np.random.default_rng(seed)
    for name in ("dropped_attributes_count", "dropped_events_count", "dropped_links_count"):
        values = rng.integers(0, 3, rb.num_rows).astype(np.uint32)
        rb = rb.set_column(rb.schema.get_field_index(name), rb.schema.field(name),
                           pa.array(values, pa.uint32()))
    i = rb.schema.get_field_index("scope_attributes")
    rb = rb.set_column(i, rb.schema.field(i), rb.column("attributes"))
    return knhk.SpanBatch._wrap(rb)


# -- tests --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=spans(), max_packet=st.sampled_from([512, 900, 4096, 65_000]),
       seed=st.integers(0, 3))
def test_kernel_matches_reference(batch, max_packet, seed):
    batch = with_counts(batch, seed)
    got, nspans, counters = kernel(batch, max_packet, seq0=seed)
    want, want_counters = reference(batch, max_packet, seq0=seed)
    assert got == want
    assert counters == want_counters
    assert all(len(d) <= max_packet for d in got)
    assert int(nspans.sum()) == batch.num_rows - counters["spans_dropped_too_large"]


def test_workload_batch_matches_reference():
    from knhk.workload import WorkloadConfig, generate

    batch = generate(3_000, WorkloadConfig(seed=3))
    got, nspans, counters = kernel(batch, 65_000)
    want, want_counters = reference(batch, 65_000)
    assert got == want and counters == want_counters
    assert len(got) > 5 and int(nspans.sum()) == 3_000
    assert counters["spans_truncated"] == 0


def test_huge_value_is_cut_to_fit_and_counted():
    span = knhk.Span("op", trace_id=1, span_id=1, start_time_ns=0, duration_ns=1,
                     attributes={"big": "é" * 40_000, "small": "x", "blob": b"\xff" * 30_000})
    batch = knhk.SpanBatch.from_spans([span])
    got, _, counters = kernel(batch, 10_000)
    want, want_counters = reference(batch, 10_000)
    assert got == want and counters == want_counters
    assert len(got) == 1 and 9_000 < len(got[0]) <= 10_000
    assert counters["spans_truncated"] == 1 and counters["values_truncated"] == 2


def test_span_that_cannot_fit_is_dropped_and_counted():
    many = {f"key-{i:05d}": i for i in range(3_000)}  # ~40 kB of keys alone
    batch = knhk.SpanBatch.from_spans([
        knhk.Span("big", trace_id=1, span_id=1, start_time_ns=0, duration_ns=1,
                  attributes=many),
        knhk.Span("ok", trace_id=1, span_id=2, start_time_ns=0, duration_ns=1)])
    got, nspans, counters = kernel(batch, 8_000)
    assert counters["spans_dropped_too_large"] == 1
    assert nspans.tolist() == [1]
    assert got == reference(batch, 8_000)[0]


def test_huge_process_is_cut_to_half_a_datagram():
    span = knhk.Span("op", trace_id=1, span_id=1, start_time_ns=0, duration_ns=1,
                     resource_attributes={"host.name": "h" * 50_000, "n": 1})
    batch = knhk.SpanBatch.from_spans([span])
    got, _, counters = kernel(batch, 4_096)
    assert counters["processes_truncated"] == 1
    assert got == reference(batch, 4_096)[0]
    assert len(got[0]) <= 4_096


def test_traces_are_kept_whole_and_split_only_when_too_large():
    # ten traces of 20 spans; a datagram holds a few traces, never part of one
    spans_ = [knhk.Span("op" * 20, trace_id=t + 1, span_id=s + 1, start_time_ns=s,
                        duration_ns=1, service="svc", attributes={"i": s})
              for s in range(20) for t in range(10)]
    batch = knhk.SpanBatch.from_spans(spans_)
    got, nspans, _ = kernel(batch, 8_000)
    assert got == reference(batch, 8_000)[0]
    assert all(k % 20 == 0 for k in nspans.tolist()) and len(got) > 1
    # one trace of 200 spans must be split span by span
    one = knhk.SpanBatch.from_spans([
        knhk.Span("op" * 20, trace_id=1, span_id=s + 1, start_time_ns=s, duration_ns=1,
                  attributes={"i": s}) for s in range(200)])
    got, nspans, _ = kernel(one, 2_000)
    assert got == reference(one, 2_000)[0]
    assert len(got) > 5 and int(nspans.sum()) == 200


def test_bad_column_buffers_are_refused_with_the_column_named():
    cols = jaeger._columns(knhk.SpanBatch.from_spans(
        [knhk.Span("op", trace_id=1, span_id=1)]).record_batch, jaeger._Prep())
    cols["kind"] = cols["kind"].astype(np.int64)
    with pytest.raises(ValueError, match="kind"):
        jaeger._kernel.encode_batch(cols, 65_000, 0)
    with pytest.raises(ValueError, match="max_packet"):
        jaeger._kernel.encode_batch(jaeger._columns(knhk.SpanBatch.empty().record_batch,
                                                    jaeger._Prep()), 10, 0)


def test_empty_batch_gives_no_datagrams():
    assert encode_batch(knhk.SpanBatch.empty()) == []
