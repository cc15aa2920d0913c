"""The resolved semantic-convention registry: attributes, groups, and their fields.

:func:`knhk.validation.load_registry` reads a directory of YAML files (Weaver's
v1 ``groups:`` syntax and v2 ``file_format: definition/2``) and resolves it into
a :class:`Registry`: every ``ref`` is replaced by its definition with the ref's
overrides applied, every group carries the attributes it inherits through
``extends`` / ``ref_group`` / ``include_groups``, and stabilities, deprecations
and requirement levels are normalised. The objects here are immutable.

Example
-------
>>> from knhk.validation.model import Attribute, EnumMember, RequirementLevel
>>> a = Attribute("http.request.method", "enum", stability="stable",
...               members=(EnumMember("get", "GET"),))
>>> a.is_enum, sorted(a.enum_values)
(True, ['GET'])
>>> RequirementLevel.parse({"conditionally_required": "if set"}).level
'conditionally_required'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ARRAY_TYPES",
    "PRIMITIVE_TYPES",
    "STABILITIES",
    "Attribute",
    "Deprecated",
    "EnumMember",
    "Group",
    "Registry",
    "RequirementLevel",
    "Source",
]

#: Attribute types a value can have (Weaver's ``PrimitiveOrArrayTypeSpec``).
PRIMITIVE_TYPES = ("string", "int", "double", "boolean", "any")
ARRAY_TYPES = ("string[]", "int[]", "double[]", "boolean[]")

#: Stability levels; ``experimental`` is read as ``development`` and
#: ``deprecated`` is the legacy level some v1 registries still use.
STABILITIES = ("stable", "development", "alpha", "beta", "release_candidate", "deprecated")

REQUIREMENT_LEVELS = ("required", "conditionally_required", "recommended", "opt_in")
DEPRECATION_REASONS = ("renamed", "obsoleted", "uncategorized", "unspecified")
GROUP_TYPES = ("span", "metric", "event", "attribute_group", "entity", "scope",
               "metric_group", "resource")
INSTRUMENTS = ("counter", "updowncounter", "gauge", "histogram")


@dataclass(frozen=True, slots=True)
class Source:
    """Where a definition was written: a file (relative to the registry) and the
    path of keys and indexes to it inside that file's YAML document."""

    file: str
    path: tuple = ()

    def __str__(self) -> str:
        return self.file


@dataclass(frozen=True, slots=True)
class Deprecated:
    """Why something is deprecated: ``renamed`` (with ``renamed_to``),
    ``obsoleted``, ``uncategorized``, or ``unspecified`` (the legacy string form)."""

    reason: str
    renamed_to: str | None = None
    note: str = ""

    def __str__(self) -> str:
        if self.note:
            return self.note
        if self.renamed_to:
            return f"Replaced by `{self.renamed_to}`."
        return self.reason

    @property
    def live_check_reason(self) -> str:
        """The reason as Weaver's live-check reports it (``unspecified`` folds into
        ``uncategorized``)."""
        return "uncategorized" if self.reason == "unspecified" else self.reason


@dataclass(frozen=True, slots=True)
class RequirementLevel:
    """``required``, ``conditionally_required`` (``text`` is the condition),
    ``recommended`` or ``opt_in`` (``text`` optional)."""

    level: str
    text: str = ""

    @staticmethod
    def parse(raw: Any) -> RequirementLevel:
        """Read a YAML requirement level (a string or a one-key map); ``ValueError`` if bad."""
        if isinstance(raw, str):
            if raw in ("required", "recommended", "opt_in"):
                return _BASIC_LEVELS[raw]
            if raw == "conditionally_required":
                return RequirementLevel("conditionally_required")
            raise ValueError(
                f"requirement_level must be required, recommended, opt_in or a one-key map "
                f"(conditionally_required / recommended / opt_in: <text>), got {raw!r}")
        if isinstance(raw, Mapping) and len(raw) == 1:
            (level, text), = raw.items()
            if level in ("conditionally_required", "recommended", "opt_in"):
                if text is None:
                    text = ""
                if not isinstance(text, str):
                    raise ValueError(f"requirement_level {level}: expected a string, got "
                                     f"{type(text).__name__}")
                return RequirementLevel(level, text)
        raise ValueError(
            f"requirement_level must be required, recommended, opt_in or a one-key map "
            f"(conditionally_required / recommended / opt_in: <text>), got {raw!r}")


_BASIC_LEVELS = {name: RequirementLevel(name) for name in ("required", "recommended", "opt_in")}
RECOMMENDED = _BASIC_LEVELS["recommended"]


@dataclass(frozen=True, slots=True)
class EnumMember:
    """One member of an enum attribute; ``value`` defaults to ``id`` in the YAML."""

    id: str
    value: str | int | float | bool
    brief: str = ""
    note: str = ""
    stability: str | None = None
    deprecated: Deprecated | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Attribute:
    """An attribute as defined in the registry, or as refined inside a group.

    ``type`` is the canonical type string: one of :data:`PRIMITIVE_TYPES` or
    :data:`ARRAY_TYPES`, ``"enum"`` (see ``members``), or ``"template[<type>]"``
    for a family of attributes sharing the key prefix ``key + "."``.
    ``requirement_level`` is the level in the group it was resolved for (the
    definition's own level, ``recommended`` unless set, in the catalog).
    """

    key: str
    type: str
    brief: str = ""
    note: str = ""
    stability: str | None = None
    deprecated: Deprecated | None = None
    requirement_level: RequirementLevel = RECOMMENDED
    examples: Any = None
    members: tuple[EnumMember, ...] = ()
    annotations: Mapping[str, Any] | None = None
    sampling_relevant: bool = False
    tag: str | None = None
    role: str | None = None
    source: Source | None = None

    @property
    def is_template(self) -> bool:
        return self.type.startswith("template[")

    @property
    def is_enum(self) -> bool:
        return self.type == "enum"

    @property
    def value_type(self) -> str:
        """The type a value of this attribute has: the template's inner type, an
        enum's member type (``string`` / ``int`` / ...), or ``type`` itself."""
        if self.is_template:
            return self.type[len("template["):-1]
        if self.is_enum:
            kinds = {_member_kind(m.value) for m in self.members}
            return kinds.pop() if len(kinds) == 1 else "any"
        return self.type

    @property
    def enum_values(self) -> frozenset:
        return frozenset(m.value for m in self.members)

    @property
    def is_stable(self) -> bool:
        return self.stability == "stable"

    def __repr__(self) -> str:
        return f"Attribute({self.key!r}, {self.type!r})"


