"""The shared core of llm-vigil, imported by the inference process and the exporter alike and
importing neither: the state-directory contract (``statedir``, ``procfs``), the metric-spec type
(``metricspec``), default paths (``paths``), JSON logging (``logs``), typed options
(``options``) and the GPU seam (``gpu``). It needs no torch, transformers or OpenTelemetry, so
that the exporter, the rules and the dashboards install next to any engine."""

__version__ = "0.1.0"
