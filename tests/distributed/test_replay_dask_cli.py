"""``knhk replay --dask``: the distributed analyses from the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from knhk.analysis import open_dataset


def _knhk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knhk", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "spans.arrow"
    done = _knhk("generate", "--spans", "3000", "--seed", "5", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_replay_on_a_local_cluster_reports_every_span(recording):
    done = _knhk("replay", str(recording), "--dask", "local:2", "--analyses", "aggregates,traces")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("1 files, 3,000 spans"), first
    summary = open_dataset(recording).summary()
    assert f"traces: {summary['traces']} " in done.stdout


@pytest.mark.parametrize("args, message", [
    (("--dask", "tcp://127.0.0.1:9", "--dask-timeout", "1"), "127.0.0.1:9"),
    (("--dask", "local:2", "--speed", "2"), "neither --speed nor --config"),
    (("--dask", "nonsense"), "nonsense"),
])
def test_replay_dask_mistakes_are_one_line_and_exit_2(recording, args, message):
    done = _knhk("replay", str(recording), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
