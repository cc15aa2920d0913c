"""Registry loading and resolution: the real semconv registry, knhk's own, and errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from validation_testing import SMALL_V1, write_registry

from knhk.errors import RegistryError
from knhk.validation import RegistryIssue, load_registry
from knhk.validation.loader import RegistryFiles


@pytest.fixture(scope="module")
def semconv(semconv_path):
    return load_registry(semconv_path)


def _count_definitions(root: str) -> tuple[set[str], int]:
    """Attribute keys defined in the YAML (v1 ``id``, v2 ``key``), read independently."""
    keys: set[str] = set()
    files = 0
    for path in Path(root).rglob("*.yaml"):
        files += 1
        doc = yaml.safe_load(path.read_text()) or {}
        for g in doc.get("groups") or []:
            keys.update(a["id"] for a in g.get("attributes") or [] if "id" in a)
        keys.update(a["key"] for a in doc.get("attributes") or [])
    return keys, files


# -- the real registry --------------------------------------------------------------------


def test_semconv_loads_with_its_940_attribute_keys(semconv, semconv_path):
    expected, n_files = _count_definitions(semconv_path)
    assert len(expected) == 940
    assert set(semconv.attributes) == expected
    assert len(semconv.files) == n_files == 250
    assert semconv.manifest["schema_url"] == "https://opentelemetry.io/schemas/1.44.0"
    assert "manifest.yaml" in semconv.files


def test_semconv_reads_both_syntaxes(semconv, semconv_path):
    v2_files = [p for p in Path(semconv_path).rglob("*.yaml")
                if "file_format: definition/2" in p.read_text()]
    assert len(v2_files) == 32
    # v2 attributes (server/registry.yaml) and v2 spans (faas/spans.yaml) both resolve
    assert semconv.attributes["server.port"].type == "int"
    faas = semconv.group("span.faas.datasource.server")
    assert faas is not None and faas.type == "span" and faas.span_kind == "server"
    levels = {a.key: a.requirement_level.level for a in faas.attributes}
    # from ref_group faas.attributes.server, and the span's own refs
    assert levels["faas.trigger"] == "required"
    assert levels["faas.document.collection"] == "required"
    assert levels["faas.coldstart"] == "recommended"


def test_semconv_ref_overrides_and_extends(semconv):
    client = semconv.group("span.http.client")
    levels = {a.key: a.requirement_level for a in client.attributes}
    # own ref
    assert levels["url.full"].level == "required"
    assert levels["http.request.method_original"].level == "conditionally_required"
    assert "different" in levels["http.request.method_original"].text
    assert levels["http.request.resend_count"].level == "recommended"
    assert levels["http.request.resend_count"].text.startswith("if and only if")
    # inherited through extends attributes.http.client -> attributes.http.common
    assert levels["server.address"].level == "required"
    assert levels["http.request.method"].level == "required"
    # the ref's brief/note override the definition's; the type comes from the definition
    addr = client.attribute("server.address")
    assert "request target" in addr.note
    assert addr.type == semconv.attributes["server.address"].type == "string"


def test_semconv_refinement_inherits_from_its_span(semconv):
    refined = semconv.group("span.messaging.rocketmq.send.producer")
    base = semconv.group("span.messaging.send.producer")
    assert refined.refines == "span.messaging.send.producer" and refined.type == "span"
    assert {a.key for a in base.attributes} <= {a.key for a in refined.attributes}
    assert refined.attribute("messaging.rocketmq.namespace").requirement_level.level == \
        "required"
    assert refined.span_kind == base.span_kind == "producer"


def test_semconv_enums_templates_deprecations(semconv):
    method = semconv.attributes["http.request.method"]
    assert method.is_enum and {"GET", "POST", "_OTHER"} <= method.enum_values
    code = semconv.attributes["rpc.grpc.status_code"]
    assert code.is_enum and code.value_type == "int" and code.enum_values == set(range(17))
    header = semconv.attributes["http.request.header"]
    assert header.is_template and header.value_type == "string[]"
    assert semconv.find_template("http.request.header.content-type") is header
    assert semconv.find_template("http.request.headerx") is None
    old = semconv.attributes["http.method"]
    assert old.deprecated.reason == "renamed"
    assert old.deprecated.renamed_to == "http.request.method"
    reasons = Counter(a.deprecated.reason for a in semconv.attributes.values() if a.deprecated)
    assert set(reasons) <= {"renamed", "obsoleted", "uncategorized"} and sum(
        reasons.values()) == 206
    stabilities = {a.stability for a in semconv.attributes.values()}
    assert "experimental" not in stabilities and "development" in stabilities


def test_semconv_metric_groups(semconv):
    m = semconv.metric("http.server.request.duration")
    assert m.instrument == "histogram" and m.unit == "s" and m.stability == "stable"
    refined = semconv.group("metric.hw.enclosure.status")
    assert refined.refines == "metric.hw.status"
    assert refined.metric_name == "hw.status" and refined.instrument == \
        semconv.metric("hw.status").instrument
    assert semconv.metric("hw.status").refines is None   # the base answers the name


def test_knhk_registry_loads_with_workflow_execute(knhk_registry_path):
    reg = load_registry(knhk_registry_path)
    group = reg.span_group("workflow.execute")
    assert group is not None
    levels = {a.key: a.requirement_level.level for a in group.attributes}
    assert levels["workflow.id"] == "required"
    assert levels["workflow.pattern"] == "required"


# -- resolution rules on a handwritten registry ----------------------------------------------


def test_small_registry_resolution(small_registry):
    reg = load_registry(small_registry)
    assert reg.manifest["name"] == "small"
    op = reg.group("test.op")
    attrs = {a.key: a for a in op.attributes}
    assert list(attrs) == ["t.str", "t.int", "t.color", "t.header", "t.bool"]
    assert attrs["t.str"].requirement_level.level == "required"          # from extends
    # the child's own ref keeps the inherited level it does not set
    assert attrs["t.int"].requirement_level.level == "conditionally_required"
    assert attrs["t.int"].note == "refined note"
    assert attrs["t.bool"].requirement_level.level == "opt_in"
    assert attrs["t.bool"].requirement_level.text == "if set"
    color = reg.attributes["t.color"]
    assert [m.value for m in color.members] == ["red", "green"]          # value defaults to id
    assert reg.attributes["t.gone"].stability == "development"           # experimental alias
    assert reg.attributes["t.gone"].deprecated.reason == "unspecified"   # string form
    refined = reg.group("v2.op.refined")
    assert refined.span_kind == "client" and refined.stability == "development"
    assert refined.attribute("v2.size").requirement_level.level == "required"  # via ref_group
    assert refined.attribute("t.color").requirement_level.level == "required"
    assert reg.span_group("v2.op") is reg.group("span.v2.op")
    assert reg.metric("v2.latency").unit == "s"


def test_hidden_files_and_yml_and_empty_files(tmp_path):
    write_registry(tmp_path, {
        "a.yml": "groups:\n  - id: g\n    type: attribute_group\n    brief: b\n"
                 "    attributes:\n      - id: a.x\n        type: int\n        brief: x\n"
                 "        stability: stable\n",
        ".hidden.yaml": "this: [is not: valid",
        ".git/config.yaml": "also: [broken",
        "empty.yaml": "",
        "notes.txt": "not yaml at all: [",
    })
    reg = load_registry(tmp_path)
    assert set(reg.attributes) == {"a.x"}
    assert reg.files == ("a.yml", "empty.yaml")


# -- errors ----------------------------------------------------------------------------------


def _errors(tmp_path: Path, files: dict[str, str]) -> list[RegistryIssue]:
    write_registry(tmp_path, files)
    with pytest.raises(RegistryError) as info:
        load_registry(tmp_path)
    assert isinstance(info.value, ValueError)          # RegistryError is a ValueError
    issues = info.value.errors
    assert issues and all(isinstance(i, RegistryIssue) for i in issues)
    for i in issues:                                   # every issue is in the message
        assert str(i) in str(info.value)
    return issues


GOOD_ATTR = """
groups:
  - id: registry.ok
    type: attribute_group
    brief: ok
    attributes:
      - id: ok.name
        type: string
        stability: stable
        brief: a name
