"""Tests of knhk.workload and of the repository's registry/ it follows.

Invariants are checked with plain NumPy / Python written here, never with the
generator's own helpers; the registry is read with ``yaml.safe_load`` directly.
"""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

import knhk
from knhk.workload import Topology, WorkloadConfig, feed, generate, generate_batches

REGISTRY = Path(__file__).resolve().parents[1] / "registry"
SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL = 2, 3, 4, 5, 1


# -- registry/ read independently ----------------------------------------------------------


def _registry_files() -> dict[Path, dict]:
    files = {}
    for path in sorted(REGISTRY.rglob("*.y*ml")):
        with path.open() as fh:
            files[path] = yaml.safe_load(fh)
    return files


def _registry() -> tuple[dict[str, dict], dict[str, dict]]:
    """(attribute id -> definition, group id -> group) over every file."""
    attrs: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    for path, doc in _registry_files().items():
        if path.name in ("registry_manifest.yaml", "manifest.yaml"):
            continue
        for group in doc.get("groups", []):
            assert group["id"] not in groups, f"duplicate group {group['id']} in {path}"
            groups[group["id"]] = group
            for a in group.get("attributes", []):
                if "id" in a:
                    assert a["id"] not in attrs, f"attribute {a['id']} defined twice"
                    attrs[a["id"]] = a
        for a in doc.get("attributes", []):  # v2 syntax
            assert a["key"] not in attrs, f"attribute {a['key']} defined twice"
            attrs[a["key"]] = a
    return attrs, groups


def _group_attributes(groups: dict[str, dict], gid: str, seen: tuple = ()) -> dict[str, object]:
    """ref -> requirement level of a group, following ``extends`` (own refs win)."""
    assert gid not in seen, f"extends cycle through {gid}"
    group = groups[gid]
    out: dict[str, object] = {}
    if "extends" in group:
        out.update(_group_attributes(groups, group["extends"], (*seen, gid)))
    for a in group.get("attributes", []):
        key = a.get("ref") or a.get("id")
        out[key] = a.get("requirement_level", "recommended")
    return out


_TAG = {"string": int(knhk.AttrType.STRING), "int": int(knhk.AttrType.INT),
        "double": int(knhk.AttrType.DOUBLE), "boolean": int(knhk.AttrType.BOOL)}


def _expected_tag(definition: dict) -> int:
    t = definition["type"]
    if isinstance(t, dict):  # enum: the member values' type
        values = [m["value"] for m in t["members"]]
        kinds = {type(v) for v in values}
        assert len(kinds) == 1
        return _TAG["string"] if kinds == {str} else _TAG["int"]
    return _TAG[t]


def test_registry_parses_and_every_ref_resolves():
    files = _registry_files()
    manifest = files[REGISTRY / "registry_manifest.yaml"]
    assert manifest["name"] == "knhk" and manifest["semconv_version"]
    attrs, groups = _registry()
    refs = []
    for path, doc in files.items():
        for group in doc.get("groups", []) + doc.get("attribute_groups", []) + \
                doc.get("spans", []):
            for a in group.get("attributes", []):
                if "ref" in a:
                    refs.append((path.name, group.get("id"), a["ref"]))
            if "extends" in group:
                assert group["extends"] in groups, f"{path}: extends {group['extends']} unknown"
    unresolved = [r for r in refs if r[2] not in attrs]
    assert refs and not unresolved, unresolved
    for key, a in attrs.items():
        assert a.get("stability") and a.get("brief"), key
        _expected_tag(a)
        if a["type"] == "string":
            assert a.get("examples"), f"string attribute {key} has no examples"


