"""The Cython span ring buffer against a plain Python model of it.

The model is a list of open rows plus a deque of sealed batches (lists of the
``Span`` objects that went in), with drop counters by reason. A hypothesis
state machine drives both with random interleavings of append (good and bad
spans), offer, seal, seal_if_due, pop and close under every backpressure
strategy, and checks after every step that they agree. Threaded tests cover
BLOCK, many producers, sealed-batch immutability and memory reuse.
"""

from __future__ import annotations

import gc
import io
import threading
import time
from collections import deque

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from knhk_testing import same
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

import knhk
from knhk import BackpressureStrategy, DropReason, Span, SpanBatch
from knhk._core._ringbuffer import SpanRing

SERVICE = "ring-test"
LOW, HIGH = 1, 2**64 - 1  # low 64 bits of trace ids ADAPTIVE_SAMPLING always keeps / sheds

# -- comparing rows with the spans that went in --------------------------------------

_VALUE_CHILDREN = ("str", "int", "double", "bool", "bytes", "any")
_CHILD_OF_TAG = {1: "str", 2: "bool", 3: "int", 4: "double", 5: "any", 6: "any", 7: "bytes"}


def _pb_value(v: AnyValue):
    # Decoded with the real opentelemetry-proto class, not knhk's codec.
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_pb_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value) if kv.HasField("value") else None
                for kv in v.kvlist_value.values}
    return getattr(v, which)


def decode_attributes(items: list[dict]) -> dict:
    """Attribute struct rows -> dict, asserting exactly the child named by ``type`` is set."""
    out = {}
    for a in items:
        child = _CHILD_OF_TAG.get(a["type"])
        set_children = [c for c in _VALUE_CHILDREN if a[c] is not None]
        assert set_children == ([child] if child else []), f"attribute row {a}"
        if child is None:
            out[a["key"]] = None
        elif child == "any":
            out[a["key"]] = _pb_value(AnyValue.FromString(a["any"]))
        else:
            out[a["key"]] = a[child]
    return out


def assert_rows_match(rb: pa.RecordBatch, spans: list[Span], service: str = SERVICE) -> None:
    assert rb.schema.equals(knhk.SPAN_SCHEMA)
    rows = rb.to_pylist()
    assert len(rows) == len(spans)
    for i, (row, span) in enumerate(zip(rows, spans, strict=True)):
        where = f"row {i}"
        assert row["trace_id"] == span.trace_id, where
        assert row["span_id"] == span.span_id, where
        assert row["parent_span_id"] == span.parent_span_id, where
        assert row["name"] == span.name, where
        assert row["service"] == (span.service or service), where
        assert row["kind"] == int(span.kind), where
        assert row["status_code"] == int(span.status), where
        assert row["start_time_ns"] == span.start_time_ns, where
        assert row["end_time_ns"] == span.end_time_ns, where
        got = decode_attributes(row["attributes"])
        assert same(got, span.attributes or {}), (where, got, span.attributes)


# -- the state machine ---------------------------------------------------------------

_keys = st.sampled_from(["k0", "k1", "k2", "http.route"])
_scalars = st.one_of(
    st.text(max_size=4), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(),
    st.none())
_sparse = st.one_of(
    st.binary(max_size=4),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=2)), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(-5, 5), max_size=2))
_span_specs = st.fixed_dictionaries({
    "shed": st.booleans(),   # trace id ADAPTIVE_SAMPLING sheds when over half full
    "error": st.booleans(),
    "root": st.booleans(),
    "name": st.sampled_from(["GET /", "SELECT", "publish"]),
    "service": st.sampled_from([None, "checkout"]),
    "attrs": st.dictionaries(_keys, st.one_of(_scalars, _sparse), max_size=3),
})
_BAD_VALUES = {"overflow": 2**63, "underflow": -(2**63) - 1, "object": object(),
               "set": {1, 2}}


