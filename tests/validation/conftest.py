"""Fixtures of the validation tests: registries (real and handwritten) and a cache dir.

``small_registry`` is a handwritten registry in both syntaxes that exercises
every resolution rule the validator depends on (refs with overrides, extends,
ref_group, v2 refinements, enums with defaulted values, templates, deprecation
forms, stability aliases, metrics).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from validation_testing import KNHK_REGISTRY, SEMCONV, SMALL_V1, SMALL_V2, write_registry


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory: pytest.TempPathFactory,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the default registry cache ($XDG_CACHE_HOME/knhk) out of the user's home:
    pipelines built with ``with_weaver_registry`` use the default location."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="session")
def semconv_path() -> str:
    assert SEMCONV.is_dir(), f"the semantic-conventions test data is missing at {SEMCONV}"
    return str(SEMCONV)


@pytest.fixture(scope="session")
def knhk_registry_path() -> str:
    assert KNHK_REGISTRY.is_dir(), f"knhk's own registry is missing at {KNHK_REGISTRY}"
    return str(KNHK_REGISTRY)


@pytest.fixture(scope="session")
def small_registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("small-registry")
    write_registry(root, {"test/registry.yaml": SMALL_V1, "v2/signals.yaml": SMALL_V2,
                          "manifest.yaml": "name: small\nsemconv_version: 0.0.1\n"})
    return str(root)


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    d = tmp_path / "cache"
    return os.fspath(d)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.fspath(tmp_path_factory.mktemp("registry-cache"))
