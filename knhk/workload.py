"""Synthetic, deterministic trace workloads from a random microservice topology.

Every later test, benchmark, notebook and demo feeds knhk from here. A seeded
:class:`Topology` (entry services such as ``frontend``, downstream services
such as ``checkout`` or ``payment``, their HTTP or gRPC operations, call edges
forming a DAG, databases and message queues) is turned into a few hundred
trace *templates* (call trees). Batches are then stamped out with NumPy: pick
templates, tile their nodes, draw ids, log-normal durations, errors and slow
spans for every row at once, and assemble the Arrow RecordBatch directly in
:data:`knhk.SPAN_SCHEMA`. No Python object is created per span.

Attribute keys, types and requirement levels follow the repository's own
semantic-convention registry (``registry/``).

Example
-------
>>> import knhk
>>> from knhk.workload import WorkloadConfig, generate
>>> batch = generate(1_000, WorkloadConfig(seed=7))
>>> batch.num_rows
1000
>>> int((batch.column("parent_span_id").is_null()).sum().as_py()) > 0   # some roots
True
>>> generate(1_000, WorkloadConfig(seed=7)).equals(batch)                 # deterministic
True
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from knhk import __version__
from knhk.batch import SpanBatch
from knhk.schema import ATTRIBUTE_STRUCT, ATTRIBUTES_TYPE, SPAN_SCHEMA, AttrType, SpanKind

__all__ = [
    "Database",
    "Operation",
    "Queue",
    "Service",
    "Topology",
    "WorkloadConfig",
    "feed",
    "generate",
    "generate_batches",
]

logger = logging.getLogger(__name__)

#: 2025-01-01T00:00:00Z; the default first timestamp is this plus ``seed % 1000`` days.
_EPOCH_NS = 1_735_689_600 * 10**9
_DAY_NS = 86_400 * 10**9
#: Pacing used when ``spans_per_second`` is None.
DEFAULT_SPANS_PER_SECOND = 10_000.0

_TEMPLATE_VARIANTS = 16     # call trees drawn per entry operation
_MAX_TEMPLATE_SPANS = 600   # keeps one trace from swallowing a batch
_INSTANCES = 3              # hosts per service
_MAX_BATCH = 100_000_000
_PROPAGATE = 0.5            # chance a failing child fails its (non-client) parent

_ENTRY_NAMES = ("frontend", "api-gateway", "mobile-bff", "partner-api")
_SERVICE_NAMES = (
    "checkout", "payment", "cart", "catalog", "shipping", "currency", "recommendation",
    "ad", "email", "auth", "inventory", "search", "user", "pricing", "review",
    "fraud-detection", "accounting", "quote", "notification", "loyalty",
)
_HTTP_ROUTES = (
    ("GET", "/api/{r}"), ("GET", "/api/{r}/{id}"), ("POST", "/api/{r}"),
    ("PUT", "/api/{r}/{id}"), ("DELETE", "/api/{r}/{id}"), ("GET", "/api/{r}/search"),
    ("PATCH", "/api/{r}/{id}"), ("POST", "/api/{r}/{id}/actions"),
)
_ENTRY_RESOURCES = ("products", "cart", "checkout", "orders", "account", "recommendations",
                    "search", "ads")
_POD_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_OK_CODE = {"GET": 200, "POST": 201, "PUT": 200, "DELETE": 204, "PATCH": 200}
_RPC_VERBS = ("Get", "List", "Create", "Update", "Delete", "Check", "Search", "Convert")
_INTERNAL_VERBS = ("validate", "authorize", "serialize", "render", "compute",
                   "cache.lookup", "transform", "enrich")
_DB_SYSTEMS = {
    # system: (port, operations)
    "postgresql": (5432, ("SELECT", "INSERT", "UPDATE", "DELETE")),
    "mysql": (3306, ("SELECT", "INSERT", "UPDATE", "DELETE")),
    "mariadb": (3306, ("SELECT", "INSERT", "UPDATE")),
    "mongodb": (27017, ("find", "insert", "update", "aggregate")),
    "redis": (6379, ("GET", "SET", "HGETALL", "DEL")),
}
_QUEUE_NAMES = ("orders", "payments", "notifications", "shipments", "events", "audit",
                "emails", "inventory-updates")
_MESSAGING = {"kafka": (9092, "send"), "rabbitmq": (5672, "publish")}
_WORKFLOW_PATTERNS = ("sequence", "parallel_split", "synchronization", "exclusive_choice",
                      "simple_merge", "multi_choice", "deferred_choice")

# Error families: (error.type values, status messages); http also has status codes.
_HTTP, _GRPC, _DB, _MSG, _INTERNAL = range(5)
_ERRORS = {
    _HTTP: (("500", "502", "503", "504"),
            ("500 Internal Server Error", "502 Bad Gateway", "503 Service Unavailable",
             "504 Gateway Timeout")),
    _GRPC: (("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "RESOURCE_EXHAUSTED"),
            ("upstream connect error or disconnect/reset before headers",
             "deadline exceeded after 2s", "internal error", "too many concurrent streams")),
    _DB: (("timeout", "deadlock_detected", "connection_refused"),
          ("query timed out", "deadlock detected", "connection refused")),
    _MSG: (("timeout", "broker_unavailable"),
           ("send timed out", "no broker available for the destination")),
    _INTERNAL: (("ValueError", "KeyError", "TimeoutError"),
                ("invalid input", "missing key", "operation timed out")),
}
_HTTP_ERROR_CODES = np.array([500, 502, 503, 504], dtype=np.int64)

# Attribute slot behaviours.
_STATIC, _POOL, _STATUS, _ERRTYPE = range(4)

_STRING = int(AttrType.STRING)
_INT = int(AttrType.INT)


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadConfig:
    """What workload to generate; equal configs give byte-identical output.

    Parameters
    ----------
    seed : int
        Seeds the topology and the traffic (``numpy.random.SeedSequence``).
    services : int
        Number of services, entry services (``frontend``, ...) included.
    operations_per_service : int
        Distinct operations (HTTP routes or gRPC methods) each service serves.
    max_depth : int
        Most cross-service hops below the entry service in one trace.
    max_fan_out : int
        Most downstream calls one operation makes.
    error_rate : float
        Probability that a span *originates* an error; ancestors may then fail too.
    slow_rate : float
        Probability that a span is slow: its own time is multiplied by ``slow_factor``
        (a leaf span's whole duration; for a parent, the time around its children).
    slow_factor : float
        How much slower a slow span is (>= 1).
    start_time_ns : int or None
        First trace start; None uses a fixed epoch derived from the seed.
    spans_per_second : float or None
        Traffic rate: ``n`` spans cover ``n / spans_per_second`` seconds of traces.
        None means ``DEFAULT_SPANS_PER_SECOND``.
    messaging, db : bool
        Whether the topology has message queues (PRODUCER/CONSUMER spans) and
        databases (DB CLIENT spans).
    """

    seed: int = 0
    services: int = 8
    operations_per_service: int = 4
    max_depth: int = 5
    max_fan_out: int = 4
    error_rate: float = 0.01
    slow_rate: float = 0.02
    slow_factor: float = 20.0
    start_time_ns: int | None = None
    spans_per_second: float | None = None
    messaging: bool = True
    db: bool = True

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"WorkloadConfig.{name} must be an int, "
                                f"got {type(value).__name__}")
            if value < low:
                raise ValueError(f"WorkloadConfig.{name} must be at least {low}, got {value}.")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise TypeError(f"WorkloadConfig.{name} must be a number, "
                                f"got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"WorkloadConfig.{name} must be finite, got {value}.")
            return float(value)

        integer("seed", 0)
        integer("services", 1)
        integer("operations_per_service", 1)
        integer("max_depth", 0)
        integer("max_fan_out", 0)
        for name in ("error_rate", "slow_rate"):
            if not 0.0 <= number(name) <= 1.0:
                raise ValueError(f"WorkloadConfig.{name} must be between 0 and 1, "
                                 f"got {getattr(self, name)}.")
        if number("slow_factor") < 1.0:
            raise ValueError(f"WorkloadConfig.slow_factor must be at least 1, "
                             f"got {self.slow_factor}.")
        if self.start_time_ns is not None:
            integer("start_time_ns", 0)
        if self.spans_per_second is not None and number("spans_per_second") <= 0:
            raise ValueError(f"WorkloadConfig.spans_per_second must be positive, "
                             f"got {self.spans_per_second}.")
        for name in ("messaging", "db"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"WorkloadConfig.{name} must be a bool, "
                                f"got {type(getattr(self, name)).__name__}")

    @property
    def first_start_ns(self) -> int:
        """The first trace's start time: ``start_time_ns`` or the seed's epoch."""
        if self.start_time_ns is not None:
            return int(self.start_time_ns)
        return _EPOCH_NS + (self.seed % 1000) * _DAY_NS

    @property
    def rate(self) -> float:
        """Spans per second of simulated time."""
        return float(self.spans_per_second or DEFAULT_SPANS_PER_SECOND)


# -- topology ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A database owned by one service."""

    system: str            # db.system.name
    namespace: str         # db.namespace
    address: str           # server.address
    port: int
    operations: tuple[str, ...]
    collections: tuple[str, ...]   # empty for key-value stores


@dataclass(frozen=True)
class Queue:
    """A message destination with one producing and one consuming service."""

    name: str              # messaging.destination.name
    system: str            # messaging.system
    address: str
    port: int
    producer: int          # service index
    consumer: int          # service index


@dataclass
class Operation:
    """One operation a service serves (the name of its SERVER span) and what it does.

    ``steps`` is the ordered list of things the operation may do, each a tuple
    ``(kind, probability, *details)`` with kind one of ``"call"`` (service
    index, operation index), ``"internal"`` (verb), ``"workflow"`` (pattern),
    ``"db"`` (operation, collection) or ``"produce"`` (queue index).
    """

    name: str
    protocol: str                      # "http" or "grpc"
    method: str | None = None          # HTTP method
    route: str | None = None           # HTTP route template
    rpc_method: str | None = None      # fully qualified gRPC method
    paths: tuple[str, ...] = ()        # url.path values the route takes
    weight: float = 1.0                # traffic share among an entry service's operations
    parallel: bool = False             # downstream work runs concurrently
    leaf_ms: float = 1.0               # median duration when it calls nothing
    self_ms: float = 0.2               # median own time before and after its children
    steps: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class Service:
    """A service of the topology."""

    name: str
    version: str
    protocol: str                  # protocol its operations speak: "http" or "grpc"
    address: str                   # server.address callers use
    port: int
    scheme: str                    # url.scheme of its HTTP endpoints
    hosts: tuple[str, ...]         # host.name of its instances
    entry: bool
    operations: list[Operation] = field(default_factory=list)
    database: Database | None = None
    internal_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Topology:
    """A synthetic microservice system: services, operations, a call DAG, DBs, queues.

    Build one with :meth:`Topology.random`. ``edges`` lists every possible
    call as ``(caller service, caller operation, callee service, callee
    operation)`` indices; a callee always has a higher index than its caller,
    so calls form a DAG rooted at the entry services.
    """

    config: WorkloadConfig
    services: list[Service]
    queues: list[Queue]

    @property
    def entry_services(self) -> list[Service]:
        """The services where traces start (their SERVER spans are the roots)."""
        return [s for s in self.services if s.entry]

    @property
    def databases(self) -> list[Database]:
        """The databases, one per owning service."""
        return [s.database for s in self.services if s.database is not None]

    @property
    def edges(self) -> list[tuple[int, int, int, int]]:
        """Every possible call: (caller service, caller op, callee service, callee op)."""
        out = []
        for si, svc in enumerate(self.services):
            for oi, op in enumerate(svc.operations):
                out.extend((si, oi, st[2], st[3]) for st in op.steps if st[0] == "call")
        return out

    @classmethod
    def random(cls, config: WorkloadConfig | None = None) -> Topology:
        """A random topology, a pure function of ``config``.

        Parameters
        ----------
        config : WorkloadConfig, optional

        Returns
        -------
        Topology

        Examples
        --------
        >>> topo = Topology.random(WorkloadConfig(seed=1, services=6))
        >>> [s.name for s in topo.services][:3]
        ['frontend', 'checkout', 'payment']
        >>> all(a < c for a, _, c, _ in topo.edges)
        True
        """
        config = _check_config(config)
        rng = np.random.default_rng(_streams(config.seed)[0])
        n_entry = min(len(_ENTRY_NAMES), 1 + (config.services - 1) // 10)
        names = list(_ENTRY_NAMES[:n_entry])
        for k in range(config.services - n_entry):
            base = _SERVICE_NAMES[k % len(_SERVICE_NAMES)]
            lap = k // len(_SERVICE_NAMES)
            names.append(base if lap == 0 else f"{base}-{lap + 1}")
        services = [_random_service(rng, name, i < n_entry, config) for i, name in enumerate(names)]
        _wire_calls(rng, services, config)
        queues = _random_queues(rng, services, config) if config.messaging else []
        for svc in services:
            _add_local_steps(rng, svc)
        for qi, q in enumerate(queues):
            producer = services[q.producer]
            ops = [op for op in producer.operations if not op.name.endswith("/health")]
            chosen = rng.choice(len(ops), size=max(1, len(ops) // 2), replace=False)
            for oi in sorted(chosen.tolist()):
                ops[oi].steps.append(("produce", 0.7, qi))
        return cls(config=config, services=services, queues=queues)

    def __repr__(self) -> str:
        return (f"Topology({len(self.services)} services, {len(self.edges)} call edges, "
                f"{len(self.databases)} databases, {len(self.queues)} queues)")


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", " ").split())


def _random_service(rng: np.random.Generator, name: str, entry: bool,
                    config: WorkloadConfig) -> Service:
    protocol = "http" if entry or rng.random() >= 0.35 else "grpc"
    version = f"{int(rng.integers(1, 4))}.{int(rng.integers(0, 20))}.{int(rng.integers(0, 10))}"
    # Kubernetes-style pod names: <deployment>-<replica set hash>-<pod suffix>
    suffix = "".join(rng.choice(list("0123456789abcdef"), size=9).tolist())
    hosts = tuple(f"{name}-{suffix}-{''.join(rng.choice(list(_POD_CHARS), size=5).tolist())}"
                  for _ in range(_INSTANCES))
    if entry:
        address, port, scheme = f"{name}.example.com", 443, "https"
    elif protocol == "grpc":
        address, port, scheme = name, int(rng.choice([50051, 9090, 8443])), "http"
    else:
        address, port, scheme = name, int(rng.choice([8080, 8000, 3000, 9000])), "http"
    svc = Service(name=name, version=version, protocol=protocol, address=address, port=port,
                  scheme=scheme, hosts=hosts, entry=entry)
    noun = name.split("-")[0]
    n_ops = config.operations_per_service
    if protocol == "http":
        order = rng.permutation(len(_HTTP_ROUTES)).tolist()
        for k in range(n_ops):
            method, route = _HTTP_ROUTES[order[k % len(order)]]
            resource = _ENTRY_RESOURCES[k % len(_ENTRY_RESOURCES)] if entry else noun
            route = route.format(r=resource, id="{id}")
            if k >= len(order):
                route = f"/api/v{k // len(order) + 1}{route[4:]}"
            if "{id}" in route:
                ids = ["".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"),
                                          size=10).tolist()) for _ in range(8)]
                paths = tuple(route.replace("{id}", i) for i in ids)
            else:
                paths = (route,)
            svc.operations.append(Operation(name=f"{method} {route}", protocol="http",
                                            method=method, route=route, paths=paths))
    else:
        klass = f"shop.v1.{_camel(name)}Service"
        verbs = rng.permutation(len(_RPC_VERBS)).tolist()
        for k in range(n_ops):
            verb = _RPC_VERBS[verbs[k % len(verbs)]]
            rpc = f"{klass}/{verb}{_camel(noun)}{'' if k < len(verbs) else k // len(verbs) + 1}"
            svc.operations.append(Operation(name=rpc, protocol="grpc", rpc_method=rpc))
    for rank, op in enumerate(svc.operations):
        op.weight = 1.0 / (rank + 1)          # Zipf-like popularity
        op.parallel = bool(rng.random() < 0.3)
        op.leaf_ms = float(np.exp(rng.uniform(np.log(0.3), np.log(20.0))))
        op.self_ms = float(np.exp(rng.uniform(np.log(0.05), np.log(0.8))))
    if entry:
        health = Operation(name="GET /health", protocol="http", method="GET", route="/health",
                           paths=("/health",), weight=0.05 * sum(o.weight for o in svc.operations),
                           leaf_ms=0.2, self_ms=0.05)
        svc.operations.append(health)
    if config.db and not entry and rng.random() < 0.6:
        system = str(rng.choice(list(_DB_SYSTEMS)))
        port, ops = _DB_SYSTEMS[system]
        if system == "redis":
            collections: tuple[str, ...] = ()
            namespace = str(int(rng.integers(0, 4)))
        else:
            pool = (f"{noun}s", f"{noun}_items", f"{noun}_events", f"{noun}_audit")
            collections = tuple(pool[: int(rng.integers(1, 4))])
            namespace = f"{noun}_db"
        svc.database = Database(system=system, namespace=namespace,
                                address=f"{name}-{system}", port=port,
                                operations=ops, collections=collections)
    svc.internal_ms = {v: float(np.exp(rng.uniform(np.log(0.05), np.log(5.0))))
                       for v in _INTERNAL_VERBS}
    return svc


def _wire_calls(rng: np.random.Generator, services: list[Service],
                config: WorkloadConfig) -> None:
    n = len(services)
    first_callee = sum(s.entry for s in services)
    has_caller = [False] * n
    for si, svc in enumerate(services):
        callees = list(range(max(si + 1, first_callee), n))
        if not callees:
            continue
        for op in svc.operations:
            if op.route == "/health":
                continue
            low = 1 if svc.entry and config.max_fan_out > 0 else 0
            k = int(rng.integers(low, config.max_fan_out + 1))
            # nearer services are likelier callees, which keeps traces deep but bounded
            w = 1.0 / (np.arange(len(callees)) + 1.0)
            chosen = rng.choice(callees, size=min(k, len(callees)), replace=False, p=w / w.sum())
            for ci in sorted(chosen.tolist()):
                oi = int(rng.integers(0, len(services[ci].operations)))
                op.steps.append(("call", 0.85, ci, oi))
                has_caller[ci] = True
    for ci in range(first_callee, n):
        if has_caller[ci] or config.max_fan_out == 0:
            continue
        for si in rng.permutation(ci).tolist():
            ops = [op for op in services[si].operations if op.route != "/health"
                   and sum(st[0] == "call" for st in op.steps) < config.max_fan_out]
            if ops:
                op = ops[int(rng.integers(0, len(ops)))]
                callee_op = int(rng.integers(0, len(services[ci].operations)))
                op.steps.append(("call", 0.85, ci, callee_op))
                break


def _random_queues(rng: np.random.Generator, services: list[Service],
                   config: WorkloadConfig) -> list[Queue]:
    candidates = [i for i, s in enumerate(services) if not s.entry]
    if len(candidates) < 2:
        return []
    queues = []
    for qi in range(max(1, len(services) // 5)):
        producer, consumer = (int(x) for x in rng.choice(candidates, size=2, replace=False))
        system = str(rng.choice(list(_MESSAGING)))
        name = _QUEUE_NAMES[qi % len(_QUEUE_NAMES)]
        if qi >= len(_QUEUE_NAMES):
            name = f"{name}-{qi // len(_QUEUE_NAMES) + 1}"
        queues.append(Queue(name=name, system=system, address=f"{system}.messaging",
                            port=_MESSAGING[system][0], producer=producer, consumer=consumer))
    return queues


def _add_local_steps(rng: np.random.Generator, svc: Service) -> None:
    for op in svc.operations:
        if op.route == "/health":
            continue
        local: list[tuple[Any, ...]] = []
        for _ in range(int(rng.integers(0, 3))):
            verb = _INTERNAL_VERBS[int(rng.integers(0, len(_INTERNAL_VERBS)))]
            local.append(("internal", 0.8, verb))
        if rng.random() < 0.25:
            local.append(("workflow", 0.9,
                          _WORKFLOW_PATTERNS[int(rng.integers(0, len(_WORKFLOW_PATTERNS)))]))
        db = svc.database
        if db is not None and rng.random() < 0.8:
            for _ in range(int(rng.integers(1, 3))):
                dbop = db.operations[int(rng.integers(0, len(db.operations)))]
                coll = db.collections[int(rng.integers(0, len(db.collections)))] \
                    if db.collections else None
                local.append(("db", 0.9, dbop, coll))
        # own work first (validate, read), then the downstream calls, then writes
        split = int(rng.integers(0, len(local) + 1))
        op.steps[:0] = local[:split]
        op.steps.extend(local[split:])


def _check_config(config: WorkloadConfig | None) -> WorkloadConfig:
    if config is None:
        return WorkloadConfig()
    if not isinstance(config, WorkloadConfig):
        raise TypeError(f"config must be a knhk.workload.WorkloadConfig, "
                        f"got {type(config).__name__}")
    return config


# -- compilation: templates and flat lookup tables ---------------------------------------


def _mu(ms: float) -> float:
    """Log-space location of a log-normal with median ``ms`` milliseconds, in ns."""
    return math.log(ms * 1e6)


class _Interner:
    def __init__(self) -> None:
        self.values: list[str] = []
        self.index: dict[str, int] = {}

    def one(self, value: str) -> int:
        idx = self.index.get(value)
        if idx is None:
            idx = self.index[value] = len(self.values)
            self.values.append(value)
        return idx


_KEYS = (
    "http.request.method", "http.route", "http.response.status_code", "url.path", "url.full",
    "url.scheme", "server.address", "server.port", "rpc.system.name", "rpc.method",
    "db.system.name", "db.operation.name", "db.collection.name", "db.namespace",
    "messaging.system", "messaging.destination.name", "messaging.operation.type",
    "messaging.operation.name", "error.type", "workflow.id", "workflow.pattern",
    "service.name", "service.version", "service.namespace", "deployment.environment.name",
    "host.name",
)
_KEY = {k: i for i, k in enumerate(_KEYS)}
_SERVICE_NAMESPACE = "shop"
_ENVIRONMENT = "production"


class _Compiled:
    """Flat NumPy tables of a topology's templates, ready for batch instantiation."""

    def __init__(self, topo: Topology) -> None:
        config = topo.config
        rng = np.random.default_rng(_streams(config.seed)[1])
        self.config = config
        self.strings = _Interner()
        self.names = _Interner()
        self._slot_sets: dict[tuple, int] = {}
        self._slot_count: dict[int, int] = {}
        self.slots: list[tuple[int, int, int, int, int, int]] = []  # key, type, str, int, dyn, pool
        self.pool_table: list[int] = []     # string ids of value pools, picked by offset
        self._pools: dict[tuple[str, ...], int] = {}
        self._err_base = {fam: self._pool(vals[0]) for fam, vals in _ERRORS.items()}
        msgs: list[str] = []
        self.msg_base = np.zeros(5, np.int64)
        self.err_size = np.zeros(5, np.int64)
        for fam, (types, messages) in _ERRORS.items():
            self.msg_base[fam] = len(msgs)
            self.err_size[fam] = len(types)
            msgs.extend(messages)
        self.messages = pa.array(msgs, pa.string())
        self._workflow_ids = tuple(f"wf-{x:08x}" for x in
                                   rng.integers(0, 2**32, size=64, dtype=np.uint64).tolist())
        self.nodes: list[list[Any]] = []
        self.t_offset: list[int] = []
        self.t_size: list[int] = []
        self.t_weight: list[float] = []
        self._topo = topo
        for svc_i, svc in enumerate(topo.services):
            if not svc.entry:
                continue
            total = sum(op.weight for op in svc.operations)
            for op_i, op in enumerate(svc.operations):
                variants = 1 if op.route == "/health" else _TEMPLATE_VARIANTS
                for _ in range(variants):
                    start = len(self.nodes)
                    self._budget = start + _MAX_TEMPLATE_SPANS
                    self._server(rng, svc_i, op_i, parent=-1, depth=0, hops=0)
                    self.t_offset.append(start)
                    self.t_size.append(len(self.nodes) - start)
                    self.t_weight.append(op.weight / total / variants / len(topo.entry_services))
        self._finish(topo)

    # -- template building (Python, once per topology) --

    def _node(self, *, parent: int, depth: int, kind: SpanKind, service: int, name: str,
              slots: int, leaf_ms: float, leaf_sigma: float, self_ms: float, self_sigma: float,
              gap_ms: float, gap_sigma: float, family: int, is_async: bool = False,
              new_instance: bool = False) -> int:
        idx = len(self.nodes)
        self.nodes.append([parent, -1, depth, 0, int(kind), service, self.names.one(name), slots,
                           _mu(leaf_ms), leaf_sigma, _mu(self_ms), self_sigma, _mu(gap_ms),
                           gap_sigma, family, is_async, new_instance])
        return idx

    def _chain(self, children: list[int], parallel: bool) -> None:
        """Sequential children start one after the other; parallel ones all at once."""
        if parallel:
            return
        for a, b in itertools.pairwise(children):
            self.nodes[b][1] = a            # prev sibling
            self.nodes[b][3] = self.nodes[a][3] + 1   # rank

    def _server(self, rng: np.random.Generator, svc_i: int, op_i: int, *, parent: int,
                depth: int, hops: int) -> int:
        topo = self._topo
        svc = topo.services[svc_i]
        op = svc.operations[op_i]
        me = self._node(parent=parent, depth=depth, kind=SpanKind.SERVER, service=svc_i,
                        name=op.name, slots=self._server_slots(svc, op), leaf_ms=op.leaf_ms,
                        leaf_sigma=0.45, self_ms=op.self_ms, self_sigma=0.4, gap_ms=0.05,
                        gap_sigma=0.3, family=_HTTP if op.protocol == "http" else _GRPC,
                        new_instance=True)
        children: list[int] = []
        for step in op.steps:
            if len(self.nodes) >= self._budget:
                break
            if rng.random() >= step[1]:
                continue
            kind = step[0]
            if kind == "call":
                if hops >= self.config.max_depth:
                    continue
                callee = topo.services[step[2]]
                cop = callee.operations[step[3]]
                client = self._node(
                    parent=me, depth=depth + 1, kind=SpanKind.CLIENT, service=svc_i,
                    name=cop.method if cop.protocol == "http" else cop.rpc_method,
                    slots=self._client_slots(callee, cop), leaf_ms=1.0, leaf_sigma=0.4,
                    self_ms=0.25, self_sigma=0.3, gap_ms=0.02, gap_sigma=0.3,
                    family=_HTTP if cop.protocol == "http" else _GRPC)
                self._server(rng, step[2], step[3], parent=client, depth=depth + 2,
                             hops=hops + 1)
                children.append(client)
            elif kind == "produce":
                children.append(self._produce(rng, svc_i, step[2], me, depth + 1))
            else:
                children.append(self._local(svc_i, step, me, depth + 1))
        self._chain(children, op.parallel)
        return me

    def _local(self, svc_i: int, step: tuple, parent: int, depth: int) -> int:
        svc = self._topo.services[svc_i]
        kind = step[0]
        if kind == "internal":
            return self._node(parent=parent, depth=depth, kind=SpanKind.INTERNAL, service=svc_i,
                              name=step[2], slots=self._slot_set((), _INTERNAL),
                              leaf_ms=svc.internal_ms[step[2]], leaf_sigma=0.4, self_ms=0.05,
                              self_sigma=0.3, gap_ms=0.03, gap_sigma=0.3, family=_INTERNAL)
        if kind == "workflow":
            slots = self._slot_set(
                (("workflow.id", _STRING, self._pool(self._workflow_ids), _POOL,
                  len(self._workflow_ids)),
                 ("workflow.pattern", _STRING, self.strings.one(step[2]), _STATIC, 0)), _INTERNAL)
            return self._node(parent=parent, depth=depth, kind=SpanKind.INTERNAL, service=svc_i,
                              name="workflow.execute", slots=slots,
                              leaf_ms=svc.internal_ms["compute"] * 2, leaf_sigma=0.4,
                              self_ms=0.05, self_sigma=0.3, gap_ms=0.03, gap_sigma=0.3,
                              family=_INTERNAL)
        db = svc.database
        dbop, coll = step[2], step[3]
        s = self.strings
        attrs = [("db.system.name", _STRING, s.one(db.system), _STATIC, 0),
                 ("db.operation.name", _STRING, s.one(dbop), _STATIC, 0)]
        if coll is not None:
            attrs.append(("db.collection.name", _STRING, s.one(coll), _STATIC, 0))
        attrs += [("db.namespace", _STRING, s.one(db.namespace), _STATIC, 0),
                  ("server.address", _STRING, s.one(db.address), _STATIC, 0),
                  ("server.port", _INT, 0, _STATIC, db.port)]
        base = 0.4 if db.system == "redis" else 3.0
        # one latency per (service, statement) so a span name has one distribution
        ms = base * _stable_factor(svc.name, dbop, coll or "")
        return self._node(parent=parent, depth=depth, kind=SpanKind.CLIENT, service=svc_i,
                          name=f"{dbop} {coll}" if coll else dbop,
                          slots=self._slot_set(tuple(attrs), _DB), leaf_ms=ms, leaf_sigma=0.45,
                          self_ms=0.05, self_sigma=0.3, gap_ms=0.03, gap_sigma=0.3, family=_DB)

    def _produce(self, rng: np.random.Generator, svc_i: int, qi: int, parent: int,
                 depth: int) -> int:
        topo = self._topo
        q = topo.queues[qi]
        s = self.strings
        op_name = _MESSAGING[q.system][1]
        send = self._node(
            parent=parent, depth=depth, kind=SpanKind.PRODUCER, service=svc_i,
            name=f"{op_name} {q.name}",
            slots=self._slot_set((
                ("messaging.system", _STRING, s.one(q.system), _STATIC, 0),
                ("messaging.operation.type", _STRING, s.one("send"), _STATIC, 0),
                ("messaging.operation.name", _STRING, s.one(op_name), _STATIC, 0),
                ("messaging.destination.name", _STRING, s.one(q.name), _STATIC, 0),
                ("server.address", _STRING, s.one(q.address), _STATIC, 0),
                ("server.port", _INT, 0, _STATIC, q.port)), _MSG),
            leaf_ms=0.8, leaf_sigma=0.4, self_ms=0.1, self_sigma=0.3, gap_ms=0.03,
            gap_sigma=0.3, family=_MSG)
        consumer_svc = topo.services[q.consumer]
        recv = self._node(
            parent=send, depth=depth + 1, kind=SpanKind.CONSUMER, service=q.consumer,
            name=f"process {q.name}",
            slots=self._slot_set((
                ("messaging.system", _STRING, s.one(q.system), _STATIC, 0),
                ("messaging.operation.type", _STRING, s.one("process"), _STATIC, 0),
                ("messaging.operation.name", _STRING, s.one("process"), _STATIC, 0),
                ("messaging.destination.name", _STRING, s.one(q.name), _STATIC, 0)), _MSG),
            leaf_ms=2.0, leaf_sigma=0.45, self_ms=0.1, self_sigma=0.3,
            # the queueing delay between send and processing
            gap_ms=8.0, gap_sigma=0.9, family=_MSG, is_async=True, new_instance=True)
        children = []
        for step in ("internal", 0.9, "transform"), ("internal", 0.5, "enrich"):
            if rng.random() < step[1]:
                children.append(self._local(q.consumer, step, recv, depth + 2))
        db = consumer_svc.database
        if db is not None:
            coll = db.collections[0] if db.collections else None
            write = db.operations[min(1, len(db.operations) - 1)]
            children.append(self._local(q.consumer, ("db", 1.0, write, coll), recv, depth + 2))
        self._chain(children, parallel=False)
        return send

    # -- attribute slots --

    def _pool(self, values: tuple[str, ...]) -> int:
        start = self._pools.get(values)
        if start is None:
            start = self._pools[values] = len(self.pool_table)
            self.pool_table.extend(self.strings.one(v) for v in values)
        return start

    def _slot_set(self, attrs: tuple, family: int) -> int:
        """Intern an attribute layout; error.type is always the last slot."""
        key = (attrs, family)
        start = self._slot_sets.get(key)
        if start is None:
            start = self._slot_sets[key] = len(self.slots)
            for k, typ, sval, dyn, extra in attrs:
                if typ == _INT:
                    self.slots.append((_KEY[k], typ, 0, extra, dyn, 0))
                else:
                    self.slots.append((_KEY[k], typ, sval, 0, dyn, extra))
            self.slots.append((_KEY["error.type"], _STRING, self._err_base[family], 0, _ERRTYPE,
                               len(_ERRORS[family][0])))
            self._slot_count[start] = len(attrs) + 1
        return start

    def _server_slots(self, svc: Service, op: Operation) -> int:
        s = self.strings
        if op.protocol == "grpc":
            return self._slot_set((
                ("rpc.system.name", _STRING, s.one("grpc"), _STATIC, 0),
                ("rpc.method", _STRING, s.one(op.rpc_method), _STATIC, 0),
                ("server.address", _STRING, s.one(svc.address), _STATIC, 0),
                ("server.port", _INT, 0, _STATIC, svc.port)), _GRPC)
        return self._slot_set((
            ("http.request.method", _STRING, s.one(op.method), _STATIC, 0),
            ("http.route", _STRING, s.one(op.route), _STATIC, 0),
            ("url.path", _STRING, self._pool(op.paths), _POOL, len(op.paths)),
            ("url.scheme", _STRING, s.one(svc.scheme), _STATIC, 0),
            ("server.address", _STRING, s.one(svc.address), _STATIC, 0),
            ("server.port", _INT, 0, _STATIC, svc.port),
            ("http.response.status_code", _INT, 0, _STATUS, _OK_CODE[op.method])), _HTTP)

    def _client_slots(self, callee: Service, op: Operation) -> int:
        s = self.strings
        if op.protocol == "grpc":
            return self._slot_set((
                ("rpc.system.name", _STRING, s.one("grpc"), _STATIC, 0),
                ("rpc.method", _STRING, s.one(op.rpc_method), _STATIC, 0),
                ("server.address", _STRING, s.one(callee.address), _STATIC, 0),
                ("server.port", _INT, 0, _STATIC, callee.port)), _GRPC)
        port = "" if callee.port in (80, 443) else f":{callee.port}"
        fulls = tuple(f"{callee.scheme}://{callee.address}{port}{p}" for p in op.paths)
        return self._slot_set((
            ("http.request.method", _STRING, s.one(op.method), _STATIC, 0),
            ("url.full", _STRING, self._pool(fulls), _POOL, len(fulls)),
            ("server.address", _STRING, s.one(callee.address), _STATIC, 0),
            ("server.port", _INT, 0, _STATIC, callee.port),
            ("http.response.status_code", _INT, 0, _STATUS, _OK_CODE[op.method])), _HTTP)

    # -- flatten --

    def _finish(self, topo: Topology) -> None:
        cols = list(zip(*self.nodes, strict=True))
        self.parent = np.array(cols[0], np.int64)
        self.prev = np.array(cols[1], np.int64)
        self.depth = np.array(cols[2], np.int64)
        self.rank = np.array(cols[3], np.int64)
        self.kind = np.array(cols[4], np.int8)
        self.service = np.array(cols[5], np.int32)
        self.name = np.array(cols[6], np.int32)
        self.slot_start = np.array(cols[7], np.int64)
        self.leaf_mu = np.array(cols[8])
        self.leaf_sigma = np.array(cols[9])
        self.self_mu = np.array(cols[10])
        self.self_sigma = np.array(cols[11])
        self.gap_mu = np.array(cols[12])
        self.gap_sigma = np.array(cols[13])
        self.family = np.array(cols[14], np.int64)
        self.is_async = np.array(cols[15], bool)
        self.new_instance = np.array(cols[16], bool)
        m = len(self.nodes)
        # parent / prev as offsets from the node itself, so tiling needs no per-trace fixup
        self.parent_delta = np.where(self.parent >= 0, self.parent - np.arange(m), 0)
        self.prev_delta = np.where(self.prev >= 0, self.prev - np.arange(m), 0)
        self.is_root = self.parent < 0
        has_sync = np.zeros(m, bool)
        sync_child = (~self.is_root) & (~self.is_async)
        has_sync[(np.arange(m) + self.parent_delta)[sync_child]] = True
        self.has_sync_children = has_sync
        parent_kind = np.where(self.is_root, 0, self.kind[np.arange(m) + self.parent_delta])
        self.echo = (self.kind == SpanKind.SERVER) & (parent_kind == SpanKind.CLIENT)
        self.prop = np.where(self.is_async, 0.0, np.where(self.echo, 1.0, _PROPAGATE))
        self.slot_count = np.array([self._slot_count[s] for s in self.slot_start.tolist()],
                                   np.int64)
        self.max_depth = int(self.depth.max())
        self.max_rank = int(self.rank.max())
        self.key = self.depth * (self.max_rank + 1) + self.rank
        self.t_offset_a = np.asarray(self.t_offset, np.int64)
        self.t_size_a = np.asarray(self.t_size, np.int64)
        w = np.asarray(self.t_weight)
        self.t_weight_a = w / w.sum()
        self.mean_size = float((self.t_weight_a * self.t_size_a).sum())
        slots = np.array(self.slots, np.int64).reshape(-1, 6)
        self.s_key, self.s_type, self.s_str = slots[:, 0], slots[:, 1].astype(np.int8), slots[:, 2]
        self.s_int, self.s_dyn, self.s_pool = slots[:, 3], slots[:, 4], slots[:, 5]
        # the string dictionaries are shared by every batch, so IPC files need no replacement
        self.key_dict = pa.array(_KEYS, pa.string())
        self.names_dict = pa.array(self.names.values, pa.string())
        self.services_dict = pa.array([s.name for s in topo.services], pa.string())
        # resource attributes: one fixed layout per (service, host)
        s = self.strings
        res = []
        for svc in topo.services:
            for host in svc.hosts:
                res.extend([(_KEY["service.name"], s.one(svc.name)),
                            (_KEY["service.version"], s.one(svc.version)),
                            (_KEY["service.namespace"], s.one(_SERVICE_NAMESPACE)),
                            (_KEY["deployment.environment.name"], s.one(_ENVIRONMENT)),
                            (_KEY["host.name"], s.one(host))])
        res_a = np.array(res, np.int64).reshape(-1, 2)
        self.r_key, self.r_str = res_a[:, 0], res_a[:, 1]
        self.str_dict = pa.array(self.strings.values, pa.string())
        self.pool_table = np.asarray(self.pool_table, np.int64)
        self.scope_dict = pa.array(["knhk.workload"], pa.string())
        self.scope_version_dict = pa.array([__version__], pa.string())
        logger.debug("compiled %d templates, %d nodes, mean trace %.1f spans",
                     len(self.t_offset), m, self.mean_size)


def _stable_factor(*parts: str) -> float:
    """A factor in [1, 4) that depends only on ``parts`` (not on PYTHONHASHSEED)."""
    h = 2166136261
    for ch in "\x1f".join(parts).encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return 1.0 + 3.0 * (h / 2**32)


def _streams(seed: int) -> list[np.random.SeedSequence]:
    """Independent seed streams: topology, templates, traffic."""
    return np.random.SeedSequence(seed).spawn(3)


_COMPILED: dict[WorkloadConfig, _Compiled] = {}


def _compiled(config: WorkloadConfig) -> _Compiled:
    # Traffic-only fields do not change the topology or templates.
    key = WorkloadConfig(seed=config.seed, services=config.services,
                         operations_per_service=config.operations_per_service,
                         max_depth=config.max_depth, max_fan_out=config.max_fan_out,
                         messaging=config.messaging, db=config.db)
    c = _COMPILED.get(key)
    if c is None:
        if len(_COMPILED) >= 8:
            _COMPILED.pop(next(iter(_COMPILED)))
        c = _COMPILED[key] = _Compiled(Topology.random(key))
    return c


# -- instantiation: many traces at once ---------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection on uint64 (so distinct inputs stay distinct)."""
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _bitmap(valid: np.ndarray) -> pa.Buffer:
    return pa.py_buffer(np.packbits(valid, bitorder="little"))


def _masked(values: np.ndarray, valid: np.ndarray, type: pa.DataType) -> pa.Array:
    n = len(values)
    nulls = n - int(np.count_nonzero(valid))
    if nulls == 0:
        return pa.Array.from_buffers(type, n, [None, pa.py_buffer(values)])
    return pa.Array.from_buffers(type, n, [_bitmap(valid), pa.py_buffer(values)], nulls)


def _dict(indices: np.ndarray, dictionary: pa.Array, valid: np.ndarray | None = None
          ) -> pa.DictionaryArray:
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    if valid is None:
        arr = pa.Array.from_buffers(pa.int32(), len(indices), [None, pa.py_buffer(indices)])
    else:
        arr = _masked(indices, valid, pa.int32())
    # indices come from our own tables; the tests validate batches in full
    return pa.DictionaryArray.from_arrays(arr, dictionary, safe=False)


def _fixed(raw: np.ndarray, width: int, valid: np.ndarray | None = None) -> pa.Array:
    raw = np.ascontiguousarray(raw)
    n = raw.shape[0]
    if valid is None:
        return pa.Array.from_buffers(pa.binary(width), n, [None, pa.py_buffer(raw)])
    nulls = n - int(np.count_nonzero(valid))
    return pa.Array.from_buffers(pa.binary(width), n, [_bitmap(valid), pa.py_buffer(raw)], nulls)


_ATTR_FIELDS = list(ATTRIBUTE_STRUCT)


def _attribute_list(c: _Compiled, offsets: np.ndarray, key: np.ndarray, typ: np.ndarray,
                    sval: np.ndarray, ival: np.ndarray) -> pa.Array:
    total = len(key)
    is_str = typ == _STRING
    is_int = typ == _INT
    children = [
        _dict(key, c.key_dict),
        pa.Array.from_buffers(pa.int8(), total, [None, pa.py_buffer(np.ascontiguousarray(typ))]),
        _dict(sval, c.str_dict, is_str),
        _masked(np.ascontiguousarray(ival, dtype=np.int64), is_int, pa.int64()),
        pa.nulls(total, pa.float64()),
        pa.nulls(total, pa.bool_()),
        pa.nulls(total, pa.binary()),
        pa.nulls(total, pa.binary()),
    ]
    struct = pa.StructArray.from_arrays(children, fields=_ATTR_FIELDS)
    offsets = np.ascontiguousarray(offsets, dtype=np.int32)
    offsets_arr = pa.Array.from_buffers(pa.int32(), len(offsets), [None, pa.py_buffer(offsets)])
    return pa.ListArray.from_arrays(offsets_arr, struct, type=ATTRIBUTES_TYPE)


def _empty_lists(n: int, type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)),
                                    pa.array([], type=type.value_type), type=type)


class _Stream:
    """Generates consecutive batches of one workload."""

    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config
        self.c = _compiled(config)
        self.rng = np.random.default_rng(_streams(config.seed)[2])
        self.rows_done = 0

    def _time_at(self, rows: int) -> int:
        return self.config.first_start_ns + round(rows * 1e9 / self.config.rate)

    def _templates(self, n: int) -> np.ndarray:
        c, rng = self.c, self.rng
        n_t = len(c.t_size_a)
        est = int(n / c.mean_size * 1.05) + 4
        picks = [rng.choice(n_t, size=est, p=c.t_weight_a)]
        total = int(c.t_size_a[picks[0]].sum())
        while total < n:
            picks.append(rng.choice(n_t, size=est, p=c.t_weight_a))
            total += int(c.t_size_a[picks[-1]].sum())
        chosen = np.concatenate(picks)
        cs = np.cumsum(c.t_size_a[chosen])
        k = int(np.searchsorted(cs, n, side="right"))
        remaining = n - (int(cs[k - 1]) if k else 0)
        extra = []
        # top up with templates that still fit: the batch ends on a whole trace
        while remaining > 0:
            fits = np.flatnonzero(c.t_size_a <= remaining)
            cw = np.cumsum(c.t_weight_a[fits])
            t = int(fits[min(int(np.searchsorted(cw, rng.random() * cw[-1])), len(fits) - 1)])
            extra.append(t)
            remaining -= int(c.t_size_a[t])
        return np.concatenate([chosen[:k], np.asarray(extra, np.int64)])

    def batch(self, n: int) -> SpanBatch:
        c, rng, cfg = self.c, self.rng, self.config
        templates = self._templates(n)
        k = len(templates)
        sizes = c.t_size_a[templates]
        row_start = np.cumsum(sizes) - sizes
        trace = np.repeat(np.arange(k), sizes)
        rows = np.arange(n)
        node = np.repeat(c.t_offset_a[templates] - row_start, sizes) + rows
        parent = rows + c.parent_delta[node]
        prev = rows + c.prev_delta[node]
        is_root = c.is_root[node]
        is_async = c.is_async[node]

        # rows grouped by (depth, sibling rank): each group is one vectorized step
        n_rank = c.max_rank + 1
        order = np.argsort(c.key[node], kind="stable")
        bounds = np.zeros((c.max_depth + 2) * n_rank + 1, np.int64)
        np.cumsum(np.bincount(c.key[node], minlength=(c.max_depth + 2) * n_rank),
                  out=bounds[1:])

        def level(d: int) -> np.ndarray:
            return order[bounds[d * n_rank]:bounds[(d + 1) * n_rank]]

        z = rng.standard_normal((4, n))
        leaf = np.exp(c.leaf_mu[node] + c.leaf_sigma[node] * z[0])
        pre = np.exp(c.self_mu[node] + c.self_sigma[node] * z[1]).astype(np.int64) + 1
        post = np.exp(c.self_mu[node] + c.self_sigma[node] * z[2]).astype(np.int64) + 1
        gap = np.exp(c.gap_mu[node] + c.gap_sigma[node] * z[3]).astype(np.int64)
        u = rng.random((4, n))
        slow = u[0] < cfg.slow_rate
        origin = u[1] < cfg.error_rate
        propagate = u[2] < c.prop[node]
        new_inst = (u[3] * _INSTANCES).astype(np.int64)
        pick, errpick = rng.integers(0, 1 << 30, size=(2, n))
        trace_ids = np.frombuffer(rng.bytes(16 * k), np.uint8).reshape(k, 16).copy()
        salts = rng.integers(0, np.iinfo(np.uint64).max, size=k, dtype=np.uint64,
                             endpoint=True)
        t0 = self._time_at(self.rows_done)
        t1 = self._time_at(self.rows_done + n)
        trace_start = t0 + np.sort(rng.integers(0, max(t1 - t0, 1), size=k))
        self.rows_done += n

        # durations bottom-up: children laid out inside their parent. A slow span's own
        # time is stretched: all of a leaf, the time around its children for a parent,
        # so slow spans nested in one trace add up instead of multiplying.
        stretch = np.where(slow, cfg.slow_factor, 1.0)
        dur = (leaf * stretch).astype(np.int64) + 1
        post += ((pre + post) * (stretch - 1.0)).astype(np.int64)
        offset = np.zeros(n, np.int64)
        child_end = np.zeros(n, np.int64)
        has_sync = c.has_sync_children[node]
        for d in range(c.max_depth, 0, -1):
            base = d * n_rank
            if bounds[base] == bounds[base + n_rank]:
                continue
            for r in range(n_rank):
                a, b = bounds[base + r], bounds[base + r + 1]
                if a == b:
                    continue
                grp = order[a:b]
                if r == 0:
                    offset[grp] = pre[parent[grp]] + gap[grp]
                else:
                    pv = prev[grp]
                    offset[grp] = offset[pv] + dur[pv] + gap[grp]
            lv = level(d)
            sync = lv[~is_async[lv]]
            np.maximum.at(child_end, parent[sync], offset[sync] + dur[sync])
            up = level(d - 1)
            up = up[has_sync[up]]
            dur[up] = child_end[up] + post[up]

        # start times and hosts top-down
        start = np.empty(n, np.int64)
        inst = np.empty(n, np.int64)
        roots = level(0)
        start[roots] = trace_start[trace[roots]]
        inst[roots] = new_inst[roots]
        new_instance = c.new_instance[node]
        for d in range(1, c.max_depth + 1):
            lv = level(d)
            p = parent[lv]
            start[lv] = start[p] + offset[lv]
            inst[lv] = np.where(new_instance[lv], new_inst[lv], inst[p])
        end = start + dur

        # errors bottom-up; a server's failure is what its client sees
        echo = c.echo[node]
        err = origin.copy()
        for d in range(c.max_depth, 0, -1):
            lv = level(d)
            up = lv[err[lv] & propagate[lv]]
            e = up[echo[up]]
            errpick[parent[e]] = errpick[e]
            err[parent[up]] = True
        e = np.flatnonzero(echo)
        pick[e] = pick[parent[e]]        # the server sees the path its client asked for

        # ids
        local = (rows - row_start[trace]).astype(np.uint64)
        x = salts[trace] + local
        zero = x == 0
        if zero.any():
            x[zero] = salts[trace[zero]] + sizes[trace[zero]].astype(np.uint64)
        span_ids = _mix64(x).view(np.uint8).reshape(n, 8)

        # attributes: tile each node's slot layout, then fill the per-row values
        fam = c.family[node]
        counts = c.slot_count[node] - (~err)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        arow = np.repeat(rows, counts)
        sid = np.repeat(c.slot_start[node] - offsets[:-1], counts) + np.arange(total)
        dyn = c.s_dyn[sid]
        sval = c.s_str[sid]
        ival = c.s_int[sid]
        m = np.flatnonzero(dyn == _POOL)
        sval[m] = c.pool_table[sval[m] + pick[arow[m]] % c.s_pool[sid[m]]]
        m = np.flatnonzero(dyn == _ERRTYPE)
        sval[m] = c.pool_table[sval[m] + errpick[arow[m]] % c.s_pool[sid[m]]]
        m = np.flatnonzero(dyn == _STATUS)
        ar = arow[m]
        ival[m] = np.where(err[ar], _HTTP_ERROR_CODES[errpick[ar] % 4], ival[m])
        attributes = _attribute_list(c, offsets, c.s_key[sid], c.s_type[sid], sval, ival)

        svc = c.service[node].astype(np.int64)
        r_off = np.arange(n + 1, dtype=np.int64) * 5
        rid = np.repeat((svc * _INSTANCES + inst) * 5, 5) + np.tile(np.arange(5), n)
        resource = _attribute_list(c, r_off, c.r_key[rid], np.full(5 * n, _STRING, np.int8),
                                   c.r_str[rid], np.zeros(5 * n, np.int64))

        msg = np.where(err, c.msg_base[fam] + errpick % c.err_size[fam], 0)
        status_message = c.messages.take(_masked(msg.astype(np.int64), err, pa.int64()))
        zeros = pa.array(np.zeros(n, np.uint32))
        no_dict = pa.nulls(n, SPAN_SCHEMA.field("trace_state").type)
        first = np.zeros(n, np.int32)
        arrays = [
            _fixed(trace_ids[trace], 16),
            _fixed(span_ids, 8),
            _fixed(span_ids[parent], 8, ~is_root),
            no_dict,
            pa.array(np.ones(n, np.uint32)),
            _dict(c.name[node], c.names_dict),
            pa.array(c.kind[node]),
            pa.array(start),
            pa.array(end),
            pa.array(np.where(err, 2, 0).astype(np.int8)),
            status_message,
            _dict(svc, c.services_dict),
            attributes,
            zeros,
            _empty_lists(n, SPAN_SCHEMA.field("events").type),
            zeros,
            _empty_lists(n, SPAN_SCHEMA.field("links").type),
            zeros,
            resource,
            zeros,
            no_dict,
            _dict(first, c.scope_dict),
            _dict(first, c.scope_version_dict),
            _empty_lists(n, ATTRIBUTES_TYPE),
            zeros,
            no_dict,
        ]
        return SpanBatch(pa.RecordBatch.from_arrays(arrays, schema=SPAN_SCHEMA))


# -- public entry points -------------------------------------------------------------------


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}.")
    return int(value)


def generate_batches(n_spans: int, *, config: WorkloadConfig | None = None,
                     batch_size: int = 10_000) -> Iterator[SpanBatch]:
    """Yield ``n_spans`` spans as batches of ``batch_size`` rows (the last may be shorter).

    Every batch holds whole traces, so each is a self-contained unit for
    trace assembly. The output is a pure function of ``(n_spans, config,
    batch_size)``.

    Parameters
    ----------
    n_spans : int
        Total number of spans.
    config : WorkloadConfig, optional
        The workload; ``WorkloadConfig()`` by default.
    batch_size : int
        Rows per batch.

    Yields
    ------
    SpanBatch
        Batches in :data:`knhk.SPAN_SCHEMA`.

    Examples
    --------
    >>> [b.num_rows for b in generate_batches(25_000, batch_size=10_000)]
    [10000, 10000, 5000]
    """
    n_spans = _check_count("n_spans", n_spans, 0)
    batch_size = _check_count("batch_size", batch_size, 1)
    if min(batch_size, n_spans) > _MAX_BATCH:
        # list offsets are int32 and a span carries up to ~9 attributes
        raise ValueError(f"one batch holds at most {_MAX_BATCH:,} spans, got batch_size="
                         f"{batch_size:,}; use generate_batches with a smaller batch_size.")
    config = _check_config(config)
    stream = _Stream(config)
    done = 0
    while done < n_spans:
        n = min(batch_size, n_spans - done)
        yield stream.batch(n)
        done += n


def generate(n_spans: int, config: WorkloadConfig | None = None) -> SpanBatch:
    """All ``n_spans`` spans of a workload as one batch.

    Parameters
    ----------
    n_spans : int
    config : WorkloadConfig, optional

    Returns
    -------
    SpanBatch

    Examples
    --------
    >>> generate(500, WorkloadConfig(seed=3)).num_rows
    500
    """
    n_spans = _check_count("n_spans", n_spans, 0)
    if n_spans == 0:
        return SpanBatch.empty()
    return next(generate_batches(n_spans, config=config, batch_size=n_spans))


def feed(pipeline: Any, n_spans: int, config: WorkloadConfig | None = None, *,
         batch_size: int = 10_000) -> int:
    """Record a generated workload into a pipeline with ``record_batch``.

    Parameters
    ----------
    pipeline : knhk.TelemetryPipeline
    n_spans : int
    config : WorkloadConfig, optional
    batch_size : int
        Rows per ``record_batch`` call.

    Returns
    -------
    int
        Rows the pipeline accepted.

    Examples
    --------
    >>> import knhk
    >>> sink = knhk.InMemoryExporter()
    >>> with knhk.TelemetryPipeline.builder().with_exporter(sink).build() as p:
    ...     feed(p, 2_000)
    2000
    >>> sink.spans().num_rows
    2000
    """
    if not hasattr(pipeline, "record_batch"):
        raise TypeError(f"feed needs a knhk.TelemetryPipeline (anything with record_batch), "
                        f"got {type(pipeline).__name__}")
    accepted = 0
    for batch in generate_batches(n_spans, config=config, batch_size=batch_size):
        accepted += int(pipeline.record_batch(batch))
    return accepted