class RingMachine(RuleBasedStateMachine):
    """A SpanRing next to a plain model; subclasses fix the strategy."""

    STRATEGY = BackpressureStrategy.DROP_OLDEST

    def __init__(self) -> None:
        super().__init__()
        self.next_id = 1

    @initialize(batch_size=st.integers(1, 4), extra=st.integers(0, 8))
    def make_ring(self, batch_size: int, extra: int) -> None:
        self.batch_size, self.cap = batch_size, batch_size + extra
        self.ring = SpanRing(batch_size, self.cap, int(self.STRATEGY), 0.0, SERVICE)
        self.open: list[Span] = []
        self.sealed: deque[list[Span]] = deque()
        self.dropped = [0] * len(DropReason)
        self.received = self.accepted = self.popped = 0
        self.closed = False

    # -- building spans --

    def _span(self, spec: dict, attrs: dict | None = None) -> Span:
        i = self.next_id
        self.next_id += 1
        return Span(spec["name"], trace_id=(i << 64) | (HIGH if spec["shed"] else LOW),
                    span_id=i, parent_span_id=None if spec["root"] else i + 1,
                    start_time_ns=i, duration_ns=i % 7, service=spec["service"],
                    status=knhk.SpanStatus.ERROR if spec["error"] else knhk.SpanStatus.OK,
                    attributes=spec["attrs"] if attrs is None else attrs)

    # -- the model --

    def _occupancy(self) -> int:
        return len(self.open) + sum(map(len, self.sealed))

    def _seal(self) -> None:
        if self.open:
            self.sealed.append(self.open)
            self.open = []

    def _evict(self, need: int) -> None:
        while self._occupancy() + need > self.cap:
            if not self.sealed:
                self._seal()
                continue
            self.dropped[DropReason.DROPPED_OLDEST] += len(self.sealed.popleft())

    def _drop(self, reason: DropReason, n: int = 1) -> None:
        self.received += n
        self.dropped[reason] += n

    def _admit(self, span: Span, shed: bool) -> bool:
        """The ring's decision before it writes: False (and counted) if dropped."""
        if self.closed:
            self._drop(DropReason.SHUTDOWN)
            return False
        occ = self._occupancy()
        if occ >= self.cap:
            if self.STRATEGY is BackpressureStrategy.BLOCK:
                self._drop(DropReason.BLOCK_TIMEOUT)
                return False
            if self.STRATEGY is not BackpressureStrategy.DROP_OLDEST:
                self._drop(DropReason.QUEUE_FULL)
                return False
            # DROP_OLDEST writes first and evicts after (see _model_append), so a
            # span that is rejected evicts nothing.
        elif (self.STRATEGY is BackpressureStrategy.ADAPTIVE_SAMPLING and 2 * occ > self.cap
              and shed and span.status != knhk.SpanStatus.ERROR):
            self._drop(DropReason.ADAPTIVE_SAMPLING)
            return False
        return True

    def _model_append(self, span: Span, shed: bool) -> bool:
        if not self._admit(span, shed):
            return False
        self.received += 1
        self.accepted += 1
        self.open.append(span)
        if len(self.open) == self.batch_size:
            self._seal()
        if self.STRATEGY is BackpressureStrategy.DROP_OLDEST:
            self._evict(0)
        return True

    def _model_offer(self, spans: list[Span], shed: list[bool]) -> int:
        n = len(spans)
        if self.closed:
            self._drop(DropReason.SHUTDOWN, n)
            return 0
        self._seal()  # rows appended before an offer go first
        room = self.cap - self._occupancy()
        if self.STRATEGY is BackpressureStrategy.ADAPTIVE_SAMPLING and 2 * (self.cap - room) \
                > self.cap:
            kept = [s for s, h in zip(spans, shed, strict=True)
                    if not h or s.status == knhk.SpanStatus.ERROR]
            self._drop(DropReason.ADAPTIVE_SAMPLING, n - len(kept))
            spans, n = kept, len(kept)
            if n == 0:
                return 0
        if room >= n or self.STRATEGY is BackpressureStrategy.DROP_OLDEST:
            self._evict(n)
            self.sealed.append(list(spans))
            self.received += n
            self.accepted += n
            return n
        if self.STRATEGY is BackpressureStrategy.BLOCK:
            self._drop(DropReason.BLOCK_TIMEOUT, n)
            return 0
        taken = max(room, 0)
        self._drop(DropReason.QUEUE_FULL, n - taken)
        self.received += taken
        self.accepted += taken
        if taken:
            self.sealed.append(list(spans[:taken]))
        return taken

    # -- rules --

    @rule(spec=_span_specs)
    def append(self, spec: dict) -> None:
        span = self._span(spec)
        assert self.ring.append(span) is self._model_append(span, spec["shed"])

    def _append_rejected(self, span: Span, shed: bool, errors, match: str) -> None:
        # A span the ring drops anyway (closed, full, shed) is counted as that drop
        # before its attributes are looked at; otherwise it must raise and change nothing.
        if self._admit(span, shed):
            with pytest.raises(errors, match=match):
                self.ring.append(span)
        else:
            assert self.ring.append(span) is False

    @rule(spec=_span_specs, before=st.dictionaries(st.sampled_from(["k0", "k1"]), _sparse,
                                                   max_size=2),
          bad=st.sampled_from(sorted(_BAD_VALUES)),
          after=st.dictionaries(st.sampled_from(["k3", "k4"]), _sparse, max_size=2))
    def append_bad(self, spec: dict, before: dict, bad: str, after: dict) -> None:
        # Valid values before the bad one include bytes and arrays, which the ring keeps
        # apart from the row until it is committed.
        span = self._span(spec, {**before, "bad": _BAD_VALUES[bad], **after})
        self._append_rejected(span, spec["shed"], (TypeError, ValueError), "'bad'")

    @rule(spec=_span_specs)
    def append_bad_key(self, spec: dict) -> None:
        span = self._span(spec, {"k0": "fine", 7: "not a str key"})
        self._append_rejected(span, spec["shed"], TypeError, "attributes keys must be str")

    @rule(specs=st.lists(_span_specs, min_size=1, max_size=4))
    def offer(self, specs: list[dict]) -> None:
        specs = specs[:self.batch_size]
        spans = [self._span(s) for s in specs]
        shed = [s["shed"] for s in specs]
        rb = SpanBatch.from_spans(spans, default_service=SERVICE).record_batch
        if self.STRATEGY is BackpressureStrategy.ADAPTIVE_SAMPLING:
            low = np.array([HIGH if h else LOW for h in shed], dtype=np.uint64)
            errors = np.array([s["error"] for s in specs])
            got = self.ring.offer(rb, low, errors)
        else:
            got = self.ring.offer(rb)
        assert got == self._model_offer(spans, shed)

    @rule()
    def seal(self) -> None:
        assert self.ring.seal() is bool(self.open)
        self._seal()

    @rule(interval=st.sampled_from([0.0, 3600.0]))
    def seal_if_due(self, interval: float) -> None:
        wait = self.ring.seal_if_due(interval)
        assert 0 <= wait <= max(interval, 0.0)
        if interval == 0.0:
            self._seal()

    @rule()
    def pop(self) -> None:
        item = self.ring.pop()
        if not self.sealed:
            assert item is None
            return
        expected = self.sealed.popleft()
        rb, sealed_ns = item
        assert isinstance(sealed_ns, int)
        assert 1 <= rb.num_rows <= self.batch_size
        assert_rows_match(rb, expected)
        self.popped += rb.num_rows

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        self.ring.close()
        self.closed = True
        self._seal()

    # -- invariants --

    @invariant()
    def counters_agree(self) -> None:
        r = self.ring
        assert r.received == self.received
        assert r.accepted == self.accepted
        assert r.dropped_counts() == self.dropped
        assert r.open_rows == len(self.open)
        assert r.queued == sum(map(len, self.sealed))

    @invariant()
    def nothing_lost_or_duplicated(self) -> None:
        r = self.ring
        assert r.received == self.popped + r.open_rows + r.queued + sum(r.dropped_counts())

    @invariant()
    def bounded(self) -> None:
        r = self.ring
        assert r.open_rows < r.batch_size
        assert r.open_rows + r.queued <= r.capacity
        assert 0.0 <= r.occupancy <= 1.0


