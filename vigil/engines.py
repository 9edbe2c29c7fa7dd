"""The serving engines the stack watches, and how to tell them apart from their /metrics.

A target of the exporter may name its engine (``vllm=http://127.0.0.1:8000``); otherwise the
exporter recognises it from the metric names it exposes. Each engine's own names are mapped to
one vocabulary by the recording rules (alerts/engines.py); the sources of the names are cited
there and in the metrics reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# vigil: this project's inference process; vllm, sglang, tgi: the engines people already run.
ENGINES = ("vigil", "vllm", "sglang", "tgi")

# A metric name only that engine exposes, matched at the start of a line of the text format
# (a sample or its # HELP/# TYPE line). vLLM and SGLang prefix every metric with "vllm:" and
# "sglang:", TGI's router with "tgi_" (see alerts/engines.py for the sources); ours publishes
# the engine's heartbeat.
_SIGNATURES = {
    "vllm": re.compile(r"^(# (HELP|TYPE) )?vllm:", re.MULTILINE),
    "sglang": re.compile(r"^(# (HELP|TYPE) )?sglang:", re.MULTILINE),
    "tgi": re.compile(r"^(# (HELP|TYPE) )?tgi_", re.MULTILINE),
    "vigil": re.compile(
        r"^(# (HELP|TYPE) )?inference_progress_heartbeat_timestamp_seconds", re.MULTILINE
    ),
}


@dataclass(frozen=True)
class EngineSeries:
    """The series of an engine's own /metrics that say whether it has work and whether its
    forward passes complete: what the exporter reads itself (exporter/engine_state.py), and the
    same names the recording rules map (alerts/engines.py), where each profile cites its source.

    Names are as scraped (a counter with the suffix it is exposed with, if any)."""

    running: str  # gauge: requests in the running batch
    waiting: str  # gauge: requests queued for a slot
    # Counters that move with the forward passes: each increase is progress.
    progress_counters: tuple[str, ...]
    # Gauges the engine republishes while it steps: each change of value is progress.
    progress_gauges: tuple[str, ...] = ()
    model_label: str | None = None  # the label holding the served model's name (None: none)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(
            (self.running, self.waiting, *self.progress_counters, *self.progress_gauges)
        )


SERIES: dict[str, EngineSeries] = {
    # This project's inference process (inference/telemetry/catalog.py): prometheus_client in
    # multiprocess mode, gauges per live pid (a pid label), forward passes by stage.
    "vigil": EngineSeries(
        running="inference_requests_running",
        waiting="inference_queue_depth",
        progress_counters=("inference_engine_steps_total",),
        model_label="model",
    ),
    # vLLM V1 (vllm-project/vllm vllm/v1/metrics/loggers.py: num_requests_running :527,
    # num_requests_waiting :537, prompt_tokens :747, generation_tokens :798 @0.33.0), 0.8.0 to
    # 0.33.0. The generation counter moves at every iteration that decodes, the prompt counter
    # when a request's prefill is done (IterationStats.update_from_output), the KV-cache gauge at
    # every step a prefill chunk or a decode changes it; every series carries model_name and,
    # from 0.8.3, engine (the engine-core index: summed per model). Counters scrape with _total.
    "vllm": EngineSeries(
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        progress_counters=("vllm:generation_tokens_total", "vllm:prompt_tokens_total"),
        # Republished at every step; every prefill chunk changes it (the prompt counter moves
        # only once the prefill is done).
        progress_gauges=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        model_label="model_name",
    ),
    # SGLang (sgl-project/sglang python/sglang/srt/observability/metrics_collector.py
    # num_running_reqs :364, num_queue_reqs :370, num_used_tokens :432, generation_tokens :1860
    # @0.5.23; srt/metrics/collector.py up to 0.5.9), 0.4.5 to 0.5.23, with --enable-metrics.
    # The token counter moves once per finished request, so each change of num_used_tokens,
    # which the scheduler republishes every decode log interval while it decodes, counts too.
    "sglang": EngineSeries(
        running="sglang:num_running_reqs",
        waiting="sglang:num_queue_reqs",
        progress_counters=("sglang:generation_tokens_total",),
        progress_gauges=("sglang:num_used_tokens",),
        model_label="model_name",
    ),
    # TGI (huggingface/text-generation-inference backends/v3/src/backend.rs: batch_current_size
    # :170,290, batch_inference_count :305-381; queue.rs: queue_size :143,158 @v3.3.7), v1.4.0 to
    # v3.3.7. Router metrics with no model label; counters scrape WITHOUT _total
    # (metrics-exporter-prometheus render()). batch_inference_count counts the prefill and
    # decode calls of the batch (label method).
    "tgi": EngineSeries(
        running="tgi_batch_current_size",
        waiting="tgi_queue_size",
        progress_counters=("tgi_batch_inference_count",),
        model_label=None,
    ),
}


def recognise(exposition: str) -> str | None:
    """The engine whose metrics these are, or None when no signature (or several) is found."""
    found = [engine for engine, signature in _SIGNATURES.items() if signature.search(exposition)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Target:
    """A server to watch: its base URL and its engine (None: recognise it from /metrics)."""

    url: str
    engine: str | None = None

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def __str__(self) -> str:
        return f"{self.engine}={self.url}" if self.engine else self.url


def parse_target(text: str) -> Target:
    """``[ENGINE=]URL``; ValueError (with a message that says what is wrong) otherwise."""
    engine, sep, url = text.strip().partition("=")
    if not sep or "://" in engine:  # no engine named (a URL may hold '=' in its query)
        engine, url = "", text.strip()
    if engine and engine not in ENGINES:
        raise ValueError(f"must name a known engine ({', '.join(ENGINES)}), not {engine!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, after ENGINE= if any")
    try:
        _ = parts.port  # raises ValueError for a port outside 0-65535
    except ValueError:
        raise ValueError("must have a port from 0 to 65535") from None
    return Target(url.rstrip("/"), engine or None)
