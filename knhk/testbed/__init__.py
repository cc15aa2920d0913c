"""A reliability testbed: load generator, fault-injecting backends, accounting, a report.

The pieces follow the OpenTelemetry Collector's testbed: a
:class:`~knhk.testbed.load.LoadGenerator` sends OTLP at a set rate with
unique span ids to the system under test, run as its own process
(:class:`~knhk.testbed.sut.SutProcess`, the testbed's runner with every
counter exposed, or :class:`~knhk.testbed.serve.ServeProcess`, ``knhk serve``
on a config from :func:`~knhk.testbed.serve.serve_config`); it exports to backend sinks
(:class:`~knhk.testbed.sinks.GrpcSink`, :class:`~knhk.testbed.sinks.HttpSink`)
that record every span id and fail on command; :func:`~knhk.testbed.accounting.account`
checks that every span sent was received or counted as dropped, and
:class:`~knhk.testbed.report.Report` writes ``docs/RELIABILITY.md``.

Example
-------
>>> from knhk.testbed import account
>>> account({b"1", b"2"}, {b"1", b"2"}, {}).balanced
True
"""

import importlib
from typing import Any

# imported on first use, so ``python -m knhk.testbed.sut`` / ``.report`` run cleanly
_LAZY = {"Accounting": "accounting", "account": "accounting", "LoadGenerator": "load",
         "LoadResult": "load", "Report": "report", "ScenarioResult": "report",
         "Faults": "sinks", "GrpcSink": "sinks", "HttpSink": "sinks", "SutProcess": "sut",
         "counted_drops": "sut", "ServeProcess": "serve", "serve_config": "serve"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'knhk.testbed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"knhk.testbed.{module}"), name)
