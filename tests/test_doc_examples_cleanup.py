"""Docstring examples that write files leave nothing behind in the temp directory.

Each module's examples run (as ``--doctest-modules`` runs them) with
``tempfile`` pointed at an empty directory, which must be empty afterwards.
"""

from __future__ import annotations

import doctest
import importlib
import os
import tempfile

import pytest

MODULES = [
    "knhk.replay",
    "knhk.exporters.ipc",
    "knhk.exporters._persistent_queue",
    "knhk.exporters._lb_resolvers",
    "knhk.validation.loader",
    "knhk.analysis",
    "knhk.analysis._scan",
    "knhk.pipeline",
    "knhk.testbed.report",
    "knhk.testbed.disk",
    "knhk.distributed",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples_clean_up_their_temporary_files(name, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    assert any("tempfile" in t.docstring for t in tests), f"{name} has no file example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t, out=lambda s: None)
    assert runner.failures == 0, f"{name}: {runner.failures} example(s) failed"
    assert os.listdir(scratch) == []