_machine_settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


class DropOldestMachine(RingMachine):
    STRATEGY = BackpressureStrategy.DROP_OLDEST


class DropNewestMachine(RingMachine):
    STRATEGY = BackpressureStrategy.DROP_NEWEST


class BlockMachine(RingMachine):
    STRATEGY = BackpressureStrategy.BLOCK


class AdaptiveMachine(RingMachine):
    STRATEGY = BackpressureStrategy.ADAPTIVE_SAMPLING


TestDropOldestAgainstModel = DropOldestMachine.TestCase
TestDropNewestAgainstModel = DropNewestMachine.TestCase
TestBlockAgainstModel = BlockMachine.TestCase
TestAdaptiveAgainstModel = AdaptiveMachine.TestCase
for _case in (TestDropOldestAgainstModel, TestDropNewestAgainstModel, TestBlockAgainstModel,
              TestAdaptiveAgainstModel):
    _case.settings = _machine_settings
del _case


# -- construction and small behaviours -------------------------------------------------


def _spans(ids, **fields) -> list[Span]:
    return [Span("op", trace_id=i, span_id=i, start_time_ns=i, **fields) for i in ids]


@pytest.mark.parametrize(("args", "match"), [
    ((0, 10), "batch_size"),
    ((5, 4), "capacity"),
    ((2, 4, 9), "strategy"),
])
def test_constructor_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        SpanRing(*args)