def test_registry_holds_the_design_conventions():
    attrs, groups = _registry()
    wf = groups["workflow.execute"]
    assert wf["type"] == "span"
    levels = _group_attributes(groups, "workflow.execute")
    assert levels["workflow.id"] == "required" and levels["workflow.pattern"] == "required"
    assert attrs["workflow.id"]["type"] == "string"
    assert "members" in attrs["workflow.pattern"]["type"]
    metrics = {g["metric_name"]: g for g in groups.values() if g["type"] == "metric"}
    expected = {
        "knhk.pipeline.events.received": ("counter", "{span}"),
        "knhk.pipeline.events.processed": ("counter", "{span}"),
        "knhk.pipeline.events.dropped": ("counter", "{span}"),
        "knhk.pipeline.processing.duration": ("histogram", "s"),
        "knhk.pipeline.queue.occupancy": ("gauge", "1"),
        "knhk.exporter.errors": ("counter", "{error}"),
    }
    assert {k: (m["instrument"], m["unit"]) for k, m in metrics.items()} == expected
    dropped = _group_attributes(groups, "metric.knhk.pipeline.events.dropped")
    assert dropped == {"knhk.drop.reason": "required"}
    reasons = {m["value"] for m in attrs["knhk.drop.reason"]["type"]["members"]}
    assert reasons == {r.label for r in knhk.DropReason}
    assert _group_attributes(groups, "metric.knhk.exporter.errors") == \
        {"knhk.exporter.name": "required"}
    kinds = {g["span_kind"] for g in groups.values() if g["type"] == "span"}
    assert kinds == {"server", "client", "producer", "consumer", "internal"}


# -- helpers over a batch ----------------------------------------------------------------------


def _attribute_dicts(column: pa.ListArray) -> list[dict[str, dict]]:
    """Per row: key -> {"type", "str", "int"}, read from the flattened children."""
    offsets = column.offsets.to_numpy()
    flat = column.flatten()
    keys = flat.field("key").dictionary_decode().to_pylist()
    types = flat.field("type").to_pylist()
    strs = flat.field("str").dictionary_decode().to_pylist()
    ints = flat.field("int").to_pylist()
    base = offsets[0]
    rows = []
    for a, b in zip(offsets[:-1] - base, offsets[1:] - base, strict=True):
        rows.append({keys[j]: {"type": types[j], "str": strs[j], "int": ints[j]}
                     for j in range(a, b)})
    return rows


class Frame:
    """Plain Python/NumPy columns of a batch, for independent checks."""

    def __init__(self, batch: knhk.SpanBatch) -> None:
        rb = batch.record_batch
        self.n = rb.num_rows
        self.trace = rb.column("trace_id").to_pylist()
        self.span = rb.column("span_id").to_pylist()
        self.parent = rb.column("parent_span_id").to_pylist()
        self.is_root = rb.column("parent_span_id").is_null().to_numpy(zero_copy_only=False)
        self.kind = rb.column("kind").to_numpy()
        self.start = rb.column("start_time_ns").to_numpy()
        self.end = rb.column("end_time_ns").to_numpy()
        self.status = rb.column("status_code").to_numpy()
        self.message = rb.column("status_message").to_pylist()
        self.name = rb.column("name").to_pylist()
        self.service = rb.column("service").to_pylist()
        self.attrs = _attribute_dicts(rb.column("attributes"))
        self._rb = rb
        index = {(t, s): i for i, (t, s) in enumerate(zip(self.trace, self.span, strict=True))}
        assert len(index) == self.n, "span ids repeat within a trace"
        self.parent_row = np.full(self.n, -1)
        for i in np.flatnonzero(~self.is_root):
            self.parent_row[i] = index.get((self.trace[i], self.parent[i]), -2)
        self.children: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(self.parent_row):
            if p >= 0:
                self.children[int(p)].append(i)

    @property
    def resource(self) -> list[dict]:
        return [{k: a["str"] for k, a in row.items()}
                for row in _attribute_dicts(self._rb.column("resource_attributes"))]

    def value(self, i: int, key: str):
        a = self.attrs[i].get(key)
        if a is None:
            return None
        return a["str"] if a["type"] == int(knhk.AttrType.STRING) else a["int"]


@pytest.fixture(scope="module")
def sample() -> tuple[WorkloadConfig, knhk.SpanBatch, Frame]:
    config = WorkloadConfig(seed=11, services=10)
    batch = knhk.SpanBatch.concat(list(generate_batches(20_000, config=config,
                                                        batch_size=5_000)))
    return config, batch, Frame(batch)


