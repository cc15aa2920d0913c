"""``knhk serve``: a long-running knhk configured like an OpenTelemetry Collector.

The configuration has the Collector's sections — ``receivers``,
``processors``, ``exporters``, ``extensions`` and ``service`` (its
``pipelines``, ``extensions`` and ``telemetry.logs``) — and its component ids
(``type`` or ``type/name``, e.g. ``otlp/backend``). Values may use
``${env:VAR}`` and ``${env:VAR:-default}``. ``knhk validate-config FILE``
checks a file without starting anything; errors name the file, line and key
path. Without ``--config``, :data:`knhk.serve.config.DEFAULT_CONFIG` runs
(``knhk serve --print-config`` prints it).

Component types
---------------
receivers
    ``otlp`` — ``protocols: {grpc: {endpoint, max_recv_msg_size_mib,
    bearer_token}, http: {endpoint, max_request_body_size, bearer_token}}``
    (defaults ``localhost:4317`` / ``localhost:4318``; port 0 picks a free port).
processors
    ``batch`` — ``send_batch_size`` (rows per sealed batch), ``timeout``
    (flush interval). ``memory_limiter`` — ``limit_spans`` (ring-buffer
    capacity), ``strategy`` (``drop_oldest``/``drop_newest``/``block``; what
    ``record_batch`` does when full: the OTLP receivers always refuse with a
    retryable status instead), ``block_timeout``; and the Collector's
    ``check_interval``, ``limit_mib``, ``spike_limit_mib``,
    ``limit_percentage``, ``spike_limit_percentage``: above limit - spike of
    resident memory the OTLP receivers refuse with UNAVAILABLE / 503 and a
    retry hint (clients keep the data and retry). ``knhk_validation`` —
    Weaver registry validation: ``registry`` (default ``./registry`` or the
    bundled one), ``violation``/``improvement``/``information``
    (``pass``/``drop``/``quarantine``), ``annotate``, ``quarantine`` (a
    directory). ``probabilistic_sampler`` — ``sampling_percentage`` (trace-id
    ratio). ``adaptive_sampling`` — ``base_rate``, ``error_rate``,
    ``slow_rate``, ``slow_threshold``, ``min_rate``, ``max_rate``,
    ``target_spans_per_second``, ``adjust_interval``. ``tail_sampling`` — the
    Collector's tail-sampling processor settings (``decision_wait``,
    ``policies``, ...). ``red_windows`` — RED aggregates (rate, errors,
    duration quantiles) per window: ``window``, ``slide``, ``kind``
    (``tumbling``/``sliding``/``session``), ``allowed_lateness``, ``group_by``,
    ``quantiles``, ``mode`` (``exact``/``sketch``). ``service_graph`` — the
    service call graph of completed traces, recorded as the Collector
    servicegraph connector's metrics: ``idle_timeout``, ``max_wait``,
    ``max_traces``, ``metrics`` (record them, default true), ``metrics_interval``.
exporters
    ``otlp`` (gRPC: ``endpoint``, ``headers``, ``compression``, ``timeout``,
    ``tls: {insecure, ca_file}``, ``sending_queue: {enabled, queue_size,
    num_consumers, storage}`` (``storage: file_storage/<name>``: a persistent
    queue on disk, replayed after a crash or restart), ``retry_on_failure:
    {enabled, initial_interval, max_interval, max_elapsed_time, multiplier,
    randomization_factor}`` (``max_elapsed_time: 0`` retries forever));
    ``otlphttp`` (the
    same, ``endpoint`` being the base URL, plus ``traces_endpoint``,
    ``metrics_endpoint``, ``encoding: proto|json``); ``prometheus``
    (``endpoint``, ``cardinality_limit``, ``duration_buckets_ms``,
    ``metric_expiration`` — window and metric-point series nothing updated
    for this long stop being exposed, default 5m, 0 keeps them);
    ``jaeger`` (``endpoint`` of the agent, UDP); ``file`` — Arrow IPC files:
    ``path``, ``prefix``, ``compression`` (``lz4``/``zstd``/``none``),
    ``compression_level`` (more CPU, fewer bytes: lz4 level 3 writes ~12% less),
    ``rotation: {max_megabytes, max_age}``; ``debug`` (``verbosity``);
    ``loadbalancing`` — routes each span by a consistent (rendezvous) hash of
    ``routing_key`` (``traceID``, ``service``; ``metric`` in metrics
    pipelines) to one of several OTLP/gRPC endpoints, so each trace is whole
    in one downstream instance: ``protocol: {otlp: {the otlp keys but
    endpoint}}``, ``resolver`` — one of ``static: {hostnames}``, ``dns:
    {hostname, port, interval, timeout}``, ``file: {path, interval}`` (one
    ``host:port`` per line, re-read when it changes); ``drain_timeout``.
extensions
    ``health_check`` — ``endpoint`` (default ``localhost:13133``), ``path``
    (``/``): 200 with a JSON status while serving, 503 while shutting down.
    ``file_storage`` — ``directory``, ``create_directory``, ``fsync``: where
    exporters' persistent sending queues live (one process per directory).
service
    ``pipelines`` — ``traces[/name]`` and ``metrics[/name]``, each with
    ``receivers``, ``processors``, ``exporters``; ``extensions``;
    ``telemetry: {logs: {level, encoding: json|console, stats_interval}}``
    (``stats_interval``, default 60s, 0 for none: a line per pipeline that saw
    traffic — received and its rate, processed, sampled out, dropped by
    reason, exported and failed per exporter);
    ``shutdown_timeout`` (knhk's own: how long SIGTERM may take, default 30s).

Each pipeline entry is its own :class:`~knhk.TelemetryPipeline` with its own
exporter instances; ``prometheus`` and ``file`` exporters own a port or a
directory, so each may be in one pipeline only. A receiver listed in several
pipelines of one signal feeds each of them every batch: the first pipeline
that lists it decides whether a request is taken (full: the client is told
to retry); the others record it under their own backpressure strategy and
count what they drop.

Example
-------
>>> from knhk.serve import parse_config
>>> cfg = parse_config('''
... receivers: {otlp: {protocols: {grpc: {endpoint: localhost:0}}}}
... exporters: {debug: {}}
... service: {pipelines: {traces: {receivers: [otlp], exporters: [debug]}}}
... ''')
>>> sorted(cfg)
['exporters', 'receivers', 'service']
"""

from knhk.serve.config import (
    DEFAULT_CONFIG,
    ConfigError,
    default_config,
    load_config,
    parse_config,
    validate_config,
)
from knhk.serve.server import Server, configure_logging

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "Server",
    "configure_logging",
    "default_config",
    "load_config",
    "parse_config",
    "validate_config",
]