def test_append_rejects_non_spans():
    ring = SpanRing(2, 4)
    with pytest.raises(TypeError, match=r"knhk\.Span"):
        ring.append({"name": "op"})
    with pytest.raises(TypeError, match=r"knhk\.Span"):
        ring.append_many([_spans([1])[0], "op"])
    # The good span before the bad item was taken.
    assert ring.received == 1


def test_offer_larger_than_capacity_raises_and_counts_nothing():
    ring = SpanRing(2, 4)
    rb = SpanBatch.from_spans(_spans(range(1, 6))).record_batch
    with pytest.raises(ValueError, match="capacity"):
        ring.offer(rb)
    assert (ring.received, ring.queued) == (0, 0)


def test_seal_if_due_reports_time_left():
    ring = SpanRing(4, 8)
    assert ring.seal_if_due(5.0) == 5.0          # empty: a whole interval
    ring.append(_spans([1])[0])
    left = ring.seal_if_due(5.0)
    assert 4.0 < left <= 5.0
    assert ring.open_rows == 1 and ring.queued == 0
    time.sleep(0.02)
    ring.seal_if_due(0.01)
    assert ring.open_rows == 0 and ring.queued == 1


def test_pop_with_timeout_waits_then_returns_none():
    ring = SpanRing(4, 8)
    t0 = time.monotonic()
    assert ring.pop(timeout=0.05) is None
    assert time.monotonic() - t0 >= 0.04


def test_pop_wakes_when_another_thread_seals():
    ring = SpanRing(4, 8)
    ring.append(_spans([1])[0])
    threading.Timer(0.05, ring.seal).start()
    item = ring.pop(timeout=2.0)
    assert item is not None and item[0].num_rows == 1


def test_default_service_fills_spans_without_one():
    ring = SpanRing(2, 2, default_service="payments")
    ring.append(Span("a", trace_id=1, span_id=1))
    ring.append(Span("b", trace_id=1, span_id=2, service="ledger"))
    assert ring.pop()[0].column("service").to_pylist() == ["payments", "ledger"]


# -- known bugs ------------------------------------------------------------------------


def test_offer_does_not_overtake_open_rows():
    """Spans recorded one by one, then a batch: the pipeline must see them in that order."""
    ring = SpanRing(4, 16)
    ring.append(Span("first", trace_id=1, span_id=1))
    ring.offer(SpanBatch.from_spans([Span("second", trace_id=2, span_id=2)]).record_batch)
    ring.seal()
    names = [n for _ in range(2) for n in ring.pop()[0].column("name").to_pylist()]
    assert names == ["first", "second"]


def test_rejected_span_does_not_evict_good_rows():
    ring = SpanRing(2, 2, int(BackpressureStrategy.DROP_OLDEST), 0.0)
    assert ring.append_many(_spans([1, 2])) == 2
    with pytest.raises(ValueError, match="'n'"):
        ring.append(Span("bad", trace_id=3, span_id=3, attributes={"n": 2**64}))
    assert ring.dropped_counts() == [0] * len(DropReason)
    assert ring.pop()[0].column("name").to_pylist() == ["op", "op"]


def test_rejected_span_leaves_no_bytes_behind():
    ring = SpanRing(4, 8)
    with pytest.raises(TypeError, match="'bad'"):
        ring.append(Span("x", trace_id=1, span_id=1,
                         attributes={"secret": b"rejected", "bad": object()}))
    ring.append(Span("y", trace_id=1, span_id=2, attributes={"list": [1, 2]}))
    ring.seal()
    rb = ring.pop()[0]
    (attr,) = rb.column("attributes").to_pylist()[0]
    assert attr["bytes"] is None, f"a rejected span's value leaked into {attr}"


def test_rejected_span_with_bytes_does_not_break_sealing():
    ring = SpanRing(4, 8)
    assert ring.append(Span("kept", trace_id=1, span_id=1))
    with pytest.raises(TypeError, match="'bad'"):
        ring.append(Span("x", trace_id=1, span_id=2,
                         attributes={"blob": b"\x00", "bad": object()}))
    # Sealing must work and deliver the span accepted before the bad one.
    assert ring.seal() is True
    assert ring.pop()[0].column("name").to_pylist() == ["kept"]


