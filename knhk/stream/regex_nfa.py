"""Regular patterns over symbol sequences, compiled to a state machine.

``CepPattern.regex("AB+C", {...}, within)`` fires when the pattern matches a run
of a key's symbols ending at the newest one and starting no more than
``within`` before it. The pattern is parsed here (symbols, ``.``, ``[...]``,
groups, ``|``, ``*``, ``+``, ``?``, ``{m}``, ``{m,}``, ``{m,n}``) into a
Thompson NFA (Thompson 1968), whose epsilon closures are folded into one
boolean step matrix per symbol. Matching keeps, for every key and NFA state,
the latest start of a run that reaches it (later starts dominate: they satisfy
every window that earlier ones do), and steps all keys of a batch at once:
the r-th symbol of every key in one max-plus product, so there is no Python
loop per span and no per-key history.

>>> nfa = RegexNfa("AB+C", "ABC")
>>> nfa.num_states > 0, RegexNfa("C{2}", "ABC").accepts("CC"), nfa.accepts("ABBC")
(True, True, True)
>>> nfa.accepts("AC")
False
"""

from __future__ import annotations

import numpy as np

__all__ = ["RegexNfa"]

_NEVER = np.iinfo(np.int64).min
_MAX_REPEAT = 256


class _Parser:
    """Recursive descent over the pattern; builds NFA fragments (start, end)."""

    def __init__(self, pattern: str, letters: str, nfa: RegexNfa) -> None:
        self.s, self.i, self.letters, self.nfa = pattern, 0, letters, nfa

    def error(self, what: str) -> ValueError:
        return ValueError(f"cannot compile regex pattern {self.s!r}: {what} at position {self.i}")

    def peek(self) -> str | None:
        return self.s[self.i] if self.i < len(self.s) else None

    def parse(self) -> tuple[int, int]:
        frag = self.alternation()
        if self.i != len(self.s):
            raise self.error(f"unexpected {self.s[self.i]!r}")
        return frag

    def alternation(self) -> tuple[int, int]:
        frags = [self.concat()]
        while self.peek() == "|":
            self.i += 1
            frags.append(self.concat())
        if len(frags) == 1:
            return frags[0]
        start, end = self.nfa.state(), self.nfa.state()
        for a, b in frags:
            self.nfa.eps(start, a)
            self.nfa.eps(b, end)
        return start, end

    def concat(self) -> tuple[int, int]:
        start = end = self.nfa.state()
        while self.peek() not in (None, "|", ")"):
            a, b = self.repeat()
            self.nfa.eps(end, a)
            end = b
        return start, end

    def repeat(self) -> tuple[int, int]:
        atom_at = self.i
        frag = self.atom()
        atom_end = self.i
        while self.peek() in ("*", "+", "?", "{"):
            c = self.s[self.i]
            if c == "{":
                lo, hi = self.counts()
            else:
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            frag = self.repeated(frag, atom_at, atom_end, lo, hi)
            atom_at, atom_end = atom_at, self.i
        return frag

    def counts(self) -> tuple[int, int | None]:
        close = self.s.find("}", self.i)
        if close < 0:
            raise self.error("unclosed '{'")
        body = self.s[self.i + 1:close]
        lo_s, comma, hi_s = body.partition(",")
        try:
            lo = int(lo_s)
            hi = (int(hi_s) if hi_s else None) if comma else lo
        except ValueError:
            raise self.error(f"bad repetition {{{body}}}") from None
        if lo < 0 or (hi is not None and hi < lo) or max(lo, hi or 0) > _MAX_REPEAT:
            raise self.error(f"bad repetition {{{body}}}")
        self.i = close + 1
        return lo, hi

    def repeated(self, frag: tuple[int, int], at: int, end: int, lo: int,
                 hi: int | None) -> tuple[int, int]:
        # Each copy re-parses the atom's text so that it gets states of its own.
        def copy() -> tuple[int, int]:
            sub = _Parser(self.s[at:end], self.letters, self.nfa)
            return sub.parse()

        start = last = self.nfa.state()
        copies = [frag] + [copy() for _ in range(max(lo, 1 if hi is None else hi) - 1)]
        for a, b in copies[:lo]:
            self.nfa.eps(last, a)
            last = b
        if hi is None:  # a loop on one more copy
            a, b = copies[lo] if lo < len(copies) else copy()
            self.nfa.eps(last, a)
            self.nfa.eps(b, a)
            out = self.nfa.state()
            self.nfa.eps(last, out)
            self.nfa.eps(b, out)
            return start, out
        out = self.nfa.state()
        self.nfa.eps(last, out)
        for a, b in copies[lo:hi]:
            self.nfa.eps(last, a)
            self.nfa.eps(b, out)
            last = b
        return start, out

    def atom(self) -> tuple[int, int]:
        c = self.peek()
        if c is None:
            raise self.error("missing symbol")
        if c == "(":
            self.i += 1
            if self.s.startswith("?:", self.i):
                self.i += 2
            frag = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return frag
        if c == "[":
            close = self.s.find("]", self.i)
            if close < 0:
                raise self.error("unclosed '['")
            syms = self.s[self.i + 1:close]
            self.i = close + 1
            return self.symbols(syms)
        if c == ".":
            self.i += 1
            return self.symbols(self.letters)
        if c in "*+?{})|]":
            raise self.error(f"nothing to repeat or unbalanced {c!r}")
        self.i += 1
        return self.symbols(c)

    def symbols(self, chars: str) -> tuple[int, int]:
        unknown = [c for c in chars if c not in self.letters]
        if unknown or not chars:
            raise self.error(f"unknown symbol {unknown[0]!r}" if unknown else "empty class")
        a, b = self.nfa.state(), self.nfa.state()
        for c in set(chars):
            self.nfa.edge(a, self.letters.index(c), b)
        return a, b


