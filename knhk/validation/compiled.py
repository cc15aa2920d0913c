"""A registry compiled into lookup tables, and the content-keyed cache of them.

Validation never walks the YAML model: it works on integer tables indexed by a
*key id* (one per attribute key the registry defines, templates included) and a
*group id*. Per key: the declared value type, flags (deprecated, not stable,
template, enum), and the enum members as sorted id/value lists; per group: its
attributes with their requirement levels (CSR arrays), its signal fields
(metric name, instrument, unit, span kind), stability and deprecation.

:func:`load_compiled` builds these tables from a directory. The tables are
plain lists and numbers, so they are cached as JSON under the user cache
directory (``$XDG_CACHE_HOME/knhk`` or ``~/.cache/knhk``, or ``cache_dir=``),
keyed by a hash of every registry file's path and bytes: a warm load reads the
files, hashes them and parses one small JSON file. A cache entry that does not
parse, fails its checksum or is for another content key is ignored and
rewritten (a cold load).

Example
-------
>>> from knhk.validation.compiled import load_compiled
>>> c = load_compiled("../shared/testdata/semconv")
>>> c.key_id("http.request.method") >= 0, c.num_keys
(True, 940)
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from knhk.environment import XDG_CACHE_HOME
from knhk.validation.loader import RegistryFiles, resolve_files
from knhk.validation.model import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "CODE_IDS",
    "CODE_LEVELS",
    "CompiledRegistry",
    "default_cache_dir",
    "load_compiled",
    "save_compiled",
]

# -- finding codes: bit positions in the per-attribute and per-row masks ---------------
# The ids and levels are Weaver live-check's (crates/weaver_live_check: lib.rs finding
# constants, advice/type_advisor.rs check_attributes table, deprecated_advisor.rs,
# stability_advisor.rs, enum_advisor.rs; docs/finding.md).
C_MISSING_ATTRIBUTE = 0
C_TYPE_MISMATCH = 1
C_DEPRECATED = 2
C_NOT_STABLE = 3
C_UNDEFINED_ENUM_VARIANT = 4
C_TEMPLATE_ATTRIBUTE = 5
C_INVALID_VALUE = 6
C_REQUIRED = 7
C_CONDITIONALLY_REQUIRED = 8
C_RECOMMENDED = 9
C_OPT_IN = 10
C_MISSING_METRIC = 11
C_UNIT_MISMATCH = 12
C_UNEXPECTED_INSTRUMENT = 13
C_SIGNAL_DEPRECATED = 14
C_SIGNAL_NOT_STABLE = 15
C_MISSING_EVENT = 16
N_CODES = 17

INFORMATION, IMPROVEMENT, VIOLATION = 1, 2, 3

#: Finding id of each code (several codes may share an id: ``deprecated`` is
#: reported for attributes and for signals alike).
CODE_IDS = (
    "missing_attribute", "type_mismatch", "deprecated", "not_stable",
    "undefined_enum_variant", "template_attribute", "invalid_attribute_value",
    "required_attribute_not_present", "conditionally_required_attribute_not_present",
    "recommended_attribute_not_present", "opt_in_attribute_not_present",
    "missing_metric", "unit_mismatch", "unexpected_instrument", "deprecated",
    "not_stable", "missing_event",
)
#: Level of each code: 3 violation, 2 improvement, 1 information.
CODE_LEVELS = (3, 3, 3, 2, 1, 1, 3, 3, 1, 2, 1, 3, 3, 3, 3, 2, 3)
#: Codes reported per attribute (by the kernel) vs per row.
ATTRIBUTE_CODES = (C_MISSING_ATTRIBUTE, C_TYPE_MISMATCH, C_DEPRECATED, C_NOT_STABLE,
                   C_UNDEFINED_ENUM_VARIANT, C_TEMPLATE_ATTRIBUTE, C_INVALID_VALUE)
REQUIREMENT_CODES = {"required": C_REQUIRED, "conditionally_required": C_CONDITIONALLY_REQUIRED,
                     "recommended": C_RECOMMENDED, "opt_in": C_OPT_IN}

# -- declared value types (the kernel's ``decl`` codes) ----------------------------------
T_STRING, T_INT, T_DOUBLE, T_BOOLEAN = 1, 2, 3, 4
T_STRINGS, T_INTS, T_DOUBLES, T_BOOLEANS = 5, 6, 7, 8
T_ANY, T_ENUM = 9, 10
TYPE_CODES = {"string": T_STRING, "int": T_INT, "double": T_DOUBLE, "boolean": T_BOOLEAN,
              "string[]": T_STRINGS, "int[]": T_INTS, "double[]": T_DOUBLES,
              "boolean[]": T_BOOLEANS, "any": T_ANY, "enum": T_ENUM}

# -- per-key flags -----------------------------------------------------------------------
F_DEPRECATED, F_NOT_STABLE, F_TEMPLATE, F_ENUM_STR, F_ENUM_INT = 1, 2, 4, 8, 16

#: Keys the validator writes itself (annotations); never validated.
OWN_PREFIX = "knhk.validation."
KEY_UNKNOWN, KEY_IGNORED = -1, -2

INSTRUMENT_OF_KIND = {1: "gauge", 2: "counter", 3: "updowncounter", 4: "histogram"}

CACHE_FORMAT = 1
_MAGIC = "knhk-compiled-registry"


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/knhk``, else ``~/.cache/knhk``."""
    base = os.environ.get(XDG_CACHE_HOME, "").strip()
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "knhk")


