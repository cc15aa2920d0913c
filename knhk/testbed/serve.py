"""``knhk serve`` as the system under test: a Collector-shaped config and the process.

:func:`serve_config` writes the configuration the scenarios need (OTLP
receivers on given ports, a batch processor, OTLP exporters to the sinks
with a sending queue); :class:`ServeProcess` runs ``knhk serve --config``
on it, waits for "ready", and on SIGTERM reads the summary table it prints.

Example
-------
>>> cfg = serve_config(4317, 4318, [("grpc", "127.0.0.1:9")], queue_size=50)
>>> cfg["exporters"]["otlp/sink0"]["sending_queue"]["queue_size"]
50
>>> from knhk.serve import validate_config
>>> validate_config(cfg)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
from typing import Any

from knhk.testbed._child import ChildProcess

__all__ = ["ServeProcess", "free_port", "serve_config"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (port 0 works too: the banner names the port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(grpc_port: int, http_port: int, exporters: list[tuple[str, str]], *,
                 queue_size: int = 1000, consumers: int = 4, timeout: str = "2s",
                 batch_size: int = 512, shutdown_timeout: str = "10s") -> dict[str, Any]:
    """A ``knhk serve`` configuration: OTLP in on the ports, OTLP out to ``exporters``.

    ``exporters`` are ``(kind, endpoint)`` with kind ``grpc`` (``host:port``) or
    ``http`` (the base URL); they are named ``otlp/sink<i>`` / ``otlphttp/sink<i>``.
    """
    out: dict[str, Any] = {}
    for i, (kind, endpoint) in enumerate(exporters):
        body = {"endpoint": endpoint, "timeout": timeout,
                "sending_queue": {"queue_size": queue_size, "num_consumers": consumers},
                "retry_on_failure": {"enabled": True}}
        if kind == "grpc":
            body["tls"] = {"insecure": True}
            out[f"otlp/sink{i}"] = body
        elif kind == "http":
            out[f"otlphttp/sink{i}"] = body
        else:
            raise ValueError(f"exporter kind must be 'grpc' or 'http', got {kind!r}.")
    return {
        "receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": f"127.0.0.1:{grpc_port}"},
            "http": {"endpoint": f"127.0.0.1:{http_port}"}}}},
        "processors": {"batch": {"send_batch_size": batch_size, "timeout": "50ms"}},
        "exporters": out,
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                             "exporters": list(out)}},
                    "telemetry": {"logs": {"level": "warn"}},
                    "shutdown_timeout": shutdown_timeout},
    }


class ServeProcess(ChildProcess):
    """``knhk serve --config`` on ``config`` (a dict), started in ``workdir``."""

    def __init__(self, config: dict[str, Any], workdir: str, *,
                 ready_timeout: float = 30.0) -> None:
        import yaml

        self.config = config
        path = os.path.join(workdir, f"serve-{id(self)}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        code = "import sys; from knhk.cli import main; sys.exit(main(sys.argv[1:]))"
        super().__init__([sys.executable, "-c", code, "serve", "--config", path],
                         os.path.join(workdir, f"serve-{id(self)}.log"))
        self.banner: list[str] = []
        done = threading.Event()

        def read() -> None:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                self.banner.append(line)
                if line.startswith("ready"):
                    break
            done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(ready_timeout) or not any(ln.startswith("ready") for ln in self.banner):
            self.kill()
            raise RuntimeError(f"knhk serve did not start: {''.join(self.banner)!r}; "
                               f"log: {self.log()}")
        protocols = config["receivers"]["otlp"]["protocols"]
        grpc_at, http_at = protocols["grpc"]["endpoint"], protocols["http"]["endpoint"]
        for line in self.banner:  # the bound addresses (port 0 resolved)
            m = re.match(r"\s*listening\s+OTLP/(gRPC|HTTP)\s+(\S+)", line)
            if m and m.group(1) == "gRPC":
                grpc_at = m.group(2)
            elif m:
                http_at = m.group(2)
        self.grpc_endpoint = grpc_at
        self.http_url = f"http://{http_at}/v1/traces"
        self.pid = self.proc.pid

    def terminate(self, timeout: float = 60.0) -> dict[str, int]:
        """SIGTERM; the summary table's numbers, e.g. ``{"traces: spans received": 10, ...}``."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        self._log.close()
        self.returncode = self.proc.returncode
        summary = {}
        for line in out.decode(errors="replace").splitlines():
            m = re.match(r"\s*(\S.*?:\s.*?\S)\s{2,}([\d,]+)\s*$", line)
            if m:
                summary[m.group(1)] = int(m.group(2).replace(",", ""))
        return summary
