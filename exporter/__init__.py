"""The companion exporter of llm-vigil: GPUs through NVML, the inference processes' telemetry
and their state seen from outside, and a black-box probe, on one /metrics."""

__version__ = "0.1.0"