class RegexNfa:
    """A pattern over the symbols ``letters`` as per-symbol NFA step matrices."""

    def __init__(self, pattern: str, letters: str) -> None:
        self._eps: list[tuple[int, int]] = []
        self._edges: list[tuple[int, int, int]] = []
        self.num_states = 0
        start, accept = _Parser(pattern, letters, self).parse()
        n = self.num_states
        closure = np.eye(n, dtype=bool)
        for a, b in self._eps:
            closure[a, b] = True
        while True:  # transitive closure (patterns are small)
            grown = closure | ((closure.astype(np.uint8) @ closure.astype(np.uint8)) > 0)
            if (grown == closure).all():
                break
            closure = grown
        step = np.zeros((len(letters), n, n), dtype=bool)
        for a, sym, b in self._edges:
            # from any state whose closure holds a, the symbol leads to closure(b)
            step[sym] |= closure[:, a][:, None] & closure[b][None, :]
        # Only states that consume a symbol, and the accepting state, carry runs; the
        # epsilon-only states Thompson's construction adds are folded away.
        keep = sorted({a for a, _, _ in self._edges} | {accept})
        self.step = np.ascontiguousarray(step[:, keep][:, :, keep])
        self.start = closure[start][keep]
        self.accept = keep.index(accept)
        self.num_states = len(keep)
        self.letters = letters

    def state(self) -> int:
        self.num_states += 1
        return self.num_states - 1

    def eps(self, a: int, b: int) -> None:
        self._eps.append((a, b))

    def edge(self, a: int, sym: int, b: int) -> None:
        self._edges.append((a, sym, b))

    def accepts(self, word: str) -> bool:
        """Whether the whole ``word`` matches (for tests and examples)."""
        cur = self.start.copy()
        for c in word:
            cur = (cur[:, None] & self.step[self.letters.index(c)]).any(axis=0)
        return bool(cur[self.accept])

    def advance(self, start_t: np.ndarray, start_seq: np.ndarray, sym: np.ndarray,
                t: np.ndarray, seq: np.ndarray, within_ns: int, max_len: int) -> np.ndarray:
        """Step keys (rows of the ``(k, n)`` state arrays, updated in place) by one symbol
        each; return which keys now match a run ending here."""
        # a run may start at this symbol
        fresh = self.start[None, :]
        newer = fresh & (t[:, None] > start_t)
        start_t[newer] = np.broadcast_to(t[:, None], start_t.shape)[newer]
        start_seq[newer] = np.broadcast_to(seq[:, None], start_seq.shape)[newer]
        m = self.step[sym]                                     # (k, n_from, n_to)
        new_t = np.full(start_t.shape, _NEVER, np.int64)
        new_seq = np.zeros(start_seq.shape, np.int64)
        for s in range(self.num_states):  # a max-plus product, one source state at a time
            cand = np.where(m[:, s, :], start_t[:, s:s + 1], _NEVER)
            better = cand > new_t
            new_t = np.where(better, cand, new_t)
            new_seq = np.where(better, start_seq[:, s:s + 1], new_seq)
        alive = ((new_t > _NEVER) & (t[:, None] - new_t <= within_ns)
                 & (seq[:, None] - new_seq < max_len))
        start_t[:] = np.where(alive, new_t, _NEVER)
        start_seq[:] = np.where(alive, new_seq, 0)
        return alive[:, self.accept]