def _member_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    return "string"


@dataclass(frozen=True, slots=True, eq=False)
class Group:
    """A resolved group: a span, metric, event, entity or attribute group.

    ``attributes`` are the group's attributes after resolution, in order:
    inherited ones first (``extends``, then ``ref_group``/``include_groups``),
    then the group's own; a key the group refines itself keeps the inherited
    fields it does not set. ``refines`` names the signal a v2 refinement refines.
    """

    id: str
    type: str
    brief: str = ""
    note: str = ""
    stability: str | None = None
    deprecated: Deprecated | None = None
    attributes: tuple[Attribute, ...] = ()
    extends: str | None = None
    span_kind: str | None = None
    metric_name: str | None = None
    instrument: str | None = None
    unit: str | None = None
    name: str | None = None
    display_name: str | None = None
    annotations: Mapping[str, Any] | None = None
    entity_associations: tuple = ()
    visibility: str | None = None
    refines: str | None = None
    source: Source | None = None
    _by_key: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self._by_key:
            self._by_key.update((a.key, a) for a in self.attributes)

    def attribute(self, key: str) -> Attribute | None:
        """The group's attribute ``key`` (None if it has none)."""
        return self._by_key.get(key)

    def __repr__(self) -> str:
        return f"Group({self.id!r}, {self.type!r}, {len(self.attributes)} attributes)"


class Registry:
    """A resolved registry: its attribute catalog and its groups.

    ``attributes`` maps every attribute key defined in the registry to its
    definition; ``groups`` maps group ids to resolved groups. Lookups that the
    validator needs (metric by name, span group by name, template by key
    prefix) are methods.
    """

    def __init__(self, path: str, attributes: Mapping[str, Attribute],
                 groups: Mapping[str, Group], *, manifest: Mapping[str, Any] | None = None,
                 files: tuple[str, ...] = (), content_key: str = "") -> None:
        self.path = path
        self.attributes = dict(attributes)
        self.groups = dict(groups)
        self.manifest = dict(manifest or {})
        self.files = tuple(files)
        self.content_key = content_key
        # Longest prefix first, so "a.b.c.<key>" wins over "a.b.<key>".
        self.templates = tuple(sorted((a for a in self.attributes.values() if a.is_template),
                                      key=lambda a: (-len(a.key), a.key)))
        self._metrics: dict[str, Group] = {}
        self._events: dict[str, Group] = {}
        for g in self.groups.values():
            # A refinement shares its signal's name; the base definition answers.
            if g.type == "metric" and g.metric_name and (
                    g.refines is None or g.metric_name not in self._metrics):
                self._metrics[g.metric_name] = g
            if g.type == "event" and g.name and (
                    g.refines is None or g.name not in self._events):
                self._events[g.name] = g

    # -- lookups -------------------------------------------------------------

    def attribute(self, key: str) -> Attribute | None:
        """The definition of ``key``, or of the template whose prefix ``key`` has."""
        a = self.attributes.get(key)
        return a if a is not None else self.find_template(key)

    def find_template(self, key: str) -> Attribute | None:
        for t in self.templates:
            if key.startswith(t.key) and key[len(t.key):len(t.key) + 1] == ".":
                return t
        return None

    def group(self, group_id: str) -> Group | None:
        return self.groups.get(group_id)

    def metric(self, name: str) -> Group | None:
        """The metric group whose ``metric_name`` is ``name``."""
        return self._metrics.get(name)

    def event(self, name: str) -> Group | None:
        return self._events.get(name)

    def span_group(self, name: str) -> Group | None:
        """The span group with id ``name`` (or ``span.<name>``, a v2 span type)."""
        g = self.groups.get(name)
        if g is not None and g.type == "span":
            return g
        g = self.groups.get("span." + name)
        return g if g is not None and g.type == "span" else None

    def groups_of_type(self, type: str) -> Iterator[Group]:
        return (g for g in self.groups.values() if g.type == type)

    def summary(self) -> dict[str, Any]:
        """Counts for ``knhk registry check``: files, groups by type, attributes, ..."""
        by_type: dict[str, int] = {}
        for g in self.groups.values():
            by_type[g.type] = by_type.get(g.type, 0) + 1
        attrs = self.attributes.values()
        return {
            "files": len(self.files),
            "groups": len(self.groups),
            "groups_by_type": dict(sorted(by_type.items())),
            "attributes": len(self.attributes),
            "templates": len(self.templates),
            "enums": sum(a.is_enum for a in attrs),
            "deprecated_attributes": sum(a.deprecated is not None for a in attrs),
            "stable_attributes": sum(a.stability == "stable" for a in attrs),
            "metrics": len(self._metrics),
            "events": len(self._events),
        }

    def __repr__(self) -> str:
        return (f"Registry({self.path!r}: {len(self.attributes)} attributes, "
                f"{len(self.groups)} groups)")
