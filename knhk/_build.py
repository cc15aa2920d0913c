"""Import the compiled kernels with an error that says how to build them."""

from __future__ import annotations

import importlib
from types import ModuleType

from knhk.errors import BuildError

#: The compiled modules of knhk._core, in the order ``knhk info`` lists them.
CORE_MODULES = ("_span", "_ringbuffer", "_sampling", "_validate", "_tracing", "_otlp", "_sketch",
                "_jaeger")

_HOW = (
    "knhk's compiled core is missing or was built for another Python/NumPy. "
    "Build it with `pip install .` (or `pip install -e .` for development; "
    "`python setup.py build_ext --inplace` rebuilds in place) from the source tree."
)


def load_core(name: str) -> ModuleType:
    """Import ``knhk._core.<name>``, turning a missing build into a BuildError."""
    try:
        return importlib.import_module(f"knhk._core.{name}")
    except ImportError as exc:
        raise BuildError(f"cannot import knhk._core.{name}: {exc}. {_HOW}") from exc
