"""Load a semantic-convention registry directory and resolve it as Weaver does.

A registry is a directory of YAML files, read recursively (``*.yaml``,
``*.yml``; hidden files and directories skipped; ``manifest.yaml`` or
``registry_manifest.yaml`` at the root is the manifest). Files are parsed with
``yaml.safe_load`` semantics (the C ``CSafeLoader`` when PyYAML has it), in
either syntax real registries use: v1 ``groups:`` and v2
``file_format: definition/2``. Resolution follows Weaver: ``ref`` takes the
definition and applies the fields set at the ref, ``extends`` / ``ref_group`` /
``include_groups`` inherit attributes (the group's own fields win), enums,
templates, requirement levels, deprecations and stabilities are normalised.

Anything wrong -- malformed YAML, a YAML tag such as ``!!python/object``, an
unknown key, a value of the wrong type, a ref or extends that resolves to
nothing, a cycle of extends -- is collected and raised as one
:class:`~knhk.errors.RegistryError` whose ``errors`` list names file, line and
group of each problem. Line numbers are found only when there is an error (the
file is composed again to walk to the offending node), so a good registry
loads at the speed of the C parser.

Example
-------
>>> import os, tempfile
>>> from knhk.validation import load_registry
>>> tmp = tempfile.TemporaryDirectory()
>>> with open(os.path.join(tmp.name, "r.yaml"), "w") as f:
...     _ = f.write('''
... groups:
...   - id: registry.demo
...     type: attribute_group
...     brief: demo
...     attributes:
...       - id: demo.size
...         type: int
...         stability: stable
...         brief: a size
...   - id: demo.op
...     type: span
...     span_kind: internal
...     stability: development
...     brief: an operation
...     attributes:
...       - ref: demo.size
...         requirement_level: required
... ''')
>>> reg = load_registry(tmp.name)
>>> reg.group("demo.op").attribute("demo.size").requirement_level.level
'required'
>>> tmp.cleanup()
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from knhk.errors import RegistryError
from knhk.validation.model import (
    ARRAY_TYPES,
    DEPRECATION_REASONS,
    GROUP_TYPES,
    INSTRUMENTS,
    PRIMITIVE_TYPES,
    RECOMMENDED,
    Attribute,
    Deprecated,
    EnumMember,
    Group,
    Registry,
    RequirementLevel,
    Source,
)

logger = logging.getLogger(__name__)

__all__ = ["RegistryFiles", "RegistryIssue", "load_registry", "resolve_files"]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MANIFEST_NAMES = ("registry_manifest.yaml", "manifest.yaml")

_SPAN_KINDS = ("client", "server", "producer", "consumer", "internal")

# Keys each kind of YAML object may have (Weaver's JSON schemas: semconv.schema.json
# for v1 and semconv.schema.v2.json for definition/2, open-telemetry/weaver schemas/).
_V1_TOP = {"groups", "imports"}
_V1_GROUP = {"id", "type", "brief", "note", "prefix", "extends", "stability", "deprecated",
             "attributes", "span_kind", "events", "metric_name", "instrument", "unit",
             "name", "display_name", "body", "annotations", "entity_associations",
             "include_groups", "visibility", "constraints"}
_V1_ATTR_DEF = {"id", "type", "brief", "note", "examples", "requirement_level",
                "sampling_relevant", "stability", "deprecated", "annotations", "role", "tag"}
_V1_ATTR_REF = {"ref", "brief", "note", "examples", "requirement_level", "sampling_relevant",
                "stability", "deprecated", "annotations", "role", "tag", "prefix"}
_ENUM_TYPE = {"members", "allow_custom_values"}
_ENUM_MEMBER = {"id", "value", "brief", "note", "stability", "deprecated", "annotations"}
_DEPRECATED = {"reason", "renamed_to", "note"}

_V2_TOP = {"file_format", "version", "attributes", "attribute_groups", "spans",
           "span_refinements", "metrics", "metric_refinements", "events", "event_refinements",
           "entities", "entity_refinements", "imports"}
_V2_ATTR_DEF = {"key", "type", "brief", "note", "stability", "deprecated", "annotations",
                "examples"}
_V2_ATTR_REF = {"ref", "brief", "note", "examples", "requirement_level", "stability",
                "deprecated", "annotations"}
_V2_SPAN_ATTR_REF = _V2_ATTR_REF | {"sampling_relevant"}
_V2_GROUP_REF = {"ref_group"}
_V2_ATTR_GROUP = {"id", "visibility", "brief", "note", "stability", "deprecated",
                  "annotations", "attributes"}
_V2_SPAN = {"type", "kind", "name", "brief", "note", "stability", "deprecated", "attributes",
            "entity_associations", "annotations", "requirement_level"}
_V2_REFINEMENT = {"id", "ref", "attributes", "entity_associations", "brief", "note",
                  "stability", "deprecated", "annotations"}
_V2_SPAN_REFINEMENT = _V2_REFINEMENT | {"name"}
_V2_METRIC = {"name", "brief", "note", "unit", "instrument", "stability", "deprecated",
              "attributes", "entity_associations", "annotations", "requirement_level"}
_V2_EVENT = {"name", "brief", "note", "stability", "deprecated", "attributes",
             "entity_associations", "annotations", "requirement_level", "body"}
_V2_ENTITY = {"type", "brief", "note", "stability", "deprecated", "identity", "description",
              "annotations", "requirement_level"}
_V2_ENTITY_REFINEMENT = {"id", "ref", "description", "brief", "note", "stability",
                         "deprecated", "annotations"}

# Fields a ref may set on the attribute it refers to.
_REF_FIELDS = ("brief", "note", "examples", "requirement_level", "stability", "deprecated",
               "sampling_relevant", "annotations", "tag", "role")


# -- errors ------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryIssue:
    """One problem in a registry: where (file, line, group) and what."""

    file: str
    line: int | None
    group: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.group:
            return f"{where}: group {self.group!r}: {self.message}"
        return f"{where}: {self.message}"


@dataclass
class _Pending:
    file: str
    path: tuple
    group: str | None
    message: str
    line: int | None = None


class _Issues:
    """Problems found while loading; lines are looked up once, at the end."""

    def __init__(self) -> None:
        self.items: list[_Pending] = []

    def add(self, file: str, path: tuple, group: str | None, message: str,
            line: int | None = None) -> None:
        self.items.append(_Pending(file, tuple(path), group, message, line))

    def raise_if_any(self, root: str, data: Mapping[str, bytes]) -> None:
        if not self.items:
            return
        nodes: dict[str, Any] = {}
        issues = []
        for p in self.items:
            line = p.line
            if line is None and p.file in data:
                if p.file not in nodes:
                    nodes[p.file] = _compose(data[p.file])
                line = _line_of(nodes[p.file], p.path)
            issues.append(RegistryIssue(p.file, line, p.group, p.message))
        shown = "\n".join(f"  {i}" for i in issues[:50])
        more = f"\n  ... and {len(issues) - 50} more" if len(issues) > 50 else ""
        err = RegistryError(
            f"registry {root} has {len(issues)} error(s):\n{shown}{more}")
        err.errors = issues
        raise err


def _compose(data: bytes) -> Any:
    try:
        return yaml.compose(data, Loader=_Loader)
    except yaml.YAMLError:
        return None


def _line_of(node: Any, path: tuple) -> int | None:
    """1-based line of the node at ``path`` (keys and indexes); the key's line for a
    missing or unknown key, the nearest existing ancestor otherwise."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for step in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == step:
                    line = k.start_mark.line + 1
                    node = v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) \
                and 0 <= step < len(node.value):
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# -- files ---------------------------------------------------------------------------