# -- ADAPTIVE_SAMPLING -----------------------------------------------------------------

_ADAPTIVE = int(BackpressureStrategy.ADAPTIVE_SAMPLING)


def _fill(ring: SpanRing, n: int, start: int = 10**6) -> None:
    # Error spans are admitted at any occupancy below capacity, so they fill exactly.
    for i in range(start, start + n):
        assert ring.append(Span("fill", trace_id=i, span_id=i, status=2))


@settings(max_examples=40, deadline=None)
@given(fill=st.integers(0, 32),
       traces=st.lists(st.tuples(st.integers(1, 2**64 - 1), st.integers(1, 4)),
                       min_size=1, max_size=10, unique_by=lambda t: t[0]),
       error_flags=st.lists(st.booleans(), min_size=32, max_size=32))
def test_adaptive_offer_sheds_whole_traces_by_trace_id(fill, traces, error_flags):
    ring = SpanRing(32, 64, _ADAPTIVE, 0.0)
    _fill(ring, fill)
    spans, lows = [], []
    for t, (low64, count) in enumerate(traces):
        for _ in range(count):
            k = len(spans)
            if k < 32:
                spans.append(Span("op", trace_id=((t + 1) << 64) | low64, span_id=k + 1,
                                  status=2 if error_flags[k] else 0))
                lows.append(low64)
    rb = SpanBatch.from_spans(spans).record_batch
    errors = np.array([s.status == knhk.SpanStatus.ERROR for s in spans])
    got = ring.offer(rb, np.array(lows, dtype=np.uint64), errors)
    ring.seal()
    kept_ids = set()
    while (item := ring.pop()) is not None:
        for name, sid in zip(item[0].column("name").to_pylist(),
                             item[0].column("span_id").to_pylist(), strict=True):
            if name == "op":
                kept_ids.add(sid)
    kept = [s.span_id in kept_ids for s in spans]
    assert got == sum(kept)
    assert ring.dropped_counts()[DropReason.ADAPTIVE_SAMPLING] == len(spans) - got
    if 2 * fill <= 64:
        assert all(kept), "nothing is shed while the ring is at most half full"
    assert all(k for k, e in zip(kept, errors, strict=True) if e), "error spans are kept"
    decisions: dict[int, set[bool]] = {}
    for k, e, low in zip(kept, errors, lows, strict=True):
        if not e:
            decisions.setdefault(low, set()).add(k)
    assert all(len(d) == 1 for d in decisions.values()), "one decision per trace"
    kept_lows = [low for low, d in decisions.items() if d == {True}]
    shed_lows = [low for low, d in decisions.items() if d == {False}]
    if kept_lows and shed_lows:
        assert max(kept_lows) < min(shed_lows), "a lower trace id ratio keeps a subset"


@settings(max_examples=15, deadline=None)
@given(probes=st.lists(st.integers(1, 2**64 - 1), min_size=1, max_size=12))
def test_adaptive_append_decision_is_monotone_in_trace_id_and_occupancy(probes):
    cap = 40
    probes = sorted(set(probes) | {1, 2**64 - 1})
    ring = SpanRing(1, cap, _ADAPTIVE, 0.0)   # batch_size 1: one pop undoes one accept
    table = []
    for occ in range(cap + 1):
        row = []
        for j, low in enumerate(probes):
            before = ring.dropped_counts()
            ok = ring.append(Span("probe", trace_id=((j + 1) << 64) | low, span_id=j + 1))
            if ok:
                ring.pop()
            else:
                after = ring.dropped_counts()
                reason = (DropReason.QUEUE_FULL if occ == cap
                          else DropReason.ADAPTIVE_SAMPLING)
                assert after[reason] == before[reason] + 1
            row.append(ok)
            assert ring.queued + ring.open_rows == occ
        table.append(row)
        error_ok = ring.append(Span("err", trace_id=1, span_id=1, status=2))
        assert error_ok is (occ < cap), "errors are kept while there is room"
    for occ, row in enumerate(table):
        if 2 * occ <= cap:
            assert all(row), f"shed at occupancy {occ}/{cap}"
        assert row == sorted(row, reverse=True), f"not a threshold at occupancy {occ}"
    assert not any(table[cap])
    for j in range(len(probes)):
        column = [row[j] for row in table]
        assert column == sorted(column, reverse=True), "fuller rings keep no more"


