"""Stream processing of span batches: windows, aggregates, sketches, CEP rules, anomalies.

The :class:`StreamProcessor` is a pipeline stage that observes every span and
reports per-window, per-key aggregates; CEP rules and anomaly detectors raise
alerts that go to sinks.

>>> from knhk.stream import CepAction, CepPattern, CepRule, Matcher, StreamProcessor, WindowConfig
>>> processor = StreamProcessor(WindowConfig.tumbling(seconds=60))
>>> processor.add_cep_rule(CepRule("errors", CepPattern.count_threshold(
...     Matcher(status="error"), threshold=100, within=60, by="service"),
...     CepAction.alert("critical", "{count} errors in a minute on {key}")))
>>> processor.key_names
('service', 'name')
"""

from knhk.stream.alerts import (
    Alert,
    AlertRouter,
    AlertSink,
    CallbackAlertSink,
    InMemoryAlertSink,
    LoggingAlertSink,
)
from knhk.stream.anomaly import EwmaDetector, ThresholdRule
from knhk.stream.cep import CepAction, CepPattern, CepRule, Matcher
from knhk.stream.processor import StreamProcessor, WindowResult, quantile_name
from knhk.stream.sketch import DDSketch
from knhk.stream.windows import WindowConfig

__all__ = [
    "Alert",
    "AlertRouter",
    "AlertSink",
    "CallbackAlertSink",
    "CepAction",
    "CepPattern",
    "CepRule",
    "DDSketch",
    "EwmaDetector",
    "InMemoryAlertSink",
    "LoggingAlertSink",
    "Matcher",
    "StreamProcessor",
    "ThresholdRule",
    "WindowConfig",
    "WindowResult",
    "quantile_name",
]
