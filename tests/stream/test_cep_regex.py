"""CEP matchers' regular expressions: RE2 semantics, conversions of re.Pattern, clear refusals.

The hostile case (a catastrophic pattern over 4,000-character names inside a
running pipeline) is in tests/reliability/test_hostile_regex.py, in a child
process with a timeout.
"""

from __future__ import annotations

import re

import pytest

import knhk
from knhk.stream.cep import Matcher


def batch(names: list[str], users: list[str | None]) -> knhk.SpanBatch:
    return knhk.SpanBatch.from_spans([
        knhk.Span(n, trace_id=i + 1, span_id=i + 1, attributes={} if u is None else {"user": u})
        for i, (n, u) in enumerate(zip(names, users, strict=True))])


def test_name_regex_and_attribute_patterns_match_as_python_re_on_ordinary_input():
    names = ["GET /users/1", "POST /users", "get /Users/22", "DELETE /x"]
    users = ["Bob", "alice", None, "bobby"]
    b = batch(names, users)
    for pat in [r"^(GET|POST) /users", r"/\d+$", r"[a-z]+ /[A-Z]", r"users?/?"]:
        want = [re.search(pat, n) is not None for n in names]
        assert Matcher(name_regex=pat).mask(b).tolist() == want, pat
        py = re.compile(pat)  # a compiled re.Pattern is accepted, as before
        assert Matcher(name_regex=py).mask(b).tolist() == want, pat
    rx = re.compile(r"^bob", re.IGNORECASE)
    want = [u is not None and rx.search(u) is not None for u in users]
    assert want == [True, False, False, True]
    assert Matcher(attributes={"user": rx}).mask(b).tolist() == want


def test_a_name_longer_than_the_cap_never_ends_at_the_cut():
    b = batch(["a" * 5000 + "!", "a" * 5000, "b" + "a" * 10], [None] * 3)
    # searched in the first 4096 characters; $ is the real end of the name
    assert Matcher(name_regex="a$").mask(b).tolist() == [False, False, True]
    assert Matcher(name_regex="^a{100}").mask(b).tolist() == [True, True, False]
    assert Matcher(name_regex="!").mask(b).tolist() == [False, False, False]


@pytest.mark.parametrize("make, words", [
    (lambda: Matcher(name_regex=r"^(?!health)"), ["Matcher name_regex", "'^(?!health)'",
                                                  "no negative lookahead"]),
    (lambda: Matcher(name_regex=r"(\w)\1"), ["Matcher name_regex", "no backreferences"]),
    (lambda: Matcher(attributes={"user": re.compile(r"(?<=x)y")}),
     ["Matcher attributes['user']", "no lookbehind"]),
    (lambda: Matcher(attributes={"user": re.compile("a b", re.VERBOSE)}),
     ["Matcher attributes['user']", "VERBOSE"]),
    (lambda: Matcher(name_regex=42), ["Matcher name_regex", "got int"]),
])
def test_patterns_re2_refuses_fail_when_the_matcher_is_built(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value), str(err.value)