# -- BLOCK with threads ----------------------------------------------------------------


def test_block_producer_resumes_when_consumer_pops():
    ring = SpanRing(2, 4, int(BackpressureStrategy.BLOCK), 5.0)
    for s in _spans(range(1, 5)):
        assert ring.append(s)
    result = {}

    def produce():
        t0 = time.monotonic()
        result["ok"] = ring.append(Span("late", trace_id=9, span_id=9))
        result["waited"] = time.monotonic() - t0

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.1)
    assert t.is_alive(), "the producer should be blocked on the full ring"
    assert ring.pop()[0].num_rows == 2
    t.join(2.0)
    assert not t.is_alive()
    assert result["ok"] is True
    assert 0.05 < result["waited"] < 2.0
    assert ring.dropped_counts() == [0] * len(DropReason)
    ring.seal()
    rest = [n for item in iter(ring.pop, None) for n in item[0].column("name").to_pylist()]
    assert rest == ["op", "op", "late"]


def test_block_times_out_and_counts_block_timeout():
    ring = SpanRing(2, 2, int(BackpressureStrategy.BLOCK), 0.1)
    assert ring.append_many(_spans([1, 2])) == 2
    t0 = time.monotonic()
    assert ring.append(Span("late", trace_id=3, span_id=3)) is False
    waited = time.monotonic() - t0
    assert 0.08 < waited < 1.0
    assert ring.dropped_counts()[DropReason.BLOCK_TIMEOUT] == 1
    rb = SpanBatch.from_spans(_spans([4, 5])).record_batch
    assert ring.offer(rb) == 0
    assert ring.dropped_counts()[DropReason.BLOCK_TIMEOUT] == 3
    assert ring.received == 5


def test_blocked_offer_resumes_when_consumer_pops():
    ring = SpanRing(2, 4, int(BackpressureStrategy.BLOCK), 5.0)
    ring.append_many(_spans(range(1, 5)))
    rb = SpanBatch.from_spans(_spans([7, 8])).record_batch
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("n", ring.offer(rb)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    ring.pop()
    t.join(2.0)
    assert out == {"n": 2}


def test_close_releases_a_blocked_producer_as_shutdown_drop():
    ring = SpanRing(2, 2, int(BackpressureStrategy.BLOCK), 10.0)
    ring.append_many(_spans([1, 2]))
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ok", ring.append(_spans([3])[0])))
    t.start()
    time.sleep(0.05)
    ring.close()
    t.join(2.0)
    assert not t.is_alive(), "close() must wake a blocked producer"
    assert out == {"ok": False}
    assert ring.dropped_counts()[DropReason.SHUTDOWN] == 1
    assert ring.received == 3


# -- many producers --------------------------------------------------------------------


def _produce(ring: SpanRing, thread: int, n: int) -> None:
    base = thread * 1_000_000
    for i in range(base + 1, base + n + 1):
        ring.append(Span("op", trace_id=(i << 64) | 1, span_id=i, start_time_ns=i))


@pytest.mark.parametrize("strategy", [BackpressureStrategy.BLOCK,
                                      BackpressureStrategy.DROP_OLDEST], ids=lambda s: s.name)
def test_many_producers_lose_and_duplicate_nothing(strategy):
    threads, per_thread = 8, 20_000
    ring = SpanRing(512, 4096, int(strategy), 30.0)
    seen: list[np.ndarray] = []
    done = threading.Event()

    def consume():
        while True:
            item = ring.pop(timeout=0.01)
            if item is not None:
                col = item[0].column("span_id")
                seen.append(np.frombuffer(col.buffers()[1], ">u8", len(col),
                                          col.offset * 8).copy())
            elif done.is_set() and ring.queued == 0:
                return

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=_produce, args=(ring, t, per_thread))
                 for t in range(threads)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    ring.close()
    done.set()
    consumer.join(30)
    ids = np.concatenate(seen) if seen else np.empty(0, ">u8")
    total = threads * per_thread
    assert np.unique(ids).size == ids.size, "a span was delivered twice"
    expected = {t * 1_000_000 + i for t in range(threads) for i in range(1, per_thread + 1)}
    assert set(ids.tolist()) <= expected
    drops = ring.dropped_counts()
    assert ring.received == total
    assert ids.size + sum(drops) == total
    if strategy is BackpressureStrategy.BLOCK:
        assert ids.size == total and sum(drops) == 0
    else:
        assert drops[DropReason.DROPPED_OLDEST] == sum(drops)
    # Per producer, spans come out in the order they went in.
    for t in range(threads):
        mine = ids[(ids > t * 1_000_000) & (ids <= (t + 1) * 1_000_000)]
        assert np.all(np.diff(mine.astype(np.int64)) > 0)


