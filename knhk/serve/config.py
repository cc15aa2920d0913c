"""``knhk serve`` configuration: load YAML, substitute ``${env:…}``, check the schema.

The file has the OpenTelemetry Collector's shape (``receivers``,
``processors``, ``exporters``, ``extensions``, ``service``); the component
types knhk knows and their keys are listed in :mod:`knhk.serve`. Checking is
strict: an unknown component type, an unknown key, a value of the wrong type
or a pipeline naming a component that is not defined raises
:class:`ConfigError` naming the key path (``exporters.otlp/backend.endpoint``)
and, for a file, the line.

Substitution happens after parsing, on string values, as in the Collector:
``${env:VAR}`` is the variable's value (an error if it is unset),
``${env:VAR:-default}`` falls back to ``default``, ``$$`` is a literal ``$``.
A value that is exactly one reference is re-read as a YAML scalar, so
``port: ${env:PORT}`` gives an int.

Example
-------
>>> from knhk.serve.config import parse_config
>>> cfg = parse_config('''
... receivers: {otlp: {protocols: {grpc: {endpoint: "localhost:${env:NO_SUCH_PORT:-4317}"}}}}
... exporters: {debug: {}}
... service: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}}}
... ''')
>>> cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
'localhost:4317'
>>> parse_config("exporters: {nope: {}}")
Traceback (most recent call last):
...
knhk.serve.config.ConfigError: <config>:1: exporters.nope: unknown exporter type 'nope'; ...
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from knhk.errors import KnhkError

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "component_type",
    "load_config",
    "parse_config",
    "parse_duration",
    "validate_config",
]


class ConfigError(KnhkError, ValueError):
    """A ``knhk serve`` configuration is wrong; the message names the key path."""


# -- value kinds ----------------------------------------------------------------------


class _Kind:
    """One kind of leaf value; ``check`` returns an error text or None."""

    def __init__(self, label: str, check: Any) -> None:
        self.label = label
        self.check = check


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number of seconds or a Go duration string (``"10s"``, ``"1m30s"``).

    Parameters
    ----------
    value : int, float or str

    Returns
    -------
    float

    Examples
    --------
    >>> parse_duration("1m30s"), parse_duration("200ms"), parse_duration(2)
    (90.0, 0.2, 2.0)
    """
    if _is_num(value):
        if value < 0:
            raise ValueError(f"a duration must not be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION_RE.findall(text)
        if parts and "".join(a + b for a, b in parts) == text:
            return sum(float(a) * _UNIT_S[b] for a, b in parts)
    raise ValueError(f"expected a duration such as '10s' or '500ms', got {value!r}")


def _duration_error(v: Any) -> str | None:
    try:
        parse_duration(v)
    except ValueError as exc:
        return str(exc)
    return None


def _endpoint_error(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"expected 'host:port', got {v!r}"
    _, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return f"expected 'host:port' with a port 0-65535, got {v!r}"
    return None


STR = _Kind("a string", lambda v: None if isinstance(v, str) else f"expected a string, got {v!r}")
INT = _Kind("an integer", lambda v: None if _is_int(v) else f"expected an integer, got {v!r}")
POS_INT = _Kind("a positive integer", lambda v: None if _is_int(v) and v > 0
                else f"expected a positive integer, got {v!r}")
NUM = _Kind("a number", lambda v: None if _is_num(v) else f"expected a number, got {v!r}")
RATE = _Kind("a number in [0, 1]", lambda v: None if _is_num(v) and 0 <= v <= 1
             else f"expected a number in [0, 1], got {v!r}")
NON_NEG = _Kind("a number >= 0", lambda v: None if _is_num(v) and v >= 0
                else f"expected a number >= 0, got {v!r}")
PERCENT = _Kind("a percentage (0-100)", lambda v: None if _is_num(v) and 0 <= v <= 100
                else f"expected a percentage from 0 to 100, got {v!r}")
BOOL = _Kind("true or false", lambda v: None if isinstance(v, bool)
             else f"expected true or false, got {v!r}")
DURATION = _Kind("a duration", _duration_error)
ENDPOINT = _Kind("host:port", _endpoint_error)
ANY = _Kind("anything", lambda v: None)


def _one_of(*choices: Any) -> _Kind:
    shown = ", ".join(repr(c) for c in choices)
    return _Kind(f"one of {shown}",
                 lambda v: None if v in choices else f"expected one of {shown}, got {v!r}")


def _list_of(kind: _Kind) -> _Kind:
    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return f"expected a list of {kind.label}s, got {v!r}"
        for i, item in enumerate(v):
            err = kind.check(item)
            if err:
                return f"item {i}: {err}"
        return None
    return _Kind(f"a list of {kind.label}s", check)


def _map_of(kind: _Kind) -> _Kind:
    def check(v: Any) -> str | None:
        if not isinstance(v, Mapping):
            return f"expected a mapping, got {v!r}"
        for k, item in v.items():
            err = kind.check(item)
            if err:
                return f"key {k!r}: {err}"
        return None
    return _Kind(f"a mapping of {kind.label}s", check)


_LEVELS = ("pass", "drop", "quarantine")

# -- component schemas ----------------------------------------------------------------
# A schema is a dict of key -> _Kind or nested schema dict. Keys a Collector
# user knows keep the Collector's spelling; knhk's own settings are named plainly.

RECEIVERS: dict[str, dict[str, Any]] = {
    "otlp": {
        "protocols": {
            "grpc": {"endpoint": ENDPOINT, "max_recv_msg_size_mib": POS_INT,
                     "bearer_token": STR},
            "http": {"endpoint": ENDPOINT, "max_request_body_size": POS_INT,
                     "bearer_token": STR},
        },
    },
}

PROCESSORS: dict[str, dict[str, Any]] = {
    "batch": {"send_batch_size": POS_INT, "timeout": DURATION},
    "memory_limiter": {"limit_spans": POS_INT,
                       "strategy": _one_of("refuse", "drop_oldest", "drop_newest", "block"),
                       "block_timeout": DURATION,
                       # the Collector's: resident memory limits (knhk.MemoryLimiter)
                       "check_interval": DURATION, "limit_mib": NON_NEG,
                       "spike_limit_mib": NON_NEG, "limit_percentage": PERCENT,
                       "spike_limit_percentage": PERCENT},
    "knhk_validation": {"registry": STR, "violation": _one_of(*_LEVELS),
                        "improvement": _one_of(*_LEVELS), "information": _one_of(*_LEVELS),
                        "annotate": BOOL, "quarantine": STR},
    "probabilistic_sampler": {"sampling_percentage": NUM},
    "adaptive_sampling": {"base_rate": RATE, "error_rate": RATE, "slow_rate": RATE,
                          "slow_threshold": DURATION, "min_rate": RATE, "max_rate": RATE,
                          "target_spans_per_second": NUM, "adjust_interval": DURATION},
    "tail_sampling": {"*": ANY},  # checked by knhk.TailSamplingConfig.from_dict
    "red_windows": {"window": DURATION, "slide": DURATION,
                    "kind": _one_of("tumbling", "sliding", "session"),
                    "allowed_lateness": DURATION, "group_by": _list_of(STR),
                    "quantiles": _list_of(RATE), "mode": _one_of("exact", "sketch")},
    "service_graph": {"idle_timeout": DURATION, "max_wait": DURATION,
                      "max_traces": POS_INT, "metrics": BOOL, "metrics_interval": DURATION},
}

_TLS = {"insecure": BOOL, "ca_file": STR}
_QUEUE = {"enabled": BOOL, "queue_size": POS_INT, "num_consumers": POS_INT, "storage": STR}
_RETRY = {"enabled": BOOL, "initial_interval": DURATION, "max_interval": DURATION,
          "max_elapsed_time": DURATION, "multiplier": NUM, "randomization_factor": RATE}

EXPORTERS: dict[str, dict[str, Any]] = {
    "otlp": {"endpoint": STR, "headers": _map_of(STR), "compression": _one_of("gzip", "none"),
             "timeout": DURATION, "tls": _TLS, "sending_queue": _QUEUE,
             "retry_on_failure": _RETRY},
    "otlphttp": {"endpoint": STR, "traces_endpoint": STR, "metrics_endpoint": STR,
                 "encoding": _one_of("proto", "json"), "headers": _map_of(STR),
                 "compression": _one_of("gzip", "none"), "timeout": DURATION, "tls": _TLS,
                 "sending_queue": _QUEUE, "retry_on_failure": _RETRY},
    "prometheus": {"endpoint": ENDPOINT, "cardinality_limit": POS_INT,
                   "duration_buckets_ms": _list_of(NUM), "metric_expiration": DURATION},
    "jaeger": {"endpoint": ENDPOINT},
    "file": {"path": STR, "prefix": STR, "compression": _one_of("lz4", "zstd", "none"),
             "compression_level": INT,
             "rotation": {"max_megabytes": POS_INT, "max_age": DURATION}},
    "debug": {"verbosity": _one_of("basic", "normal", "detailed")},
}


def _lb_hostnames_error(v: Any) -> str | None:
    from knhk.exporters.loadbalancing import normalize_endpoint

    if not isinstance(v, list) or not v:
        return f"expected a non-empty list of 'host:port', got {v!r}"
    for i, item in enumerate(v):
        try:
            normalize_endpoint(item, f"item {i}")
        except ValueError as exc:
            return str(exc)
    return None


_LB_RESOLVERS = {
    "static": {"hostnames": _Kind("a list of host:port", _lb_hostnames_error)},
    "dns": {"hostname": STR, "port": POS_INT, "interval": DURATION, "timeout": DURATION},
    "file": {"path": STR, "interval": DURATION},  # a knhk extension
}


def _lb_resolver_error(v: Any) -> str | None:
    # one resolver and one only, so checked whole: errors name the path below it
    if not isinstance(v, Mapping) or len(v) != 1 or next(iter(v)) not in _LB_RESOLVERS:
        got = sorted(v) if isinstance(v, Mapping) else v
        return f"name exactly one resolver (static, dns or file), got {got!r}"
    try:
        _check(v, _LB_RESOLVERS, (), None)
    except ConfigError as exc:
        return str(exc)
    return None


# the Collector's loadbalancing exporter: protocol.otlp takes the otlp exporter's keys
# but the endpoint, which the resolver gives
EXPORTERS["loadbalancing"] = {
    "routing_key": _one_of("traceID", "service", "metric"),
    "protocol": {"otlp": {k: v for k, v in EXPORTERS["otlp"].items() if k != "endpoint"}},
    "resolver": _Kind("a resolver", _lb_resolver_error),
    "drain_timeout": DURATION,  # a knhk extension: how long a removed endpoint may drain
}

EXTENSIONS: dict[str, dict[str, Any]] = {
    "health_check": {"endpoint": ENDPOINT, "path": STR},
    # the Collector's file_storage: where exporters' persistent sending queues live
    "file_storage": {"directory": STR, "create_directory": BOOL, "fsync": BOOL},
}

_SECTIONS = {"receivers": RECEIVERS, "processors": PROCESSORS, "exporters": EXPORTERS,
             "extensions": EXTENSIONS}
_SINGULAR = {"receivers": "receiver", "processors": "processor", "exporters": "exporter",
             "extensions": "extension"}

#: Processors that act on spans only; a metrics pipeline may use the others.
SPAN_ONLY_PROCESSORS = frozenset({"knhk_validation", "probabilistic_sampler",
                                  "adaptive_sampling", "tail_sampling", "red_windows",
                                  "service_graph"})
#: Exporters that own a resource (a port, a directory) and so may sit in one pipeline only.
EXCLUSIVE_EXPORTERS = frozenset({"prometheus", "file"})

_SERVICE = {
    "extensions": _list_of(STR),
    "pipelines": {"*": {"receivers": _list_of(STR), "processors": _list_of(STR),
                        "exporters": _list_of(STR)}},
    "telemetry": {"logs": {"level": _one_of("debug", "info", "warn", "warning", "error"),
                           "encoding": _one_of("json", "console"),
                           "stats_interval": DURATION}},
    "shutdown_timeout": DURATION,
}

#: The embedded default configuration of ``knhk serve`` (``knhk serve --print-config``).
#: ``knhk_validation.registry`` left out means: ``./registry`` or the bundled one.
DEFAULT_CONFIG: dict[str, Any] = {
    "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": "localhost:4317"},
                                         "http": {"endpoint": "localhost:4318"}}}},
    "processors": {
        "batch": {"send_batch_size": 4096, "timeout": "100ms"},
        "memory_limiter": {"limit_spans": 200_000},
        "knhk_validation": {},
        "red_windows": {"window": "60s", "allowed_lateness": "30s"},
        # the Prometheus exporter derives its own service-graph series; these
        # edges feed the shutdown summary (and metrics pipelines elsewhere)
        "service_graph": {"idle_timeout": "2s", "max_wait": "30s", "metrics": False},
        "adaptive_sampling": {"base_rate": 0.1, "error_rate": 1.0, "slow_rate": 1.0,
                              "slow_threshold": "1s"},
    },
    "exporters": {
        "file/arrow": {"path": "./knhk-data", "compression": "lz4",
                       "rotation": {"max_megabytes": 256, "max_age": "1h"}},
        "prometheus": {"endpoint": "localhost:9464"},
    },
    "extensions": {"health_check": {"endpoint": "localhost:13133"}},
    "service": {
        "extensions": ["health_check"],
        "pipelines": {"traces": {
            "receivers": ["otlp"],
            "processors": ["memory_limiter", "batch", "knhk_validation", "red_windows",
                           "service_graph", "adaptive_sampling"],
            "exporters": ["file/arrow", "prometheus"],
        }},
        "telemetry": {"logs": {"level": "info", "encoding": "console",
                               "stats_interval": "60s"}},
        "shutdown_timeout": "30s",
    },
}


