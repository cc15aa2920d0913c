"""Where :mod:`knhk.exporters.loadbalancing` sends: endpoint checking and the resolvers
(a static list, DNS, a file re-read when it changes).

Example
-------
>>> normalize_endpoint("localhost"), StaticResolver(["b:1", "a:1", "a:1"]).resolve()
('localhost:4317', ['a:1', 'b:1'])
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterable
from typing import Any

from knhk.errors import KnhkError

__all__ = ["DEFAULT_PORT", "DnsResolver", "FileResolver", "ResolveError", "StaticResolver",
           "normalize_endpoint", "unique_sorted"]

#: Port an endpoint gets when it names none (the OTLP/gRPC default, as in the Collector).
DEFAULT_PORT = 4317


class ResolveError(KnhkError, OSError):
    """The set of endpoints could not be resolved (DNS failure, unreadable or bad file)."""


def normalize_endpoint(endpoint: Any, where: str = "endpoint") -> str:
    """Check one downstream endpoint and return it canonically written.

    ``host:port``, ``[v6-address]:port``, ``host`` (port 4317, as the
    Collector assumes) or a URL ``http(s)://host:port[/path]``. The string is
    what routing hashes, so spellings of one backend are made one: host names
    in lower case, IPv6 addresses compressed, ports without leading zeros, and
    a URL without a trailing ``/`` or ``/v1/traces``.

    Raises
    ------
    ValueError
        Naming ``where`` and what was wrong.

    Examples
    --------
    >>> normalize_endpoint(" backend-1:4317 "), normalize_endpoint("backend-2")
    ('backend-1:4317', 'backend-2:4317')
    >>> normalize_endpoint("[0:0::1]:4317"), normalize_endpoint("Backend:04317")
    ('[::1]:4317', 'backend:4317')
    >>> normalize_endpoint("http://A:4318/v1/traces/")
    'http://a:4318'
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ValueError(f"{where}: expected 'host:port', got {endpoint!r}")
    text = endpoint.strip()
    if any(c.isspace() for c in text):
        raise ValueError(f"{where}: an endpoint must not contain blanks, got {endpoint!r}")
    if "://" in text:
        parsed = urllib.parse.urlparse(text)
        try:
            port = parsed.port
        except ValueError:
            port = -1
        if parsed.scheme not in ("http", "https") or not parsed.hostname or port == -1:
            raise ValueError(f"{where}: expected an http(s)://host:port URL, got {endpoint!r}")
        path = parsed.path.rstrip("/")
        if path.endswith("/v1/traces"):
            path = path[:-len("/v1/traces")]
        host = _canonical_host(parsed.hostname)
        netloc = f"[{host}]" if ":" in host else host
        if port is not None:
            netloc += f":{port}"
        return urllib.parse.urlunparse((parsed.scheme, netloc, path, "", parsed.query, ""))
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{where}: {host!r} in brackets is not an IPv6 address "
                             f"(in {endpoint!r})") from None
        host = _canonical_host(host)
        if not rest:
            return f"[{host}]:{DEFAULT_PORT}"
        port_text = rest[1:] if rest.startswith(":") else None
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{where}: write an IPv6 address in brackets, "
                             f"as [{host}]:{port_text}; got {endpoint!r}")
    else:
        return f"{_canonical_host(text)}:{DEFAULT_PORT}"
    if not host or not port_text or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{where}: expected 'host:port' with a port 1-65535, got {endpoint!r}")
    host = _canonical_host(host)
    return f"[{host}]:{int(port_text)}" if ":" in host else f"{host}:{int(port_text)}"


