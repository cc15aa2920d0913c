"""Helpers shared by knhk's tests (``from knhk_testing import same``).

A module of its own rather than conftest.py: conftest modules of different folders
share one import name, so importing from them is order-dependent.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil

import pyarrow as pa
from pyarrow import ipc


def same(a, b) -> bool:
    """Equal *and* of the same Python type, recursively (1, 1.0 and True differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def ipc_messages(path) -> list[tuple[str, int, int, int]]:
    """(type, start, body start, stop) of every IPC message, by pyarrow's message reader."""
    out = []
    with pa.OSFile(str(path)) as f:
        f.seek(8)
        while True:
            start = f.tell()
            try:
                m = ipc.read_message(f)
            except EOFError:
                return out
            stop = f.tell()
            out.append((m.type, start, stop - (m.body.size if m.body else 0), stop))


class PrometheusServer:
    """A real Prometheus (Debian's ``/usr/bin/prometheus``) on loopback scraping one
    target every second, for tests; ``query(promql)`` asks its HTTP API.

    ``with PrometheusServer(tmp_path, target_port) as prom: prom.query("up")``
    """

    BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"

    def __init__(self, directory, target_port: int) -> None:
        import subprocess

        from knhk.testbed.serve import free_port

        self.port = free_port()
        config = os.path.join(directory, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "scrape_configs:\n  - job_name: knhk\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{target_port}']\n")
        self._log = open(os.path.join(directory, "prometheus.log"), "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [self.BINARY, f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(directory, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant query (asserts the API said success)."""
        import json
        import urllib.parse
        import urllib.request

        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        import subprocess

        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._log.close()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the load balancer's routing, in plain Python (independent of the NumPy router) -----

M64 = (1 << 64) - 1


def ref_mix(x: int) -> int:
    """SplitMix64's finalizer on a Python int."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_digest(data: bytes) -> int:
    """BLAKE2b-64 of ``data`` as a big-endian int."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def ref_trace_key(trace_id: bytes) -> int:
    hi, lo = int.from_bytes(trace_id[:8], "big"), int.from_bytes(trace_id[8:], "big")
    return ref_mix(hi ^ ref_mix(lo))


def ref_endpoint(key: int, endpoints: list[str]) -> str:
    """The endpoint with the highest ``mix(key ^ seed)``; ties to the first in sorted order."""
    ordered = sorted(set(endpoints))
    scores = [ref_mix(key ^ ref_digest(e.encode())) for e in ordered]
    return ordered[scores.index(max(scores))]