# -- loading --------------------------------------------------------------------------


class _Lines:
    """Line numbers of key paths, from the YAML node tree."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[tuple[str, ...], int] = {}

    def line(self, path: tuple[str, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)


def _walk_nodes(node: yaml.Node, path: tuple[str, ...], lines: _Lines) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            k = str(key.value)
            if k in seen:
                where = ".".join((*path, k))
                raise ConfigError(f"{lines.source}:{key.start_mark.line + 1}: {where}: "
                                  "duplicate key")
            seen.add(k)
            lines.lines[(*path, k)] = key.start_mark.line + 1
            _walk_nodes(value, (*path, k), lines)
    elif isinstance(node, yaml.SequenceNode):
        # items by index, so an error inside a list (a tail-sampling policy, ...) can
        # name the item's own line
        for i, item in enumerate(node.value):
            lines.lines[(*path, str(i))] = item.start_mark.line + 1
            _walk_nodes(item, (*path, str(i)), lines)


def parse_config(text: str, source: str = "<config>",
                 environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse, substitute and check a configuration given as YAML text.

    Parameters
    ----------
    text : str
        The YAML document.
    source : str
        Named in error messages (a file name).
    environ : mapping, optional
        Variables for ``${env:…}`` (default ``os.environ``).

    Returns
    -------
    dict
        The checked configuration, variables substituted.

    Raises
    ------
    ConfigError
        Naming the source, line and key path of the first problem.
    """
    lines = _Lines(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if node is not None:
        lines.lines[()] = node.start_mark.line + 1
        _walk_nodes(node, (), lines)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping, "
                          f"got {type(data).__name__}")
    env = os.environ if environ is None else environ
    data = _substitute(data, (), env, lines)
    validate_config(data, lines=lines)
    return data