@pytest.fixture(scope="module")
def big() -> tuple[WorkloadConfig, Frame]:
    config = WorkloadConfig(seed=3, error_rate=0.02, slow_rate=0.03)
    return config, Frame(generate(100_000, config))


# -- determinism, batches, validity ----------------------------------------------------------


def _ipc_bytes(batches) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, knhk.SPAN_SCHEMA) as writer:
        for b in batches:
            writer.write_batch(b.record_batch)
    return sink.getvalue()


def test_same_seed_gives_identical_bytes_and_other_seeds_differ():
    cfg = WorkloadConfig(seed=42)
    a = _ipc_bytes(generate_batches(12_000, config=cfg, batch_size=5_000))
    b = _ipc_bytes(generate_batches(12_000, config=WorkloadConfig(seed=42), batch_size=5_000))
    c = _ipc_bytes(generate_batches(12_000, config=WorkloadConfig(seed=43), batch_size=5_000))
    assert a == b
    assert a != c
    ta = generate(2_000, cfg).column("trace_id").to_pylist()
    tc = generate(2_000, WorkloadConfig(seed=43)).column("trace_id").to_pylist()
    assert not set(ta) & set(tc)


def test_default_timestamps_come_from_the_seed_not_the_clock():
    first = generate(500, WorkloadConfig(seed=9)).column("start_time_ns").to_numpy().min()
    again = generate(500, WorkloadConfig(seed=9)).column("start_time_ns").to_numpy().min()
    other = generate(500, WorkloadConfig(seed=10)).column("start_time_ns").to_numpy().min()
    assert first == again != other
    assert WorkloadConfig(seed=9).first_start_ns <= first
    start = 1_600_000_000 * 10**9
    got = generate(500, WorkloadConfig(seed=9, start_time_ns=start))
    assert got.column("start_time_ns").to_numpy().min() >= start


def test_spans_per_second_sets_the_time_covered():
    n, rate = 40_000, 2_000.0
    f = generate(n, WorkloadConfig(seed=4, spans_per_second=rate, start_time_ns=0))
    starts = f.column("start_time_ns").to_numpy()[
        f.column("parent_span_id").is_null().to_numpy(zero_copy_only=False)]
    covered = (starts.max() - starts.min()) / 1e9
    assert covered == pytest.approx(n / rate, rel=0.02)
    assert np.all(np.diff(starts) >= 0)  # traces start in order


def test_batch_sizes_and_validity():
    sizes = []
    for batch in generate_batches(23_456, config=WorkloadConfig(seed=1), batch_size=5_000):
        batch.record_batch.validate(full=True)
        knhk.SpanBatch(batch.record_batch)
        assert batch.schema.equals(knhk.SPAN_SCHEMA)
        sizes.append(batch.num_rows)
        # every batch holds whole traces
        rb = batch.record_batch
        spans = set(rb.column("span_id").to_pylist())
        parents = set(rb.column("parent_span_id").drop_null().to_pylist())
        assert parents <= spans
    assert sizes == [5_000] * 4 + [3_456]
    assert generate(0).num_rows == 0
    assert generate(1).num_rows == 1
    assert [b.num_rows for b in generate_batches(7, batch_size=3)] == [3, 3, 1]


def test_batches_can_be_written_to_one_ipc_file(tmp_path):
    path = tmp_path / "w.arrow"
    batches = list(generate_batches(9_000, config=WorkloadConfig(seed=2), batch_size=3_000))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, knhk.SPAN_SCHEMA) as w:
        for b in batches:
            w.write_batch(b.record_batch)
    table = pa.ipc.open_file(str(path)).read_all()
    assert table.num_rows == 9_000
    expected = [s for b in batches for s in b.column("span_id").to_pylist()]
    assert table.column("span_id").to_pylist() == expected


# -- structure ------------------------------------------------------------------------------------