# -- immutability and memory -----------------------------------------------------------


def _ipc_bytes(rb: pa.RecordBatch) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, rb.schema) as writer:
        writer.write_batch(rb)
    return sink.getvalue()


def _rich_span(i: int) -> Span:
    return Span(f"op{i % 5}", trace_id=(i << 64) | 7, span_id=i,
                parent_span_id=i + 1 if i % 3 else None, start_time_ns=i, duration_ns=i % 11,
                service=f"svc{i % 3}", status=i % 3, status_message="m" if i % 4 == 0 else None,
                trace_state="k=v" if i % 6 == 0 else None, flags=i % 2,
                attributes={"s": f"v{i % 9}", "i": i, "f": i / 3, "b": bool(i % 2),
                            **({"blob": bytes([i % 256])} if i % 5 == 0 else {}),
                            **({"arr": [i, i + 1]} if i % 7 == 0 else {})},
                resource_attributes={"host": f"h{i % 2}"} if i % 2 else None,
                scope_name="lib" if i % 2 else None)


@pytest.mark.parametrize("hold", ["batch", "slice", "column"])
def test_held_sealed_batches_never_change(hold):
    # Some popped batches (or a slice, or one column of them) are held; the rest are
    # released, so their segments go back to the pool and are written again.
    ring = SpanRing(64, 256, int(BackpressureStrategy.DROP_OLDEST), 0.0)
    held: list[tuple[object, bytes, list]] = []
    i = 1
    for round_ in range(40):
        for _ in range(64 + round_ % 7):
            ring.append(_rich_span(i))
            i += 1
        ring.seal()
        while (item := ring.pop()) is not None:
            rb = item[0]
            if len(held) < 12 or round_ % 9 == 0:
                if hold == "slice":
                    rb = rb.slice(3, 20)
                elif hold == "column":
                    rb = pa.RecordBatch.from_arrays([rb.column("attributes")], ["attributes"])
                held.append((rb, _ipc_bytes(rb), rb.to_pylist()))
        gc.collect()
    assert ring.segments_allocated < len(held) + 10, "segments were not reused"
    for rb, raw, rows in held:
        assert _ipc_bytes(rb) == raw
        assert rb.to_pylist() == rows


def test_memory_stays_bounded_when_batches_are_released():
    ring = SpanRing(500, 5_000, int(BackpressureStrategy.DROP_OLDEST), 0.0)
    for i in range(1, 100_001):
        ring.append(Span("op", trace_id=i, span_id=i, attributes={"k": "v"}))
        if i % 2_000 == 0:
            while ring.pop() is not None:
                pass
    assert ring.received == 100_000 and sum(ring.dropped_counts()) == 0
    assert ring.segments_allocated <= 12, ring.segments_allocated


def test_evicted_batches_return_their_segments():
    # Nobody pops: DROP_OLDEST evicts, and the evicted segments are reused.
    ring = SpanRing(100, 1_000, int(BackpressureStrategy.DROP_OLDEST), 0.0)
    for i in range(1, 50_001):
        ring.append(Span("op", trace_id=i, span_id=i))
    drops = ring.dropped_counts()
    assert ring.received == 50_000
    assert drops[DropReason.DROPPED_OLDEST] + ring.queued + ring.open_rows == 50_000
    assert ring.segments_allocated <= 15, ring.segments_allocated


# -- the unlocked append path beside the locked one -------------------------------------


class _StrSub(str):
    pass


def _mixed_span(thread: int, i: int) -> Span:
    """Plain spans (exact str attributes: the unlocked path) interleaved with spans the
    locked path must take (ints, floats, status messages, resource attributes, a str
    subclass as service)."""
    sid = thread * 1_000_000 + i
    kind = i % 5
    attrs: dict = {"http.route": f"/r{i % 7}", "t": str(thread)}
    extra: dict = {}
    if kind == 1:
        attrs["n"] = i
    elif kind == 2:
        extra["status_message"] = f"m{i}"
    elif kind == 3:
        extra["resource_attributes"] = {"host": f"h{thread}"}
    service = None if i % 2 else f"svc{thread}"
    if kind == 4:
        service = _StrSub(f"svc{thread}")
        attrs["f"] = i / 4
    return Span(f"op{i % 3}", trace_id=(sid << 64) | 5, span_id=sid, start_time_ns=sid,
                duration_ns=i, attributes=attrs, service=service, **extra)


