"""Helpers of the knhk serve tests: real OpenTelemetry SDK senders, a serve subprocess."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

import pyarrow as pa


def sdk_send(endpoint: str, *, protocol: str = "grpc", traces: int = 20,
             children: int = 3, service: str = "sdk-app", errors: int = 0
             ) -> set[tuple[bytes, bytes]]:
    """Send ``traces`` traces of ``1 + children`` spans with the real opentelemetry-sdk
    OTLP exporter, the roots of the first ``errors`` with status ERROR; return the
    (trace_id, span_id) pairs sent."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import Status, StatusCode, format_span_id, format_trace_id

    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=f"http://{endpoint}", insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=f"http://{endpoint}/v1/traces")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=64))
    tracer = provider.get_tracer("knhk-serve-tests")
    sent = set()
    for i in range(traces):
        with tracer.start_as_current_span(f"GET /item/{i % 4}") as root:
            root.set_attribute("http.request.method", "GET")
            if i < errors:
                root.set_status(Status(StatusCode.ERROR, "boom"))
            ctx = root.get_span_context()
            sent.add((bytes.fromhex(format_trace_id(ctx.trace_id)),
                      bytes.fromhex(format_span_id(ctx.span_id))))
            for j in range(children):
                with tracer.start_as_current_span(f"step {j}") as child:
                    c = child.get_span_context()
                    sent.add((bytes.fromhex(format_trace_id(c.trace_id)),
                              bytes.fromhex(format_span_id(c.span_id))))
    assert provider.force_flush(30_000)
    provider.shutdown()
    return sent


def recorded_spans(directory: str) -> pa.Table:
    """Every span recorded under ``directory`` (knhk IPC files), as one table."""
    from knhk.batch import SpanBatch
    from knhk.replay import read_batches

    tables = [b.record_batch for b in read_batches(directory) if isinstance(b, SpanBatch)]
    return pa.Table.from_batches(tables) if tables else pa.table({})


def id_pairs(table: pa.Table) -> set[tuple[bytes, bytes]]:
    return set(zip(table.column("trace_id").to_pylist(), table.column("span_id").to_pylist(),
                   strict=True))


class ServeProcess:
    """``python -m knhk.cli serve --config PATH`` as a subprocess, its addresses parsed."""

    def __init__(self, config_path: str, env: dict[str, str] | None = None,
                 cwd: str | None = None, timeout: float = 20.0) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "knhk.cli", "serve", "--config", str(config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd)
        self.lines: list[str] = []
        self._rest = b""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        # raw reads: a buffered readline would hide lines from select()
        while not any(line.startswith("ready;") for line in self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise AssertionError(f"serve did not get ready: {self.lines}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                err = self.proc.stderr.read().decode()
                raise AssertionError(f"serve exited ({self.proc.wait()}): {self.lines} {err}")
            *done, self._rest = (self._rest + chunk).split(b"\n")
            self.lines += [d.decode() for d in done]

    def address(self, protocol: str) -> str:
        """The ``host:port`` (or URL) printed for ``protocol`` (``OTLP/gRPC``, ``health``...)."""
        for line in self.lines:
            m = re.match(rf"\s+\w+\s+{re.escape(protocol)}\s+(\S+)", line)
            if m:
                return m.group(1)
            if protocol == "health" and line.strip().startswith("health"):
                return line.split()[2]
        raise AssertionError(f"{protocol} not in {self.lines}")

    def terminate(self, timeout: float = 20.0) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        return (self.proc.returncode, "\n".join(self.lines) + "\n" + (self._rest + out).decode(),
                err.decode())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)