def test_ids_are_nonzero_and_parents_exist_in_the_same_trace(sample):
    _, _, f = sample
    assert all(any(t) for t in f.trace) and all(any(s) for s in f.span)
    assert {len(t) for t in f.trace} == {16} and {len(s) for s in f.span} == {8}
    assert not np.any(f.parent_row == -2), "a parent id points nowhere in its trace"
    roots = Counter(f.trace[i] for i in np.flatnonzero(f.is_root))
    traces = set(f.trace)
    assert set(roots) == traces and set(roots.values()) == {1}
    assert len(traces) > 100


def test_roots_are_server_spans_of_entry_services(sample):
    config, _, f = sample
    entry = {s.name for s in Topology.random(config).entry_services}
    roots = np.flatnonzero(f.is_root)
    assert set(f.kind[roots]) == {SERVER}
    assert {f.service[i] for i in roots} <= entry


def test_children_lie_inside_their_parent_except_async_consumers(sample):
    _, _, f = sample
    child = np.flatnonzero(f.parent_row >= 0)
    p = f.parent_row[child]
    assert np.all(f.end >= f.start)
    assert np.all(f.start[child] >= f.start[p])
    sync = child[f.kind[child] != CONSUMER]
    ps = f.parent_row[sync]
    assert np.all(f.end[sync] <= f.end[ps])
    consumers = child[f.kind[child] == CONSUMER]
    assert consumers.size > 0
    assert set(f.kind[f.parent_row[consumers]]) == {PRODUCER}
    # some consumers really do outlive their producer
    assert np.any(f.end[consumers] > f.end[f.parent_row[consumers]])


def test_each_rpc_or_http_client_has_a_server_child_in_another_service(sample):
    _, _, f = sample
    n_clients = 0
    for i in np.flatnonzero(f.kind == CLIENT):
        keys = f.attrs[i]
        if "db.system.name" in keys:
            assert i not in f.children, "a DB client span has children"
            continue
        assert "http.request.method" in keys or "rpc.system.name" in keys
        kids = f.children[i]
        assert len(kids) == 1 and f.kind[kids[0]] == SERVER
        assert f.service[kids[0]] != f.service[i]
        n_clients += 1
    assert n_clients > 1_000
    kinds = set(f.kind.tolist())
    assert kinds == {SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL}


def test_service_column_is_the_resource_service_name(sample):
    _, _, f = sample
    required = {"service.name", "service.version", "service.namespace",
                "deployment.environment.name", "host.name"}
    resource = f.resource
    for i in range(f.n):
        assert set(resource[i]) == required
        assert resource[i]["service.name"] == f.service[i]
    # spans of one service call within one trace run on one host
    for i in np.flatnonzero(f.kind == CLIENT):
        p = f.parent_row[i]
        assert resource[i]["host.name"] == resource[p]["host.name"]


def test_topology_is_a_dag_from_the_entry_services():
    topo = Topology.random(WorkloadConfig(seed=5, services=14))
    names = [s.name for s in topo.services]
    assert names[0] == "frontend" and "checkout" in names and "payment" in names
    assert len(set(names)) == len(names) == 14
    n_entry = len(topo.entry_services)
    assert all(s.entry for s in topo.services[:n_entry])
    assert topo.edges and all(caller < callee for caller, _, callee, _ in topo.edges)
    assert all(callee >= n_entry for _, _, callee, _ in topo.edges)
    reached = {callee for _, _, callee, _ in topo.edges}
    assert reached == set(range(n_entry, 14))
    assert topo.databases and topo.queues
    bare = Topology.random(WorkloadConfig(seed=5, services=14, db=False, messaging=False))
    assert not bare.databases and not bare.queues


def test_db_and_messaging_can_be_switched_off():
    f = Frame(generate(3_000, WorkloadConfig(seed=8, db=False, messaging=False)))
    assert not set(f.kind.tolist()) & {PRODUCER, CONSUMER}
    assert not any("db.system.name" in a for a in f.attrs)


def test_max_depth_bounds_the_cross_service_hops():
    for depth in (0, 1, 2):
        f = Frame(generate(3_000, WorkloadConfig(seed=6, services=12, max_depth=depth,
                                                 messaging=False)))
        hops = np.zeros(f.n, int)
        for i in range(f.n):  # rows come parents first
            p = f.parent_row[i]
            if p >= 0:
                hops[i] = hops[p] + (f.kind[i] == SERVER)
        assert hops.max() == depth


