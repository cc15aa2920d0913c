"""User-supplied regular expressions, run in linear time with RE2.

Rules that users write (a CEP matcher's ``name_regex`` or attribute regex, a
tail-sampling ``string_attribute`` policy with ``enabled_regex_matching``) are
matched against span data that anyone sending OTLP controls. Python's ``re``
backtracks, so a rule such as ``(a+)+$`` over a hostile span name takes
exponential time and stalls the pipeline thread. These rules are compiled with
RE2 (the ``google-re2`` package) instead, whose matching time is linear in the
input, the engine behind Go's ``regexp`` and so behind the OpenTelemetry
Collector's tail sampling. The price is RE2's syntax: no backreferences, no
lookaround, no atomic groups or possessive quantifiers; a pattern using them is
refused when the rule is built, with an error that names the rule and says what
to write instead.

Facts about ``google-re2`` (1.1) this module relies on:

* ``re2.compile(pattern, options)`` takes an ``re2.Options`` (no ``re`` flags);
  an invalid pattern raises ``re2.error`` (a plain ``Exception`` subclass)
  whose only argument is RE2's message as *bytes*.
* ``Options.log_errors`` is True by default, which also prints every compile
  error to stderr through absl logging; it is switched off here.
* ``Options.max_mem`` (default 8 MiB) bounds the compiled program; a larger one
  fails to compile with "pattern too large - compile failed". The lazy DFA used
  for matching shares the budget and falls back to the NFA when it runs out, so
  matching stays linear.
* A ``str`` pattern is encoded to UTF-8 and works in UTF-8 mode; the text may
  be ``bytes`` (matched as UTF-8, no decoding of offsets) or ``str`` (encoded
  with strict UTF-8, so a lone surrogate raises ``UnicodeEncodeError``). Text
  is therefore encoded here, with ``surrogatepass``.
* ``search(text, pos, endpos)`` on bytes takes byte offsets, and RE2 reads
  ``^``, ``$`` and ``\\b`` from the text around ``[pos, endpos)``: with
  ``endpos`` before the end, ``a$`` does not match at ``endpos``.
* Matching is correct with a small ``max_mem`` too (checked: a DFA-hungry
  ``(a|b)*a(a|b){20}c`` over 4 KiB with a 32 KiB budget), only slower.
* Inline flags ``(?i)``, ``(?m)``, ``(?s)`` and ``(?U)`` exist; ``(?x)``,
  ``(?a)``, ``(?u)``, ``(?#...)``, ``\\Z``, ``\\u``, ``\\N{...}`` and counted
  repeats above 1000 do not.

Semantics beside Python's ``re`` (equal for literals, classes, ``.``,
alternation, groups, repeats and ``^``/``$`` on text without a final newline):
``$`` without ``(?m)`` matches at the very end only (Python's also matches
before a final ``\\n``), and ``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only
(use Unicode classes such as ``\\pL``, ``\\pN`` or ``\\p{Greek}`` for others), both as
in Go. A match must lie in the first ``max_input`` characters of a value (4096 by
default), which bounds the work per distinct value; ``$`` and ``\\b`` still see
the value's real end, so a cut never creates a match.

Example
-------
>>> from knhk._regex import compile_pattern
>>> rx = compile_pattern(r"(a+)+$", "name_regex")
>>> rx.search("a" * 4000 + "!")     # Python's re would not return in our lifetime
False
>>> rx.search("caaa")
True
>>> compile_pattern("(a)=(?P=a)", "rule 'dup'")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: rule 'dup': cannot compile regular expression ... RE2 has no backreferences; ...
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["DEFAULT_MAX_INPUT", "DEFAULT_MAX_MEM", "LinearPattern", "compile_pattern"]

#: Characters of a value a pattern looks at (a cap on work per distinct value).
DEFAULT_MAX_INPUT = 4096
#: Bytes RE2 may use for one compiled pattern (RE2's own default).
DEFAULT_MAX_MEM = 8 << 20

# re flags RE2 can honour, as inline flags; re.ASCII is honoured as is (RE2's \d \w
# \s \b are ASCII-only), re.UNICODE is the default of every str pattern and
# re.DEBUG only printed the parse when Python compiled it.
_INLINE = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))
_HONOURED = re.IGNORECASE | re.MULTILINE | re.DOTALL | re.ASCII | re.UNICODE | re.DEBUG

# RE2's message (prefix) -> what to write instead.
_HINTS = (
    ("invalid escape sequence: \\Z", "RE2 writes the end of the text as \\z, not \\Z"),
    ("invalid escape sequence: \\u", "write a code point as \\x{HHHH}"),
    ("invalid escape sequence: \\U", "write a code point as \\x{HHHHHH}"),
    ("invalid escape sequence: \\N", "write a code point as \\x{HHHH}"),
    ("invalid escape sequence: \\G", "RE2 has no \\G; anchor with ^ instead"),
    ("invalid perl operator: (?=", "RE2 has no lookahead; match the text itself, or add a "
     "second, negated rule"),
    ("invalid perl operator: (?!", "RE2 has no negative lookahead; match the text itself, "
     "or add a second, negated rule"),
    ("invalid perl operator: (?<=", "RE2 has no lookbehind; match the preceding text too"),
    ("invalid perl operator: (?<!", "RE2 has no negative lookbehind; match the preceding "
     "text too, or add a second, negated rule"),
    ("invalid perl operator: (?>", "RE2 never backtracks, so it needs no atomic group; "
     "write a plain group (...)"),
    ("invalid perl operator: (?P", "RE2 has no backreferences; match the repeated text "
     "itself or check equality in code"),
    ("invalid perl operator: (?x", "RE2 has no verbose mode; remove the spaces and comments"),
    ("invalid perl operator: (?#", "RE2 has no comments in patterns; remove (?#...)"),
    ("invalid perl operator: (?a", "RE2's \\d, \\w, \\s and \\b are always ASCII; "
     "remove (?a)"),
    ("invalid perl operator: (?u", "RE2 matches Unicode text already; remove (?u) and "
     "use \\pL / \\pN for Unicode letters / digits"),
    ("bad repetition operator: ++", "RE2 never backtracks, so it needs no possessive "
     "quantifier; write + instead of ++"),
    ("bad repetition operator: *+", "write * instead of *+ (RE2 never backtracks)"),
    ("bad repetition operator: ?+", "write ? instead of ?+ (RE2 never backtracks)"),
    ("invalid repetition size", "RE2 allows counted repeats {n,m} up to 1000; use + or * "
     "or a shorter count"),
    ("pattern too large", "the compiled pattern is over RE2's memory budget; "
     "simplify it (large counted repeats of Unicode classes grow fastest)"),
)
_BACKREF = re.compile(r"invalid escape sequence: \\[1-9]")


def _hint(message: str, pattern: str) -> str:
    if _BACKREF.match(message):
        return ("RE2 has no backreferences; match the repeated text itself "
                f"(e.g. {_backref_example(pattern)!r}) or check equality in code")
    for prefix, hint in _HINTS:
        if message.startswith(prefix):
            return hint
    return "see https://github.com/google/re2/wiki/Syntax for the syntax RE2 accepts"


def _backref_example(pattern: str) -> str:
    # "(\w+) \1" -> "(\w+) \w+": repeating the group's pattern is the usual rewrite
    # when the two parts need not be equal (equality is not a regular language).
    m = re.search(r"\((?!\?)([^()]*)\)", pattern)
    body = m.group(1) if m is not None else "..."
    return re.sub(r"\\[1-9]", lambda _: body, pattern)


def _python_to_re2(rx: re.Pattern, where: str) -> str:
    """The RE2 spelling of a compiled Python pattern: its flags inline, ``\\Z`` as ``\\z``."""
    if not isinstance(rx.pattern, str):
        raise ValueError(f"{where}: the regular expression {rx.pattern!r} is a bytes pattern; "
                         "span data is text, so compile a str pattern")
    refused = rx.flags & ~_HONOURED
    if refused:
        names = str(re.RegexFlag(refused)).replace("re.", "").replace("RegexFlag.", "")
        raise ValueError(
            f"{where}: the regular expression {rx.pattern!r} uses the flag(s) {names}, "
            "which RE2 (the linear-time engine knhk runs rules with) cannot honour; "
            "compile it without them (for VERBOSE: remove the spaces and comments)")
    out = []
    i, text = 0, rx.pattern
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            # Python's \Z is RE2's \z; a valid Python pattern has no \Z inside a class
            out.append("\\z" if text[i + 1] == "Z" else text[i:i + 2])
            i += 2
            continue
        out.append(c)
        i += 1
    inline = "".join(ch for flag, ch in _INLINE if rx.flags & flag)
    return (f"(?{inline})" if inline else "") + "".join(out)


class LinearPattern:
    """A compiled user pattern that matches in time linear in the (capped) input.

    Build with :func:`compile_pattern`. Matching methods take ``str`` (``None``
    never matches) and return a bool.

    Attributes
    ----------
    source : str
        The pattern as the user wrote it (``.pattern`` of a compiled ``re.Pattern``).
    re2_pattern : str
        The pattern RE2 compiled (flags of an ``re.Pattern`` made inline).
    max_input : int
        Characters of a value that are looked at.
    """

    __slots__ = ("_rx", "max_input", "re2_pattern", "source", "where")

    def __init__(self, rx: Any, source: str, re2_pattern: str, where: str,
                 max_input: int) -> None:
        self._rx = rx
        self.source = source
        self.re2_pattern = re2_pattern
        self.where = where
        self.max_input = max_input

    def _subject(self, text: str) -> tuple[bytes, int]:
        """UTF-8 of the first ``max_input`` characters (plus one of context) and its end."""
        # surrogatepass: a lone surrogate (from a lenient decoder) must not raise here
        if len(text) <= self.max_input:
            data = text.encode("utf-8", "surrogatepass")
            return data, len(data)
        head = text[:self.max_input].encode("utf-8", "surrogatepass")
        # One more character as context: RE2 takes ^, $ and \b from the text around
        # [pos, endpos), so $ does not match at the cut as it would on a truncated copy.
        return head + text[self.max_input].encode("utf-8", "surrogatepass"), len(head)

    def search(self, text: str | None) -> bool:
        """Whether the pattern matches in ``text`` (Go's ``MatchString``).

        The match must lie within the first ``max_input`` characters; ``$`` and
        ``\\b`` still see where the value really ends, so a longer value never
        "ends" at the cut.

        Examples
        --------
        >>> compile_pattern("^GET ", "name_regex").search("GET /users")
        True
        >>> compile_pattern("a$", "name_regex", max_input=3).search("aaab")
        False
        """
        if not isinstance(text, str):
            return False
        data, end = self._subject(text)
        return self._rx.search(data, 0, end) is not None

    def fullmatch(self, text: str | None) -> bool:
        """Whether the pattern matches the whole of ``text``.

        A value longer than ``max_input`` is not looked at in whole, so it never
        matches.

        Examples
        --------
        >>> compile_pattern("a|ab", "values[0]").fullmatch("ab")
        True
        """
        if not isinstance(text, str) or len(text) > self.max_input:
            return False
        return self._rx.fullmatch(text.encode("utf-8", "surrogatepass")) is not None

    def __reduce__(self) -> tuple:
        # the RE2 object does not pickle; rebuild it (flags are inline in re2_pattern)
        return (_rebuild, (self.re2_pattern, self.source, self.where, self.max_input))

    def __repr__(self) -> str:
        return f"LinearPattern({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinearPattern) and \
            (self.re2_pattern, self.max_input) == (other.re2_pattern, other.max_input)

    def __hash__(self) -> int:
        return hash((self.re2_pattern, self.max_input))


def _rebuild(re2_pattern: str, source: str, where: str, max_input: int) -> LinearPattern:
    rx = compile_pattern(re2_pattern, where, max_input=max_input)
    rx.source = source
    return rx


def compile_pattern(pattern: str | re.Pattern | LinearPattern, where: str, *,
                    max_input: int = DEFAULT_MAX_INPUT,
                    max_mem: int = DEFAULT_MAX_MEM) -> LinearPattern:
    """Compile a user's regular expression with RE2, or raise a ``ValueError`` saying why.

    Parameters
    ----------
    pattern : str, re.Pattern or LinearPattern
        RE2 syntax (as Go's ``regexp``). A compiled ``re.Pattern`` is converted:
        its IGNORECASE, MULTILINE and DOTALL flags become inline flags and
        ``\\Z`` becomes ``\\z``; VERBOSE, LOCALE and bytes patterns are refused.
    where : str
        What the pattern configures (``"Matcher name_regex"``, ``"policy 'x'
        string_attribute.values[0]"``); every error message starts with it.
    max_input : int, optional
        Characters of a value that matching looks at.
    max_mem : int, optional
        RE2's memory budget for the compiled pattern, in bytes.

    Returns
    -------
    LinearPattern

    Raises
    ------
    ValueError
        The pattern is not a string, or RE2 refuses it; the message names
        ``where``, the pattern, RE2's reason and what to write instead.

    Examples
    --------
    >>> import re
    >>> compile_pattern(re.compile("^get", re.IGNORECASE), "name_regex").search("GET /")
    True
    >>> compile_pattern("a(?=b)", "values[0]")
    Traceback (most recent call last):
    ...
    ValueError: values[0]: cannot compile regular expression 'a(?=b)' with RE2 \
(invalid perl operator: (?=): RE2 has no lookahead; match the text itself, or add a second, \
negated rule
    """
    if isinstance(pattern, LinearPattern):
        return pattern
    if isinstance(max_input, bool) or not isinstance(max_input, int) or max_input < 1:
        raise ValueError(f"{where}: max_input must be an int >= 1, got {max_input!r}")
    if isinstance(pattern, re.Pattern):
        source = pattern.pattern
        text = _python_to_re2(pattern, where)
    elif isinstance(pattern, str):
        source = text = pattern
    else:
        raise ValueError(f"{where}: a regular expression must be a str or a compiled "
                         f"re.Pattern, got {type(pattern).__name__}")
    try:
        import re2
    except ImportError as exc:  # pragma: no cover - a dependency; no backtracking fallback
        raise ImportError("knhk runs user regular expressions with RE2: "
                          "pip install google-re2") from exc
    options = re2.Options()
    options.log_errors = False  # else every refused pattern is also printed to stderr
    options.max_mem = int(max_mem)
    try:
        rx = re2.compile(text, options)
    except re2.error as exc:
        raw = exc.args[0] if exc.args else ""
        reason = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        raise ValueError(f"{where}: cannot compile regular expression {source!r} with RE2 "
                         f"({reason}): {_hint(reason, text)}") from None
    except (UnicodeEncodeError, TypeError) as exc:
        raise ValueError(f"{where}: cannot compile regular expression {source!r}: "
                         f"{exc}") from None
    return LinearPattern(rx, source, text, where, max_input)