def _canonical_host(host: str) -> str:
    """One spelling per host: IP addresses compressed, names in lower case."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower()


def unique_sorted(endpoints: Iterable[Any], where: str) -> tuple[str, ...]:
    """Every endpoint checked (:func:`normalize_endpoint`), without repeats, sorted."""
    if isinstance(endpoints, str | bytes):
        raise TypeError(f"{where}: expected a list of endpoints, got the string {endpoints!r}")
    return tuple(sorted({normalize_endpoint(e, f"{where}[{i}]")
                         for i, e in enumerate(endpoints)}))


class StaticResolver:
    """A fixed list of endpoints (the Collector's ``static`` resolver).

    Examples
    --------
    >>> StaticResolver(["b:4317", "a:4317"]).resolve()
    ['a:4317', 'b:4317']
    """

    interval: float | None = None

    def __init__(self, endpoints: Iterable[str]) -> None:
        self.endpoints = list(unique_sorted(endpoints, "StaticResolver.endpoints"))
        if not self.endpoints:
            raise ValueError("StaticResolver.endpoints: name at least one endpoint.")

    def resolve(self) -> list[str]:
        return list(self.endpoints)

    def describe(self) -> str:
        return "static " + ", ".join(self.endpoints)


class DnsResolver:
    """Every A/AAAA address of ``hostname``, each as an endpoint ``address:port``.

    The Collector's ``dns`` resolver: re-resolved every ``interval`` seconds;
    a lookup that fails or takes longer than ``timeout`` keeps the previous
    set (and is counted). IPv6 addresses are written ``[address]:port``.

    Examples
    --------
    >>> "127.0.0.1:4317" in DnsResolver("localhost").resolve()
    True
    """

    def __init__(self, hostname: str, port: int = DEFAULT_PORT, *, interval: float = 5.0,
                 timeout: float = 1.0) -> None:
        if not isinstance(hostname, str) or not hostname.strip() or ":" in hostname:
            raise ValueError(f"DnsResolver.hostname: expected a host name without a port, "
                             f"got {hostname!r}.")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"DnsResolver.port: expected a port 1-65535, got {port!r}.")
        for name, value in (("interval", interval), ("timeout", timeout)):
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"DnsResolver.{name}: expected seconds > 0, got {value!r}.")
        self.hostname = hostname.strip()
        self.port = port
        self.interval = float(interval)
        self.timeout = float(timeout)
        self._pending: threading.Thread | None = None

    def resolve(self) -> list[str]:
        if self._pending is not None and self._pending.is_alive():
            # one lookup at a time: a resolver that hangs does not pile up threads
            raise ResolveError(f"DNS lookup of {self.hostname!r} still running (started "
                               f"more than {self.timeout:g} s ago)")
        result: list[Any] = []

        def lookup() -> None:
            try:
                result.append(socket.getaddrinfo(self.hostname, self.port,
                                                 type=socket.SOCK_STREAM))
            except OSError as exc:
                result.append(exc)

        # getaddrinfo has no timeout of its own; an abandoned lookup ends by itself
        t = self._pending = threading.Thread(target=lookup, name="knhk-lb-dns", daemon=True)
        t.start()
        t.join(self.timeout)
        if not result:
            raise ResolveError(f"DNS lookup of {self.hostname!r} took longer than "
                               f"{self.timeout:g} s")
        if isinstance(result[0], OSError):
            exc = result[0]
            raise ResolveError(f"DNS lookup of {self.hostname!r} failed: "
                               f"{getattr(exc, 'strerror', None) or exc}")
        out = set()
        for family, _, _, _, sockaddr in result[0]:
            host = sockaddr[0]
            out.add(f"[{host}]:{self.port}" if family == socket.AF_INET6 else
                    f"{host}:{self.port}")
        return sorted(out)

    def describe(self) -> str:
        return f"dns {self.hostname}:{self.port} every {self.interval:g} s"


class FileResolver:
    """Endpoints listed in a file, one per line, re-read when the file changes.

    A knhk extension: the simplest way to change the set at run time
    without Kubernetes. Blank lines and ``#`` comments are ignored. The file
    is checked every ``interval`` seconds and re-read when its modification
    time or size changed; a missing file or a bad line keeps the previous
    set (and is counted, with the file and line in the log). Write the new
    file beside the old one and rename it over, so a reader never sees half.

    Examples
    --------
    >>> import tempfile, os
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "backends.txt")
    >>> with open(path, "w") as f:
    ...     _ = f.write("# the tail-sampling tier\\nb:4317\\n\\na:4317  # primary\\n")
    >>> FileResolver(path).resolve()
    ['a:4317', 'b:4317']
    >>> tmp.cleanup()
    """

    def __init__(self, path: str | os.PathLike, *, interval: float = 1.0) -> None:
        if not isinstance(interval, int | float) or not interval > 0:
            raise ValueError(f"FileResolver.interval: expected seconds > 0, got {interval!r}.")
        self.path = os.fspath(path)
        self.interval = float(interval)
        self._stamp: tuple[int, int, int] | None = None
        self._cached: list[str] = []

    def resolve(self) -> list[str]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise ResolveError(f"cannot read the endpoints file {self.path!r}: "
                               f"{exc.strerror or exc}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return list(self._cached)
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ResolveError(f"cannot read the endpoints file {self.path!r}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        out = set()
        for no, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                out.add(normalize_endpoint(text, f"{self.path}:{no}"))
            except ValueError as exc:
                raise ResolveError(str(exc)) from None
        self._stamp, self._cached = stamp, sorted(out)
        return list(self._cached)

    def describe(self) -> str:
        return f"file {self.path} (checked every {self.interval:g} s)"