# -- errors and slow spans ------------------------------------------------------------------


def test_error_origin_rate_and_propagation(big):
    config, f = big
    err = f.status == 2
    origins = 0
    for i in np.flatnonzero(err):
        if not any(err[c] and f.kind[c] != CONSUMER for c in f.children.get(i, ())):
            origins += 1
    expected = config.error_rate * f.n
    # independent origins under a failing child are not counted: a bias of about
    # error_rate * (fraction of spans with children), well inside 5 sigma here
    assert abs(origins - expected) < 5 * math.sqrt(expected) + 0.02 * expected
    assert err.sum() > origins * 1.2, "errors do not propagate to parents"
    # the client sees exactly what its server answered
    for i in np.flatnonzero(err & (f.kind == SERVER) & (f.parent_row >= 0)):
        p = f.parent_row[i]
        if f.kind[p] == CLIENT:
            assert err[p]
            assert f.value(p, "error.type") == f.value(i, "error.type")
            assert f.value(p, "http.response.status_code") == \
                f.value(i, "http.response.status_code")


def test_error_spans_carry_message_type_and_5xx(big):
    _, f = big
    err = f.status == 2
    assert set(np.unique(f.status).tolist()) == {0, 2}
    for i in range(f.n):
        code = f.value(i, "http.response.status_code")
        if err[i]:
            assert f.message[i] and f.value(i, "error.type")
            if code is not None:
                assert 500 <= code <= 599 and f.value(i, "error.type") == str(code)
        else:
            assert f.message[i] is None and "error.type" not in f.attrs[i]
            if code is not None:
                assert 200 <= code < 300


def test_slow_rate_on_leaf_spans(big):
    config, f = big
    leaves = [i for i in range(f.n) if i not in f.children]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in leaves:
        groups[(f.service[i], f.name[i])].append(i)
    log_dur = np.log(np.maximum(f.end - f.start, 1))
    cut = math.log(config.slow_factor) / 2
    slow = total = 0
    for rows in groups.values():
        if len(rows) < 50:
            continue
        d = log_dur[rows]
        slow += int(np.sum(d > np.median(d) + cut))
        total += len(rows)
    assert total > 30_000
    expected = config.slow_rate * total
    assert abs(slow - expected) < 5 * math.sqrt(expected) + 0.003 * total


def test_no_slow_spans_and_no_errors_when_rates_are_zero():
    f = generate(5_000, WorkloadConfig(seed=2, error_rate=0.0, slow_rate=0.0))
    assert not np.any(f.column("status_code").to_numpy())
    assert f.column("status_message").null_count == f.num_rows


# -- attributes follow registry/ -----------------------------------------------------------


def test_attribute_types_match_the_registry(sample):
    _, batch, _ = sample
    attrs, _ = _registry()
    for column in ("attributes", "resource_attributes"):
        flat = batch.column(column).flatten()
        keys = flat.field("key").dictionary_decode().to_pylist()
        tags = flat.field("type").to_numpy()
        seen: dict[str, set[int]] = defaultdict(set)
        for k, t in zip(keys, tags.tolist(), strict=True):
            seen[k].add(t)
        unknown = set(seen) - set(attrs)
        assert not unknown, f"{column}: keys not in registry/: {unknown}"
        for key, found in seen.items():
            assert found == {_expected_tag(attrs[key])}, (key, found)
        strs = flat.field("str").dictionary_decode().to_pylist()
        for key, value in zip(keys, strs, strict=True):
            t = attrs[key]["type"]
            if isinstance(t, dict) and key != "error.type":  # error.type is open-ended
                assert value in {m["value"] for m in t["members"]}, (key, value)
    ints = batch.attribute("server.port")
    assert ints.type == pa.int64()
    assert batch.attribute("http.response.status_code").type == pa.int64()


