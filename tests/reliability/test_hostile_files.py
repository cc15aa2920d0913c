"""Hostile files (issue 11, §3): truncated or forged Arrow IPC for replay, YAML with Python tags.

In-process: these inputs reach knhk as files, not over the network. Pass: a
clear error naming the file (and where), nothing executed, nothing good lost
before the damage.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

import knhk
from knhk.errors import KnhkError
from knhk.testbed import ScenarioResult


def _row(report, sid, title, passed, details):
    details = re.sub(r"/tmp/pytest-of-[^ :]*?/[^ :/]*/", "<tmp>/", details)
    report.add(ScenarioResult(sid, title, "clear error naming the file, nothing executed, "
                              "nothing good lost", passed=passed, kind="hostile",
                              load="file", sent=1, details=details))


@pytest.fixture
def arrow_file(tmp_path):
    """A real knhk IPC file of 3 batches, written by IpcExporter."""
    from knhk import workload
    from knhk.exporters.ipc import IpcExporter

    exporter = IpcExporter(tmp_path / "out")
    for k in range(3):
        exporter.export(workload.generate(200, workload.WorkloadConfig(seed=k)))
    exporter.shutdown()
    files = sorted(p for p in (tmp_path / "out").iterdir() if p.suffix in (".arrow", ".arrows"))
    assert files
    return files[0]


def test_truncated_arrow_file_for_replay(arrow_file, report):
    from knhk.replay import read_batches

    whole = sum(b.num_rows for b in read_batches(str(arrow_file)))
    data = arrow_file.read_bytes()
    arrow_file.write_bytes(data[:int(len(data) * 0.6)])
    got, error = 0, None
    try:
        for b in read_batches(str(arrow_file)):
            got += b.num_rows
    except KnhkError as exc:
        error = exc
    clear = error is not None and str(arrow_file) in str(error)
    _row(report, "hostile-truncated-arrow-ipc", "Arrow IPC file cut at 60% (replay)",
         clear and 0 < got < whole,
         f"{got} of {whole} spans read before the cut; error: {str(error)[:160]}")
    assert clear, error
    assert 0 < got < whole


def test_forged_arrow_file_for_replay(tmp_path, report):
    from knhk.replay import read_batches

    forged = tmp_path / "forged.arrow"
    # the Arrow file magic around garbage: looks like a file, is none
    forged.write_bytes(b"ARROW1\0\0" + os.urandom(4096) + b"ARROW1")
    with pytest.raises(KnhkError) as info:
        list(read_batches(str(forged)))
    clear = str(forged) in str(info.value)
    _row(report, "hostile-forged-arrow-ipc", "forged Arrow IPC file (replay)", clear,
         f"error: {str(info.value)[:160]}")
    assert clear


def test_serve_config_with_python_tags_is_refused(tmp_path, report):
    from knhk.serve import ConfigError, parse_config

    marker = tmp_path / "pwned"
    text = ("receivers: !!python/object/apply:os.system ['touch " + str(marker) + "']\n"
            "exporters: {debug: {}}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="evil.yaml")
    executed = marker.exists()
    _row(report, "hostile-yaml-python-tag-serve-config", "knhk serve config with a Python tag",
         not executed and "evil.yaml" in str(info.value),
         f"executed: {executed}; error: {str(info.value)[:160]}")
    assert not executed
    assert "evil.yaml" in str(info.value)


def test_registry_yaml_with_python_tags_is_refused(tmp_path, report):
    from knhk.validation import WeaverValidator

    root = tmp_path / "registry"
    shutil.copytree(os.path.join(os.path.dirname(knhk.__file__), "..", "registry"), root)
    marker = tmp_path / "pwned"
    evil = root / "http" / "evil.yaml"
    evil.write_text("groups: !!python/object/apply:os.system ['touch " + str(marker) + "']\n")
    error = None
    try:
        WeaverValidator(str(root))
    except Exception as exc:  # what matters: which error, and that nothing ran
        error = exc
    executed = marker.exists()
    named = error is not None and "evil.yaml" in str(error)
    _row(report, "hostile-yaml-python-tag-registry", "Weaver registry YAML with a Python tag",
         not executed and named, f"executed: {executed}; error: "
         f"{type(error).__name__}: {str(error)[:160]}")
    assert not executed
    assert named, error
