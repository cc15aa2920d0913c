"""Build the Cython kernels in knhk/_core.

Directives are set once here. ``KNHK_CYTHON_DEBUG=1`` turns bounds checking
and wraparound back on for debugging a kernel. ``KNHK_BUILD_ONLY=_span,_otlp``
builds only those kernels (``python setup.py build_ext --inplace`` while
another kernel's source is half-edited).
"""

import os
import shutil
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

DEBUG = os.environ.get("KNHK_CYTHON_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        f"knhk._core.{path.stem}",
        [str(path)],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
        extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"],
    )
    for path in sorted(Path("knhk/_core").glob("*.pyx"))
]
ONLY = {m.strip() for m in os.environ.get("KNHK_BUILD_ONLY", "").split(",") if m.strip()}
if ONLY:
    extensions = [e for e in extensions if e.name.rsplit(".", 1)[1] in ONLY]



class build_py_with_registry(build_py):
    """Bundle the repo's ``registry/`` as ``knhk/_registry`` for installs outside the repo."""

    def run(self):
        super().run()
        src = Path(__file__).parent / "registry"
        if src.is_dir() and not self.editable_mode:
            dst = Path(self.build_lib) / "knhk" / "_registry"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))


setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
    cmdclass={"build_py": build_py_with_registry},
)