def _shape(f: Frame, i: int) -> str | None:
    keys = f.attrs[i]
    kind = f.kind[i]
    if f.name[i] == "workflow.execute":
        return "workflow.execute"
    if "http.request.method" in keys:
        return {SERVER: "span.http.server", CLIENT: "span.http.client"}[kind]
    if "rpc.system.name" in keys:
        return {SERVER: "span.rpc.server", CLIENT: "span.rpc.client"}[kind]
    if "db.system.name" in keys:
        return "span.db.client"
    if "messaging.system" in keys:
        return {PRODUCER: "span.messaging.producer", CONSUMER: "span.messaging.consumer"}[kind]
    return None


def test_span_shapes_follow_the_registry_span_groups(big):
    _, f = big
    _, groups = _registry()
    kind_of = {"server": SERVER, "client": CLIENT, "producer": PRODUCER,
               "consumer": CONSUMER, "internal": INTERNAL}
    counts: Counter = Counter()
    for i in range(f.n):
        gid = _shape(f, i)
        keys = set(f.attrs[i])
        if gid is None:  # plain INTERNAL spans: nothing but error.type on failure
            assert f.kind[i] == INTERNAL and keys <= {"error.type"}
            continue
        counts[gid] += 1
        group = groups[gid]
        assert kind_of[group["span_kind"]] == f.kind[i]
        levels = _group_attributes(groups, gid)
        assert keys <= set(levels), (gid, keys - set(levels))
        required = {k for k, lvl in levels.items() if lvl == "required"}
        assert required <= keys, (gid, required - keys)
    span_groups = {g for g, d in groups.items() if d["type"] == "span"}
    assert set(counts) == span_groups, span_groups - set(counts)


# -- into a real pipeline, and back through Span objects -----------------------------------


def test_feed_delivers_every_span_through_a_pipeline():
    config = WorkloadConfig(seed=21)
    sink = knhk.InMemoryExporter()
    pipeline = (knhk.TelemetryPipeline.builder().with_batch_size(2_000)
                .with_channel_capacity(200_000).with_exporter(sink).build())
    with pipeline:
        accepted = feed(pipeline, 25_000, config, batch_size=4_000)
    assert accepted == 25_000
    got = sink.spans()
    assert got.num_rows == 25_000
    sent = knhk.SpanBatch.concat(list(generate_batches(25_000, config=config,
                                                       batch_size=4_000)))
    key = ["trace_id", "span_id"]
    assert sorted(zip(*(got.column(k).to_pylist() for k in key), strict=True)) == \
        sorted(zip(*(sent.column(k).to_pylist() for k in key), strict=True))
    stats = pipeline.stats()
    assert stats.events_received == 25_000 and stats.events_dropped == 0


def test_spans_survive_to_spans_round_trip():
    batch = generate(400, WorkloadConfig(seed=13, error_rate=0.2))
    spans = batch.to_spans()
    assert len(spans) == 400
    back = knhk.SpanBatch.from_spans(spans)
    for name in knhk.SPAN_SCHEMA.names:
        assert back.column(name).to_pylist() == batch.column(name).to_pylist(), name
    s = spans[0]
    assert s.is_root and s.service == batch.column("service")[0].as_py()


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "exc", "text"), [
    ({"services": 0}, ValueError, "services"),
    ({"error_rate": 1.5}, ValueError, "error_rate"),
    ({"slow_rate": -0.1}, ValueError, "slow_rate"),
    ({"slow_factor": 0.5}, ValueError, "slow_factor"),
    ({"spans_per_second": 0}, ValueError, "spans_per_second"),
    ({"seed": -1}, ValueError, "seed"),
    ({"services": "8"}, TypeError, "services"),
    ({"max_depth": 2.5}, TypeError, "max_depth"),
    ({"db": 1}, TypeError, "db"),
])
def test_bad_config_is_refused_with_the_field_named(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        WorkloadConfig(**kwargs)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n_spans"):
        list(generate_batches(-1))
    with pytest.raises(ValueError, match="batch_size"):
        list(generate_batches(10, batch_size=0))
    with pytest.raises(TypeError, match="WorkloadConfig"):
        generate(10, {"seed": 1})
    with pytest.raises(TypeError, match="record_batch"):
        feed(object(), 10)
