"""OTLP/JSON: the specification's encoding rules, checked on hand-written JSON."""

from __future__ import annotations

import json

import pytest

import knhk
from knhk import _attributes
from knhk.otlp import OtlpDecodeError
from knhk.otlp.json import decode_traces_json, encode_traces_json
from knhk.workload import WorkloadConfig, generate

# shaped like the example in the OTLP specification's repository (examples/trace.json)
SPEC_EXAMPLE = """{
  "resourceSpans": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]},
    "scopeSpans": [{
      "scope": {"name": "my.library", "version": "1.0.0",
                "attributes": [{"key": "my.scope.attribute",
                                "value": {"stringValue": "some scope attribute"}}]},
      "spans": [{
        "traceId": "5B8EFFF798038103D269B633813FC60C",
        "spanId": "EEE19B7EC3C1B174",
        "parentSpanId": "EEE19B7EC3C1B173",
        "name": "I'm a server span",
        "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": 1544712661000000000,
        "kind": 2,
        "attributes": [
          {"key": "my.span.attr", "value": {"stringValue": "some value"}},
          {"key": "n", "value": {"intValue": "-42"}},
          {"key": "b", "value": {"boolValue": true}},
          {"key": "d", "value": {"doubleValue": 0.5}},
          {"key": "raw", "value": {"bytesValue": "aGk="}},
          {"key": "arr", "value": {"arrayValue": {"values": [{"intValue": 1},
                                                             {"stringValue": "x"}]}}},
          {"key": "kv", "value": {"kvlistValue": {"values": [
              {"key": "inner", "value": {"doubleValue": 1.5}}]}}}
        ],
        "events": [{"timeUnixNano": "1544712660500000000", "name": "ev"}],
        "links": [{"traceId": "00000000000000000000000000000001",
                   "spanId": "0000000000000002", "flags": 256}],
        "status": {"code": 2, "message": "bad"},
        "someFutureField": {"ignored": true}
      }]
    }]
  }]
}"""


def test_the_specification_example_decodes():
    batch = decode_traces_json(SPEC_EXAMPLE)
    row = batch.to_pylist()[0]
    assert row["trace_id"].hex() == "5b8efff798038103d269b633813fc60c"
    assert row["span_id"].hex() == "eee19b7ec3c1b174"
    assert row["parent_span_id"].hex() == "eee19b7ec3c1b173"
    assert (row["kind"], row["status_code"], row["status_message"]) == (2, 2, "bad")
    assert (row["start_time_ns"], row["end_time_ns"]) == (1544712660000000000,
                                                           1544712661000000000)
    assert row["service"] == "my.service" and row["scope_name"] == "my.library"
    assert _attributes.attributes_dict(row["attributes"]) == {
        "my.span.attr": "some value", "n": -42, "b": True, "d": 0.5, "raw": b"hi",
        "arr": [1, "x"], "kv": {"inner": 1.5}}
    assert row["events"][0]["time_unix_nano"] == 1544712660500000000
    assert row["links"][0]["flags"] == 256


def test_encoding_follows_the_json_rules():
    batch = decode_traces_json(SPEC_EXAMPLE)
    obj = json.loads(encode_traces_json(batch))
    span = obj["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "5b8efff798038103d269b633813fc60c"      # hex, not base64
    assert span["parentSpanId"] == "eee19b7ec3c1b173"
    assert span["kind"] == 2                                          # enums as integers
    assert span["startTimeUnixNano"] == "1544712660000000000"         # 64-bit as strings
    assert span["links"][0]["spanId"] == "0000000000000002"
    assert decode_traces_json(encode_traces_json(batch)).equals(batch)


def test_workload_round_trip():
    batch = generate(100, WorkloadConfig(seed=4))
    assert decode_traces_json(encode_traces_json(batch)).to_pylist() == batch.to_pylist()


@pytest.mark.parametrize(("body", "words"), [
    ("not json", "malformed OTLP/JSON"),
    ("[]", "top level must be an object"),
    ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}', "must be hex"),
    ('{"resourceSpans": 5}', "malformed OTLP/JSON"),
    ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "00", "spanId": "01"}]}]}]}',
     "trace_id must be 16 bytes"),
    ('{"a":' * 5000 + "1" + "}" * 5000, "malformed OTLP/JSON"),
], ids=["not-json", "array", "bad-hex", "wrong-shape", "short-id", "deep"])
def test_bad_json_is_a_clear_error(body, words):
    with pytest.raises(OtlpDecodeError, match=words):
        decode_traces_json(body)


def test_empty_request():
    assert decode_traces_json("{}").num_rows == 0
    assert json.loads(encode_traces_json(knhk.SpanBatch.empty())) == {}