class CompiledRegistry:
    """A registry as lookup tables; see the module docstring.

    Build one with :func:`load_compiled` (cached) or :meth:`from_registry`.
    Instances are immutable after construction and safe to share between
    threads; the validator swaps a whole instance on reload.
    """

    def __init__(self, tables: Mapping[str, Any], *, registry: Registry | None = None,
                 files: RegistryFiles | None = None) -> None:
        t = dict(tables)
        self.path: str = t["path"]
        self.content_key: str = t["content_key"]
        self.summary: dict = t["summary"]
        self.keys: list[str] = t["keys"]
        self.types: list[str] = t["types"]
        self.stability: list[str | None] = t["stability"]
        self.deprecated: list = t["deprecated"]
        self.decl = np.asarray(t["decl"], dtype=np.int8)
        self.flags = np.asarray(t["flags"], dtype=np.uint8)
        self.enum_vocab: list[str] = t["enum_vocab"]
        self.es_off = np.asarray(t["es_off"], dtype=np.int32)
        self.es_vals = np.asarray(t["es_vals"], dtype=np.int32)
        self.ei_off = np.asarray(t["ei_off"], dtype=np.int32)
        self.ei_vals = np.asarray(t["ei_vals"], dtype=np.int64)
        self.templates: list[tuple[str, int]] = [tuple(x) for x in t["templates"]]
        self.group_ids: list[str] = t["group_ids"]
        self.group_type: list[str] = t["group_type"]
        self.group_stability: list[str | None] = t["group_stability"]
        self.group_deprecated: list = t["group_deprecated"]
        self.group_span_kind: list[str | None] = t["group_span_kind"]
        self.group_metric: list[str | None] = t["group_metric"]
        self.group_instrument: list[str | None] = t["group_instrument"]
        self.group_unit: list[str | None] = t["group_unit"]
        self.group_event: list[str | None] = t["group_event"]
        self.rq_off = np.asarray(t["rq_off"], dtype=np.int32)
        self.rq_kid = np.asarray(t["rq_kid"], dtype=np.int32)
        self.rq_code = np.asarray(t["rq_code"], dtype=np.int8)
        self._tables = t
        self._registry = registry
        self._files = files
        self._lock = threading.Lock()
        self.key_index = {k: i for i, k in enumerate(self.keys)}
        self.group_index = {g: i for i, g in enumerate(self.group_ids)}
        self.vid_of = {v: i for i, v in enumerate(self.enum_vocab)}
        self._key_vocab = pa.array(self.keys, type=pa.string())
        self._enum_vocab_arr = pa.array(self.enum_vocab, type=pa.string())
        self._template_cache: dict[str, int] = {}
        # span name -> group: a span group's id, or a v2 span's type ("span.<type>").
        self.span_group_of: dict[str, int] = {}
        for gi, (gid, gt) in enumerate(zip(self.group_ids, self.group_type, strict=True)):
            if gt == "span":
                self.span_group_of.setdefault(gid, gi)
                if gid.startswith("span."):
                    self.span_group_of.setdefault(gid[5:], gi)
        self.metric_group_of: dict[str, int] = {}
        self.event_group_of: dict[str, int] = {}
        refines = t.get("group_refines") or [None] * len(self.group_ids)
        for gi, name in enumerate(self.group_metric):
            if name and self.group_type[gi] == "metric" and (
                    refines[gi] is None or name not in self.metric_group_of):
                self.metric_group_of[name] = gi
        for gi, name in enumerate(self.group_event):
            if name and self.group_type[gi] == "event" and (
                    refines[gi] is None or name not in self.event_group_of):
                self.event_group_of[name] = gi
        self.registry_attribute_names = [k for k, d in zip(self.keys, self.deprecated,
                                                           strict=True) if d is None]
        self.registry_metric_names = sorted(self.metric_group_of)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_registry(cls, registry: Registry, files: RegistryFiles | None = None
                      ) -> CompiledRegistry:
        """Compile a resolved :class:`~knhk.validation.model.Registry`."""
        keys = sorted(registry.attributes)
        kid = {k: i for i, k in enumerate(keys)}
        attrs = [registry.attributes[k] for k in keys]
        vocab: dict[str, int] = {}
        for a in attrs:
            for m in a.members:
                if isinstance(m.value, str):
                    vocab.setdefault(m.value, len(vocab))
        decl, flags, es_off, es_vals, ei_off, ei_vals = [], [], [0], [], [0], []
        for a in attrs:
            vt = a.type[len("template["):-1] if a.is_template else a.type
            decl.append(TYPE_CODES[vt])
            f = 0
            if a.deprecated is not None:
                f |= F_DEPRECATED
            if a.stability != "stable":
                f |= F_NOT_STABLE
            if a.is_template:
                f |= F_TEMPLATE
            strs = sorted({vocab[m.value] for m in a.members if isinstance(m.value, str)})
            ints = sorted({m.value for m in a.members
                           if isinstance(m.value, int) and not isinstance(m.value, bool)})
            if strs:
                f |= F_ENUM_STR
            if ints:
                f |= F_ENUM_INT
            flags.append(f)
            es_vals += strs
            es_off.append(len(es_vals))
            ei_vals += ints
            ei_off.append(len(ei_vals))
        group_ids = sorted(registry.groups)
        groups = [registry.groups[g] for g in group_ids]
        rq_off, rq_kid, rq_code = [0], [], []
        for g in groups:
            for a in g.attributes:
                k = kid.get(a.key)
                if k is not None:
                    rq_kid.append(k)
                    rq_code.append(REQUIREMENT_CODES[a.requirement_level.level])
            rq_off.append(len(rq_kid))
        summary = registry.summary()
        tables = {
            "format": CACHE_FORMAT,
            "path": registry.path,
            "content_key": registry.content_key,
            "summary": summary,
            "keys": keys,
            "types": [a.type for a in attrs],
            "stability": [a.stability for a in attrs],
            "deprecated": [_dep(a.deprecated) for a in attrs],
            "decl": decl,
            "flags": flags,
            "enum_vocab": list(vocab),
            "es_off": es_off, "es_vals": es_vals, "ei_off": ei_off, "ei_vals": ei_vals,
            "templates": [[t.key, kid[t.key]] for t in registry.templates],
            "group_ids": group_ids,
            "group_type": [g.type for g in groups],
            "group_stability": [g.stability for g in groups],
            "group_deprecated": [_dep(g.deprecated) for g in groups],
            "group_span_kind": [g.span_kind for g in groups],
            "group_metric": [g.metric_name for g in groups],
            "group_instrument": [g.instrument for g in groups],
            "group_unit": [g.unit for g in groups],
            "group_event": [g.name if g.type == "event" else None for g in groups],
            "group_refines": [g.refines for g in groups],
            "rq_off": rq_off, "rq_kid": rq_kid, "rq_code": rq_code,
        }
        return cls(tables, registry=registry, files=files)

    def to_json(self) -> str:
        return json.dumps(self._tables, separators=(",", ":"))

    # -- the full model, on demand -------------------------------------------------------

    @property
    def registry(self) -> Registry:
        """The resolved model. A registry loaded from the cache resolves its files
        (the bytes read at load time, so it matches these tables) on first use."""
        if self._registry is None:
            with self._lock:
                if self._registry is None:
                    files = self._files if self._files is not None else RegistryFiles(self.path)
                    self._registry = resolve_files(files)
        return self._registry

    # -- lookups ---------------------------------------------------------------------------

    @property
    def num_keys(self) -> int:
        return len(self.keys)

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    def key_id(self, key: str) -> int:
        """Key id of ``key`` (a template's id for a key under a template prefix);
        ``-1`` if the registry has no such attribute, ``-2`` for the validator's own
        annotation keys."""
        k = self.key_index.get(key)
        if k is not None:
            return k
        k = self._template_cache.get(key)
        if k is not None:
            return k
        if key.startswith(OWN_PREFIX):
            k = KEY_IGNORED
        else:
            k = KEY_UNKNOWN
            for prefix, tk in self.templates:
                if key.startswith(prefix) and key[len(prefix):len(prefix) + 1] == ".":
                    k = tk
                    break
        if len(self._template_cache) < 65536:   # bounded: keys may be high-cardinality
            self._template_cache[key] = k
        return k

    def map_keys(self, dictionary: pa.Array) -> np.ndarray:
        """Key ids (int32) of a batch's attribute-key dictionary, one per entry."""
        n = len(dictionary)
        if n == 0:
            return np.zeros(0, dtype=np.int32)
        if n <= 32:
            return np.fromiter((self.key_id(s) if s is not None else KEY_UNKNOWN
                                for s in dictionary.to_pylist()),
                               dtype=np.int32, count=n)
        idx = pc.index_in(dictionary, value_set=self._key_vocab)
        out = idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32, copy=True)
        miss = np.flatnonzero(out < 0)
        if miss.size:
            values = dictionary.take(pa.array(miss)).to_pylist()
            out[miss] = [self.key_id(s) if s is not None else KEY_UNKNOWN for s in values]
        return out

    def map_enum_values(self, dictionary: pa.Array, used: np.ndarray | None) -> np.ndarray:
        """Enum value ids (int32, -1 if none) of the entries of a string dictionary
        that ``used`` marks (all entries when ``used`` is None); others get -1."""
        out = np.full(len(dictionary), -1, dtype=np.int32)
        if not self.enum_vocab or not len(dictionary):
            return out
        if used is None:
            idx = pc.index_in(dictionary, value_set=self._enum_vocab_arr)
            return np.ascontiguousarray(idx.fill_null(-1).to_numpy(zero_copy_only=False),
                                        dtype=np.int32)
        pos = np.flatnonzero(used)
        if pos.size == 0:
            return out
        vals = dictionary.take(pa.array(pos))
        idx = pc.index_in(vals, value_set=self._enum_vocab_arr)
        out[pos] = idx.fill_null(-1).to_numpy(zero_copy_only=False)
        return out

    def map_span_names(self, dictionary: pa.Array, mapping: Mapping[str, str] | None = None,
                       by_name: bool = True) -> np.ndarray:
        """Group ids (int32, -1 unmatched) of a batch's span-name dictionary: an explicit
        ``mapping`` (exact names or glob patterns) first, then span group ids."""
        names = dictionary.to_pylist()
        out = np.full(len(names), -1, dtype=np.int32)
        for i, name in enumerate(names):
            out[i] = self.span_group(name, mapping, by_name)
        return out

    def span_group(self, name: str | None, mapping: Mapping[str, str] | None = None,
                   by_name: bool = True) -> int:
        if name is None:
            return -1
        if mapping:
            target = mapping.get(name)
            if target is None:
                for pattern, gid in mapping.items():
                    if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
                        target = gid
                        break
            if target is not None:
                return self.group_index.get(target, -1)
        if by_name:
            return self.span_group_of.get(name, -1)
        return -1

    def map_metric_names(self, dictionary: pa.Array) -> np.ndarray:
        return np.fromiter((self.metric_group_of.get(s, -1) if s is not None else -1
                            for s in dictionary.to_pylist()),
                           dtype=np.int32, count=len(dictionary))