class RegistryFiles:
    """The YAML files of a registry directory, their bytes and a content key.

    ``content_key`` hashes every file's relative path and bytes, so a cache
    entry is reused exactly when the registry's content is unchanged.
    ``signature()`` is a cheap ``stat`` of the same files, for noticing edits.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise RegistryError(f"registry {self.root} is not a directory")
        self.paths = _walk(self.root)
        self.data: dict[str, bytes] = {}
        for rel in self.paths:
            try:
                with open(os.path.join(self.root, rel), "rb") as f:
                    self.data[rel] = f.read()
            except OSError as exc:
                raise RegistryError(f"{rel}: cannot read registry file: {exc}") from None
        h = hashlib.sha256(b"knhk-registry-content/1\0")
        for rel in self.paths:
            blob = self.data[rel]
            h.update(rel.encode("utf-8") + b"\0" + str(len(blob)).encode() + b"\0")
            h.update(blob)
        self.content_key = h.hexdigest()

    @property
    def manifest_file(self) -> str | None:
        for name in MANIFEST_NAMES:
            if name in self.data:
                return name
        return None

    def signature(self) -> tuple:
        return signature(self.root)


def _walk(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.endswith((".yaml", ".yml")):
                continue
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    out.sort()
    return out


def signature(root: str | os.PathLike) -> tuple:
    """``(path, size, mtime_ns)`` of every registry file: changes when a file does."""
    root = os.fspath(root)
    out = []
    for rel in _walk(root):
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            continue
        out.append((rel, st.st_size, st.st_mtime_ns))
    return tuple(out)


# -- parsing -------------------------------------------------------------------------


def _parse(rel: str, blob: bytes, issues: _Issues) -> Any:
    try:
        return yaml.load(blob, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or str(exc)
        if "could not determine a constructor for the tag" in problem:
            tag = problem.split("tag", 1)[1].strip().strip("'\"")
            short = tag.replace("tag:yaml.org,2002:", "!!")
            message = (f"YAML tag {short!r} is not allowed: registry files are read with "
                       "safe_load semantics (plain YAML data only)")
        else:
            context = ""
            if exc.context:
                cm = exc.context_mark
                started = f" that starts at line {cm.line + 1}" if cm is not None and \
                    cm.line + 1 != line else ""
                context = f" ({exc.context}{started})"
            message = f"malformed YAML: {problem}{context}"
        issues.add(rel, (), None, message, line=line)
    except yaml.YAMLError as exc:
        issues.add(rel, (), None, f"malformed YAML: {exc}", line=None)
    except UnicodeDecodeError as exc:
        issues.add(rel, (), None, f"not UTF-8 text: {exc}", line=None)
    return _BAD


_BAD = object()


@dataclass
class _Entry:
    """One item of a group's ``attributes`` list."""

    kind: str            # "def" (defines an attribute) or "ref"
    key: str
    fields: dict
    source: Source


