"""The knhk Arrow IPC file format: what a recording adds to plain Arrow IPC.

Shared by the writer (:mod:`knhk.exporters.ipc`) and the reader
(:mod:`knhk.replay`): the custom-metadata keys every record batch carries, the
walk over (nested) dictionary-encoded fields, the per-batch CRC-32 and the
encoding of the dictionary deltas a batch adds.

Example
-------
>>> parse_deltas(format_deltas([("name", 0, 3), ("attributes.item.key", 2, 5)]))
[('name', 0, 3), ('attributes.item.key', 2, 5)]
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["CRC_KEY", "DICT_KEY", "batch_crc", "dictionary_at", "dictionary_paths", "file_schema",
           "format_deltas", "has_dictionary", "map_dictionaries", "parse_deltas", "update_crc"]

#: Custom-metadata keys of each record batch written here.
CRC_KEY = b"knhk.crc32"
DICT_KEY = b"knhk.dict"


def file_schema(path: str) -> pa.Schema:
    """The schema of an Arrow IPC file, or of an IPC stream (a recording whose writer
    never wrote the footer); only the head of the file is read.

    Raises ``pyarrow.ArrowException`` or ``OSError`` when neither can be read.
    """
    from pyarrow import ipc

    with pa.memory_map(path) as source:
        try:
            return ipc.open_file(source).schema
        except (pa.ArrowException, OSError):
            source.seek(0)
            return ipc.open_stream(source).schema


# -- dictionary-encoded fields, nested ones included ---------------------------------


@functools.lru_cache(maxsize=256)
def has_dictionary(t: pa.DataType) -> bool:
    """True if ``t`` is, or contains, a dictionary type."""
    if pa.types.is_dictionary(t):
        return True
    if pa.types.is_struct(t):
        return any(has_dictionary(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return has_dictionary(t.value_type)
    return False


def map_dictionaries(arr: pa.Array, path: str,
                     fn: Callable[[str, pa.DictionaryArray], pa.DictionaryArray],
                     empty: Callable[[str, pa.Array], pa.Array] | None = None) -> pa.Array:
    """Rebuild ``arr`` with ``fn(path, dictionary_array)`` applied to each dictionary inside.

    Paths name fields from the column down, list items by their field name
    (``attributes.item.key``). Lists are rebuilt over only the child values
    they reference, so a slice of a large batch costs what the slice holds.
    Arrays without dictionaries are returned as they are; an empty array is
    handed to ``empty(path, arr)`` if given (a writer caches those).
    """
    t = arr.type
    if pa.types.is_dictionary(t):
        return fn(path, arr)
    if not has_dictionary(t):
        return arr
    if empty is not None and len(arr) == 0:
        return empty(path, arr)
    mask = arr.is_null() if arr.null_count else None
    if pa.types.is_struct(t):
        children = [map_dictionaries(arr.field(i), f"{path}.{t.field(i).name}", fn, empty)
                    for i in range(t.num_fields)]
        return pa.StructArray.from_arrays(children, fields=list(t), mask=mask)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = arr.offsets
        start = offsets[0].as_py()
        stop = offsets[-1].as_py()
        child = map_dictionaries(arr.values.slice(start, stop - start),
                                 f"{path}.{t.value_field.name}", fn, empty)
        if start:
            offsets = pc.subtract(offsets, pa.scalar(start, offsets.type))
        cls = pa.ListArray if pa.types.is_list(t) else pa.LargeListArray
        return cls.from_arrays(offsets, child, type=t, mask=mask)
    raise TypeError(f"field {path!r}: cannot rewrite dictionaries inside {t}")


def dictionary_paths(t: pa.DataType, path: str) -> list[str]:
    if pa.types.is_dictionary(t):
        return [path]
    if pa.types.is_struct(t):
        return [p for i in range(t.num_fields)
                for p in dictionary_paths(t.field(i).type, f"{path}.{t.field(i).name}")]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return dictionary_paths(t.value_type, f"{path}.{t.value_field.name}")
    return []


def dictionary_at(rb: pa.RecordBatch, path: str) -> pa.Array:
    """The dictionary (values) of the dictionary-encoded field at ``path`` in ``rb``."""
    head, _, rest = path.partition(".")
    arr: pa.Array = rb.column(head)
    while rest:
        name, _, rest = rest.partition(".")
        t = arr.type
        if pa.types.is_struct(t):
            arr = arr.field(name)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            arr = arr.values
        else:
            raise KeyError(path)
    if not pa.types.is_dictionary(arr.type):
        raise KeyError(path)
    return arr.dictionary


def update_crc(arr: pa.Array, crc: int) -> int:
    """CRC-32 of ``arr``'s IPC encoding, continuing from ``crc``.

    The IPC encoder normalizes offsets, slices and bitmaps, so a slice and a
    fresh array with the same values give the same bytes.
    """
    return zlib.crc32(pa.record_batch([arr], names=["v"]).serialize(), crc)


def batch_crc(rb: pa.RecordBatch, deltas: list[tuple[str, int, int]]) -> int:
    """The checksum stored with a batch: its IPC encoding, then its dictionary deltas."""
    crc = zlib.crc32(rb.serialize())
    for path, start, stop in deltas:
        dictionary = dictionary_at(rb, path)
        if stop > len(dictionary):
            raise ValueError(f"dictionary delta {path}={start}:{stop} is past the end of "
                             f"the dictionary ({len(dictionary)} values)")
        crc = update_crc(dictionary.slice(start, stop - start), crc)
    return crc


def format_deltas(deltas: list[tuple[str, int, int]]) -> bytes:
    return ",".join(f"{p}={a}:{b}" for p, a, b in deltas).encode()


def parse_deltas(raw: bytes) -> list[tuple[str, int, int]]:
    """Inverse of :func:`format_deltas`; ValueError if ``raw`` is malformed."""
    out = []
    for item in raw.decode("ascii").split(","):
        if not item:
            continue
        path, _, span = item.partition("=")
        start, _, stop = span.partition(":")
        a, b = int(start), int(stop)
        if not 0 <= a <= b:
            raise ValueError(f"bad dictionary delta {item!r}")
        out.append((path, a, b))
    return out
