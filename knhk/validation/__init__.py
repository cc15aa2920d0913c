"""Semantic-convention validation: load Weaver registries, validate batches, live-check.

>>> from knhk.validation import WeaverValidator
>>> v = WeaverValidator("registry/")
>>> v.validate_span("workflow.execute", {"workflow.id": "1"}).is_valid()
False
"""

from knhk.validation.compiled import (
    CompiledRegistry,
    default_cache_dir,
    load_compiled,
    save_compiled,
)
from knhk.validation.loader import RegistryIssue, load_registry
from knhk.validation.model import (
    Attribute,
    Deprecated,
    EnumMember,
    Group,
    Registry,
    RequirementLevel,
)
from knhk.validation.validator import (
    BatchValidationReport,
    Finding,
    FindingId,
    FindingLevel,
    ValidationAction,
    ValidationPolicy,
    ValidationResult,
    ValidationStage,
    ValidationStats,
    WeaverValidator,
    annotate_batch,
)

__all__ = [
    "Attribute",
    "BatchValidationReport",
    "CompiledRegistry",
    "Deprecated",
    "EnumMember",
    "Finding",
    "FindingId",
    "FindingLevel",
    "Group",
    "Registry",
    "RegistryIssue",
    "RequirementLevel",
    "ValidationAction",
    "ValidationPolicy",
    "ValidationResult",
    "ValidationStage",
    "ValidationStats",
    "WeaverValidator",
    "annotate_batch",
    "default_cache_dir",
    "load_compiled",
    "load_registry",
    "save_compiled",
]