def load_config(path: str | os.PathLike, environ: Mapping[str, str] | None = None
                ) -> dict[str, Any]:
    """Read, substitute and check the configuration file at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
    environ : mapping, optional
        Variables for ``${env:…}`` (default ``os.environ``).

    Returns
    -------
    dict

    Raises
    ------
    ConfigError
        When the file cannot be read or is wrong; the message names the file,
        line and key path.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {path!r}: "
                          f"{exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, source=path, environ=environ)


_REF_RE = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _substitute(value: Any, path: tuple[str, ...], env: Mapping[str, str],
                lines: _Lines) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, (*path, str(k)), env, lines) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, path, env, lines) for v in value]
    if not isinstance(value, str) or "$" not in value:
        return value

    def fail(message: str) -> ConfigError:
        return ConfigError(_where(lines, path) + message)

    def expand(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        ref = m.group(1)
        scheme, sep, rest = ref.partition(":")
        if not sep or scheme != "env":
            raise fail(f"unsupported reference ${{{ref}}}; write ${{env:VAR}} or "
                       "${env:VAR:-default}")
        name, dsep, default = rest.partition(":-")
        if not _NAME_RE.match(name):
            raise fail(f"${{{ref}}}: {name!r} is not an environment variable name")
        if name in env:
            return env[name]
        if dsep:
            return default
        raise fail(f"environment variable {name} is not set "
                   f"(write ${{env:{name}:-default}} to give a default)")

    out = _REF_RE.sub(expand, value)
    whole = _REF_RE.fullmatch(value)
    if whole is not None and whole.group(0) != "$$":
        # as in the Collector: a value that is one reference is typed like YAML
        try:
            typed = yaml.safe_load(out) if out.strip() else out
        except yaml.YAMLError:
            return out
        if isinstance(typed, bool | int | float) or typed is None:
            return typed
    return out


# -- checking -------------------------------------------------------------------------


def component_type(component_id: str) -> str:
    """The type part of a component id: ``"otlp/backend"`` -> ``"otlp"``.

    Examples
    --------
    >>> component_type("otlp/backend"), component_type("batch")
    ('otlp', 'batch')
    """
    return component_id.split("/", 1)[0]


def _where(lines: _Lines | None, path: tuple[str, ...]) -> str:
    dotted = ".".join(path)
    if lines is None:
        return f"{dotted}: " if dotted else ""
    line = lines.line(path)
    prefix = f"{lines.source}:{line}" if line is not None else lines.source
    return f"{prefix}: {dotted}: " if dotted else f"{prefix}: "


def _check(value: Any, schema: Any, path: tuple[str, ...], lines: _Lines | None) -> None:
    if isinstance(schema, _Kind):
        err = schema.check(value)
        if err:
            raise ConfigError(_where(lines, path) + err)
        return
    if value is None:
        return  # an empty mapping written as a bare key
    if not isinstance(value, dict):
        raise ConfigError(_where(lines, path) + f"expected a mapping, got {value!r}")
    if "*" in schema:
        inner = schema["*"]
        if inner is ANY:
            return
        for k, v in value.items():
            _check(v, inner, (*path, str(k)), lines)
        return
    for k, v in value.items():
        if k not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise ConfigError(_where(lines, (*path, str(k))) + f"unknown key; known keys: {known}")
        _check(v, schema[k], (*path, str(k)), lines)


def validate_config(config: Mapping[str, Any], *, lines: _Lines | None = None) -> None:
    """Check a configuration mapping (already substituted) against knhk's schema.

    Parameters
    ----------
    config : mapping

    Raises
    ------
    ConfigError
        Naming the key path of the first problem.

    Examples
    --------
    >>> validate_config(DEFAULT_CONFIG)
    >>> validate_config({"exporters": {"debug": {}}, "service": {"pipelines": {
    ...     "traces": {"receivers": ["otlp"], "exporters": ["debug"]}}}})
    Traceback (most recent call last):
    ...
    knhk.serve.config.ConfigError: service.pipelines.traces.receivers: receiver 'otlp' is not ...
    """
    if not isinstance(config, Mapping):
        raise ConfigError(_where(lines, ()) + "the configuration must be a mapping")
    for key in config:
        if key not in (*_SECTIONS, "service"):
            raise ConfigError(_where(lines, (str(key),)) + "unknown section; known: "
                              "exporters, extensions, processors, receivers, service")
    for section, known in _SECTIONS.items():
        components = config.get(section) or {}
        if not isinstance(components, Mapping):
            raise ConfigError(_where(lines, (section,)) + f"expected a mapping of "
                              f"{_SINGULAR[section]}s, got {components!r}")
        for cid, body in components.items():
            path = (section, str(cid))
            ctype = component_type(str(cid))
            if ctype not in known:
                raise ConfigError(_where(lines, path) + f"unknown {_SINGULAR[section]} type "
                                  f"{ctype!r}; known: {', '.join(sorted(known))}")
            if str(cid).endswith("/"):
                raise ConfigError(_where(lines, path) + "a component name after '/' "
                                  "must not be empty")
            _check(body, known[ctype], path, lines)
            if section == "processors" and ctype == "tail_sampling" and body:
                _check_tail(body, path, lines)
            if section == "exporters" and ctype == "loadbalancing" and \
                    "resolver" not in (body or {}):
                raise ConfigError(_where(lines, path) + "resolver: required (static: "
                                  "{hostnames: [...]}, dns: {hostname: ...} or file: "
                                  "{path: ...})")
    _check(config.get("service"), _SERVICE, ("service",), lines)
    _check_service(config, lines)
    _check_reliability(config, lines)


def _check_tail(body: Mapping[str, Any], path: tuple[str, ...], lines: _Lines | None) -> None:
    from knhk.tail_sampling import Policy, TailSamplingConfig

    policies = body.get("policies")
    if isinstance(policies, list):
        # one policy at a time first: a mistake is reported at its policy's line
        for i, spec in enumerate(policies):
            try:
                Policy.from_dict(spec, f"policies[{i}]")
            except (ValueError, TypeError) as exc:
                line = lines.line((*path, "policies", str(i))) if lines is not None else None
                at = f"{lines.source}:{line}: " if lines is not None else ""
                raise ConfigError(f"{at}{'.'.join(path)}: {exc}") from None
    try:
        TailSamplingConfig.from_dict(body)
    except (ValueError, TypeError) as exc:
        raise ConfigError(_where(lines, path) + str(exc)) from None


def _check_service(config: Mapping[str, Any], lines: _Lines | None) -> None:
    service = config.get("service") or {}
    for i, ext in enumerate(service.get("extensions") or []):
        if ext not in (config.get("extensions") or {}):
            raise ConfigError(_where(lines, ("service", "extensions")) +
                              f"item {i}: extension {ext!r} is not defined under extensions")
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        raise ConfigError(_where(lines, ("service", "pipelines")) +
                          "at least one pipeline is needed (service.pipelines.traces)")
    users: dict[tuple[str, str], list[str]] = {}
    for pid, body in pipelines.items():
        ppath = ("service", "pipelines", str(pid))
        signal = component_type(str(pid))
        if signal not in ("traces", "metrics"):
            raise ConfigError(_where(lines, ppath) + f"unknown pipeline type {signal!r}; "
                              "knhk runs traces and metrics pipelines")
        body = body or {}
        for part in ("receivers", "exporters"):
            if not body.get(part):
                raise ConfigError(_where(lines, (*ppath, part)) +
                                  f"a pipeline needs at least one {part[:-1]}")
        for part in ("receivers", "processors", "exporters"):
            defined = config.get(part) or {}
            listed = body.get(part) or []
            for name in listed:
                if name not in defined:
                    raise ConfigError(_where(lines, (*ppath, part)) +
                                      f"{_SINGULAR[part]} {name!r} is not defined under {part}")
                if listed.count(name) > 1:
                    raise ConfigError(_where(lines, (*ppath, part)) +
                                      f"{_SINGULAR[part]} {name!r} is listed twice")
                ctype = component_type(name)
                if part == "exporters" and ctype == "loadbalancing":
                    key = ((defined.get(name) or {}).get("routing_key")
                           or ("traceID" if signal == "traces" else "service"))
                    if (signal, key) in (("traces", "metric"), ("metrics", "traceID")):
                        can = "traceID or service" if signal == "traces" else \
                            "service or metric"
                        raise ConfigError(
                            _where(lines, ("exporters", name, "routing_key")) +
                            f"{key!r} cannot route the {signal} of pipeline {pid!r} ({can})")
                if part == "processors" and signal == "metrics" and \
                        ctype in SPAN_ONLY_PROCESSORS:
                    raise ConfigError(_where(lines, (*ppath, part)) +
                                      f"processor {name!r} works on spans; it cannot be "
                                      "in a metrics pipeline")
                if part != "processors":
                    users.setdefault((part, name), []).append(str(pid))
    for (part, name), pids in users.items():
        if part == "exporters" and component_type(name) in EXCLUSIVE_EXPORTERS and \
                len(pids) > 1:
            raise ConfigError(_where(lines, ("service", "pipelines", pids[1], part)) +
                              f"exporter {name!r} is already used by pipeline {pids[0]!r}; "
                              "it owns a port or directory, so it may be in one pipeline")


def _check_reliability(config: Mapping[str, Any], lines: _Lines | None) -> None:
    """Memory limits, retry schedules and persistent queues hold together."""
    for pid, body in (config.get("processors") or {}).items():
        if component_type(str(pid)) != "memory_limiter" or not body:
            continue
        path = ("processors", str(pid))
        try:
            memory_limiter_settings(body)
        except ValueError as exc:
            text = str(exc)
            key = next((k for k in ("spike_limit_percentage", "spike_limit_mib",
                                    "limit_percentage", "limit_mib", "check_interval")
                        if text.startswith(k)), None)
            raise ConfigError(_where(lines, (*path, key) if key and key in body else path)
                              + text) from None
    extensions = config.get("extensions") or {}
    enabled = set((config.get("service") or {}).get("extensions") or [])
    for eid, body in (config.get("exporters") or {}).items():
        body = body or {}
        path = ("exporters", str(eid))
        retry = body.get("retry_on_failure")
        if retry:
            try:
                retry_config(retry)
            except ValueError as exc:
                raise ConfigError(_where(lines, (*path, "retry_on_failure")) + str(exc)
                                  ) from None
        queue = body.get("sending_queue") or {}
        storage = queue.get("storage")
        if storage is None:
            continue
        where = _where(lines, (*path, "sending_queue", "storage"))
        if queue.get("enabled", True) is False:
            raise ConfigError(where + "a storage needs the sending queue: remove storage or "
                              "set sending_queue.enabled: true")
        if storage not in extensions:
            raise ConfigError(where + f"extension {storage!r} is not defined under extensions")
        if component_type(storage) != "file_storage":
            raise ConfigError(where + f"extension {storage!r} is a "
                              f"{component_type(storage)}, not a file_storage")
        if storage not in enabled:
            raise ConfigError(where + f"extension {storage!r} is not enabled: list it in "
                              "service.extensions")
    for xid, body in extensions.items():
        if component_type(str(xid)) == "file_storage":
            _check_storage_directory(body or {}, ("extensions", str(xid)), lines)


def memory_limiter_settings(body: Mapping[str, Any]) -> Any:
    """The ``knhk.MemoryLimiter`` a ``memory_limiter`` processor's Collector keys ask for.

    None when the body sets no memory limit (only ``limit_spans``, the
    ring-buffer capacity); raises ValueError naming the key that is wrong.

    >>> memory_limiter_settings({"limit_mib": 512, "spike_limit_mib": 128}).soft_limit >> 20
    384
    >>> memory_limiter_settings({"limit_spans": 1000}) is None
    True
    """
    from knhk.memory_limiter import MemoryLimiter

    keys = ("limit_mib", "spike_limit_mib", "limit_percentage", "spike_limit_percentage")
    if not any(k in body for k in (*keys, "check_interval")):
        return None
    interval = parse_duration(body.get("check_interval", "1s"))
    if interval <= 0:
        raise ValueError("check_interval must be a duration > 0 (the Collector recommends 1s)")
    return MemoryLimiter.from_collector(check_interval=interval,
                                        **{k: body[k] for k in keys if k in body})


def retry_config(body: Mapping[str, Any] | None) -> Any:
    """The ``RetryConfig`` of an exporter's ``retry_on_failure`` (Collector defaults).

    >>> retry_config({"initial_interval": "1s", "max_elapsed_time": 0}).max_elapsed_time
    0.0
    """
    from knhk.exporters._retry import RetryConfig

    body = body or {}
    fields: dict[str, Any] = {}
    if "enabled" in body:
        fields["enabled"] = body["enabled"]
    for key in ("initial_interval", "max_interval", "max_elapsed_time"):
        if key in body:
            fields[key] = parse_duration(body[key])
    for key in ("multiplier", "randomization_factor"):
        if key in body:
            fields[key] = float(body[key])
    return RetryConfig(**fields)


def _check_storage_directory(body: Mapping[str, Any], path: tuple[str, ...],
                             lines: _Lines | None) -> None:
    """A file_storage directory must be given and writable (or creatable, if allowed)."""
    directory = body.get("directory")
    where = _where(lines, (*path, "directory"))
    if not directory:
        raise ConfigError(_where(lines, path) + "directory: required (where the persistent "
                          "queues are kept)")
    full = os.path.abspath(directory)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise ConfigError(where + f"{full!r} is not a directory")
        if not os.access(full, os.W_OK | os.X_OK):
            raise ConfigError(where + f"{full!r} is not writable")
        return
    if not body.get("create_directory", False):
        raise ConfigError(where + f"{full!r} does not exist (create it, or set "
                          "create_directory: true)")
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(where + f"{full!r} cannot be created: {parent!r} is not writable")


def default_config() -> dict[str, Any]:
    """A deep copy of :data:`DEFAULT_CONFIG`, safe to modify."""
    return copy.deepcopy(DEFAULT_CONFIG)
