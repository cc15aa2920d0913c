"""knhk.serve.config: YAML loading, ${env:...} substitution and schema errors with key paths."""

from __future__ import annotations

import glob
import os
import textwrap

import pytest
import yaml

from knhk.serve.config import (
    DEFAULT_CONFIG,
    ConfigError,
    default_config,
    load_config,
    parse_config,
    parse_duration,
    validate_config,
)

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                                         "*.yaml")))

MINIMAL = """\
receivers:
  otlp:
    protocols:
      grpc: {endpoint: "localhost:4317"}
exporters:
  debug: {}
service:
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [debug]
"""


def _error(text: str, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="k.yaml", environ=env)
    return str(info.value)


def test_minimal_config_passes_and_keeps_values():
    cfg = parse_config(MINIMAL, environ={})
    assert cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "localhost:4317"
    assert cfg["service"]["pipelines"]["traces"]["exporters"] == ["debug"]


def test_env_substitution_default_set_typed_and_escaped():
    text = """\
    receivers:
      otlp:
        protocols:
          grpc: {endpoint: "${env:HOST:-localhost}:${env:PORT}"}
    processors:
      batch: {send_batch_size: "${env:BATCH}", timeout: "${env:TIMEOUT:-250ms}"}
    exporters:
      otlp/up:
        endpoint: "up:4317"
        headers: {authorization: "Bearer $${not_a_ref} ${env:TOKEN}"}
    service:
      pipelines:
        traces: {receivers: [otlp], processors: [batch], exporters: [otlp/up]}
    """
    cfg = parse_config(textwrap.dedent(text), environ={"PORT": "4999", "BATCH": "128",
                                                        "TOKEN": "s3cret"})
    assert cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "localhost:4999"
    # a value that is one reference is typed like YAML: an int here
    assert cfg["processors"]["batch"]["send_batch_size"] == 128
    assert cfg["processors"]["batch"]["timeout"] == "250ms"
    assert cfg["exporters"]["otlp/up"]["headers"]["authorization"] == \
        "Bearer ${not_a_ref} s3cret"


def test_unset_variable_without_default_names_variable_and_key_path():
    msg = _error(MINIMAL.replace('"localhost:4317"', '"${env:KNHK_NO_SUCH_VAR}"'))
    assert msg.startswith("k.yaml:4: receivers.otlp.protocols.grpc.endpoint: ")
    assert "KNHK_NO_SUCH_VAR is not set" in msg


def test_unsupported_reference_scheme_is_refused():
    msg = _error(MINIMAL.replace('"localhost:4317"', '"${file:/etc/passwd}"'))
    assert "receivers.otlp.protocols.grpc.endpoint" in msg and "${file:/etc/passwd}" in msg


@pytest.mark.parametrize(("change", "path", "words"), [
    (("debug: {}", "debug: {}\n  nope/x: {}"), "exporters.nope/x", "unknown exporter type 'nope'"),
    (("debug: {}", "debug: {verbosity: loud}"), "exporters.debug.verbosity",
     "expected one of"),
    (("debug: {}", "debug: {colour: red}"), "exporters.debug.colour", "unknown key"),
    (('"localhost:4317"', "4317"), "receivers.otlp.protocols.grpc.endpoint",
     "expected 'host:port'"),
    (("grpc:", "grpx:"), "receivers.otlp.protocols.grpx", "unknown key; known keys: grpc, http"),
    (("exporters: [debug]", "exporters: [debug, otlp/backend]"),
     "service.pipelines.traces.exporters", "exporter 'otlp/backend' is not defined"),
    (("receivers: [otlp]", "receivers: [otlp/2]"), "service.pipelines.traces.receivers",
     "receiver 'otlp/2' is not defined"),
    (("traces:", "logs:"), "service.pipelines.logs", "unknown pipeline type 'logs'"),
    (("exporters: [debug]", "exporters: debug"), "service.pipelines.traces.exporters",
     "expected a list"),
])
def test_mistakes_name_the_key_path_and_line(change, path, words):
    msg = _error(MINIMAL.replace(*change))
    assert f": {path}: " in msg, msg
    assert words in msg, msg
    # the line named is the line of the key in the file
    line = int(msg.split(":")[1])
    key = path.rsplit(".", 1)[-1]
    text = MINIMAL.replace(*change)
    assert key in text.splitlines()[line - 1], (line, msg)


def test_wrong_type_of_a_processor_setting():
    text = MINIMAL.replace("exporters:\n", "processors:\n  batch: {send_batch_size: -5}\n"
                           "exporters:\n", 1)
    msg = _error(text)
    assert "processors.batch.send_batch_size" in msg and "positive integer" in msg


