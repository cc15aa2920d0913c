"""Live-check inputs (Weaver JSON, text, Arrow IPC), the report's shape, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from validation_testing import write_registry

import knhk
from knhk.validation import WeaverValidator
from knhk.validation.cli import live_check_main, registry_check_main
from knhk.validation.live_check import LiveCheck, LiveCheckInputError, detect_format, run

# The sample shapes of Weaver's own test data (crates/weaver_live_check/data/span.json,
# attributes.json, metrics.json), against the small registry.
SAMPLES = [
    {"span": {"name": "test.op", "kind": "internal", "attributes": [
        {"name": "t.int", "value": "nine"},
        {"name": "t.color", "value": "red"},
        {"name": "TaskId", "value": "x"}],
        "span_events": [{"name": "ev", "attributes": [{"name": "t.str", "value": 1}]}],
        "span_links": [{"attributes": [{"name": "t.header.k", "value": "v"}]}]}},
    {"attribute": {"name": "t.color", "value": "blue"}},
    {"name": "t.str"},
    {"name": "t.int", "type": "string"},
    {"metric": {"name": "v2.latency", "unit": "ms", "instrument": "counter", "data_points": [
        {"attributes": [{"name": "v2.size", "value": 3}], "value": 1},
        {"attributes": [], "bucket_counts": [0, 1], "count": 1, "sum": 0.5}]}},
    {"metric": {"name": "not.there", "unit": "1", "instrument": "gauge", "data_points": []}},
    {"metric": {"name": "test.requests", "unit": "{request}", "instrument": "summary"}},
    {"resource": {"attributes": [{"name": "t.str", "value": "svc"}]}},
]
RESOURCE = 7


@pytest.fixture
def v(small_registry, session_cache):
    return WeaverValidator(small_registry, cache_dir=session_cache)


def _advice(result):
    return sorted((a["id"], a["level"]) for a in result["all_advice"])


def test_json_samples_report_shape(v, tmp_path):
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(SAMPLES))
    lc = run(v, str(path))
    report = lc.report()
    assert set(report) == {"samples", "statistics"}
    span = report["samples"][0]["span"]
    assert _advice(span["live_check_result"]) == [
        ("opt_in_attribute_not_present", "information"),
        ("opt_in_attribute_not_present", "information"),
        ("required_attribute_not_present", "violation")]
    attrs = {a["name"]: a for a in span["attributes"]}
    assert _advice(attrs["t.int"]["live_check_result"]) == [("type_mismatch", "violation")]
    assert attrs["t.int"]["type"] == "string"
    assert _advice(attrs["t.color"]["live_check_result"]) == []
    assert attrs["t.color"]["live_check_result"]["highest_advice_level"] is None
    assert _advice(attrs["TaskId"]["live_check_result"]) == [("missing_attribute", "violation")]
    finding = attrs["TaskId"]["live_check_result"]["all_advice"][0]
    assert set(finding) == {"id", "level", "message", "context", "signal_type", "signal_name"}
    assert finding["signal_type"] == "span" and finding["signal_name"] == "test.op"
    event_attr = span["span_events"][0]["attributes"][0]
    assert _advice(event_attr["live_check_result"]) == [("type_mismatch", "violation")]
    link_attr = span["span_links"][0]["attributes"][0]
    assert _advice(link_attr["live_check_result"]) == [("template_attribute", "information")]
    blue = report["samples"][1]["attribute"]
    assert _advice(blue["live_check_result"]) == [("undefined_enum_variant", "information")]
    # no value: no type advice; a type without a value is echoed back
    assert _advice(report["samples"][2]["attribute"]["live_check_result"]) == []
    assert report["samples"][3]["attribute"]["type"] == "string"
    metric = report["samples"][4]["metric"]
    assert _advice(metric["live_check_result"]) == [("unexpected_instrument", "violation"),
                                                    ("unit_mismatch", "violation")]
    points = metric["data_points"]
    assert _advice(points[0]["live_check_result"]) == []
    assert _advice(points[1]["live_check_result"]) == [
        ("recommended_attribute_not_present", "improvement")]
    assert _advice(report["samples"][5]["metric"]["live_check_result"]) == [
        ("missing_metric", "violation")]
    summary = report["samples"][6]["metric"]["live_check_result"]["all_advice"]
    assert [(a["id"], a["message"]) for a in summary if a["id"] != "not_stable"] == [
        ("unexpected_instrument", "Instrument 'summary' is not supported")]
    assert "resource" in report["samples"][RESOURCE]
    json.dumps(report)                                   # serialisable as is


def test_statistics(v, tmp_path):
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(SAMPLES))
    st = run(v, str(path)).statistics()
    assert set(st) >= {"total_entities", "total_entities_by_type", "total_advisories",
                       "advice_level_counts", "highest_advice_level_counts", "no_advice_count",
                       "advice_type_counts", "seen_registry_attributes",
                       "seen_non_registry_attributes", "seen_registry_metrics",
                       "seen_non_registry_metrics", "registry_coverage"}
    assert st["total_entities_by_type"] == {
        "attribute": 10, "histogram_data_point": 1, "metric": 3, "number_data_point": 1,
        "resource": 1, "span": 1, "span_event": 1, "span_link": 1}
    assert st["total_entities"] == 19
    assert st["advice_type_counts"] == {
        "missing_attribute": 1, "missing_metric": 1, "not_stable": 1,
        "opt_in_attribute_not_present": 2, "recommended_attribute_not_present": 1,
        "required_attribute_not_present": 1, "template_attribute": 1, "type_mismatch": 2,
        "undefined_enum_variant": 1, "unexpected_instrument": 2, "unit_mismatch": 1}
    assert st["total_advisories"] == sum(st["advice_type_counts"].values())
    assert sum(st["advice_level_counts"].values()) == st["total_advisories"]
    assert st["no_advice_count"] + sum(st["highest_advice_level_counts"].values()) == \
        st["total_entities"]
    assert st["seen_non_registry_attributes"] == {"TaskId": 1}
    assert st["seen_registry_attributes"]["t.str"] == 3       # event, attribute, resource
    assert st["seen_registry_attributes"]["t.header"] == 1    # a template counts as itself
    assert "t.old" not in st["seen_registry_attributes"]      # deprecated: not in coverage
    assert st["seen_registry_metrics"] == {"test.requests": 1, "v2.latency": 1}
    assert st["seen_non_registry_metrics"] == {"not.there": 1}
    covered = sum(1 for c in st["seen_registry_attributes"].values() if c)
    assert st["registry_coverage"] == pytest.approx(covered / 13)


def test_text_input(v, tmp_path):
    path = tmp_path / "attrs.txt"
    path.write_text("t.str\n\nt.int=42\nt.int=forty\nt.strs=[\"a\", \"b\"]\nnope=1\n")
    lc = run(v, str(path))
    samples = [s["attribute"] for s in lc.report()["samples"]]
    assert [(s["name"], s["value"]) for s in samples] == [
        ("t.str", None), ("t.int", 42), ("t.int", "forty"), ("t.strs", ["a", "b"]), ("nope", 1)]
    assert [_advice(s["live_check_result"]) for s in samples] == [
        [], [], [("type_mismatch", "violation")], [], [("missing_attribute", "violation")]]


def test_ipc_input(v, tmp_path):
    spans = [knhk.Span("test.op", trace_id=i, span_id=i, kind=knhk.SpanKind.SERVER,
                       attributes={"t.str": "x"} if i % 2 else {"t.int": 1, "zz": 2})
             for i in range(1, 5)]
    batch = knhk.SpanBatch.from_spans(spans)
    path = tmp_path / "spans.arrow"
    with pa.ipc.new_file(path, batch.schema) as w:
        w.write_batch(batch.record_batch)
        w.write_batch(batch.record_batch)
    assert detect_format(str(path)) == "ipc"
    lc = run(v, str(path))
    samples = lc.report()["samples"]
    assert len(samples) == 8
    first, second = samples[0]["span"], samples[1]["span"]
    assert first["name"] == "test.op" and first["kind"] == "server"
    assert _advice(first["live_check_result"]) == [
        ("conditionally_required_attribute_not_present", "information"),
        ("opt_in_attribute_not_present", "information"),
        ("opt_in_attribute_not_present", "information"),
        ("recommended_attribute_not_present", "improvement")]
    assert ("required_attribute_not_present", "violation") in _advice(
        second["live_check_result"])
    zz = next(a for a in second["attributes"] if a["name"] == "zz")
    assert zz["value"] == 2 and zz["type"] == "int"
    assert _advice(zz["live_check_result"]) == [("missing_attribute", "violation")]
    st = lc.statistics()
    assert st["total_entities_by_type"] == {"attribute": 12, "span": 8}
    # a stream-format file is read too
    stream = tmp_path / "spans.arrows"
    with pa.ipc.new_stream(stream, batch.schema) as w:
        w.write_batch(batch.record_batch)
    assert len(run(v, str(stream)).report()["samples"]) == 4


def test_bad_inputs(v, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"span": {"name": "x", "attributes": [}]')
    with pytest.raises(LiveCheckInputError, match=r"bad.json:1:\d+: malformed JSON"):
        run(v, str(bad))
    bad.write_text('[{"span": {"name": "x"}, "metric": {}}]')
    with pytest.raises(LiveCheckInputError, match="sample 0 must have exactly one"):
        run(v, str(bad))
    bad.write_text('[{"span": {"name": "x", "attributes": [{"value": 1}]}}]')
    with pytest.raises(LiveCheckInputError, match="needs a string 'name'"):
        run(v, str(bad))
    with pytest.raises(LiveCheckInputError, match="no such file"):
        run(v, str(tmp_path / "missing.json"))
    arrow = tmp_path / "x.arrow"
    arrow.write_bytes(b"ARROW1\x00\x00garbage")
    with pytest.raises(LiveCheckInputError, match="not a readable Arrow IPC file"):
        run(v, str(arrow))


def test_fail_on(v):
    lc = LiveCheck(v)
    lc.check_sample({"attribute": {"name": "t.color", "value": "blue"}})    # information
    assert not lc.fails("violation") and not lc.fails("improvement")
    assert lc.fails("information") and not lc.fails("none")
    lc.check_sample({"attribute": {"name": "nope", "value": 1}})
    assert lc.fails("violation")


# -- CLI --------------------------------------------------------------------------------------


def test_live_check_cli_exit_codes_and_json(small_registry, session_cache, tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SAMPLES))
    out = tmp_path / "report.json"
    base = ["--registry", small_registry, "--input", str(path), "--cache-dir", session_cache]
    assert live_check_main([*base, "--format", "json", "--output", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["statistics"]["advice_type_counts"]["missing_metric"] == 1
    assert live_check_main([*base, "--fail-on", "none"]) == 0
    text = capsys.readouterr().out
    assert "[violation] missing_metric" in text and "registry coverage" in text
    only_info = tmp_path / "info.json"
    only_info.write_text(json.dumps([{"attribute": {"name": "t.color", "value": "blue"}}]))
    args = ["--registry", small_registry, "--input", str(only_info), "--cache-dir",
            session_cache]
    assert live_check_main(args) == 0
    assert live_check_main([*args, "--fail-on", "information"]) == 1
    assert live_check_main([*args, "--exclude", "undefined_enum_variant",
                            "--fail-on", "information"]) == 0
    assert live_check_main([*args, "--span-group", "bad"]) == 2
    assert live_check_main(["--registry", small_registry, "--input",
                            str(tmp_path / "none.json")]) == 2
    assert live_check_main(["--input", "x"]) == 2              # argparse: --registry missing


def test_registry_check_cli(small_registry, tmp_path, capsys):
    assert registry_check_main([small_registry, "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "attributes" in out and "15" in out
    assert registry_check_main([small_registry, "--format", "json", "--no-cache"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["attributes"] == 15
    bad = write_registry(Path(tmp_path / "bad"), {"x.yaml": """
        groups:
          - id: g
            type: span
            span_kind: client
            stability: stable
            brief: g
            attributes:
              - ref: nowhere
        """})
    assert registry_check_main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert "x.yaml:8: group 'g': ref 'nowhere' does not resolve" in err
    assert registry_check_main([str(bad), "--format", "json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["errors"][0]["line"] == 8
    assert registry_check_main([]) == 2


def test_registry_check_cli_real_registries(semconv_path, knhk_registry_path, tmp_path,
                                            capsys):
    assert registry_check_main([semconv_path, "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "attributes             940" in out
    assert registry_check_main([knhk_registry_path, "--no-cache"]) == 0


def test_a_damaged_ipc_file_is_an_input_error_not_a_crash(tmp_path, knhk_registry_path):
    from knhk.exporters.ipc import IpcFileWriter
    from knhk.workload import WorkloadConfig, generate_batches

    path = tmp_path / "w.arrow"
    with IpcFileWriter(path, knhk.SPAN_SCHEMA, compression=None) as w:
        for b in generate_batches(3000, config=WorkloadConfig(seed=2), batch_size=1000):
            w.write(b)
    data = bytearray(path.read_bytes())
    v = WeaverValidator(knhk_registry_path)
    # flip bytes across the file: each damaged copy is a clear input error or reads fine
    for offset in range(200, len(data) - 200, max(1, len(data) // 40)):
        damaged = tmp_path / f"d{offset}.arrow"
        bad = bytearray(data)
        bad[offset] ^= 0xFF
        damaged.write_bytes(bytes(bad))
        try:
            run(v, str(damaged))
        except LiveCheckInputError as exc:
            assert str(damaged) in str(exc)
