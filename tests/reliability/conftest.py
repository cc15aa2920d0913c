"""Fixtures of the reliability suite: the session's report, sinks and systems under test.

Every scenario records a :class:`knhk.testbed.ScenarioResult` through the
``report`` fixture, pass or fail; at the end of the session they are merged
into docs/RELIABILITY.md by scenario (a partial run updates its own rows only).
"""

from __future__ import annotations

import pytest

from knhk.testbed import GrpcSink, HttpSink, Report, SutProcess


@pytest.fixture(scope="session")
def report():
    rep = Report()
    yield rep
    rep.write()


@pytest.fixture
def sinks():
    """``sinks(kind="grpc", **kw)`` makes a started sink, stopped at teardown."""
    made = []

    def make(kind: str = "grpc", **kw):
        sink = (GrpcSink if kind == "grpc" else HttpSink)(**kw).start()
        made.append(sink)
        return sink

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def sut(tmp_path):
    """``sut(*args)`` starts a system under test (receivers on free ports); killed at teardown."""
    started = []

    def start(*args: str, receivers: bool = True) -> SutProcess:
        extra = ["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"] if receivers else []
        proc = SutProcess([*extra, *args], str(tmp_path))
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.kill()