def test_unlocked_and_locked_appends_from_many_threads_keep_every_row_intact():
    threads, per_thread = 4, 3_000
    ring = SpanRing(97, 1 << 20, int(BackpressureStrategy.BLOCK), 30.0, SERVICE)
    batches: list[pa.RecordBatch] = []
    done = threading.Event()

    def consume():
        while True:
            ring.seal_if_due(0.0005)   # seals race with the producers' appends
            item = ring.pop(timeout=0.001)
            if item is not None:
                batches.append(item[0])
                ring.release(item[0].num_rows)
            elif done.is_set() and ring.queued == 0 and ring.open_rows == 0:
                return

    def produce(t):
        append = ring.append
        for i in range(1, per_thread + 1):
            assert append(_mixed_span(t, i))

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    ring.seal()
    done.set()
    consumer.join(30)
    assert not consumer.is_alive()
    rows = [r for rb in batches for r in rb.to_pylist()]
    assert len(rows) == threads * per_thread == ring.accepted
    by_id = {int.from_bytes(r["span_id"], "big"): r for r in rows}
    assert len(by_id) == len(rows), "a span was delivered twice"
    for t in range(threads):
        for i in range(1, per_thread + 1):
            span = _mixed_span(t, i)
            row = by_id[t * 1_000_000 + i]
            assert_rows_match_row(row, span)


def assert_rows_match_row(row: dict, span: Span) -> None:
    assert row["trace_id"] == span.trace_id
    assert row["name"] == span.name
    assert row["service"] == (span.service or SERVICE)
    assert (row["start_time_ns"], row["end_time_ns"]) == (span.start_time_ns,
                                                          span.end_time_ns)
    assert row["status_message"] == span.status_message
    assert same(decode_attributes(row["attributes"]), span.attributes)
    assert same(decode_attributes(row["resource_attributes"]),
                span.resource_attributes or {})


def test_mixed_appends_fill_and_seal_segments_in_order():
    """Single producer: rows of either path land in order across segment boundaries
    (the row that fills a segment always takes the locked path and seals it)."""
    spans = [_mixed_span(0, i) for i in range(1, 400)]
    ring = SpanRing(64, 4096, 0, 1.0, SERVICE)
    for s in spans:
        assert ring.append(s)
    assert ring.queued == 64 * 6 and ring.open_rows == 399 - 64 * 6
    ring.seal()
    got = []
    while (item := ring.pop()) is not None:
        got.append(item[0])
    assert [b.num_rows for b in got] == [64] * 6 + [15]
    assert_rows_match(pa.Table.from_batches(got).combine_chunks().to_batches()[0], spans)


def test_a_str_subclass_never_runs_inside_the_unlocked_append():
    """A service given as a str subclass is interned as a plain str: a later plain span
    of the same service must not call the subclass's __eq__ half way through its row
    (which here records another span, and used to overwrite the row)."""
    tid = bytes(range(16))
    ring = SpanRing(64, 256)
    calls = []

    class Name(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            calls.append(other)
            ring.append(Span("inner", tid, b"\x00" * 7 + b"\x03"))
            return str.__eq__(self, other)

    ring.append(Span("a", tid, b"\x00" * 7 + b"\x01", service=Name("svc")))
    ring.append(Span("op", tid, b"\x00" * 7 + b"\x02", service="svc"))
    ring.seal()
    rb, _ = ring.pop()
    assert calls == []
    assert rb.column("name").to_pylist() == ["a", "op"]
    assert [s[-1] for s in rb.column("span_id").to_pylist()] == [1, 2]
    assert rb.column("service").to_pylist() == ["svc", "svc"]
    assert ring.accepted == rb.num_rows == 2


def test_long_dictionary_values_are_not_kept_after_their_batches():
    import gc
    import tracemalloc

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for k in range(50):
        ring = SpanRing(60, 600)
        for i in range(60):
            ring.append(Span("q", bytes(range(16)), (k * 60 + i + 1).to_bytes(8, "big"),
                             attributes={"db.statement": f"{k}-{i}-" + "x" * 16_000}))
        ring.seal()
        ring.pop()
        del ring
    gc.collect()
    left = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert left < 5 << 20, left  # 50 x 60 x 16 KB = 48 MB were recorded
