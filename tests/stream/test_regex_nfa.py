"""The regex state machine of CEP patterns against Python's re on the same words."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knhk.stream.regex_nfa import RegexNfa

LETTERS = "ABC"


def _patterns():
    atom = st.sampled_from(["A", "B", "C", ".", "[AB]", "[BC]"])

    def extend(inner):
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda p: f"({p[0]}|{p[1]})"),
            inner.map(lambda p: f"({p})*"),
            inner.map(lambda p: f"({p})+"),
            inner.map(lambda p: f"({p})?"),
            st.tuples(inner, st.integers(0, 2), st.integers(0, 2)).map(
                lambda p: f"({p[0]}){{{min(p[1], p[2])},{max(p[1], p[2])}}}"),
        )

    return st.recursive(atom, extend, max_leaves=5)


WORDS = ["".join(w) for n in range(6) for w in itertools.product(LETTERS, repeat=n)]


@settings(max_examples=150, deadline=None)
@given(_patterns())
def test_nfa_accepts_exactly_what_re_fullmatch_accepts(pattern):
    nfa = RegexNfa(pattern, LETTERS)
    rx = re.compile(pattern)
    for word in WORDS:
        assert nfa.accepts(word) == bool(rx.fullmatch(word)), (pattern, word)


def test_advance_steps_many_keys_with_window_and_length_bounds():
    nfa = RegexNfa("AB+C", LETTERS)
    n = nfa.num_states
    never = np.iinfo(np.int64).min
    st_t = np.full((2, n), never, np.int64)
    st_seq = np.zeros((2, n), np.int64)
    # key 0: A B C at t = 0, 1, 2 (within 10); key 1: A B C at t = 0, 5, 20 (too slow)
    hits = []
    for i, (t0, t1) in enumerate([(0, 0), (1, 5), (2, 20)]):
        hit = nfa.advance(st_t, st_seq, np.array([i, i]), np.array([t0, t1]),
                          np.array([i, i]), 10, 64)
        hits.append(hit.tolist())
    assert hits == [[False, False], [False, False], [True, False]]
    # the same run is too long for max_history 2
    st_t[:], st_seq[:] = never, 0
    out = [nfa.advance(st_t[:1], st_seq[:1], np.array([s]), np.array([i]), np.array([i]),
                       10, 2)[0] for i, s in enumerate([0, 1, 2])]
    assert out == [False, False, False]


@pytest.mark.parametrize("bad, what", [("A(", "missing ')'"), ("D", "unknown symbol"),
                                       ("*A", "nothing to repeat"), ("A{3,1}", "bad repetition"),
                                       ("[AB", "unclosed"), ("A)", "unexpected")])
def test_bad_patterns_are_clear_errors(bad, what):
    with pytest.raises(ValueError, match="cannot compile regex pattern") as err:
        RegexNfa(bad, LETTERS)
    assert what in str(err.value)