def test_duration_values_are_checked():
    text = MINIMAL.replace("exporters:\n", "processors:\n  batch: {timeout: soon}\n"
                           "exporters:\n", 1)
    assert "processors.batch.timeout: expected a duration" in _error(text)
    assert parse_duration("1h2m3.5s") == 3723.5


def test_duplicate_keys_are_an_error_not_a_silent_override():
    msg = _error(MINIMAL + "exporters:\n  debug: {}\n")
    assert "duplicate key" in msg and "exporters" in msg


def test_yaml_syntax_error_names_the_line():
    msg = _error("receivers: {otlp: [\n")
    assert msg.startswith("k.yaml:") and "not valid YAML" in msg


def test_span_processor_in_a_metrics_pipeline_is_refused():
    text = MINIMAL + """\
    metrics:
      receivers: [otlp]
      processors: [tail_sampling]
      exporters: [debug]
processors:
  tail_sampling: {policies: [{name: all, type: always_sample}]}
"""
    msg = _error(text)
    assert "service.pipelines.metrics.processors" in msg and "works on spans" in msg


def test_a_port_owning_exporter_in_two_pipelines_is_refused():
    text = MINIMAL.replace("debug: {}", "debug: {}\n  prometheus: {endpoint: localhost:0}")
    text = text.replace("receivers:\n  otlp:", "receivers:\n  otlp/2:\n    protocols: "
                        "{http: {}}\n  otlp:")
    text = text.replace("exporters: [debug]", "exporters: [prometheus]") + """\
    traces/2:
      receivers: [otlp/2]
      exporters: [prometheus]
"""
    msg = _error(text)
    assert "service.pipelines.traces/2.exporters" in msg
    assert "exporter 'prometheus' is already used by pipeline 'traces'" in msg


def test_a_receiver_may_feed_several_traces_pipelines():
    cfg = parse_config(MINIMAL + """\
    traces/2:
      receivers: [otlp]
      exporters: [debug]
""")
    assert [p["receivers"] for p in cfg["service"]["pipelines"].values()] == [["otlp"]] * 2


def test_tail_sampling_errors_are_forwarded_with_the_key_path():
    text = MINIMAL.replace("exporters:\n", "processors:\n  tail_sampling:\n"
                           "    policies: [{name: p, type: nonsense}]\nexporters:\n", 1)
    msg = _error(text)
    assert "processors.tail_sampling" in msg and "nonsense" in msg


def test_undefined_service_extension():
    msg = _error(MINIMAL + "  extensions: [health_check]\n")
    assert "service.extensions" in msg and "'health_check' is not defined" in msg


def test_default_config_is_valid_and_round_trips_through_yaml():
    validate_config(DEFAULT_CONFIG)
    text = yaml.safe_dump(default_config())
    assert parse_config(text, environ={}) == DEFAULT_CONFIG
    pipeline = DEFAULT_CONFIG["service"]["pipelines"]["traces"]
    assert {"knhk_validation", "red_windows", "service_graph", "adaptive_sampling"} <= \
        set(pipeline["processors"])
    assert DEFAULT_CONFIG["exporters"]["prometheus"]["endpoint"] == "localhost:9464"


def test_default_config_copy_is_independent():
    cfg = default_config()
    cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] = "localhost:0"
    assert DEFAULT_CONFIG["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == \
        "localhost:4317"


def test_examples_exist_and_validate():
    assert len(EXAMPLES) >= 2
    for path in EXAMPLES:
        cfg = load_config(path, environ={})
        assert cfg["service"]["pipelines"], path


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(tmp_path / "none.yaml")


def test_a_bad_tail_sampling_policy_is_reported_at_its_own_line(tmp_path):
    path = tmp_path / "tail.yaml"
    path.write_text(
        "receivers: {otlp: {protocols: {http: {endpoint: 'localhost:0'}}}}\n"  # 1
        "processors:\n"  # 2
        "  tail_sampling:\n"  # 3
        "    policies:\n"  # 4
        "      - {name: ok, type: always_sample}\n"  # 5
        "      - name: slow\n"  # 6
        "        type: latency\n"  # 7
        "        latency: {threshold_ms: -5}\n"  # 8
        "exporters: {debug: {}}\n"
        "service: {pipelines: {traces: {receivers: [otlp], processors: [tail_sampling],"
        " exporters: [debug]}}}\n")
    with pytest.raises(ConfigError, match=r"tail\.yaml:6: processors\.tail_sampling: .*"
                                          r"policies\[1\] 'slow'"):
        load_config(str(path))