@dataclass
class _Spec:
    """A group as written, before resolution."""

    id: str
    type: str
    fields: dict
    source: Source
    extends: str | None = None
    includes: list = field(default_factory=list)   # [(group id, Source)]
    entries: list = field(default_factory=list)
    refines: str | None = None


class _Ctx:
    """Reads one file's objects, reporting problems with file, path and group."""

    def __init__(self, file: str, issues: _Issues) -> None:
        self.file = file
        self.issues = issues
        self.group: str | None = None

    def err(self, path: tuple, message: str) -> None:
        self.issues.add(self.file, path, self.group, message)

    def mapping(self, obj: Any, path: tuple, what: str) -> bool:
        if isinstance(obj, dict):
            return True
        self.err(path, f"{what} must be a mapping, got {_tname(obj)}")
        return False

    def keys(self, obj: dict, allowed: set, path: tuple, what: str) -> None:
        for k in obj:
            if k not in allowed:
                self.err((*path, k), f"unknown key {k!r} in {what} "
                                      f"(allowed: {', '.join(sorted(allowed))})")

    def string(self, obj: dict, key: str, path: tuple, what: str, *,
               required: bool = False) -> str | None:
        v = obj.get(key)
        if v is None:
            if required:
                self.err(path, f"{what} has no {key!r}")
            return None
        if isinstance(v, str):
            return v
        self.err((*path, key), f"{what}: {key!r} must be a string, got {_tname(v)}")
        return None

    def text(self, obj: dict, key: str, path: tuple, what: str) -> str:
        return self.string(obj, key, path, what) or ""

    def listof(self, obj: dict, key: str, path: tuple, what: str) -> list:
        v = obj.get(key)
        if v is None:
            return []
        if isinstance(v, list):
            return v
        self.err((*path, key), f"{what}: {key!r} must be a list, got {_tname(v)}")
        return []

    def stability(self, obj: dict, path: tuple, what: str) -> str | None:
        v = obj.get("stability")
        if v is None:
            return None
        if v == "experimental":
            return "development"
        if isinstance(v, str) and v in _STABILITY_OK:
            return v
        self.err((*path, "stability"),
                 f"{what}: stability must be one of stable, development (or experimental), "
                 f"alpha, beta, release_candidate; got {v!r}")
        return None

    def deprecated(self, obj: dict, path: tuple, what: str) -> Deprecated | None:
        v = obj.get("deprecated")
        if v is None:
            return None
        p = (*path, "deprecated")
        if isinstance(v, str):
            return Deprecated("unspecified", None, v)
        if not isinstance(v, dict):
            self.err(p, f"{what}: deprecated must be a string or a mapping, got {_tname(v)}")
            return None
        self.keys(v, _DEPRECATED, p, f"{what} deprecated")
        reason = v.get("reason")
        if reason not in DEPRECATION_REASONS:
            self.err((*p, "reason"), f"{what}: deprecated.reason must be one of "
                                      f"{', '.join(DEPRECATION_REASONS)}; got {reason!r}")
            return None
        renamed = self.string(v, "renamed_to", p, f"{what} deprecated")
        if reason == "renamed" and renamed is None:
            self.err(p, f"{what}: deprecated with reason 'renamed' needs 'renamed_to'")
        note = self.text(v, "note", p, f"{what} deprecated")
        return Deprecated(reason, renamed, note)

    def requirement(self, obj: dict, path: tuple, what: str) -> RequirementLevel | None:
        v = obj.get("requirement_level")
        if v is None:
            return None
        try:
            return RequirementLevel.parse(v)
        except ValueError as exc:
            self.err((*path, "requirement_level"), f"{what}: {exc}")
            return None

    def boolean(self, obj: dict, key: str, path: tuple, what: str) -> bool | None:
        v = obj.get(key)
        if v is None or isinstance(v, bool):
            return v
        self.err((*path, key), f"{what}: {key!r} must be true or false, got {_tname(v)}")
        return None

    def annotations(self, obj: dict, path: tuple, what: str) -> dict | None:
        v = obj.get("annotations")
        if v is None or isinstance(v, dict):
            return v
        self.err((*path, "annotations"), f"{what}: annotations must be a mapping, "
                                          f"got {_tname(v)}")
        return None


