"""Shared fixtures for knhk's tests.

Kept small on purpose: helpers that a single file needs live in that file.

Example::

    def test_x(pipeline_factory, make_span):
        p = pipeline_factory(lambda b: b.with_batch_size(2))
        p.record_span(make_span(1))
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import knhk


def _span(i: int, name: str = "op", **fields) -> knhk.Span:
    """Span number ``i`` (>= 1): trace ``i``, span ``i``, fixed times; ``fields`` override."""
    args = {"trace_id": i, "span_id": i, "start_time_ns": 1_000 * i, "duration_ns": 10}
    if "end_time_ns" in fields:
        del args["duration_ns"]
    args.update(fields)
    return knhk.Span(name, **args)


@pytest.fixture
def make_span() -> Callable[..., knhk.Span]:
    """``make_span(i, **fields)``: a valid span with ids derived from ``i``."""
    return _span


@pytest.fixture
def pipeline_factory():
    """Build pipelines that are always shut down (with a short timeout) at teardown.

    ``pipeline_factory(configure)`` calls ``configure(builder)`` on a fresh
    builder (small flush interval by default) and builds it.
    """
    built: list[knhk.TelemetryPipeline] = []

    def factory(configure: Callable[[knhk.PipelineBuilder], knhk.PipelineBuilder] | None = None
                ) -> knhk.TelemetryPipeline:
        builder = knhk.TelemetryPipeline.builder().with_flush_interval(0.01)
        if configure is not None:
            builder = configure(builder)
        pipeline = builder.build()
        built.append(pipeline)
        return pipeline

    yield factory
    for pipeline in built:
        pipeline.shutdown(timeout=1.0)


@pytest.fixture
def prometheus(tmp_path):
    """``start(target_port) -> query(promql)``: a real Prometheus (Debian's package)
    scraping knhk every second, stopped at teardown."""
    from knhk_testing import PrometheusServer

    servers: list[PrometheusServer] = []

    def start(target_port: int):
        servers.append(PrometheusServer(tmp_path, target_port))
        return servers[-1].query

    yield start
    for server in servers:
        server.stop()
