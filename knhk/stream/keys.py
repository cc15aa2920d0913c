"""Group-by keys: turn key columns of a batch into stable integer group ids.

Each key column keeps a vocabulary (value -> code) that outlives batches,
because every batch has its own Arrow dictionary; a combination of codes gets
a group id the first time it is seen. Supported keys: ``service``, ``name``,
``kind``, ``status`` (``status_code``), ``scope_name``, and any span attribute
as ``attributes.<key>`` or resource attribute as ``resource.<key>``.

Example
-------
>>> import knhk
>>> from knhk.stream.keys import KeyEncoder
>>> batch = knhk.SpanBatch.from_spans([knhk.Span("a", trace_id=1, span_id=i)
...                                    for i in (1, 2)])
>>> enc = KeyEncoder(("service", "name"))
>>> enc.encode(batch).tolist(), enc.key_values(0)
([0, 0], ('unknown_service', 'a'))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from knhk.batch import SpanBatch

__all__ = ["KeyEncoder", "parse_key"]

_ALIASES = {"service": "service", "name": "name", "kind": "kind", "status": "status_code",
            "status_code": "status_code", "scope_name": "scope_name"}
_PREFIXES = {"attributes.": "attributes", "resource.": "resource_attributes"}
_DENSE_LIMIT = 1 << 20


def parse_key(key: str) -> tuple[str, str | None]:
    """``(column, attribute key or None)`` for a group-by key; ValueError if unknown."""
    if not isinstance(key, str):
        raise ValueError(f"a group-by key must be a string, got {type(key).__name__}")
    if key in _ALIASES:
        return _ALIASES[key], None
    for prefix, source in _PREFIXES.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            return source, key[len(prefix):]
    raise ValueError(
        f"unknown group-by key {key!r}: use one of {sorted(_ALIASES)} or "
        "'attributes.<attribute key>' / 'resource.<resource attribute key>'")


class _Column:
    def __init__(self, key: str) -> None:
        self.key = key
        self.column, self.attr = parse_key(key)
        self.codes: dict[Any, int] = {}
        self.values: list[Any] = []

    def _code(self, value: Any) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.values)
            self.values.append(value)
        return code

    def encode(self, batch: SpanBatch) -> np.ndarray:
        idx, lut = self.encode_local(batch)
        return lut[idx]

    def encode_local(self, batch: SpanBatch) -> tuple[np.ndarray, np.ndarray]:
        """(per-row index into a batch-local table, that table's global codes)."""
        if self.attr is not None:
            arr = batch.attribute(self.attr, source=self.column)
        else:
            arr = batch.column(self.column)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if pa.types.is_integer(arr.type) and arr.null_count == 0 and arr.type.bit_width <= 8:
            vals = arr.to_numpy().astype(np.int64) + 128
            lut = np.full(256, -1, np.int64)
            for v in np.flatnonzero(np.bincount(vals, minlength=256)):
                lut[v] = self._code(int(v) - 128)
            return vals, lut
        if not pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_encode()
        dictionary = arr.dictionary.to_pylist()
        lut = np.array([self._code(v) for v in dictionary] + [self._code(None)], np.int64)
        idx = arr.indices
        if idx.null_count:
            idx = idx.fill_null(len(dictionary))
        return idx.to_numpy(), lut


class KeyEncoder:
    """Group ids for rows of batches, stable across batches.

    Parameters
    ----------
    keys : sequence of str
        Group-by keys (see the module docstring); an empty sequence puts every
        row in group 0.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if isinstance(keys, str):
            keys = (keys,)
        self.names = tuple(keys)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"group-by keys repeat: {list(self.names)}")
        self._cols = [_Column(k) for k in self.names]
        self._gids: dict[tuple[int, ...], int] = {}
        self._tuples: list[tuple[int, ...]] = []
        self._tuples_arr = np.empty((0, len(self._cols)), np.int64)

    @property
    def n_groups(self) -> int:
        return max(len(self._tuples), 1)

    def _gid(self, combo: tuple[int, ...]) -> int:
        gid = self._gids.get(combo)
        if gid is None:
            gid = self._gids[combo] = len(self._tuples)
            self._tuples.append(combo)
        return gid

    def encode(self, batch: SpanBatch) -> np.ndarray:
        """The group id (int64) of every row of ``batch``."""
        n = batch.num_rows
        if not self._cols:
            self._gid(())
            return np.zeros(n, np.int64)
        local = [c.encode_local(batch) for c in self._cols]
        sizes = [lut.size for _, lut in local]
        total = int(np.prod(sizes, dtype=object))
        if total > _DENSE_LIMIT:
            stacked = np.stack([lut[idx] for idx, lut in local], axis=1)
            uniq, inv = np.unique(stacked, axis=0, return_inverse=True)
            lut = np.array([self._gid(tuple(int(x) for x in row)) for row in uniq], np.int64)
            return lut[inv.ravel()]
        # combine the batch-local indices (small radix), then one gather to group ids
        comb = local[0][0].astype(np.int64)
        for (idx, _), size in zip(local[1:], sizes[1:], strict=True):
            comb *= size
            comb += idx
        present = np.flatnonzero(np.bincount(comb, minlength=total))
        lut = np.full(total, -1, np.int64)
        for p in present.tolist():
            combo = []
            rest = p
            for (_, col_lut), size in zip(reversed(local), reversed(sizes), strict=True):
                rest, c = divmod(rest, size)
                combo.append(int(col_lut[c]))
            lut[p] = self._gid(tuple(reversed(combo)))
        return lut[comb]

    def compact(self, keep: np.ndarray) -> np.ndarray:
        """Forget every group not in ``keep``; renumber the rest densely.

        Returns ``remap``: for each old group id, its new id, or -1 if it was
        forgotten. Column values that no kept group uses are forgotten too, so
        a long-running processor's memory follows its live keys, not every key
        it has ever seen. Kept groups keep their relative order.
        """
        n_old = len(self._tuples)
        remap = np.full(n_old, -1, np.int64)
        kept = np.unique(np.asarray(keep, np.int64))
        kept = kept[(kept >= 0) & (kept < n_old)]
        remap[kept] = np.arange(kept.size)
        old_tuples = [self._tuples[g] for g in kept.tolist()]
        col_maps = []
        for i, col in enumerate(self._cols):
            used = sorted({t[i] for t in old_tuples})
            col_maps.append({c: j for j, c in enumerate(used)})
            col.values = [col.values[c] for c in used]
            col.codes = {v: j for j, v in enumerate(col.values)}
        self._tuples = [tuple(m[c] for m, c in zip(col_maps, t, strict=True))
                        for t in old_tuples]
        self._gids = {t: g for g, t in enumerate(self._tuples)}
        self._tuples_arr = np.empty((0, len(self._cols)), np.int64)
        return remap

    def codes(self, gids: np.ndarray) -> np.ndarray:
        """(len(gids), n_keys) int64 array of each group's per-key codes."""
        if len(self._tuples_arr) != len(self._tuples):
            self._tuples_arr = np.array(self._tuples, np.int64).reshape(
                len(self._tuples), len(self._cols))
        return self._tuples_arr[np.asarray(gids, np.int64)]

    def key_values(self, gid: int) -> tuple[Any, ...]:
        """The key values of group ``gid``, in key order."""
        combo = self._tuples[gid]
        return tuple(col.values[c] for col, c in zip(self._cols, combo, strict=True))

    def key_columns(self, gids: np.ndarray) -> dict[str, pa.Array]:
        """Key values of each group in ``gids``, one list per key name."""
        codes = self.codes(gids)
        return {col.key: pa.array(col.values).take(pa.array(codes[:, i]))
                for i, col in enumerate(self._cols)}