_STABILITY_OK = frozenset(("stable", "development", "alpha", "beta", "release_candidate",
                           "deprecated"))


def _tname(v: Any) -> str:
    if v is None:
        return "null"
    return {str: "a string", int: "an int", float: "a float", bool: "a boolean",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def _attr_type(ctx: _Ctx, raw: Any, path: tuple, what: str
               ) -> tuple[str, tuple[EnumMember, ...]] | None:
    if isinstance(raw, str):
        t = raw.strip()
        if t in PRIMITIVE_TYPES or t in ARRAY_TYPES:
            return t, ()
        if t.startswith("template[") and t.endswith("]"):
            inner = t[len("template["):-1]
            if inner in PRIMITIVE_TYPES or inner in ARRAY_TYPES:
                return t, ()
        ctx.err(path, f"{what}: unknown type {raw!r} (expected one of "
                      f"{', '.join(PRIMITIVE_TYPES + ARRAY_TYPES)}, template[<type>] or an "
                      f"enum {{members: [...]}})")
        return None
    if not isinstance(raw, dict):
        ctx.err(path, f"{what}: type must be a string or an enum mapping, got {_tname(raw)}")
        return None
    ctx.keys(raw, _ENUM_TYPE, path, f"{what} enum type")
    members_raw = raw.get("members")
    if not isinstance(members_raw, list) or not members_raw:
        ctx.err(path, f"{what}: an enum type needs a non-empty 'members' list")
        return None
    members = []
    for i, m in enumerate(members_raw):
        mp = (*path, "members", i)
        if not ctx.mapping(m, mp, f"{what} enum member"):
            continue
        ctx.keys(m, _ENUM_MEMBER, mp, f"{what} enum member")
        mid = ctx.string(m, "id", mp, f"{what} enum member", required=True)
        if mid is None:
            continue
        value = m.get("value", mid)
        if value is None:
            value = mid
        if not isinstance(value, str | int | float | bool):
            ctx.err((*mp, "value"), f"{what} enum member {mid!r}: value must be a string, "
                                     f"int, double or boolean, got {_tname(value)}")
            continue
        members.append(EnumMember(
            mid, value, ctx.text(m, "brief", mp, "enum member"),
            ctx.text(m, "note", mp, "enum member"),
            ctx.stability(m, mp, f"enum member {mid!r}"),
            ctx.deprecated(m, mp, f"enum member {mid!r}")))
    return "enum", tuple(members)


def _ref_fields(ctx: _Ctx, a: dict, path: tuple, what: str) -> dict:
    """The fields a ref (or a definition) sets explicitly, normalised."""
    out: dict[str, Any] = {}
    if "brief" in a:
        out["brief"] = ctx.text(a, "brief", path, what)
    if "note" in a:
        out["note"] = ctx.text(a, "note", path, what)
    if "examples" in a:
        out["examples"] = a["examples"]
    rl = ctx.requirement(a, path, what)
    if rl is not None:
        out["requirement_level"] = rl
    st = ctx.stability(a, path, what)
    if st is not None:
        out["stability"] = st
    dep = ctx.deprecated(a, path, what)
    if dep is not None:
        out["deprecated"] = dep
    sr = ctx.boolean(a, "sampling_relevant", path, what)
    if sr is not None:
        out["sampling_relevant"] = sr
    ann = ctx.annotations(a, path, what)
    if ann is not None:
        out["annotations"] = ann
    for k in ("tag", "role"):
        if k in a:
            v = ctx.string(a, k, path, what)
            if v is not None:
                out[k] = v
    return out


def _definition(ctx: _Ctx, a: dict, key: str, path: tuple, what: str) -> _Entry | None:
    raw_type = a.get("type")
    if raw_type is None:
        ctx.err(path, f"{what} has no 'type'")
        return None
    parsed = _attr_type(ctx, raw_type, (*path, "type"), what)
    if parsed is None:
        return None
    fields = _ref_fields(ctx, a, path, what)
    fields["type"], fields["members"] = parsed
    return _Entry("def", key, fields, Source(ctx.file, path))


def _v1_attribute(ctx: _Ctx, a: Any, path: tuple, prefix: str) -> _Entry | None:
    if not ctx.mapping(a, path, "an attribute"):
        return None
    if ("id" in a) == ("ref" in a):
        ctx.err(path, "an attribute needs exactly one of 'id' (a definition) or 'ref' "
                      "(a reference)")
        return None
    if "id" in a:
        aid = ctx.string(a, "id", path, "attribute", required=True)
        if aid is None:
            return None
        key = f"{prefix}.{aid}" if prefix else aid
        what = f"attribute {key!r}"
        ctx.keys(a, _V1_ATTR_DEF, path, what)
        return _definition(ctx, a, key, path, what)
    ref = ctx.string(a, "ref", path, "attribute ref", required=True)
    if ref is None:
        return None
    what = f"attribute ref {ref!r}"
    ctx.keys(a, _V1_ATTR_REF, path, what)
    return _Entry("ref", ref, _ref_fields(ctx, a, path, what), Source(ctx.file, path))


def _group_fields(ctx: _Ctx, g: dict, path: tuple, what: str) -> dict:
    return {
        "brief": ctx.text(g, "brief", path, what),
        "note": ctx.text(g, "note", path, what),
        "stability": ctx.stability(g, path, what),
        "deprecated": ctx.deprecated(g, path, what),
        "annotations": ctx.annotations(g, path, what),
    }


def _v1_group(ctx: _Ctx, g: Any, path: tuple, specs: list, defs: list) -> None:
    if not ctx.mapping(g, path, "a group"):
        return
    ctx.group = None
    gid = ctx.string(g, "id", path, "group", required=True)
    if gid is None:
        return
    ctx.group = gid
    ctx.keys(g, _V1_GROUP, path, "group")
    gtype = g.get("type")
    if gtype not in GROUP_TYPES:
        ctx.err((*path, "type"), f"type must be one of {', '.join(GROUP_TYPES)}; got "
                                  f"{gtype!r}")
        return
    if gtype == "resource":      # Weaver reads the old resource type as entity
        gtype = "entity"
    fields = _group_fields(ctx, g, path, "group")
    for key in ("metric_name", "unit", "name", "display_name", "visibility"):
        fields[key] = ctx.string(g, key, path, "group")
    kind = ctx.string(g, "span_kind", path, "group")
    if kind is not None and kind not in _SPAN_KINDS:
        ctx.err((*path, "span_kind"), f"span_kind must be one of {', '.join(_SPAN_KINDS)}; "
                                       f"got {kind!r}")
        kind = None
    fields["span_kind"] = kind
    instrument = ctx.string(g, "instrument", path, "group")
    if instrument is not None and instrument not in INSTRUMENTS:
        ctx.err((*path, "instrument"), f"instrument must be one of {', '.join(INSTRUMENTS)}; "
                                        f"got {instrument!r}")
        instrument = None
    fields["instrument"] = instrument
    if gtype == "metric":
        for key in ("metric_name", "instrument", "unit"):
            if fields[key] is None and key not in g:
                ctx.err(path, f"a metric group needs {key!r}")
    assoc = ctx.listof(g, "entity_associations", path, "group")
    fields["entity_associations"] = tuple(assoc)
    prefix = ctx.string(g, "prefix", path, "group") or ""
    spec = _Spec(gid, gtype, fields, Source(ctx.file, path),
                 extends=ctx.string(g, "extends", path, "group"))
    for i, inc in enumerate(ctx.listof(g, "include_groups", path, "group")):
        if isinstance(inc, str):
            spec.includes.append((inc, Source(ctx.file, (*path, "include_groups", i))))
        else:
            ctx.err((*path, "include_groups", i), f"include_groups items must be group ids "
                                                  f"(strings), got {_tname(inc)}")
    for i, a in enumerate(ctx.listof(g, "attributes", path, "group")):
        entry = _v1_attribute(ctx, a, (*path, "attributes", i), prefix)
        if entry is not None:
            spec.entries.append(entry)
            if entry.kind == "def":
                defs.append((entry, gid))
    specs.append(spec)


def _v2_refs(ctx: _Ctx, items: list, path: tuple, spec: _Spec, *, span: bool = False,
             default_level: RequirementLevel | None = None) -> None:
    allowed = _V2_SPAN_ATTR_REF if span else _V2_ATTR_REF
    for i, a in enumerate(items):
        p = (*path, i)
        if not ctx.mapping(a, p, "an attribute reference"):
            continue
        if "ref_group" in a:
            ctx.keys(a, _V2_GROUP_REF, p, "attribute group reference")
            gid = ctx.string(a, "ref_group", p, "attribute group reference", required=True)
            if gid is not None:
                spec.includes.append((gid, Source(ctx.file, p)))
            continue
        ref = ctx.string(a, "ref", p, "attribute reference", required=True)
        if ref is None:
            continue
        what = f"attribute ref {ref!r}"
        ctx.keys(a, allowed, p, what)
        fields = _ref_fields(ctx, a, p, what)
        if default_level is not None and "requirement_level" not in fields:
            fields["requirement_level"] = default_level
        spec.entries.append(_Entry("ref", ref, fields, Source(ctx.file, p)))


def _v2_file(ctx: _Ctx, doc: dict, specs: list, defs: list) -> None:
    ctx.keys(doc, _V2_TOP, (), "a definition/2 file")
    fmt = doc.get("file_format")
    if fmt is not None and fmt != "definition/2":
        ctx.err(("file_format",), f"file_format must be 'definition/2', got {fmt!r}")
    if doc.get("imports"):
        logger.warning("%s: imports from dependency registries are not resolved by knhk",
                       ctx.file)
    if any(doc.get(k) for k in _V2_TOP - {"file_format", "version", "imports"}):
        registry_id = "registry.v2." + ctx.file.rsplit(".", 1)[0].replace("/", ".")
    else:
        registry_id = ""
    holder = _Spec(registry_id, "attribute_group", {"visibility": "public"},
                   Source(ctx.file, ("attributes",)))
    for i, a in enumerate(ctx.listof(doc, "attributes", (), "file")):
        p = ("attributes", i)
        ctx.group = None
        if not ctx.mapping(a, p, "an attribute definition"):
            continue
        key = ctx.string(a, "key", p, "attribute definition", required=True)
        if key is None:
            continue
        what = f"attribute {key!r}"
        ctx.keys(a, _V2_ATTR_DEF, p, what)
        entry = _definition(ctx, a, key, p, what)
        if entry is not None:
            holder.entries.append(entry)
            defs.append((entry, registry_id))
    if holder.entries:
        specs.append(holder)

    def signal(section: str, allowed: set, ident: str, make_id, gtype: str, **opts) -> None:
        for i, item in enumerate(ctx.listof(doc, section, (), "file")):
            p = (section, i)
            ctx.group = None
            if not ctx.mapping(item, p, f"an item of {section}"):
                continue
            name = ctx.string(item, ident, p, f"an item of {section}", required=True)
            if name is None:
                continue
            gid = make_id(name)
            ctx.group = gid
            ctx.keys(item, allowed, p, section[:-1].replace("_", " "))
            fields = _group_fields(ctx, item, p, section)
            spec = _Spec(gid, gtype, fields, Source(ctx.file, p))
            opts.get("fill", lambda *a: None)(item, p, spec, name)
            for attr_key in opts.get("lists", ("attributes",)):
                level = opts.get("levels", {}).get(attr_key)
                _v2_refs(ctx, ctx.listof(item, attr_key, p, section), (*p, attr_key), spec,
                         span=gtype == "span", default_level=level)
            specs.append(spec)

    def refinement_of(prefix: str):
        def fill(item: dict, p: tuple, spec: _Spec, name: str) -> None:
            ref = ctx.string(item, "ref", p, "refinement", required=True)
            if ref is not None:
                spec.extends = spec.refines = prefix + ref
        return fill

    def fill_span(item: dict, p: tuple, spec: _Spec, name: str) -> None:
        kind = ctx.string(item, "kind", p, "span", required=True)
        if kind is not None and kind not in _SPAN_KINDS:
            ctx.err((*p, "kind"), f"kind must be one of {', '.join(_SPAN_KINDS)}; "
                                   f"got {kind!r}")
            kind = None
        spec.fields.update(span_kind=kind, name=name)
        nm = item.get("name")
        if nm is not None and ctx.mapping(nm, (*p, "name"), "span name"):
            ctx.keys(nm, {"note"}, (*p, "name"), "span name")

    def fill_metric(item: dict, p: tuple, spec: _Spec, name: str) -> None:
        instrument = ctx.string(item, "instrument", p, "metric", required=True)
        if instrument is not None and instrument not in INSTRUMENTS:
            ctx.err((*p, "instrument"), f"instrument must be one of "
                                         f"{', '.join(INSTRUMENTS)}; got {instrument!r}")
            instrument = None
        unit = ctx.string(item, "unit", p, "metric", required=True)
        spec.fields.update(metric_name=name, instrument=instrument, unit=unit)

    def fill_named(item: dict, p: tuple, spec: _Spec, name: str) -> None:
        spec.fields["name"] = name

    def fill_group(item: dict, p: tuple, spec: _Spec, name: str) -> None:
        vis = item.get("visibility")
        if vis not in ("internal", "public"):
            ctx.err((*p, "visibility"), f"visibility must be 'internal' or 'public', "
                                         f"got {vis!r}")
        spec.fields["visibility"] = vis

    def span_refinement(item: dict, p: tuple, spec: _Spec, name: str) -> None:
        refinement_of("span.")(item, p, spec, name)
        spec.fields["name"] = name

    signal("attribute_groups", _V2_ATTR_GROUP, "id", lambda n: n, "attribute_group",
           fill=fill_group)
    signal("spans", _V2_SPAN, "type", lambda n: "span." + n, "span", fill=fill_span)
    signal("span_refinements", _V2_SPAN_REFINEMENT, "id", lambda n: n, "span",
           fill=span_refinement)
    signal("metrics", _V2_METRIC, "name", lambda n: "metric." + n, "metric", fill=fill_metric)
    signal("metric_refinements", _V2_REFINEMENT, "id", lambda n: n, "metric",
           fill=refinement_of("metric."))
    signal("events", _V2_EVENT, "name", lambda n: "event." + n, "event", fill=fill_named)
    signal("event_refinements", _V2_REFINEMENT, "id", lambda n: n, "event",
           fill=refinement_of("event."))
    required = RequirementLevel("required")
    signal("entities", _V2_ENTITY, "type", lambda n: "entity." + n, "entity",
           fill=fill_named, lists=("identity", "description"),
           levels={"identity": required})
    signal("entity_refinements", _V2_ENTITY_REFINEMENT, "id", lambda n: n, "entity",
           fill=refinement_of("entity."), lists=("description",))


def _file_specs(rel: str, doc: Any, issues: _Issues, specs: list, defs: list) -> None:
    ctx = _Ctx(rel, issues)
    if doc is None:
        return
    if not isinstance(doc, dict):
        ctx.err((), f"a registry file must be a mapping at the top level, got {_tname(doc)}")
        return
    if "file_format" in doc or "version" in doc:
        _v2_file(ctx, doc, specs, defs)
        return
    ctx.keys(doc, _V1_TOP, (), "a registry file (v1 syntax: 'groups:'; v2 syntax starts "
                               "with 'file_format: definition/2')")
    for i, g in enumerate(ctx.listof(doc, "groups", (), "file")):
        _v1_group(ctx, g, ("groups", i), specs, defs)


# -- resolution ------------------------------------------------------------------------


_SIGNAL_FIELDS = ("span_kind", "metric_name", "instrument", "unit", "stability")


def _resolve(specs: list[_Spec], defs: list, issues: _Issues
             ) -> tuple[dict[str, Attribute], dict[str, Group]]:
    catalog: dict[str, Attribute] = {}
    where: dict[str, _Entry] = {}
    for entry, _gid in defs:
        prev = where.get(entry.key)
        if prev is not None:
            issues.add(entry.source.file, entry.source.path, _gid,
                       f"attribute {entry.key!r} is defined twice (also in {prev.source.file})")
            continue
        where[entry.key] = entry
        f = dict(entry.fields)
        catalog[entry.key] = Attribute(entry.key, f.pop("type"), members=f.pop("members"),
                                       source=entry.source, **f)

    by_id: dict[str, _Spec] = {}
    for s in specs:
        if s.id in by_id:
            issues.add(s.source.file, s.source.path, s.id,
                       f"group id {s.id!r} is used twice (also in {by_id[s.id].source.file})")
            continue
        by_id[s.id] = s

    resolved: dict[str, dict[str, Attribute]] = {}
    signal: dict[str, dict] = {}
    state: dict[str, int] = {}

    def visit(gid: str, chain: tuple) -> dict[str, Attribute]:
        st = state.get(gid)
        if st == 2:
            return resolved[gid]
        spec = by_id[gid]
        if st == 1:
            cycle = " -> ".join((*chain[chain.index(gid):], gid))
            issues.add(spec.source.file, spec.source.path, gid,
                       f"cycle of extends / group references: {cycle}")
            return {}
        state[gid] = 1
        attrs: dict[str, Attribute] = {}
        fields = dict(spec.fields)
        parents = []
        if spec.extends is not None:
            parents.append((spec.extends, Source(spec.source.file,
                                                 (*spec.source.path, "extends")), "extends"))
        parents += [(g, src, "ref_group") for g, src in spec.includes]
        for parent, src, how in parents:
            if parent not in by_id:
                what = "refines" if spec.refines == parent else how
                issues.add(src.file, src.path, gid,
                           f"{what} {parent!r}: no such group in the registry")
                continue
            inherited = visit(parent, (*chain, gid))
            for k, a in inherited.items():
                attrs[k] = a if k not in attrs else dataclasses.replace(
                    attrs[k], **_explicit(a))
            if how == "extends" and spec.refines is not None:
                pf = signal.get(parent, {})
                for k in _SIGNAL_FIELDS:
                    if fields.get(k) is None and pf.get(k) is not None:
                        fields[k] = pf[k]
        for e in spec.entries:
            if e.kind == "def":
                base = catalog.get(e.key)
                if base is None:     # a duplicate definition, already reported
                    continue
                rl = e.fields.get("requirement_level")
                attrs[e.key] = base if rl is None else dataclasses.replace(
                    base, requirement_level=rl)
                continue
            base = attrs.get(e.key) or catalog.get(e.key)
            if base is None:
                issues.add(e.source.file, e.source.path, gid,
                           f"ref {e.key!r} does not resolve: no attribute with that key is "
                           f"defined in the registry")
                continue
            attrs[e.key] = dataclasses.replace(base, **e.fields) if e.fields else base
        state[gid] = 2
        resolved[gid] = attrs
        signal[gid] = fields
        return attrs

    for gid in by_id:
        visit(gid, ())

    groups: dict[str, Group] = {}
    for gid, spec in by_id.items():
        f = signal[gid]
        groups[gid] = Group(
            gid, spec.type, brief=f.get("brief") or "", note=f.get("note") or "",
            stability=f.get("stability"), deprecated=f.get("deprecated"),
            attributes=tuple(resolved[gid].values()), extends=spec.extends,
            span_kind=f.get("span_kind"), metric_name=f.get("metric_name"),
            instrument=f.get("instrument"), unit=f.get("unit"), name=f.get("name"),
            display_name=f.get("display_name"), annotations=f.get("annotations"),
            entity_associations=tuple(f.get("entity_associations") or ()),
            visibility=f.get("visibility"), refines=spec.refines, source=spec.source)
    return catalog, groups


def _explicit(a: Attribute) -> dict:
    """Fields of a group's attribute that differ from the catalog default (used when two
    inherited groups carry the same key: the later one's refinements are layered on)."""
    return {k: getattr(a, k) for k in _REF_FIELDS
            if getattr(a, k) not in (None, "", False) and not (
                k == "requirement_level" and a.requirement_level is RECOMMENDED)}


# -- entry points ----------------------------------------------------------------------


def resolve_files(files: RegistryFiles) -> Registry:
    """Parse and resolve the files of ``files``; ``RegistryError`` lists every problem."""
    issues = _Issues()
    specs: list[_Spec] = []
    defs: list = []
    manifest: dict = {}
    for rel in files.paths:
        doc = _parse(rel, files.data[rel], issues)
        if doc is _BAD:
            continue
        name = rel.rsplit("/", 1)[-1]
        if name in MANIFEST_NAMES:
            if "/" not in rel:
                if doc is not None and not isinstance(doc, dict):
                    issues.add(rel, (), None, f"the manifest must be a mapping, got "
                                              f"{_tname(doc)}")
                else:
                    manifest = doc or {}
            continue
        _file_specs(rel, doc, issues, specs, defs)
    catalog, groups = ({}, {})
    if not issues.items:
        catalog, groups = _resolve(specs, defs, issues)
    issues.raise_if_any(files.root, files.data)
    return Registry(files.root, catalog, groups, manifest=manifest, files=tuple(files.paths),
                    content_key=files.content_key)


def load_registry(path: str | os.PathLike) -> Registry:
    """Load and resolve the registry in directory ``path`` into the full model.

    (The validator loads compiled tables through a cache instead; see
    :func:`knhk.validation.load_compiled`.)

    Parameters
    ----------
    path : directory of YAML files (v1 ``groups:`` and/or v2 ``definition/2``).

    Raises
    ------
    RegistryError
        Listing every problem with file, line and group (``err.errors``).

    Examples
    --------
    >>> reg = load_registry("../shared/testdata/semconv")
    >>> len(reg.attributes)
    940
    """
    return resolve_files(RegistryFiles(path))