"""


def test_malformed_yaml_names_file_and_line(tmp_path):
    issues = _errors(tmp_path, {"ok.yaml": GOOD_ATTR, "bad/broken.yaml": """
        groups:
          - id: g
            type: span
            brief: [unclosed
            stability: stable
        """})
    (issue,) = issues
    assert issue.file == "bad/broken.yaml"
    assert issue.line in (4, 5)
    assert "malformed YAML" in issue.message


def test_python_object_tag_is_refused(tmp_path):
    issues = _errors(tmp_path, {"evil.yaml": """
        groups:
          - id: g
            type: attribute_group
            brief: !!python/object/apply:os.system ["echo pwned"]
        """})
    (issue,) = issues
    assert issue.file == "evil.yaml" and issue.line == 4
    assert "!!python/object/apply:os.system" in issue.message
    assert "safe_load" in issue.message


def test_dangling_ref_names_file_line_and_group(tmp_path):
    issues = _errors(tmp_path, {"ok.yaml": GOOD_ATTR, "spans.yaml": """
        groups:
          - id: span.op
            type: span
            span_kind: internal
            stability: stable
            brief: op
            attributes:
              - ref: ok.name
              - ref: no.such.attribute
                requirement_level: required
        """})
    (issue,) = issues
    assert (issue.file, issue.line, issue.group) == ("spans.yaml", 9, "span.op")
    assert "no.such.attribute" in issue.message and "does not resolve" in issue.message


def test_dangling_extends_and_ref_group(tmp_path):
    issues = _errors(tmp_path, {"ok.yaml": GOOD_ATTR, "x.yaml": """
        groups:
          - id: child
            type: attribute_group
            brief: c
            extends: missing.parent
        """, "v2.yaml": """
        file_format: definition/2
        spans:
          - type: s
            kind: client
            name: {note: s}
            stability: stable
            brief: s
            attributes:
              - ref_group: missing.group
        """})
    by_file = {i.file: i for i in issues}
    assert "missing.parent" in by_file["x.yaml"].message and by_file["x.yaml"].line == 5
    assert by_file["x.yaml"].group == "child"
    assert "missing.group" in by_file["v2.yaml"].message and by_file["v2.yaml"].line == 9
    assert by_file["v2.yaml"].group == "span.s"


def test_extends_cycle(tmp_path):
    issues = _errors(tmp_path, {"ok.yaml": GOOD_ATTR, "cycle.yaml": """
        groups:
          - id: a
            type: attribute_group
            brief: a
            extends: b
          - id: b
            type: attribute_group
            brief: b
            extends: c
          - id: c
            type: attribute_group
            brief: c
            extends: a
        """})
    assert len(issues) == 1
    (issue,) = issues
    assert "cycle" in issue.message and "a -> b -> c -> a" in issue.message
    assert issue.file == "cycle.yaml" and issue.group == "a" and issue.line == 2


def test_unknown_key_points_at_the_key(tmp_path):
    issues = _errors(tmp_path, {"k.yaml": """
        groups:
          - id: g
            type: attribute_group
            brief: b
            atributes: []
            attributes:
              - id: g.x
                type: int
                brief: x
                stability: stable
                requirement: required
        """})
    by_line = {i.line: i for i in issues}
    assert set(by_line) == {5, 11}
    assert "'atributes'" in by_line[5].message and by_line[5].group == "g"
    assert "'requirement'" in by_line[11].message


def test_type_errors(tmp_path):
    issues = _errors(tmp_path, {"t.yaml": """
        groups:
          - id: g
            type: attribute_group
            brief: 12
            attributes:
              - id: g.a
                type: strng
                brief: a
                stability: stable
              - id: g.b
                type: int
                brief: b
                stability: solid
              - id: g.c
                type: int
                brief: c
                stability: stable
                requirement_level: mandatory
              - id: g.d
                type: int
                brief: d
                stability: stable
                deprecated:
                  reason: renamed
          - id: m
            type: metric
            brief: m
            stability: stable
            metric_name: m
            instrument: meter
            unit: s
        """})
    messages = {i.line: i.message for i in issues}
    assert "'brief' must be a string" in messages[4]
    assert "unknown type 'strng'" in messages[7]
    assert "stability must be one of" in messages[13]
    assert "requirement_level" in messages[18] and "mandatory" in messages[18]
    assert "renamed_to" in messages[23]
    assert "instrument must be one of" in messages[30]


def test_duplicate_definitions_and_group_ids(tmp_path):
    issues = _errors(tmp_path, {"a.yaml": GOOD_ATTR, "b.yaml": GOOD_ATTR})
    messages = " ".join(i.message for i in issues)
    assert "defined twice" in messages and "used twice" in messages


def test_errors_across_files_are_all_reported(tmp_path):
    issues = _errors(tmp_path, {
        "one.yaml": "groups: {not: a list}",
        "two.yaml": "- just\n- a list\n",
        "three.yaml": "groups:\n  - id: x\n    type: spam\n    brief: b\n",
    })
    assert {i.file for i in issues} == {"one.yaml", "two.yaml", "three.yaml"}


def test_not_a_directory(tmp_path):
    with pytest.raises(RegistryError, match="not a directory"):
        load_registry(tmp_path / "missing")


def test_content_key_changes_with_content(tmp_path):
    write_registry(tmp_path, {"r.yaml": SMALL_V1})
    k1 = RegistryFiles(tmp_path).content_key
    assert RegistryFiles(tmp_path).content_key == k1
    (tmp_path / "r.yaml").write_text(SMALL_V1.replace("a string", "a text"))
    assert RegistryFiles(tmp_path).content_key != k1
