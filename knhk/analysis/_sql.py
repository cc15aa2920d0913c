"""SQL over a lazy dataset: which span columns a query needs, and a stream factory
DuckDB can scan as often as a query asks.

Example
-------
>>> sql_columns("SELECT service, count(*) FROM spans GROUP BY 1")
('service',)
>>> sql_columns("SELECT s FROM spans s") is None    # a whole row: every column
True
"""

from __future__ import annotations

import re
from typing import Any

from knhk.schema import SPAN_SCHEMA

__all__ = ["ReaderFactory", "sql_columns"]

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


_EVERY_COLUMN = frozenset({"natural", "describe", "summarize", "pivot", "unpivot", "columns",
                           "exclude", "replace", "show"})


def sql_columns(query: str) -> tuple[str, ...] | None:
    """The span columns ``query`` can refer to; None (all of them) when it cannot be told.

    A superset is harmless (a column more is read); a column missed would
    fail the query, so anything that can name columns without spelling them
    (``*`` other than in ``count(*)``, NATURAL joins, DESCRIBE, SUMMARIZE,
    COLUMNS(...), a FROM-first query without SELECT) reads every column.
    """
    stripped = re.sub(r"count\s*\(\s*\*\s*\)", "", query, flags=re.IGNORECASE)
    words = {w.lower() for w in _WORD.findall(query)}
    if "*" in stripped or words & _EVERY_COLUMN or "select" not in words:
        return None
    if _row_values(query):
        return None
    cols = tuple(c for c in SPAN_SCHEMA.names if c in words)
    return cols or ("trace_id",)  # count(*) needs a column to count the rows of


_TABLE_AT = re.compile(r"\b(?:from|join)\s+spans(?:\s+(?:as\s+)?([A-Za-z_][A-Za-z0-9_]*))?",
                       re.IGNORECASE)
_NOT_ALIAS = frozenset({"where", "join", "on", "group", "order", "limit", "inner", "left",
                        "right", "full", "cross", "natural", "using", "union", "except",
                        "intersect", "having", "window", "qualify", "offset", "as"})


def _row_values(query: str) -> bool:
    """Whether ``query`` uses the ``spans`` table (or an alias of it) as a value — a
    whole row, as in ``SELECT s FROM spans s`` or ``to_json(spans)`` — which needs every
    column; a name followed by ``.`` (a column of it) or in FROM/JOIN position does not."""
    names = {"spans"}
    table_spans: set[int] = set()
    for m in _TABLE_AT.finditer(query):
        table_spans.add(m.start(0) + m.group(0).lower().index("spans"))
        alias = m.group(1)
        if alias and alias.lower() not in _NOT_ALIAS:
            names.add(alias.lower())
            table_spans.add(m.start(1))
    for m in _WORD.finditer(query):
        if m.group(0).lower() not in names or m.start() in table_spans:
            continue
        if query[m.end():].lstrip().startswith("."):
            continue  # alias.column
        return True
    return False


class ReaderFactory:
    """An Arrow stream factory: each ``__arrow_c_stream__`` call reads the batches afresh.

    DuckDB asks for a new stream each time a query scans the table (and once
    for its schema), so a query may scan ``spans`` more than once.
    """

    def __init__(self, ds: Any, columns: tuple[str, ...] | None) -> None:
        self._ds = ds
        self._columns = columns

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        return self._ds._reader(self._columns).__arrow_c_stream__(requested_schema)
