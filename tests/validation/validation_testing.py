"""Registries and helpers shared by the validation tests (imported by name, not via conftest)."""

from __future__ import annotations

import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEMCONV = REPO.parent / "shared" / "testdata" / "semconv"
KNHK_REGISTRY = REPO / "registry"

SMALL_V1 = """
groups:
  - id: registry.test
    type: attribute_group
    brief: test attributes
    attributes:
      - id: t.str
        type: string
        stability: stable
        brief: a string
        examples: ["a"]
      - id: t.int
        type: int
        stability: stable
        brief: an int
      - id: t.dbl
        type: double
        stability: stable
        brief: a double
      - id: t.bool
        type: boolean
        stability: development
        brief: a bool
      - id: t.strs
        type: string[]
        stability: stable
        brief: strings
      - id: t.ints
        type: int[]
        stability: stable
        brief: ints
      - id: t.dbls
        type: double[]
        stability: stable
        brief: doubles
      - id: t.bools
        type: boolean[]
        stability: stable
        brief: bools
      - id: t.any
        type: any
        stability: stable
        brief: anything
      - id: t.color
        stability: stable
        brief: a color
        type:
          members:
            - id: red
              value: red
              stability: stable
            - id: green
              stability: stable
      - id: t.code
        stability: release_candidate
        brief: a status code
        type:
          members:
            - id: ok
              value: 0
              stability: stable
            - id: err
              value: 2
              stability: stable
      - id: t.header
        type: template[string]
        stability: stable
        brief: headers
      - id: t.old
        type: string
        stability: development
        brief: old name
        deprecated:
          reason: renamed
          renamed_to: t.str
      - id: t.gone
        type: string
        stability: experimental
        brief: removed
        deprecated: "Removed, no replacement."
  - id: test.base
    type: attribute_group
    brief: base attributes
    attributes:
      - ref: t.str
        requirement_level: required
      - ref: t.int
        requirement_level:
          conditionally_required: when known
  - id: test.op
    type: span
    span_kind: internal
    stability: stable
    brief: an operation
    extends: test.base
    attributes:
      - ref: t.int
        note: refined note
      - ref: t.color
        requirement_level: recommended
      - ref: t.header
        requirement_level: opt_in
      - ref: t.bool
        requirement_level:
          opt_in: if set
  - id: test.metric
    type: metric
    metric_name: test.requests
    instrument: counter
    unit: "{request}"
    stability: development
    brief: requests
    attributes:
      - ref: t.code
        requirement_level: required
"""

SMALL_V2 = """
file_format: definition/2
attributes:
  - key: v2.size
    type: int
    stability: stable
    brief: a size
attribute_groups:
  - id: v2.common
    visibility: internal
    attributes:
      - ref: v2.size
        requirement_level: required
spans:
  - type: v2.op
    kind: client
    name:
      note: "v2 op"
    stability: development
    brief: a v2 span
    attributes:
      - ref_group: v2.common
      - ref: t.str
        sampling_relevant: true
span_refinements:
  - id: v2.op.refined
    ref: v2.op
    attributes:
      - ref: t.color
        requirement_level: required
metrics:
  - name: v2.latency
    instrument: histogram
    unit: s
    stability: stable
    brief: latency
    attributes:
      - ref: v2.size
"""


def write_registry(root: Path, files: dict[str, str]) -> Path:
    """Write ``{relative path: YAML text}`` under ``root``; returns ``root``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root
