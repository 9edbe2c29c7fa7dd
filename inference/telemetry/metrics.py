"""Prometheus metrics in prometheus_client's multiprocess mode, written into the state directory.

The values live in memory-mapped files under ``<state-dir>/metrics``, so the companion exporter
can publish them when this process is frozen or gone; this process serves ``/metrics`` from the
same files. Label children are bound once, here, so the hot path only calls ``set``/``inc``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from vigil import statedir

from ..engine.request import to_epoch_ns
from .catalog import METRICS, MetricSpec

LOAD_STATES = ("loading", "loaded", "failed")
STALL_STAGES = ("load", "schedule", "vision", "prefill", "decode")
STEP_STAGES = ("vision", "prefill", "decode")
# Why the connection layer (inference/http/) closed or refused a connection: every reason it logs.
CONNECTION_CLOSE_REASONS = (
    "idle_connection",
    "slow_request_head",
    "slow_request_body",
    "slow_unread_body",
    "closed_for_room",
    "connection_limit",
    "invalid_http_request",
    "request_head_too_large",
    "keep_alive_timeout",
)
CUDA_SAMPLE_EVERY_STEPS = 64
HEARTBEAT_PUBLISH_S = 0.25


def prepare_multiprocess_dir(state_dir: str | os.PathLike) -> Path:
    """Point prometheus_client at ``<state_dir>/metrics``; call before any metric is created."""
    metrics_dir = statedir.metrics_dir(state_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # Gauges left by an earlier process with this pid (a restarted container is pid 1 again)
    # would otherwise show its state as ours. Its counters are kept: totals stay monotonic.
    for stale in statedir.gauge_files_of(state_dir, os.getpid()):
        stale.unlink(missing_ok=True)
    values.ValueClass = values.MultiProcessValue()
    return metrics_dir


def _create(spec: MetricSpec):
    kwargs: dict[str, Any] = {"labelnames": spec.labels, "registry": None}
    if spec.kind == "counter":
        return Counter(spec.name, spec.help, **kwargs)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, multiprocess_mode="liveall", **kwargs)
    return Histogram(spec.name, spec.help, buckets=spec.buckets, **kwargs)


class InferenceMetrics:
    """The metrics of one inference process serving one model."""

    def __init__(self, model: str, metrics_dir: str | os.PathLike):
        self.model = model
        self.metrics_dir = Path(metrics_dir)
        self.family = {spec.name: _create(spec) for spec in METRICS}
        f = self.family
        self.queue_depth = f["inference_queue_depth"].labels(model=model)
        self.queue_oldest = f["inference_queue_oldest_enqueue_timestamp_seconds"].labels(
            model=model
        )
        self.running = f["inference_requests_running"].labels(model=model)
        self.in_flight = f["inference_requests_in_flight"].labels(model=model)
        self.connections = f["inference_connections_open"].labels(model=model)
        self.heartbeat = f[statedir.HEARTBEAT_METRIC].labels(model=model)
        self.steps = {
            stage: f["inference_engine_steps"].labels(model=model, stage=stage)
            for stage in STEP_STAGES
        }
        self.prefill_batch = f["inference_prefill_batch_size"].labels(model=model)
        self.queue_wait = f["inference_queue_wait_seconds"].labels(model=model)
        self.prefill_duration = f["inference_prefill_duration_seconds"].labels(model=model)
        self.prompt_tokens = f["inference_prompt_tokens"].labels(model=model)
        self.request_images = f["inference_request_images"].labels(model=model)
        self.request_image_tokens = f["inference_request_image_tokens"].labels(model=model)
        self.image_preprocess = f["inference_image_preprocess_duration_seconds"].labels(model=model)
        self.vision_encoder = f["inference_vision_encoder_duration_seconds"].labels(model=model)
        self.generation_tokens = f["inference_generation_tokens"].labels(model=model)
        self.load_state = {
            state: f["inference_model_load_state"].labels(model=model, state=state)
            for state in LOAD_STATES
        }
        self.stalled_flag = f["inference_engine_stalled"].labels(model=model)
        # Zero-valued series exist from the start, so that rate() and absent() behave.
        for gauge in (
            self.queue_depth,
            self.queue_oldest,
            self.running,
            self.in_flight,
            self.connections,
            self.stalled_flag,
        ):
            gauge.set(0)
        for stage in STEP_STAGES:
            f["inference_out_of_memory_errors"].labels(model=model, stage=stage)
        for stage in STALL_STAGES:
            f["inference_engine_stalls"].labels(model=model, stage=stage)
        f["inference_admission_refusals"].labels(model=model, reason="insufficient_memory")
        for reason in CONNECTION_CLOSE_REASONS:
            f["inference_connections_closed"].labels(model=model, reason=reason)
        self.heartbeat.set(time.time())
        self._pending_steps = {stage: 0 for stage in self.steps}
        self._published_at = time.monotonic()
        self._cuda_device = None  # set once a model is loaded on a GPU
        self._steps_since_cuda_sample = 0

    # ---- engine observer (called from the engine thread, once per step or change) -----------

    def step(self, stage: str, batch_size: int) -> None:
        # Counted in plain ints and published at most every HEARTBEAT_PUBLISH_S: a multiprocess
        # write costs tens of microseconds between torch ops, and hang thresholds are seconds.
        self._pending_steps[stage] += 1
        now = time.monotonic()
        if now - self._published_at >= HEARTBEAT_PUBLISH_S:
            self._publish_progress(now)
        if self._cuda_device is not None:
            # The allocator moves most at prefill; between, a sample every so many steps is
            # enough (a decode step adds one token of KV cache per row).
            self._steps_since_cuda_sample += 1
            if stage == "prefill" or self._steps_since_cuda_sample >= CUDA_SAMPLE_EVERY_STEPS:
                self._steps_since_cuda_sample = 0
                self.cuda_memory(self._cuda_device)

    def _publish_progress(self, now: float) -> None:
        self._published_at = now
        self.heartbeat.set(time.time())
        for stage, count in self._pending_steps.items():
            if count:
                self.steps[stage].inc(count)
                self._pending_steps[stage] = 0

    def running_changed(self, running: int) -> None:
        self.running.set(running)
        if running == 0:  # the engine goes idle: publish what the last steps counted
            self._publish_progress(time.monotonic())

    def batch_formed(self, new_requests: int) -> None:
        self.prefill_batch.observe(new_requests)

    def out_of_memory(self, stage: str) -> None:
        self.family["inference_out_of_memory_errors"].labels(model=self.model, stage=stage).inc()

    def admission_refused(self, reason: str) -> None:
        self.family["inference_admission_refusals"].labels(model=self.model, reason=reason).inc()

    # ---- connections (called from the event loop, per connection opened or closed) ----------

    def connections_open(self, count: int) -> None:
        self.connections.set(count)

    def connection_closed(self, reason: str) -> None:
        self.family["inference_connections_closed"].labels(model=self.model, reason=reason).inc()

    def fault_fired(self, fault: str, stage: str) -> None:
        self.family["inference_faults_injected"].labels(
            model=self.model, fault=fault, stage=stage
        ).inc()

    # ---- watchdog ----------------------------------------------------------------------------

    def stall_timeout(self, seconds: float) -> None:
        self.family["inference_watchdog_stall_timeout_seconds"].labels(model=self.model).set(
            seconds
        )

    def stalled(self, stage: str) -> None:
        self.family["inference_engine_stalls"].labels(model=self.model, stage=stage).inc()
        self.stalled_flag.set(1)

    def stall_ended(self) -> None:
        self.stalled_flag.set(0)

    def kv_cache_bytes_per_token(self, value: int) -> None:
        self.family["inference_kv_cache_bytes_per_token"].labels(model=self.model).set(value)

    def queue_changed(self, depth: int, oldest_arrival_ns: int | None) -> None:
        self.queue_depth.set(depth)
        self.queue_oldest.set(to_epoch_ns(oldest_arrival_ns) / 1e9 if oldest_arrival_ns else 0)

    # ---- model lifecycle ---------------------------------------------------------------------

    def load_started(self, started_at: float) -> None:
        self._set_load_state("loading")
        self.family["inference_model_load_started_timestamp_seconds"].labels(model=self.model).set(
            started_at
        )

    def load_finished(self, duration_s: float, ok: bool, loaded=None) -> None:
        self.family["inference_model_load_duration_seconds"].labels(model=self.model).set(
            duration_s
        )
        self._set_load_state("loaded" if ok else "failed")
        if ok and loaded is not None and loaded.device.type == "cuda":
            self._cuda_device = loaded.device
            self.cuda_memory(loaded.device)
        if ok and loaded is not None:
            self.family["inference_model_info"].labels(
                model=self.model,
                architecture=type(loaded.model).__name__,
                dtype=loaded.dtype_name,
                device=str(loaded.device),
            ).set(1)

    def _set_load_state(self, current: str) -> None:
        for state, gauge in self.load_state.items():
            gauge.set(1 if state == current else 0)

    def build_info(self, version: str, torch_version: str, transformers_version: str) -> None:
        self.family["inference_build_info"].labels(
            version=version, torch=torch_version, transformers=transformers_version
        ).set(1)

    def cuda_memory(self, device) -> None:
        """Sample PyTorch's CUDA allocator for one device (cheap: three counters read)."""
        import torch

        gpu = str(device.index or 0)
        labels = {"model": self.model, "gpu": gpu}
        f = self.family
        f["inference_torch_cuda_memory_allocated_bytes"].labels(**labels).set(
            torch.cuda.memory_allocated(device)
        )
        f["inference_torch_cuda_memory_reserved_bytes"].labels(**labels).set(
            torch.cuda.memory_reserved(device)
        )
        f["inference_torch_cuda_memory_peak_allocated_bytes"].labels(**labels).set(
            torch.cuda.max_memory_allocated(device)
        )

    # ---- exposition --------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text exposition of every process writing into the state directory."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        return generate_latest(registry)
