"""knhk._regex: user patterns compiled with RE2, beside Python's re.

Python's ``re`` is the reference where both engines agree by definition
(literals, classes, ``.``, alternation, groups, repeats, anchors on text that
does not end in a newline, ASCII text for ``\\d``/``\\w``/``\\s``/``\\b``); the
known differences are pinned by their own tests. The catastrophic cases run in
a child process with a timeout, so a regression to a backtracking engine fails
instead of hanging the suite.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knhk._regex import DEFAULT_MAX_INPUT, LinearPattern, compile_pattern

# -- the same answers as Python's re on ordinary patterns -----------------------------

_ATOMS = st.sampled_from(["a", "b", "c", "1", " ", "-", r"\.", ".", "[ab]", "[^a]", "[a-c1]",
                          "[0-9]", r"\d", r"\w", r"\s", r"\W"])
_QUANT = st.sampled_from(["", "", "", "*", "+", "?", "{2}", "{1,3}", "{0,2}", "*?", "+?",
                          "??"])


def _pattern(depth: int = 2) -> st.SearchStrategy[str]:
    atom = _ATOMS if depth == 0 else st.one_of(
        _ATOMS, _ATOMS, _pattern(depth - 1).map(lambda p: f"({p})"),
        _pattern(depth - 1).map(lambda p: f"(?:{p})"))
    piece = st.tuples(atom, _QUANT).map("".join)
    seq = st.lists(st.one_of(piece, piece, piece, st.just(r"\b")), min_size=1,
                   max_size=4).map("".join)
    return st.lists(seq, min_size=1, max_size=3).map("|".join)


PATTERNS = st.tuples(st.sampled_from(["", "^"]), _pattern(),
                     st.sampled_from(["", "$"])).map("".join)
# No final newline: there Python's $ also matches before it, RE2's (and Go's) does not.
TEXTS = st.text(alphabet="abc1 -.\nX", max_size=14).filter(lambda s: not s.endswith("\n"))


@settings(max_examples=150, deadline=None)
@given(PATTERNS, TEXTS)
def test_search_and_fullmatch_agree_with_python_re(pattern, text):
    ours = compile_pattern(pattern, "test")
    assert ours.search(text) == (re.search(pattern, text) is not None), (pattern, text)
    assert ours.fullmatch(text) == (re.fullmatch(pattern, text) is not None), (pattern, text)


FLAGS = st.sets(st.sampled_from([re.IGNORECASE, re.MULTILINE, re.DOTALL, re.ASCII]))


@settings(max_examples=100, deadline=None)
@given(PATTERNS, TEXTS, FLAGS)
def test_compiled_python_patterns_keep_their_flags(pattern, text, flags):
    value = 0
    for f in flags:
        value |= f
    py = re.compile(pattern, value)
    ours = compile_pattern(py, "test")
    assert ours.source == pattern
    assert ours.search(text) == (py.search(text) is not None), (pattern, flags, text)
    assert ours.fullmatch(text) == (py.fullmatch(text) is not None), (pattern, flags, text)


def test_python_end_of_text_is_translated():
    ours = compile_pattern(re.compile(r"^a+\Z"), "test")
    assert ours.re2_pattern == r"^a+\z"
    assert ours.search("aaa") and not ours.search("aaa\n") and not ours.search("aab")
    # an escaped backslash before Z is a literal backslash and a Z, left alone
    lit = compile_pattern(re.compile(r"\\Z"), "test")
    assert lit.re2_pattern == r"\\Z" and lit.search("x\\Z") and not lit.search("Z")


def test_documented_differences_from_python_re():
    # $ is the very end of the text (as Go), not also before a final newline
    assert re.search("a$", "a\n") and not compile_pattern("a$", "t").search("a\n")
    assert compile_pattern("(?m)a$", "t").search("a\n")
    # \w, \d are ASCII (as Go); Unicode classes are \pL, \pN
    assert re.search(r"^\w$", "é") and not compile_pattern(r"^\w$", "t").search("é")
    assert compile_pattern(r"^\pL$", "t").search("é")
    assert re.search(r"\d", "٣") and not compile_pattern(r"\d", "t").search("٣")


# -- linear time ------------------------------------------------------------------------

CATASTROPHIC = [r"(a+)+$", r"(a|aa)+$", r"(a*)*b", r"^(([a-z])+.)+[A-Z]([a-z])+$",
                r"(x+x+)+y", r"(\w+\s?)*$", r"(.*a){20}"]


def run_bounded(code: str, timeout: float = 60.0) -> dict:
    """Run ``code`` in a child Python; its last stdout line is JSON. Fails on timeout."""
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout} s: a backtracking regex engine?")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_catastrophic_patterns_over_hostile_text_finish_fast():
    out = run_bounded(f"""
        import json, time
        from knhk._regex import compile_pattern
        pats = [compile_pattern(p, "test") for p in {CATASTROPHIC!r}]
        texts = ["a" * 4000 + "!", "x" * 4000, "ab" * 2000 + "!", "a" * 100_000 + "!"]
        t0 = time.perf_counter()
        hits = [[p.search(t) for t in texts] for p in pats]
        print(json.dumps({{"seconds": time.perf_counter() - t0, "hits": hits}}))
    """)
    # Python's re needs about 2**4000 steps for the first pair; RE2 is linear.
    assert out["seconds"] < 2.0, out
    # and the answers are right: (a+)+$ never matches text ending in "!" ...
    assert out["hits"][0] == [False, False, False, False]
    # ... and (.*a){20} matches any text with 20 a's
    assert out["hits"][-1] == [True, False, True, True]


def test_input_cap_bounds_the_work_and_is_documented():
    rx = compile_pattern("b", "test")
    assert rx.max_input == DEFAULT_MAX_INPUT == 4096
    assert rx.search("a" * 4095 + "b")
    assert not rx.search("a" * 4096 + "b")  # beyond the cap: not looked at
    assert compile_pattern("b", "test", max_input=5000).search("a" * 4096 + "b")


def test_awkward_text_does_not_raise():
    rx = compile_pattern("^.b", "test")
    assert rx.search("\ud800b")  # a lone surrogate (lenient decoders make them) is a character
    assert compile_pattern("a\x00b", "t").search("xa\x00b")
    assert compile_pattern(r"a\x00b", "t").search("a\x00b")
    assert not rx.search(None) and not rx.fullmatch(None) and not rx.search(b"ab")


# -- refused patterns -----------------------------------------------------------------


@pytest.mark.parametrize("pattern, words", [
    (r"(\w+)=\1", "RE2 has no backreferences"),
    ("(?P<x>a)(?P=x)", "RE2 has no backreferences"),
    ("foo(?=bar)", "RE2 has no lookahead"),
    ("foo(?!bar)", "RE2 has no negative lookahead"),
    ("(?<=a)b", "RE2 has no lookbehind"),
    ("(?<!a)b", "RE2 has no negative lookbehind"),
    ("(?>a+)b", "needs no atomic group"),
    ("a++", "write + instead of ++"),
    (r"end\Z", r"writes the end of the text as \z"),
    ("(?x) a b ", "no verbose mode"),
    ("a{1001}", "counted repeats {n,m} up to 1000"),
    (r"\pL{1000}", "over RE2's memory budget"),
    (r"\u00e9", r"\x{HHHH}"),
    ("(", "missing )"),
])
def test_refused_patterns_name_the_rule_the_pattern_and_the_fix(pattern, words, capfd):
    with pytest.raises(ValueError) as err:
        compile_pattern(pattern, "rule 'r'")
    text = str(err.value)
    assert text.startswith("rule 'r': cannot compile regular expression " + repr(pattern))
    assert words in text, text
    # RE2 logs compile errors to stderr by default; knhk switches that off
    assert "re2" not in capfd.readouterr().err.lower()


@pytest.mark.parametrize("pattern, words", [
    (re.compile("a b", re.VERBOSE), "VERBOSE"),
    (re.compile(b"ab"), "bytes pattern"),
    (42, "must be a str or a compiled re.Pattern, got int"),
])
def test_refused_arguments(pattern, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        compile_pattern(pattern, "where")


def test_pickles_by_recompiling():
    rx = compile_pattern(re.compile("^get /", re.IGNORECASE), "name_regex", max_input=10)
    back = pickle.loads(pickle.dumps(rx))
    assert isinstance(back, LinearPattern) and back == rx
    assert back.source == "^get /" and back.max_input == 10
    assert back.search("GET /x") and not back.search("POST /")