def _dep(d: Any) -> list | None:
    if d is None:
        return None
    return [d.live_check_reason, d.renamed_to, str(d)]


# -- cache ---------------------------------------------------------------------------------


def _cache_file(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"registry-{key[:40]}.json")


def _read_cache(path: str, key: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    try:
        header, _, body = blob.partition(b"\n")
        magic, fmt, ckey, digest = header.decode("ascii").split(" ")
        if magic != _MAGIC or int(fmt) != CACHE_FORMAT or ckey != key:
            return None
        if hashlib.sha256(body).hexdigest() != digest:
            logger.warning("registry cache %s failed its checksum; loading from YAML", path)
            return None
        tables = json.loads(body)
        if not isinstance(tables, dict) or tables.get("content_key") != key:
            return None
        return tables
    except (ValueError, UnicodeDecodeError) as exc:
        logger.warning("registry cache %s is corrupt (%s); loading from YAML", path, exc)
        return None


def _write_cache(path: str, key: str, body: str) -> bool:
    data = body.encode("utf-8")
    header = f"{_MAGIC} {CACHE_FORMAT} {key} {hashlib.sha256(data).hexdigest()}\n"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".registry-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header.encode("ascii"))
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        logger.warning("cannot write the registry cache %s: %s", path, exc)
        return False
    return True


def save_compiled(compiled: CompiledRegistry,
                  cache_dir: str | os.PathLike | None = None) -> str | None:
    """Store ``compiled`` as the cache entry :func:`load_compiled` reads for its registry.

    For a caller that resolved the registry itself (``knhk registry check``
    needs the model for its report) and wants the next load to be warm.

    Parameters
    ----------
    compiled : CompiledRegistry
        Tables built by :meth:`CompiledRegistry.from_registry` (or loaded).
    cache_dir : str or path-like, optional
        Where the cache lives; default :func:`default_cache_dir`.

    Returns
    -------
    str or None
        The file written, or None if it could not be (logged as a warning: the
        cache only saves time, so failing to write it is not an error).

    Examples
    --------
    >>> import tempfile
    >>> c = load_compiled("registry/", cache=False)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     written = save_compiled(c, d)
    ...     warm = load_compiled("registry/", cache_dir=d)    # read back, not re-resolved
    ...     os.path.dirname(written) == d, warm.content_key == c.content_key
    (True, True)
    """
    path = _cache_file(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(),
                       compiled.content_key)
    return path if _write_cache(path, compiled.content_key, compiled.to_json()) else None


def load_compiled(path: str | os.PathLike, *, cache: bool = True,
                  cache_dir: str | os.PathLike | None = None) -> CompiledRegistry:
    """Load the registry in ``path`` as lookup tables, through the cache.

    Parameters
    ----------
    path : registry directory.
    cache : read and write the content-keyed cache (default True).
    cache_dir : where the cache lives; default :func:`default_cache_dir`.

    Raises
    ------
    RegistryError
        If the registry does not resolve (never for a cache problem: a bad
        cache entry is replaced by a cold load).

    Examples
    --------
    >>> c = load_compiled("registry/")
    >>> c.span_group_of["workflow.execute"] >= 0
    True
    """
    files = RegistryFiles(path)
    cfile = None
    if cache:
        cfile = _cache_file(os.fspath(cache_dir) if cache_dir is not None
                            else default_cache_dir(), files.content_key)
        tables = _read_cache(cfile, files.content_key)
        if tables is not None:
            tables["path"] = files.root
            try:
                return CompiledRegistry(tables, files=files)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("registry cache %s is unusable (%s); loading from YAML",
                               cfile, exc)
    compiled = CompiledRegistry.from_registry(resolve_files(files), files)
    if cache:
        save_compiled(compiled, cache_dir)
    return compiled
