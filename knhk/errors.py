"""The one error hierarchy of knhk.

Every class also inherits the builtin it resembles, so ``except ValueError``
written against a plain library keeps working::

    >>> from knhk.errors import SchemaError
    >>> issubclass(SchemaError, TypeError)
    True
"""

from __future__ import annotations

__all__ = [
    "BatchTooLargeError",
    "BuildError",
    "CorruptFileError",
    "KnhkError",
    "PipelineClosedError",
    "RegistryError",
    "SchemaError",
]


class KnhkError(Exception):
    """Base class of every error knhk raises on purpose."""


class SchemaError(KnhkError, TypeError):
    """A batch or column does not match the knhk schema (names the column)."""


class RegistryError(KnhkError, ValueError):
    """A semantic-convention registry could not be loaded (names file and line)."""


class BatchTooLargeError(KnhkError, ValueError):
    """A batch is larger than the pipeline can ever hold at once: retrying cannot help."""


class PipelineClosedError(KnhkError, RuntimeError):
    """The pipeline was shut down and takes no more input."""


class CorruptFileError(KnhkError, OSError):
    """An Arrow IPC file is truncated or corrupt.

    ``path`` and ``offset`` say where; ``batches_read`` how many batches before
    the fault were delivered.
    """

    def __init__(self, message: str, *, path: str, offset: int, batches_read: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.batches_read = batches_read


class BuildError(KnhkError, ImportError):
    """The compiled kernels in ``knhk._core`` are missing or stale."""
