"""Tail sampling's string_attribute regexes: RE2, refusals at configuration time, serve YAML.

The hostile case (catastrophic patterns over long attribute values, in a
pipeline and in ``knhk serve``) is in tests/reliability/test_hostile_regex.py.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys

import pytest

import knhk
from knhk._regex import LinearPattern
from knhk.tail_sampling import Policy, TailSampler, TailSamplingConfig


def sample(policies, users):
    now = [0.0]
    sampler = TailSampler(TailSamplingConfig(policies=policies, decision_wait=10.0,
                                             idle_timeout=1.0), clock=lambda: now[0])
    spans = [knhk.Span("op", trace_id=i + 1, span_id=i + 1, attributes={"user": u})
             for i, u in enumerate(users)]
    sampler.process(knhk.SpanBatch.from_spans(spans))
    now[0] = 5.0
    out = sampler.flush()
    return sampler, sorted(out.attribute("user").to_pylist())


USERS = ["admin", "Admin-2", "bob", "root\n", "svc-admin", ""]


@pytest.mark.parametrize("values", [["^adm"], ["admin$", "^b"], ["[A-Z]"], [r"\d$", "^$"]])
def test_regex_policy_keeps_what_python_re_finds_on_ordinary_patterns(values):
    _, kept = sample([Policy.string_attribute("p", "user", values,
                                              enabled_regex_matching=True)], USERS)
    # the Collector never matches an empty value
    want = sorted(u for u in USERS if u and any(re.search(v, u) for v in values))
    assert kept == want


def test_nested_and_drop_policies_compile_their_patterns_with_re2():
    inner = {"name": "rx", "type": "string_attribute",
             "string_attribute": {"key": "user", "values": ["adm"],
                                  "enabled_regex_matching": True}}
    policies = [Policy.always_sample("all"), Policy.drop("no-admins", [inner])]
    sampler, kept = sample(policies, USERS)
    assert kept == sorted(u for u in USERS if "adm" not in u)
    leaves = [n for n in sampler._engine.leaves if n.type == "string_attribute"]
    assert leaves and all(isinstance(p, LinearPattern) for n in leaves for p in n.patterns)


def test_config_with_regex_policies_still_pickles():
    cfg = TailSamplingConfig(policies=[Policy.string_attribute(
        "p", "user", ["^a+$"], enabled_regex_matching=True)])
    back = pickle.loads(pickle.dumps(cfg))
    assert back.policies[0].params["values"] == ["^a+$"]


@pytest.mark.parametrize("value, words", [
    (r"(\w+)-\1", "RE2 has no backreferences"),
    ("^(?!health)", "RE2 has no negative lookahead"),
    ("(", "missing )"),
])
def test_refused_patterns_name_the_policy_and_the_value(value, words):
    with pytest.raises(ValueError) as err:
        Policy.from_dict({"name": "users", "type": "string_attribute", "string_attribute": {
            "key": "user", "values": ["^ok", value], "enabled_regex_matching": True}})
    text = str(err.value)
    assert text.startswith("Tail sampling policy 'users': string_attribute.values[1] is not a "
                           f"valid regular expression: cannot compile regular expression "
                           f"{value!r} with RE2")
    assert words in text
    # without enabled_regex_matching the value is a plain string, so nothing is refused
    Policy.string_attribute("users", "user", [value])


YAML = """\
receivers:
  otlp:
    protocols:
      grpc: {endpoint: "127.0.0.1:0"}
processors:
  tail_sampling:
    decision_wait: 1s
    policies:
      - name: all
        type: always_sample
      - name: users
        type: string_attribute
        string_attribute:
          key: user
          values: ["^adm", "(?<!x)y"]
          enabled_regex_matching: true
exporters:
  debug: {}
service:
  pipelines:
    traces: {receivers: [otlp], processors: [tail_sampling], exporters: [debug]}
"""


def test_serve_config_refuses_the_pattern_with_file_line_and_key_path(tmp_path):
    from knhk.serve import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(YAML, source="evil.yaml")
    text = str(err.value)
    # line 11: the bad policy itself (not the tail_sampling key)
    assert text.startswith("evil.yaml:11: processors.tail_sampling: Tail sampling policies[1] "
                           "'users': string_attribute.values[1] is not a valid regular "
                           "expression"), text
    assert "'(?<!x)y'" in text and "RE2 has no negative lookbehind" in text
    # and the command line says the same and exits 2 before starting anything
    path = tmp_path / "evil.yaml"
    path.write_text(YAML)
    done = subprocess.run([sys.executable, "-m", "knhk", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"{path}:11: processors.tail_sampling:" in done.stderr
    assert "RE2 has no negative lookbehind" in done.stderr
