"""Validation: registry loading and validate_batch beside a per-span Python validator.

Run the side-by-side scenarios with ``python benchmarks/run.py validation`` (figures
go to RESULTS.md) or the pytest-benchmark form with
``pytest benchmarks/bench_validation.py --benchmark-only``.

The batch: spans with 6 attributes each -- ``http.request.method`` (an enum; 5% of
values not members), ``http.response.status_code``, ``url.full``,
``server.address``, ``server.port`` (2% strings: a type mismatch) and either
``http.route`` or an attribute no registry defines -- and 10% of the spans named
``http.client``, which matches the ``span.http.client`` group, so its requirement
levels are checked too. The same batch goes through the full OpenTelemetry
semantic-convention registry (v1.44.0) and knhk's own ``registry/``.

The peer is what a user would otherwise write: a straightforward Python validator
that walks the spans one at a time over the *same compiled registry* (dict and
set lookups, no Arrow), given the spans already as Python objects (the conversion
is not timed, which favours the peer). Both must report the same finding counts.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import Result, median_rate, paired_rates

import knhk
from knhk.schema import ATTRIBUTE_STRUCT, ATTRIBUTES_TYPE
from knhk.validation import WeaverValidator
from knhk.validation import compiled as C
from knhk.validation.compiled import load_compiled

HERE = os.path.dirname(os.path.abspath(__file__))
SEMCONV = os.path.join(HERE, "..", "..", "shared", "testdata", "semconv")
KNHK_REGISTRY = os.path.join(HERE, "..", "registry")

_KEYS = ["http.request.method", "http.response.status_code", "url.full", "server.address",
         "server.port", "http.route", "app.custom.tag"]
_STRS = ["GET", "POST", "PUT", "DELETE", "GETX", "https://shop.example.com/api/users/42",
         "https://shop.example.com/api/orders", "users.example.com", "orders.example.com",
         "/api/users/{id}", "/api/orders", "blue", "443"]


def make_batch(n: int, seed: int = 0) -> knhk.SpanBatch:
    """``n`` spans x 6 attributes, built column-wise with NumPy/pyarrow."""
    rng = np.random.default_rng(seed)
    k = 6
    m = n * k
    key_idx = np.tile(np.arange(k, dtype=np.int32), n)
    key_idx[5::k] = np.where(rng.random(n) < 0.5, 5, 6)            # http.route | unknown
    types = np.tile(np.array([1, 3, 1, 1, 3, 1], np.int8), n)
    str_idx = np.zeros(m, np.int32)
    method = rng.integers(0, 4, n)
    method[rng.random(n) < 0.05] = 4                                  # GETX: not a member
    str_idx[0::k] = method
    str_idx[2::k] = rng.integers(5, 7, n)
    str_idx[3::k] = rng.integers(7, 9, n)
    str_idx[5::k] = np.where(key_idx[5::k] == 5, rng.integers(9, 11, n), 11)
    bad_port = rng.random(n) < 0.02                                   # "443": wrong type
    types[4::k] = np.where(bad_port, 1, 3)
    str_idx[4::k] = 12
    is_str = types == 1
    ints = np.zeros(m, np.int64)
    ints[1::k] = rng.choice([200, 201, 404, 500], n)
    ints[4::k] = 443
    d = pa.dictionary(pa.int32(), pa.string())
    struct = pa.StructArray.from_arrays([
        pa.DictionaryArray.from_arrays(pa.array(key_idx), pa.array(_KEYS)).cast(d),
        pa.array(types),
        pa.DictionaryArray.from_arrays(pa.array(str_idx, mask=~is_str),
                                       pa.array(_STRS)).cast(d),
        pa.array(ints, mask=is_str),
        pa.nulls(m, pa.float64()), pa.nulls(m, pa.bool_()), pa.nulls(m, pa.binary()),
        pa.nulls(m, pa.binary())], fields=list(ATTRIBUTE_STRUCT))
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, m + 1, k, dtype=np.int32)), struct,
                                     type=ATTRIBUTES_TYPE)
    ids = rng.integers(1, 2**62, (n, 2), dtype=np.int64).view(np.uint8).reshape(n, 16)
    names = np.where(rng.random(n) < 0.1, 1, 0).astype(np.int32)
    return knhk.SpanBatch({
        "trace_id": ids, "span_id": ids[:, 8:].copy(),
        "name": pa.DictionaryArray.from_arrays(pa.array(names),
                                               pa.array(["GET /api/users/{id}", "http.client"])),
        "start_time_ns": np.arange(n, dtype=np.int64), "duration_ns": np.full(n, 1000),
        "attributes": lists})


# -- the peer: one span at a time in Python, over the same compiled registry --------------


class PerSpanValidator:
    """A straightforward validator: per span, per attribute, dict and set lookups."""

    def __init__(self, compiled: C.CompiledRegistry) -> None:
        self.c = compiled
        self.key_id = compiled.key_id
        self.decl = compiled.decl.tolist()
        self.flags = compiled.flags.tolist()
        self.str_members = [
            {compiled.enum_vocab[v] for v in compiled.es_vals[a:b].tolist()}
            for a, b in zip(compiled.es_off[:-1].tolist(), compiled.es_off[1:].tolist(),
                            strict=True)]
        self.int_members = [set(compiled.ei_vals[a:b].tolist()) for a, b in
                            zip(compiled.ei_off[:-1].tolist(), compiled.ei_off[1:].tolist(),
                                strict=True)]
        self.reqs = [list(zip(compiled.rq_kid[a:b].tolist(), compiled.rq_code[a:b].tolist(),
                              strict=True))
                     for a, b in zip(compiled.rq_off[:-1].tolist(), compiled.rq_off[1:].tolist(),
                                     strict=True)]
        self.ok_tags = {C.T_STRING: {1}, C.T_INT: {3}, C.T_DOUBLE: {3, 4}, C.T_BOOLEAN: {2},
                        C.T_ENUM: {1, 3}, C.T_ANY: set(range(8))}

    def validate(self, spans: list) -> tuple[list[int], list[int]]:
        """``spans``: ``(name, [(key, tag, value), ...])``; returns (counts, row levels)."""
        counts = [0] * C.N_CODES
        levels = []
        lv = C.CODE_LEVELS
        span_group = self.c.span_group_of
        for name, attrs in spans:
            level = 0
            present = set()
            for key, tag, value in attrs:
                kid = self.key_id(key)
                if kid == C.KEY_IGNORED:
                    continue
                found = []
                if kid < 0:
                    found.append(C.C_MISSING_ATTRIBUTE)
                else:
                    present.add(kid)
                    fl = self.flags[kid]
                    if fl & C.F_TEMPLATE:
                        found.append(C.C_TEMPLATE_ATTRIBUTE)
                    if fl & C.F_DEPRECATED:
                        found.append(C.C_DEPRECATED)
                    if fl & C.F_NOT_STABLE:
                        found.append(C.C_NOT_STABLE)
                    decl = self.decl[kid]
                    ok = self.ok_tags.get(decl)
                    if tag != 0 and ok is not None and tag not in ok:
                        found.append(C.C_TYPE_MISMATCH)
                    elif decl == C.T_ENUM and tag in (1, 3):
                        members = self.str_members[kid] if tag == 1 else self.int_members[kid]
                        if value not in members:
                            found.append(C.C_UNDEFINED_ENUM_VARIANT)
                for code in found:
                    counts[code] += 1
                    level = max(level, lv[code])
            g = span_group.get(name, -1)
            if g >= 0:
                for kid, code in self.reqs[g]:
                    if kid not in present:
                        counts[code] += 1
                        level = max(level, lv[code])
            levels.append(level)
        return counts, levels


def python_spans(batch: knhk.SpanBatch) -> list:
    """The batch as the per-span validator takes it (not timed)."""
    names = batch.column("name").to_pylist()
    out = []
    slot = {1: "str", 2: "bool", 3: "int", 4: "double", 7: "bytes"}
    for name, row in zip(names, batch.column("attributes").to_pylist(), strict=True):
        out.append((name, [(a["key"], a["type"], a.get(slot.get(a["type"], "any")))
                           for a in row]))
    return out


# -- measurements ------------------------------------------------------------------------


def cold_load_seconds(path: str) -> float:
    t0 = time.perf_counter()
    load_compiled(path, cache=False)
    return time.perf_counter() - t0


def warm_load_seconds(path: str, cache_dir: str) -> float:
    load_compiled(path, cache_dir=cache_dir)          # make sure the entry exists
    t0 = time.perf_counter()
    c = load_compiled(path, cache_dir=cache_dir)
    dt = time.perf_counter() - t0
    assert c._registry is None, "expected a warm (cached) load"
    return dt


def pure_python_yaml_seconds(path: str) -> float:
    """The naive loader's floor: PyYAML's pure-Python SafeLoader over every file."""
    import yaml

    from knhk.validation.loader import RegistryFiles

    files = RegistryFiles(path)
    t0 = time.perf_counter()
    for blob in files.data.values():
        yaml.load(blob, Loader=yaml.SafeLoader)
    return time.perf_counter() - t0


def knhk_validate(v: WeaverValidator, batch: knhk.SpanBatch) -> tuple[int, float]:
    t0 = time.perf_counter()
    v.validate_batch(batch)
    return batch.num_rows, time.perf_counter() - t0


def peer_validate(peer: PerSpanValidator, spans: list) -> tuple[int, float]:
    t0 = time.perf_counter()
    peer.validate(spans)
    return len(spans), time.perf_counter() - t0


def check_agreement(v: WeaverValidator, peer: PerSpanValidator, batch: knhk.SpanBatch,
                    spans: list) -> None:
    report = v.validate_batch(batch)
    counts, levels = peer.validate(spans)
    assert report.code_counts.tolist() == counts, (report.code_counts.tolist(), counts)
    assert report.row_level.tolist() == levels


def _median(fn, runs: int) -> float:
    return float(np.median([fn() for _ in range(runs)]))


def scenarios(quick: bool = False) -> list[Result]:
    runs = 3 if quick else 5
    n = 200_000 if quick else 1_000_000
    n_peer = 20_000 if quick else 100_000
    results = []
    cache_dir = tempfile.mkdtemp(prefix="knhk-bench-cache-")

    cold = _median(lambda: cold_load_seconds(SEMCONV), runs)
    naive = _median(lambda: pure_python_yaml_seconds(SEMCONV), 1 if quick else 3)
    results.append(Result(
        "cold load + resolve of the semconv registry (250 files, 940 attributes)", "s", cold,
        naive, "PyYAML pure-Python SafeLoader parsing the same files (no resolution)",
        "<= 0.4 s", cold <= 0.4, runs, "CSafeLoader parse, resolution, compilation to tables"))
    warm = _median(lambda: warm_load_seconds(SEMCONV, cache_dir), runs)
    results.append(Result(
        "warm load of the semconv registry from the content-keyed cache", "s", warm, cold,
        "cold load (above)", "<= 0.03 s", warm <= 0.03, runs,
        "reads and hashes every file, then one JSON file of tables"))

    batch = make_batch(n)
    peer_batch = batch.slice(0, n_peer)
    peer_spans = python_spans(peer_batch)
    for label, path, target in (("full semconv registry", SEMCONV, 5e6),
                                ("knhk registry/", KNHK_REGISTRY, 2e7)):
        v = WeaverValidator(path, cache_dir=cache_dir)
        peer = PerSpanValidator(v.compiled)
        check_agreement(v, peer, peer_batch, peer_spans)
        v.validate_batch(batch)                                   # warm-up
        (k_rate, k_all), (p_rate, p_all) = paired_rates(  # interleaved: see _harness
            [lambda v=v: knhk_validate(v, batch), lambda p=peer: peer_validate(p, peer_spans)],
            runs)
        report = v.validate_batch(batch)
        results.append(Result(
            f"validate_batch, {n:,} spans x 6 attributes, {label}", "spans/s", k_rate, p_rate,
            "per-span Python validator over the same compiled registry",
            f">= {target / 1e6:.0f},000,000 spans/s and >= 50x the per-span validator",
            k_rate >= target and k_rate / p_rate >= 50, runs,
            f"peer on {n_peer:,} spans given as Python objects; "
            f"{report.num_findings:,} findings, {report.num_invalid:,} invalid rows",
            {"knhk_runs": k_all, "peer_runs": p_all, "counts": report.counts}))

    try:
        from knhk import workload

        wb = workload.generate(n // 2, workload.WorkloadConfig(seed=11))
        v = WeaverValidator(KNHK_REGISTRY, cache_dir=cache_dir)
        w_rate, w_all = median_rate(lambda: knhk_validate(v, wb), runs)
        per_span = wb.column("attributes").values.__len__() / wb.num_rows
        results.append(Result(
            f"validate_batch of the generated workload ({n // 2:,} spans), knhk registry/",
            "spans/s", w_rate, None, None, ">= 20,000,000 spans/s", w_rate >= 2e7, runs,
            f"{per_span:.1f} attributes per span", {"knhk_runs": w_all}))
    except ImportError as exc:
        results.append(Result("validate_batch of the generated workload", "spans/s",
                              float("nan"), notes=f"skipped: {exc}"))
    return results


# -- pytest-benchmark form ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("registry", [SEMCONV, KNHK_REGISTRY], ids=["semconv", "knhk"])
@pytest.mark.parametrize("n", [10_000, 100_000, 1_000_000])
def test_validate_batch(benchmark, cache_dir, registry, n):
    v = WeaverValidator(registry, cache_dir=cache_dir)
    batch = make_batch(n)
    report = benchmark(v.validate_batch, batch)
    assert report.num_rows == n


@pytest.mark.parametrize("registry", [SEMCONV, KNHK_REGISTRY], ids=["semconv", "knhk"])
@pytest.mark.parametrize("n", [10_000, 100_000])
def test_per_span_python_validator(benchmark, cache_dir, registry, n):
    v = WeaverValidator(registry, cache_dir=cache_dir)
    batch = make_batch(n)
    spans = python_spans(batch)
    peer = PerSpanValidator(v.compiled)
    check_agreement(v, peer, batch, spans)
    benchmark.pedantic(peer.validate, args=(spans,), rounds=3)


def test_cold_load(benchmark):
    benchmark.pedantic(cold_load_seconds, args=(SEMCONV,), rounds=3)


def test_warm_load(benchmark, cache_dir):
    load_compiled(SEMCONV, cache_dir=cache_dir)
    benchmark(load_compiled, SEMCONV, cache_dir=cache_dir)


if __name__ == "__main__":
    for r in scenarios(quick="--quick" in sys.argv):
        print(r.as_dict())
