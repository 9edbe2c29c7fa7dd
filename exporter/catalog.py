"""Every metric the exporter itself publishes: name, type, unit, labels and meaning.

The collectors build their families from this table (``family()``), and the metrics reference
(docs/metrics.md, ``scripts/generate``) is generated from it together with the
inference process's catalog, whose metrics the exporter passes on from the state directory.
Names are in base units; GPUs carry ``gpu`` (NVML index), ``uuid`` and ``gpu_name`` on every
series; processes carry ``model`` and ``pid`` (as the inference process sees its own pid).
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from vigil.metricspec import MetricSpec

GPU = ("gpu", "uuid", "gpu_name")
PROCESS = ("model", "pid")

# The clock-event (throttle) reasons NVML reports, by bit, as label values.
CLOCK_EVENT_REASONS = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

M = MetricSpec
EXPORTER_METRICS: tuple[MetricSpec, ...] = (
    # ---- GPUs (NVML) -------------------------------------------------------------------------
    M(
        "vigil_nvml_up",
        "gauge",
        "",
        (),
        "1 when NVML is initialised and answers, 0 when it is missing or failing (no driver, no "
        "GPU, library not found); the exporter retries it.",
    ),
    M(
        "vigil_gpu_driver_info",
        "info",
        "",
        ("driver_version", "cuda_version", "nvml_version"),
        "The NVIDIA driver's version, the newest CUDA version it supports, and NVML's.",
    ),
    M(
        "vigil_gpu_up",
        "gauge",
        "",
        GPU,
        "1 when the GPU's last read succeeded and is fresh, 0 when it is lost or its readings are "
        "older than --gpu-max-age.",
    ),
    M(
        "vigil_gpu_last_read_timestamp_seconds",
        "gauge",
        "seconds",
        GPU,
        "Unix time of the last successful read of the GPU.",
    ),
    M(
        "vigil_gpu_utilization_ratio",
        "gauge",
        "ratio",
        GPU,
        "Share of the last sample period in which a kernel ran on the GPU (0 to 1).",
    ),
    M(
        "vigil_gpu_memory_utilization_ratio",
        "gauge",
        "ratio",
        GPU,
        "Share of the last sample period in which device memory was read or written (0 to 1).",
    ),
    M("vigil_gpu_memory_total_bytes", "gauge", "bytes", GPU, "Device memory in total."),
    M(
        "vigil_gpu_memory_used_bytes",
        "gauge",
        "bytes",
        GPU,
        "Device memory in use (NVML's v2 figure, which leaves out the driver's reserved part).",
    ),
    M("vigil_gpu_memory_free_bytes", "gauge", "bytes", GPU, "Device memory free."),
    M(
        "vigil_gpu_memory_reserved_bytes",
        "gauge",
        "bytes",
        GPU,
        "Device memory reserved by the driver and firmware (NVML v2 only).",
    ),
    M("vigil_gpu_temperature_celsius", "gauge", "celsius", GPU, "GPU core temperature."),
    M("vigil_gpu_power_watts", "gauge", "watts", GPU, "Power draw."),
    M("vigil_gpu_power_limit_watts", "gauge", "watts", GPU, "Enforced power limit."),
    M(
        "vigil_gpu_energy_joules",
        "counter",
        "joules",
        GPU,
        "Energy used since the driver was loaded.",
    ),
    M(
        "vigil_gpu_clock_hertz",
        "gauge",
        "hertz",
        GPU + ("clock",),
        "Current clock frequency, clock: sm or memory.",
    ),
    M(
        "vigil_gpu_clock_event_reason",
        "gauge",
        "",
        GPU + ("reason",),
        "1 for each reason that holds the clocks down now (throttling): "
        + ", ".join(CLOCK_EVENT_REASONS.values())
        + "; 0 for the others.",
    ),
    M(
        "vigil_gpu_ecc_errors",
        "counter",
        "errors",
        GPU + ("type",),
        "ECC memory errors since the driver was loaded (volatile), type: corrected or "
        "uncorrected; absent where ECC is unsupported or off.",
    ),
    M("vigil_gpu_pcie_replays", "counter", "replays", GPU, "PCIe replay counter."),
    M(
        "vigil_gpu_remapped_rows",
        "gauge",
        "rows",
        GPU + ("cause",),
        "Memory rows remapped, cause: correctable or uncorrectable errors.",
    ),
    M(
        "vigil_gpu_remapped_rows_pending",
        "gauge",
        "",
        GPU,
        "1 when a row remapping waits for a GPU reset.",
    ),
    M(
        "vigil_gpu_remapped_rows_failure",
        "gauge",
        "",
        GPU,
        "1 when a row remapping failed (the GPU needs service).",
    ),
    M(
        "vigil_gpu_xid_errors",
        "counter",
        "errors",
        GPU + ("xid",),
        "XID errors reported by the driver's critical-error events, by XID code.",
    ),
    M("vigil_gpu_mig_enabled", "gauge", "", GPU, "1 when MIG mode is on for the GPU."),
    M(
        "vigil_gpu_process_memory_used_bytes",
        "gauge",
        "bytes",
        GPU + ("pid", "model"),
        "Device memory used by each compute process on the GPU; pid as NVML reports it (the "
        "host's), model set for the inference processes of the state directory, empty for others.",
    ),
    # ---- the inference processes seen from outside -----------------------------------------
    M(
        "vigil_process_alive",
        "gauge",
        "",
        PROCESS,
        "1 while the inference process exists (frozen counts as alive), 0 once it is gone "
        "without a clean exit; kept for --dead-process-retention seconds.",
    ),
    M(
        "vigil_process_state",
        "gauge",
        "",
        PROCESS + ("state",),
        "1 for the process's current state from /proc (running, sleeping, disk_sleep "
        "(uninterruptible, often inside the driver), stopped, tracing_stop, zombie, dead, idle), "
        "0 for the others.",
    ),
    M(
        "vigil_process_cpu_seconds",
        "counter",
        "seconds",
        PROCESS,
        "CPU time the process has used (user plus system).",
    ),
    M("vigil_process_resident_memory_bytes", "gauge", "bytes", PROCESS, "Resident memory."),
    M("vigil_process_threads", "gauge", "threads", PROCESS, "Threads of the process."),
    M(
        "vigil_process_start_time_seconds",
        "gauge",
        "seconds",
        PROCESS,
        "Unix time at which the process started.",
    ),
    M(
        "vigil_process_heartbeat_age_seconds",
        "gauge",
        "seconds",
        PROCESS,
        "Seconds since the engine's last progress heartbeat, computed at scrape time (grows "
        "while the engine is idle too: pair it with in-flight requests).",
    ),
    M(
        "vigil_engine_processes",
        "gauge",
        "processes",
        ("target", "engine"),
        "Processes found behind a local target's port (the listener and its descendants, e.g. "
        "vLLM's API server, EngineCore and workers); 0 when none is found (the exporter's log "
        "says why: nothing listens, another network namespace, no permission). Their /proc view "
        "is in the vigil_process_* series, with the target's model and the host's pid.",
    ),
    M(
        "vigil_engine_process_info",
        "gauge",
        "",
        ("target", "engine", "model", "pid", "role", "comm"),
        "Always 1 for each process behind a local target: role listener (holds the port) or "
        "child (a descendant), comm its process name from /proc.",
    ),
    M(
        "vigil_engine_restarts",
        "counter",
        "restarts",
        ("target", "engine"),
        "Times the process listening on a local target's port was replaced by another (a "
        "restart of the engine), since the exporter started.",
    ),
    M(
        "vigil_process_unclean_exits",
        "counter",
        "processes",
        ("model",),
        "Inference processes that disappeared without a clean exit (crash, kill, watchdog exit).",
    ),
    # ---- black-box probe ----------------------------------------------------------------------
    M(
        "vigil_probe_success",
        "gauge",
        "",
        ("target", "check"),
        "1 when the last check succeeded, check: health (GET /health answered 200), ready (GET "
        "/ready answered 200) or canary (a streamed completion of a few tokens came back).",
    ),
    M(
        "vigil_probe_http_status",
        "gauge",
        "",
        ("target", "check"),
        "HTTP status of the last check; 0 when no answer came (refused, timed out).",
    ),
    M(
        "vigil_probe_duration_seconds",
        "gauge",
        "seconds",
        ("target", "check"),
        "Duration of the last check.",
    ),
    M(
        "vigil_probe_last_run_timestamp_seconds",
        "gauge",
        "seconds",
        ("target", "check"),
        "Unix time at which the last check ended.",
    ),
    M(
        "vigil_probe_checks",
        "counter",
        "checks",
        ("target", "check", "result"),
        "Checks run, result: success or failure.",
    ),
    M(
        "vigil_probe_canary_time_to_first_token_seconds",
        "gauge",
        "seconds",
        ("target",),
        "Time to the first token of the last successful canary completion.",
    ),
    M(
        "vigil_probe_canary_empty",
        "gauge",
        "",
        ("target",),
        "1 when the last canary completion came back with no text.",
    ),
    M(
        "vigil_target_info",
        "gauge",
        "",
        ("target", "engine", "source"),
        "Always 1 once the target's engine is known: engine vigil, vllm, sglang or tgi; source "
        "configured (named in --target ENGINE=URL) or recognised (from the metric names of its "
        "/metrics).",
    ),
    # ---- the engines' own state, read from their /metrics by the exporter -----------------
    M(
        "vigil_engine_metrics_up",
        "gauge",
        "",
        ("target", "engine"),
        "1 when the exporter's last read of the target's own /metrics succeeded (within "
        "--probe-timeout), 0 when it failed (a frozen engine does not answer): the engine's "
        "last known requests then stay published and its progress stands still.",
    ),
    M(
        "vigil_engine_requests_running",
        "gauge",
        "requests",
        ("target", "engine", "model"),
        "Requests in the engine's running batch, from its own gauge (vigil "
        "inference_requests_running, vLLM num_requests_running, SGLang num_running_reqs, TGI "
        "tgi_batch_current_size), summed per model; the last known value while /metrics cannot "
        "be read. model: the engine's model label, or the model GET /v1/models lists (TGI).",
    ),
    M(
        "vigil_engine_requests_waiting",
        "gauge",
        "requests",
        ("target", "engine", "model"),
        "Requests queued for a slot, from the engine's own gauge (vigil inference_queue_depth, "
        "vLLM num_requests_waiting, SGLang num_queue_reqs, TGI tgi_queue_size), summed per "
        "model; the last known value while /metrics cannot be read.",
    ),
    M(
        "vigil_engine_progress",
        "counter",
        "",
        ("target", "engine", "model"),
        "Work the engine's forward passes did, as the exporter saw it: every increase of its "
        "progress counters (vigil forward passes, vLLM prompt and generated tokens, SGLang "
        "generated tokens, TGI prefill and decode calls) plus one per change of SGLang's "
        "num_used_tokens. Kept by the exporter, so it never decreases, across engine restarts "
        "too; flat while /metrics cannot be read. With requests pending, a flat rate means a "
        "hung engine.",
    ),
    M(
        "vigil_engine_last_progress_timestamp_seconds",
        "gauge",
        "seconds",
        ("target", "engine", "model"),
        "Unix time at which the exporter last saw the engine's progress move (before any, when "
        "it first read the model's series).",
    ),
    M(
        "vigil_engine_hang_dumps",
        "counter",
        "dumps",
        ("target", "engine", "result"),
        "Hang reports written with --hang-dumps (work pending and no progress for "
        "--hang-dump-after seconds), result: ok (at least one Python stack read with py-spy), "
        "failed (py-spy ran and read none), unavailable (no py-spy, no ptrace permission, a "
        "target on another host, or no process found behind its port).",
    ),
    # ---- the exporter itself ------------------------------------------------------------------
    M(
        "vigil_exporter_build_info",
        "info",
        "",
        ("version", "python_version"),
        "The exporter's version and Python's.",
    ),
    M(
        "vigil_exporter_collector_success",
        "gauge",
        "",
        ("collector",),
        "1 when the collector's last run succeeded; a failing collector leaves out only its own "
        "metrics.",
    ),
    M(
        "vigil_exporter_collector_duration_seconds",
        "gauge",
        "seconds",
        ("collector",),
        "Duration of the collector's last run on the scrape path.",
    ),
)

_BY_NAME = {spec.name: spec for spec in EXPORTER_METRICS}


def family(name: str):
    """A fresh metric family for this scrape, typed and documented from the catalog."""
    spec = _BY_NAME[name]
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.kind == "info":
        return InfoMetricFamily(spec.name.removesuffix("_info"), spec.help, labels=())
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels, unit="")
