"""The alert rules under promtool: every alert fires where it should and stays quiet where it
should not, on an idle server, and with no data at all; the files pass promtool and amtool; every
metric a rule uses exists in the metrics reference."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from alerts import engines
from alerts.rules import (
    ALERTS_DIR,
    FAST_HANG_GROUP,
    HANG_SERIES,
    PARAMETERS,
    alert_names,
    defaults,
    groups,
    render,
)
from tools.metrics_reference import all_metric_names

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)

# The labels of the input series: one exporter instance, a model served there, its process, two
# GPUs and a probed target.
INSTANCE = 'instance="n1:9400",job="vigil-exporter"'
MODEL = INSTANCE + ',model="glm"'
PROCESS = MODEL + ',pid="7"'
GPU = INSTANCE + ',gpu="0",uuid="GPU-1",gpu_name="H100"'
SECOND_GPU = INSTANCE + ',gpu="1",uuid="GPU-2",gpu_name="H100"'
TARGET = INSTANCE + ',target="http://a:8000"'
# The labels an alert about each of them carries (besides severity and cause).
AT_INSTANCE = {"instance": "n1:9400"}
AT_MODEL = {**AT_INSTANCE, "model": "glm"}
AT_PROCESS = {**AT_MODEL, "pid": "7"}
AT_GPU = {**AT_INSTANCE, "gpu": "0", "uuid": "GPU-1", "gpu_name": "H100"}
AT_TARGET = {**AT_INSTANCE, "target": "http://a:8000"}
# The engine-agnostic alerts read the recorded vocabulary (alerts/engines.py): our own process
# is engine "vigil"; a vLLM server is scraped by its own job, model in model_name
# (vllm/v1/metrics/loggers.py).
AT_ENGINE = {**AT_MODEL, "engine": "vigil"}
AT_P95 = {**AT_ENGINE, "quantile": "0.95"}
VLLM = 'instance="gpu1:8000",job="vllm",model_name="glm",engine="0"'
AT_VLLM = {"instance": "gpu1:8000", "model": "glm", "engine": "vllm"}


def case(
    series: dict[str, str],
    eval_time: str,
    expected: list[dict] | None = None,
    interval: str = "1m",
) -> dict:
    """Input series (selector -> values, one every ``interval``), when to look, what fires."""
    return {
        "series": series,
        "eval_time": eval_time,
        "expected": expected or [],
        "interval": interval,
    }


def values(points: list[float]) -> str:
    """promtool's input values, one per point."""
    return " ".join(f"{point:g}" for point in points)


def rising_then_flat(per_step: float, rising: int, flat: int, start: float = 0) -> str:
    """A counter that grows by per_step at each of ``rising`` scrapes, then stands still for
    ``flat`` scrapes."""
    top = start + per_step * rising
    return f"{start:g}+{per_step:g}x{rising} {top:g}x{flat}"


# Alert -> (a case where it fires, a case where it does not).
CASES: dict[str, tuple[dict, dict]] = {
    "InferenceEngineStalled": (
        case({f"inference_engine_stalled{{{PROCESS}}}": "0 0 1 1 1"}, "4m", [AT_MODEL]),
        case(
            {
                f"inference_engine_stalled{{{PROCESS}}}": "0x5",
                f'inference_engine_stalls_total{{{MODEL},stage="decode"}}': "0x5",
            },
            "5m",
        ),
    ),
    "InferenceEngineStoppedGenerating": (
        # vLLM generating 20 tokens a second, scraped every 2 s (its fast job), for 140 s,
        # then nothing while 8 requests run: at 3m the last 20 s are flat and the minute
        # before moved at every scrape. More in test_engine_stopped_generating_*.
        case(
            {
                f"vllm:num_requests_running{{{VLLM}}}": "8x90",
                f"vllm:generation_tokens_total{{{VLLM}}}": rising_then_flat(40, 70, 20),
            },
            "3m",
            [AT_VLLM],
            interval="2s",
        ),
        case(
            {
                f"vllm:num_requests_running{{{VLLM}}}": "8x90",
                f"vllm:generation_tokens_total{{{VLLM}}}": "0+40x90",
            },
            "3m",
            interval="2s",
        ),
    ),
    "InferenceEngineNoProgress": (
        case(
            {
                f"inference_requests_running{{{PROCESS}}}": "1x10",
                f"inference_queue_depth{{{PROCESS}}}": "2x10",
                f'inference_engine_steps_total{{{MODEL},stage="decode"}}': "0+10x3 30x7",
            },
            "10m",
            [AT_ENGINE],
        ),
        case(
            {
                f"inference_requests_running{{{PROCESS}}}": "1x10",
                f"inference_queue_depth{{{PROCESS}}}": "2x10",
                f'inference_engine_steps_total{{{MODEL},stage="decode"}}': "0+10x10",
            },
            "10m",
        ),
    ),
    "InferenceEngineFrozen": (
        case(
            {
                f"vigil_process_cpu_seconds_total{{{PROCESS}}}": "100x10",
                f'vigil_engine_requests_running{{{MODEL},target="http://a:8000",engine="vllm"}}': "1x10",
                f'vigil_engine_requests_waiting{{{MODEL},target="http://a:8000",engine="vllm"}}': "0x10",
            },
            "10m",
            [AT_MODEL],
        ),
        case(
            {
                f"vigil_process_cpu_seconds_total{{{PROCESS}}}": "0+30x10",
                f'vigil_engine_requests_running{{{MODEL},target="http://a:8000",engine="vllm"}}': "1x10",
                f'vigil_engine_requests_waiting{{{MODEL},target="http://a:8000",engine="vllm"}}': "0x10",
            },
            "10m",
        ),
    ),
    "InferenceHeartbeatStale": (
        case(
            {
                f"vigil_process_heartbeat_age_seconds{{{PROCESS}}}": "0+10x10",
                f"inference_requests_in_flight{{{PROCESS}}}": "2x10",
            },
            "10m",
            [AT_PROCESS],
        ),
        case(
            {
                f"vigil_process_heartbeat_age_seconds{{{PROCESS}}}": "0+10x10",
                f"inference_requests_in_flight{{{PROCESS}}}": "0x10",
            },
            "10m",
        ),
    ),
    "InferenceBusyWithoutProgress": (
        case(
            {
                f"vigil_process_cpu_seconds_total{{{PROCESS}}}": "0+60x10",
                f"vigil_process_heartbeat_age_seconds{{{PROCESS}}}": "0+10x10",
                f"inference_requests_in_flight{{{PROCESS}}}": "1x10",
            },
            "10m",
            [AT_PROCESS],
        ),
        case(
            {
                f"vigil_process_cpu_seconds_total{{{PROCESS}}}": "0+6x10",
                f"vigil_process_heartbeat_age_seconds{{{PROCESS}}}": "0+10x10",
                f"inference_requests_in_flight{{{PROCESS}}}": "1x10",
            },
            "10m",
        ),
    ),
    "InferenceProcessInDriverWait": (
        case({f'vigil_process_state{{{PROCESS},state="disk_sleep"}}': "1x10"}, "10m", [AT_PROCESS]),
        case({f'vigil_process_state{{{PROCESS},state="disk_sleep"}}': "0x10"}, "10m"),
    ),
    "InferenceProbeFailing": (
        case(
            {
                f'vigil_probe_success{{{TARGET},check="canary"}}': "0x10",
                f'vigil_probe_success{{{TARGET},check="ready"}}': "1x10",
                f'vigil_probe_success{{{TARGET},check="health"}}': "1x10",
            },
            "10m",
            [AT_TARGET],
        ),
        case(
            {
                f'vigil_probe_success{{{TARGET},check="canary"}}': "0x10",
                f'vigil_probe_success{{{TARGET},check="health"}}': "0x10",
            },
            "10m",
        ),
    ),
    "InferenceTargetDown": (
        case({f'vigil_probe_success{{{TARGET},check="health"}}': "0x10"}, "10m", [AT_TARGET]),
        case({f'vigil_probe_success{{{TARGET},check="health"}}': "1x10"}, "10m"),
    ),
    "InferenceProbeAbsent": (
        case(
            {f"vigil_process_alive{{{PROCESS}}}": "1x10"},
            "10m",
            [{"check": "health", "job": "vigil-exporter"}],
        ),
        case({f'vigil_probe_success{{{TARGET},check="health"}}': "0x10"}, "10m"),
    ),
    # Per exporter, where our own process is expected (test_no_live_process_only_where_ours_
    # is_expected has the other cases): a dead process in the state directory is ours.
    "InferenceNoLiveProcess": (
        case({f"vigil_process_alive{{{PROCESS}}}": "0x10"}, "10m", [AT_INSTANCE]),
        case({f"vigil_process_alive{{{PROCESS}}}": "1x10"}, "10m"),
    ),
    "InferenceProcessDied": (
        case({f"vigil_process_alive{{{PROCESS}}}": "1 1 0 0"}, "3m", [AT_PROCESS]),
        case({f"vigil_process_alive{{{PROCESS}}}": "1x5"}, "5m"),
    ),
    "InferenceCrashLoop": (
        case({f"vigil_process_unclean_exits_total{{{MODEL}}}": "0 1 2 3 3"}, "4m", [AT_MODEL]),
        case({f"vigil_process_unclean_exits_total{{{MODEL}}}": "0 0 1 1 1"}, "4m"),
    ),
    "InferenceModelLoadSlow": (
        case(
            {
                f"inference_model_load_started_timestamp_seconds{{{PROCESS}}}": "0x20",
                f'inference_model_load_state{{{PROCESS},state="loading"}}': "1x20",
            },
            "20m",
            [AT_PROCESS],
        ),
        case(
            {
                f"inference_model_load_started_timestamp_seconds{{{PROCESS}}}": "0x20",
                f'inference_model_load_state{{{PROCESS},state="loading"}}': "0x20",
            },
            "20m",
        ),
    ),
    "InferenceModelLoadFailed": (
        case(
            {f'inference_model_load_state{{{PROCESS},state="failed"}}': "1x3"}, "3m", [AT_PROCESS]
        ),
        case({f'inference_model_load_state{{{PROCESS},state="failed"}}': "0x3"}, "3m"),
    ),
    "GpuMemoryNearlyFull": (
        case(
            {
                f"vigil_gpu_memory_used_bytes{{{GPU}}}": "96x10",
                f"vigil_gpu_memory_total_bytes{{{GPU}}}": "100x10",
            },
            "10m",
            [AT_GPU],
        ),
        case(
            {
                f"vigil_gpu_memory_used_bytes{{{GPU}}}": "50x10",
                f"vigil_gpu_memory_total_bytes{{{GPU}}}": "100x10",
            },
            "10m",
        ),
    ),
    "GpuMemoryFullWithinAnHour": (
        case(
            {
                f"vigil_gpu_memory_used_bytes{{{GPU}}}": "60+2x60",
                f"vigil_gpu_memory_total_bytes{{{GPU}}}": "200x60",
            },
            "40m",
            [AT_GPU],
        ),
        case(
            {
                f"vigil_gpu_memory_used_bytes{{{GPU}}}": "150x60",
                f"vigil_gpu_memory_total_bytes{{{GPU}}}": "200x60",
            },
            "40m",
        ),
    ),
    "InferenceKvCacheFull": (
        case(
            {
                f"vllm:kv_cache_usage_perc{{{VLLM}}}": "0.99x10",
                f"vllm:num_requests_waiting{{{VLLM}}}": "3x10",
            },
            "10m",
            [AT_VLLM],
        ),
        case(
            {
                f"vllm:kv_cache_usage_perc{{{VLLM}}}": "0.99x10",
                f"vllm:num_requests_waiting{{{VLLM}}}": "0x10",
            },
            "10m",
        ),
    ),
    "InferenceOutOfMemory": (
        case(
            {f'inference_out_of_memory_errors_total{{{MODEL},stage="decode"}}': "0 0 1 1"},
            "3m",
            [{**AT_MODEL, "stage": "decode"}],
        ),
        case({f'inference_out_of_memory_errors_total{{{MODEL},stage="decode"}}': "0x3"}, "3m"),
    ),
    "InferenceAdmissionRefusalsRising": (
        case(
            {
                f'inference_admission_refusals_total{{{MODEL},reason="insufficient_memory"}}': "0+2x10"
            },
            "10m",
            [{**AT_MODEL, "reason": "insufficient_memory"}],
        ),
        case(
            {
                f'inference_admission_refusals_total{{{MODEL},reason="insufficient_memory"}}': "0 0 0 1 1 1 1 1 1 1 1"
            },
            "10m",
        ),
    ),
    "InferenceQueueBacklog": (
        case({f"inference_queue_depth{{{PROCESS}}}": "40x5"}, "5m", [AT_ENGINE]),
        case({f"inference_queue_depth{{{PROCESS}}}": "5x5"}, "5m"),
    ),
    "InferenceQueueWaitLong": (
        case(
            {f"inference_queue_oldest_enqueue_timestamp_seconds{{{PROCESS}}}": "60x5"},
            "5m",
            [AT_PROCESS],
        ),
        case({f"inference_queue_oldest_enqueue_timestamp_seconds{{{PROCESS}}}": "0x5"}, "5m"),
    ),
    "InferenceTimeToFirstTokenHigh": (
        case(
            {
                f'gen_ai_server_time_to_first_token_seconds_bucket{{{MODEL},le="0.5"}}': "0x20",
                f'gen_ai_server_time_to_first_token_seconds_bucket{{{MODEL},le="5"}}': "0+10x20",
                f'gen_ai_server_time_to_first_token_seconds_bucket{{{MODEL},le="+Inf"}}': "0+10x20",
            },
            "20m",
            [AT_P95],
        ),
        case(
            {
                f'gen_ai_server_time_to_first_token_seconds_bucket{{{MODEL},le="0.5"}}': "0+10x20",
                f'gen_ai_server_time_to_first_token_seconds_bucket{{{MODEL},le="5"}}': "0+10x20",
                f'gen_ai_server_time_to_first_token_seconds_bucket{{{MODEL},le="+Inf"}}': "0+10x20",
            },
            "20m",
        ),
    ),
    "InferenceLatencyHigh": (
        case(
            {
                f'gen_ai_server_request_duration_seconds_bucket{{{MODEL},le="10.24"}}': "0x20",
                f'gen_ai_server_request_duration_seconds_bucket{{{MODEL},le="81.92"}}': "0+10x20",
                f'gen_ai_server_request_duration_seconds_bucket{{{MODEL},le="+Inf"}}': "0+10x20",
            },
            "20m",
            [AT_P95],
        ),
        case(
            {
                f'gen_ai_server_request_duration_seconds_bucket{{{MODEL},le="10.24"}}': "0+10x20",
                f'gen_ai_server_request_duration_seconds_bucket{{{MODEL},le="81.92"}}': "0+10x20",
                f'gen_ai_server_request_duration_seconds_bucket{{{MODEL},le="+Inf"}}': "0+10x20",
            },
            "20m",
        ),
    ),
    "InferenceErrorRateHigh": (
        case(
            {
                f'inference_requests_total{{{MODEL},status="500"}}': "0+1x10",
                f'inference_requests_total{{{MODEL},status="200"}}': "0+9x10",
            },
            "10m",
            [AT_ENGINE],
        ),
        case(
            {
                f'inference_requests_total{{{MODEL},status="500"}}': "0x10",
                f'inference_requests_total{{{MODEL},status="200"}}': "0+9x10",
            },
            "10m",
        ),
    ),
    "InferenceErrorRateCritical": (
        case(
            {
                f'inference_requests_total{{{MODEL},status="503"}}': "0+5x10",
                f'inference_requests_total{{{MODEL},status="200"}}': "0+5x10",
            },
            "10m",
            [AT_ENGINE],
        ),
        case(
            {
                f'inference_requests_total{{{MODEL},status="500"}}': "0+1x10",
                f'inference_requests_total{{{MODEL},status="200"}}': "0+9x10",
            },
            "10m",
        ),
    ),
    "InferenceEmptyOutputs": (
        case(
            {f'inference_empty_outputs_total{{{MODEL},reason="immediate_eos"}}': "0+1x10"},
            "10m",
            [{**AT_MODEL, "reason": "immediate_eos"}],
        ),
        case(
            {
                f'inference_empty_outputs_total{{{MODEL},reason="immediate_eos"}}': "0 0 0 1 1 1 1 1 1 1 1"
            },
            "10m",
        ),
    ),
    "InferenceCanaryEmpty": (
        case({f"vigil_probe_canary_empty{{{TARGET}}}": "1x10"}, "10m", [AT_TARGET]),
        case({f"vigil_probe_canary_empty{{{TARGET}}}": "0x10"}, "10m"),
    ),
    "GpuXidError": (
        case(
            {f'vigil_gpu_xid_errors_total{{{GPU},xid="79"}}': "_x5 1 1 1"},
            "7m",
            [{**AT_GPU, "xid": "79"}],
        ),
        case({f'vigil_gpu_xid_errors_total{{{GPU},xid="13"}}': "_x5 1 2 3"}, "7m"),
    ),
    "GpuThermalThrottling": (
        case(
            {f'vigil_gpu_clock_event_reason{{{GPU},reason="hw_thermal_slowdown"}}': "1x10"},
            "10m",
            [AT_GPU],
        ),
        case(
            {f'vigil_gpu_clock_event_reason{{{GPU},reason="hw_thermal_slowdown"}}': "0x10"}, "10m"
        ),
    ),
    "GpuPowerBrake": (
        case(
            {f'vigil_gpu_clock_event_reason{{{GPU},reason="hw_power_brake_slowdown"}}': "1x10"},
            "10m",
            [AT_GPU],
        ),
        case({f'vigil_gpu_clock_event_reason{{{GPU},reason="sw_power_cap"}}': "1x10"}, "10m"),
    ),
    "GpuPowerCapped": (
        case(
            {f'vigil_gpu_clock_event_reason{{{GPU},reason="sw_power_cap"}}': "1x20"},
            "20m",
            [AT_GPU],
        ),
        case({f'vigil_gpu_clock_event_reason{{{GPU},reason="sw_power_cap"}}': "0x20"}, "20m"),
    ),
    "GpuEccUncorrectable": (
        case(
            {f'vigil_gpu_ecc_errors_total{{{GPU},type="uncorrected"}}': "0 0 1 1"}, "3m", [AT_GPU]
        ),
        case(
            {
                f'vigil_gpu_ecc_errors_total{{{GPU},type="corrected"}}': "0 5 10 15",
                f'vigil_gpu_ecc_errors_total{{{GPU},type="uncorrected"}}': "0x3",
            },
            "3m",
        ),
    ),
    "GpuRowRemapFailure": (
        case({f"vigil_gpu_remapped_rows_failure{{{GPU}}}": "1x3"}, "3m", [AT_GPU]),
        case({f"vigil_gpu_remapped_rows_failure{{{GPU}}}": "0x3"}, "3m"),
    ),
    "GpuRowRemapPending": (
        case({f"vigil_gpu_remapped_rows_pending{{{GPU}}}": "1x3"}, "3m", [AT_GPU]),
        case({f"vigil_gpu_remapped_rows_pending{{{GPU}}}": "0x3"}, "3m"),
    ),
    "GpuLost": (
        case({f"vigil_gpu_up{{{GPU}}}": "0x5"}, "5m", [AT_GPU]),
        case({f"vigil_gpu_up{{{GPU}}}": "1x5"}, "5m"),
    ),
    "GpuReadingsStale": (
        case({f"vigil_gpu_last_read_timestamp_seconds{{{GPU}}}": "0x5"}, "5m", [AT_GPU]),
        case({f"vigil_gpu_last_read_timestamp_seconds{{{GPU}}}": "0+60x5"}, "5m"),
    ),
    "NvmlDown": (
        case({f"vigil_nvml_up{{{INSTANCE}}}": "1x10 0x10"}, "20m", [AT_INSTANCE]),
        case({f"vigil_nvml_up{{{INSTANCE}}}": "0x20"}, "20m"),
    ),  # a machine without GPUs
    "GpuUtilizationImbalance": (
        case(
            {
                f"vigil_gpu_utilization_ratio{{{GPU}}}": "0.9x20",
                f"vigil_gpu_utilization_ratio{{{SECOND_GPU}}}": "0.1x20",
                f'vigil_gpu_process_memory_used_bytes{{{GPU},pid="7",model="glm"}}': "1e9x20",
                f'vigil_gpu_process_memory_used_bytes{{{SECOND_GPU},pid="8",model="glm"}}': "1e9x20",
            },
            "20m",
            [AT_MODEL],
        ),
        case(
            {
                f"vigil_gpu_utilization_ratio{{{GPU}}}": "0.9x20",
                f"vigil_gpu_utilization_ratio{{{SECOND_GPU}}}": "0.8x20",
                f'vigil_gpu_process_memory_used_bytes{{{GPU},pid="7",model="glm"}}': "1e9x20",
                f'vigil_gpu_process_memory_used_bytes{{{SECOND_GPU},pid="8",model="glm"}}': "1e9x20",
            },
            "20m",
        ),
    ),
    "VigilExporterDown": (
        case(
            {'up{instance="n1:9400",job="vigil-exporter"}': "0x5"},
            "5m",
            [{**AT_INSTANCE, "job": "vigil-exporter"}],
        ),
        case({'up{instance="n1:9400",job="vigil-exporter"}': "1x5"}, "5m"),
    ),
    # vLLM's fast job times out while its normal job scrapes; quiet where both fail (the target
    # is down: other alerts say so) or where the fast job recovers within a minute.
    "VigilHangScrapeFailing": (
        case(
            {
                'up{instance="gpu1:8000",job="vllm-hang"}': "1 0x3",
                'up{instance="gpu1:8000",job="vllm"}': "1x3",
            },
            "3m",
            [{"instance": "gpu1:8000", "job": "vllm-hang"}],
        ),
        case(
            {
                'up{instance="gpu1:8000",job="vllm-hang"}': "1 0x3",
                'up{instance="gpu1:8000",job="vllm"}': "1 0x3",
                'up{instance="n1:9400",job="vigil-exporter-hang"}': "1 0 1 0",
                'up{instance="n1:9400",job="vigil-exporter"}': "1x3",
            },
            "3m",
        ),
    ),
    "VigilExporterCollectorFailing": (
        case(
            {f'vigil_exporter_collector_success{{{INSTANCE},collector="gpu"}}': "0x10"},
            "10m",
            [{**AT_INSTANCE, "collector": "gpu"}],
        ),
        case({f'vigil_exporter_collector_success{{{INSTANCE},collector="gpu"}}': "1x10"}, "10m"),
    ),
    "Watchdog": (case({}, "1m", [{}]), case({}, "1m", [{}])),  # it always fires
    # The node alerts on the single-node stack, where no series has cluster or node: the whole
    # stack is the one node, and the alert carries no place label (tests/test_fleet_rules.py
    # has the fleet of several nodes in two clusters).
    "NodeGpusFaulty": (
        case({f"vigil_gpu_up{{{GPU}}}": "0x5", f"vigil_gpu_up{{{SECOND_GPU}}}": "0x5"}, "5m", [{}]),
        case({f"vigil_gpu_up{{{GPU}}}": "0x5", f"vigil_gpu_up{{{SECOND_GPU}}}": "1x5"}, "5m"),
    ),
    "NodeGpusVanished": (
        case({'up{instance="n1:9400",job="vigil-exporter"}': "1x10 stale"}, "30m", [{}]),
        case({'up{instance="n1:9400",job="vigil-exporter"}': "1x10 stale 1x19"}, "30m"),
    ),
}

# An idle, healthy server on a machine without GPUs: the heartbeat ages, nothing is in flight.
IDLE = {
    'up{instance="n1:9400",job="vigil-exporter"}': "1x20",
    f'vigil_probe_success{{{TARGET},check="health"}}': "1x20",
    f'vigil_probe_success{{{TARGET},check="ready"}}': "1x20",
    f'vigil_probe_success{{{TARGET},check="canary"}}': "1x20",
    f"vigil_probe_canary_empty{{{TARGET}}}": "0x20",
    f"vigil_process_alive{{{PROCESS}}}": "1x20",
    f'vigil_process_state{{{PROCESS},state="sleeping"}}': "1x20",
    f'vigil_process_state{{{PROCESS},state="disk_sleep"}}': "0x20",
    f"vigil_process_cpu_seconds_total{{{PROCESS}}}": "0+0.5x20",
    f"vigil_process_heartbeat_age_seconds{{{PROCESS}}}": "0+60x20",
    f"vigil_process_unclean_exits_total{{{MODEL}}}": "0x20",
    f"inference_requests_in_flight{{{PROCESS}}}": "0x20",
    f"inference_queue_depth{{{PROCESS}}}": "0x20",
    f"inference_queue_oldest_enqueue_timestamp_seconds{{{PROCESS}}}": "0x20",
    f"inference_engine_stalled{{{PROCESS}}}": "0x20",
    f'inference_engine_stalls_total{{{MODEL},stage="decode"}}': "0x20",
    f'inference_out_of_memory_errors_total{{{MODEL},stage="decode"}}': "0x20",
    f'inference_admission_refusals_total{{{MODEL},reason="insufficient_memory"}}': "0x20",
    f'inference_model_load_state{{{PROCESS},state="loaded"}}': "1x20",
    f'inference_model_load_state{{{PROCESS},state="loading"}}': "0x20",
    f'inference_model_load_state{{{PROCESS},state="failed"}}': "0x20",
    f"inference_model_load_started_timestamp_seconds{{{PROCESS}}}": "0x20",
    f'inference_requests_total{{{MODEL},status="200"}}': "5x20",
    f"vigil_nvml_up{{{INSTANCE}}}": "0x20",
    f'vigil_exporter_collector_success{{{INSTANCE},collector="gpu"}}': "1x20",
}
# With no data at all, only the alerts about missing data (and the Watchdog) fire. Not
# InferenceNoLiveProcess: with no exporter nothing says that our process is expected anywhere
# (VigilExporterDown is the news).
FIRES_WITHOUT_DATA = {
    "Watchdog": [{}],
    "InferenceProbeAbsent": [{"check": "health", "job": "vigil-exporter"}],
    "VigilExporterDown": [{"job": "vigil-exporter"}],
}


def _labels_only_rules(tmp_path: Path) -> list[str]:
    """The rule files without annotations, so that the cases compare labels (the annotations'
    templates are checked by promtool check rules and by test_annotations_render)."""
    files = []
    for name in sorted(render()):
        data = yaml.safe_load((ALERTS_DIR / name).read_text())
        for group in data["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        files.append(str(path))
    return files


def _rule_labels() -> dict[str, dict[str, str]]:
    """Alert name -> the labels its rule sets (severity, cause)."""
    return {
        rule["alert"]: rule["labels"]
        for body in groups(defaults()).values()
        for group in body
        for rule in group["rules"]
        if "alert" in rule  # not the recording rules
    }


def _promtool_test(
    series: dict[str, str],
    eval_time: str,
    expected: dict[str, list[dict]],
    interval: str = "1m",
) -> dict:
    """One test of promtool test rules: the input series (selector -> values, one every
    ``interval``) and, per alert name, the places (labels beyond the rule's own) it fires at by
    eval_time."""
    labels = _rule_labels()
    return {
        "interval": interval,
        "input_series": [
            {"series": selector, "values": values} for selector, values in series.items()
        ],
        "alert_rule_test": [
            {
                "eval_time": eval_time,
                "alertname": name,
                "exp_alerts": [{"exp_labels": {**labels[name], **where}} for where in places],
            }
            for name, places in expected.items()
        ],
    }


def _run_promtool(
    tmp_path: Path, tests: list[dict], rule_files: list[str], evaluation_interval: str = "1m"
) -> None:
    path = tmp_path / "tests.yml"
    path.write_text(
        yaml.safe_dump(
            {"rule_files": rule_files, "evaluation_interval": evaluation_interval, "tests": tests}
        )
    )
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_every_alert_has_cases():
    assert set(CASES) == set(alert_names())


@needs_promtool
def test_each_alert_fires_and_stays_quiet(tmp_path):
    tests = []
    for name, pair in CASES.items():
        for one in pair:
            tests.append(
                _promtool_test(
                    one["series"], one["eval_time"], {name: one["expected"]}, one["interval"]
                )
            )
    _run_promtool(tmp_path, tests, _labels_only_rules(tmp_path))


@needs_promtool
def test_an_idle_server_raises_nothing_but_the_watchdog(tmp_path):
    expected = {name: [] for name in alert_names()}
    expected["Watchdog"] = [{}]
    _run_promtool(tmp_path, [_promtool_test(IDLE, "20m", expected)], _labels_only_rules(tmp_path))


@needs_promtool
def test_missing_data_fires_only_the_absence_alerts(tmp_path):
    expected = {name: FIRES_WITHOUT_DATA.get(name, []) for name in alert_names()}
    _run_promtool(tmp_path, [_promtool_test({}, "20m", expected)], _labels_only_rules(tmp_path))


@needs_promtool
def test_no_live_process_only_where_ours_is_expected(tmp_path):
    """InferenceNoLiveProcess fires per exporter where our own inference process is expected
    and none is alive, never where the exporter watches only other engines (on Kubernetes
    through a Service, without a process view of them)."""
    vllm_target = INSTANCE + ',target="http://llm-vigil-vllm.serving.svc:8000"'
    foreign = {
        # What the exporter publishes for a vLLM target: probes and the engine's state.
        f'vigil_probe_success{{{vllm_target},check="health"}}': "1x90",
        f'vigil_engine_metrics_up{{{vllm_target},engine="vllm"}}': "1x90",
        f'vigil_engine_requests_running{{{vllm_target},engine="vllm",model="glm"}}': "1x90",
    }
    vllm_process = f'{INSTANCE},model="glm",pid="100"'
    vllm_seen_locally = {
        # compose with vLLM: the exporter finds vLLM's processes from the target's port.
        f"vigil_process_alive{{{vllm_process}}}": "1x90",
        f'vigil_engine_process_info{{{vllm_process},target="http://127.0.0.1:8000",engine="vllm",role="listener",comm="vllm"}}': "1x90",
    }
    ours_target = {f'vigil_engine_metrics_up{{{TARGET},engine="vigil"}}': "0x90"}
    build_info = (
        f'inference_build_info{{{INSTANCE},pid="7",version="0.1",torch="2",transformers="4"}}'
    )
    second = 'instance="n2:9400",job="vigil-exporter"'
    quiet: list[tuple[str, dict[str, str]]] = [
        ("vLLM through a Service, no process view", foreign),
        ("vLLM seen locally", foreign | vllm_seen_locally),
        (
            "vLLM where the process view fails",
            foreign | {f'vigil_engine_processes{{{vllm_target},engine="vllm"}}': "0x90"},
        ),
        (
            "ours alive behind a local target",
            ours_target
            | {
                f"vigil_process_alive{{{PROCESS}}}": "1x90",
                f'vigil_engine_process_info{{{PROCESS},target="http://a:8000",engine="vigil",role="listener",comm="python"}}': "1x90",
            },
        ),
        ("ours last seen more than own_process_window ago", {build_info: "1x10 stale"}),
    ]
    fires: list[tuple[str, dict[str, str], list[dict]]] = [
        ("a target of engine vigil, nothing alive", ours_target, [AT_INSTANCE]),
        ("ours seen within own_process_window", {build_info: "1x60 stale"}, [AT_INSTANCE]),
        ("a live vLLM beside our dead process", ours_target | vllm_seen_locally, [AT_INSTANCE]),
        (
            "one exporter of two",
            ours_target
            | {
                f"vigil_process_alive{{{PROCESS}}}": "1x90",
                f'vigil_engine_metrics_up{{{second},target="http://a:8000",engine="vigil"}}': "1x90",
                f'vigil_process_alive{{{second},model="glm",pid="9"}}': "0x90",
            },
            [{"instance": "n2:9400"}],
        ),
    ]
    tests = [
        _promtool_test(series, "90m", {"InferenceNoLiveProcess": []}) for _name, series in quiet
    ]
    tests += [
        _promtool_test(series, "90m", {"InferenceNoLiveProcess": expected})
        for _name, series, expected in fires
    ]
    _run_promtool(tmp_path, tests, _labels_only_rules(tmp_path))


@needs_promtool
def test_memory_forecast_survives_a_replaced_exporter_pod(tmp_path):
    """An exporter pod replaced at minute 20: the old pod's GPU series end (a staleness
    marker), the new pod's, with another pod label, start; both are in the forecast's window.
    GpuMemoryFullWithinAnHour evaluates without error (promtool fails a rule that errs, as a
    one-to-one match of the two pods' series does) and still fires on the rising trend."""
    old, new = GPU + ',pod="vigil-exporter-a"', GPU + ',pod="vigil-exporter-b"'
    rising = {
        f"vigil_gpu_memory_used_bytes{{{old}}}": "60+2x20 stale",
        f"vigil_gpu_memory_total_bytes{{{old}}}": "200x20 stale",
        f"vigil_gpu_memory_used_bytes{{{new}}}": "_x21 102+2x40",
        f"vigil_gpu_memory_total_bytes{{{new}}}": "_x21 200x40",
    }
    flat = {
        selector: values.replace("60+2x20", "150x20").replace("102+2x40", "150x40")
        for selector, values in rising.items()
    }
    expected = {"GpuMemoryFullWithinAnHour": [AT_GPU], "GpuMemoryNearlyFull": []}
    tests = [
        _promtool_test(rising, "40m", expected),
        _promtool_test(flat, "40m", {name: [] for name in expected}),
    ]
    _run_promtool(tmp_path, tests, _labels_only_rules(tmp_path))


def test_every_group_is_evaluated_at_the_stacks_interval():
    """Each rule group names its interval, alerts/prometheus.yml's evaluation_interval, and no
    subquery takes its step from the loading Prometheus's global interval: the rules keep their
    cadence in a Prometheus whose global interval is another (kube-prometheus-stack)."""
    interval = yaml.safe_load((ALERTS_DIR / "prometheus.yml").read_text())["global"][
        "evaluation_interval"
    ]
    assert PARAMETERS["evaluation_interval"].default == interval
    fast = PARAMETERS["hang_evaluation_interval"].default
    assert fast == "2s"
    groups_seen = 0
    for text in render().values():
        for group in yaml.safe_load(text)["groups"]:
            groups_seen += 1
            own = fast if group["name"] == FAST_HANG_GROUP else interval
            assert group.get("interval") == own, group["name"]
            for rule in group["rules"]:
                assert not re.search(r":\s*\]", rule["expr"]), (group["name"], rule["expr"])
                # A subquery's step is its group's interval.
                for step in re.findall(r"\[[^\]:]+:([^\]]+)\]", rule["expr"]):
                    assert step == own, (group["name"], rule["expr"])
    assert groups_seen >= 10


def test_every_alert_has_a_cause():
    """Alertmanager's node inhibition holds back only alerts with a cause (cause=~".+"), so
    that other teams' alerts of the node are not muted: every alert of ours must have one."""
    config = yaml.safe_load((ALERTS_DIR / "alertmanager.yml").read_text())
    node_rule = next(r for r in config["inhibit_rules"] if r["source_matchers"] == ['cause="node"'])
    assert 'cause=~".+"' in node_rule["target_matchers"]
    for name, labels in _rule_labels().items():
        assert re.fullmatch(r"[a-z_]+", labels.get("cause", "")), name


@needs_promtool
def test_annotations_render_with_the_place_and_the_value(tmp_path):
    expected = {
        "exp_labels": {**_rule_labels()["GpuMemoryNearlyFull"], **AT_GPU},
        "exp_annotations": {
            "summary": "GPU 0 memory nearly full on n1:9400",
            "description": "GPU 0 (H100, GPU-1) has 97% of its memory in use.",
            "runbook_url": PARAMETERS["runbook_base"].default + "/GpuMemoryNearlyFull.md",
        },
    }
    tests = [
        {
            "interval": "1m",
            "input_series": [
                {"series": f"vigil_gpu_memory_used_bytes{{{GPU}}}", "values": "97x10"},
                {"series": f"vigil_gpu_memory_total_bytes{{{GPU}}}", "values": "100x10"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "GpuMemoryNearlyFull", "exp_alerts": [expected]}
            ],
        }
    ]
    _run_promtool(tmp_path, tests, [str(path) for path in sorted(ALERTS_DIR.glob("*.rules.yml"))])


def test_every_grouping_that_keeps_instance_keeps_the_place():
    """Every by (...) and on (...) that names instance names cluster, namespace and node too:
    an alert says where it fires in a fleet, and two clusters' instances never merge."""
    clauses = [
        (rule.get("alert") or rule["record"], match.group(0), match.group(2))
        for text in render().values()
        for group in yaml.safe_load(text)["groups"]
        for rule in group["rules"]
        for match in re.finditer(r"\b(by|on)\s*\(([^()]*)\)", rule["expr"])
    ]
    keeping = [(name, clause) for name, clause, labels in clauses if "instance" in labels]
    assert len(keeping) > 50  # the pattern finds them
    for name, clause in keeping:
        labels = {label.strip() for label in clause.split("(", 1)[1].rstrip(")").split(",")}
        assert {"cluster", "namespace", "node"} <= labels, (name, clause)


def test_every_alert_has_a_known_severity():
    # That the committed rule files are current: tests/test_generated_files.py.
    for name, labels in _rule_labels().items():
        assert labels["severity"] in ("critical", "warning", "info"), name


@needs_promtool
def test_promtool_accepts_the_rules_and_the_prometheus_config():
    for args in (
        ["check", "rules", *map(str, sorted(ALERTS_DIR.glob("*.rules.yml")))],
        ["check", "config", str(ALERTS_DIR / "prometheus.yml")],
    ):
        result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    AMTOOL is None, reason="amtool is not installed (Debian package prometheus-alertmanager)"
)
@pytest.mark.parametrize("name", ["alertmanager.yml", "alertmanager.examples.yml"])
def test_amtool_accepts_the_alertmanager_configs(name):
    result = subprocess.run(
        [AMTOOL, "check-config", name], capture_output=True, text=True, cwd=ALERTS_DIR
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_in_a_rule_is_in_the_reference():
    known = all_metric_names() | {"up"}
    functions = {
        "max",
        "min",
        "sum",
        "count",
        "rate",
        "increase",
        "time",
        "absent",
        "vector",
        "histogram_quantile",
        "predict_linear",
        "max_over_time",
        "by",
        "on",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "group_left",
        "le",
        "instance",
        "model",
        "pid",
        "gpu",
        "uuid",
        "gpu_name",
        "stage",
        "reason",
        "target",
        "collector",
        "xid",
        "label_replace",
        "changes",
        "model_name",
        "finished_reason",
        "engine",
        "quantile",
        "__name__",
        "min_over_time",
        "address",
        "vigil_signal",
        "group",
        "cluster",
        "namespace",
        "node",
    }
    rules = [
        (group["name"], rule)
        for text in render().values()
        for group in yaml.safe_load(text)["groups"]
        for rule in group["rules"]
    ]
    known |= {rule["record"] for _group, rule in rules if "record" in rule}
    # An engine profile reads that engine's own names (alerts/engines.py cites their sources).
    foreign = {
        "vigil-engine-vllm": "vllm:",
        "vigil-engine-sglang": "sglang:",
        "vigil-engine-tgi": "tgi_",
    }
    for group, rule in rules:
        expr = re.sub(r'"[^"]*"', "", rule["expr"])  # label values
        expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
        words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
        metrics = {
            word
            for word in words
            if word not in functions
            and not re.fullmatch(r"\d+[smhd]?", word)
            and "_" in word
            or word == "up"
        }
        unknown = metrics - known
        if group in foreign:
            unknown = {m for m in unknown if not m.startswith(foreign[group])}
        if group == FAST_HANG_GROUP:  # the engines' own names each profile cites
            unknown -= {
                n for p in engines.PROFILES for n in (p.stopped_running, *p.stopped_progress)
            }
        assert unknown == set(), (rule.get("alert") or rule["record"], unknown)


def test_every_alert_has_a_runbook_with_its_sections():
    for name in alert_names():
        path = ALERTS_DIR / "runbooks" / f"{name}.md"
        assert path.exists(), path
        text = path.read_text()
        for section in ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation"):
            assert section in text, (name, section)


# The fast hang group: InferenceEngineStoppedGenerating on literal series, scraped and evaluated
# every 2 s as the fast jobs and vigil-hangs-fast are. The hang starts after the sample at 120 s
# (the last that moved); with the 20 s window it must fire by 2m22s (window, one scrape, one
# evaluation) and not before 2m16s (no earlier than the window allows).
FAST = "2s"
HANG_AT = 60  # scrapes before the hang (120 s)
AFTER = 45  # scrapes after it (90 s)
SGLANG = 'instance="gpu2:30000",job="sglang",model_name="glm",tp_rank="0"'
AT_SGLANG = {"instance": "gpu2:30000", "model": "glm", "engine": "sglang"}
TGI = 'instance="gpu3:3000",job="tgi"'
AT_TGI = {"instance": "gpu3:3000", "engine": "tgi"}
EXPORTED = 'instance="n1:9400",job="vigil-exporter",target="http://gpu4:8000",engine="vllm"'
AT_EXPORTED = {
    "instance": "n1:9400",
    "target": "http://gpu4:8000",
    "engine": "vllm",
    "model": "glm",
    "address": "gpu4:8000",
}


def _stopped(series: dict[str, str], at: dict[str, list[dict]]) -> dict:
    """InferenceEngineStoppedGenerating (and nothing else of the fast group) at each eval time."""
    labels = _rule_labels()["InferenceEngineStoppedGenerating"]
    return {
        "interval": FAST,
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "alert_rule_test": [
            {
                "eval_time": eval_time,
                "alertname": "InferenceEngineStoppedGenerating",
                "exp_alerts": [{"exp_labels": {**labels, **where}} for where in places],
            }
            for eval_time, places in at.items()
        ],
    }


def _fast_rules(tmp_path: Path) -> list[str]:
    """The hang rule file (vigil-hangs-fast with its 2 s interval, and vigil-hangs)."""
    return [f for f in _labels_only_rules(tmp_path) if f.endswith("hangs.rules.yml")]


def _exporter_reads(moving_reads: int, flat_reads: int, per_read: float = 300) -> str:
    """vigil_engine_progress_total as the fast job sees it: the exporter reads the engine every
    15 s (its probe round), so the series moves at one scrape in 7 or 8, and stands still
    between reads; then ``flat_reads`` rounds without progress."""
    points, value = [], 0.0
    for scrape in range(HANG_AT + AFTER + 1):
        second = scrape * 2
        reads = second // 15
        value = per_read * min(reads, moving_reads)
        points.append(value)
    return values(points)


def _vllm(generation: str, running: str = f"8x{HANG_AT + AFTER}") -> dict[str, str]:
    return {
        f"vllm:num_requests_running{{{VLLM}}}": running,
        f"vllm:num_requests_waiting{{{VLLM}}}": f"0x{HANG_AT + AFTER}",
        f"vllm:generation_tokens_total{{{VLLM}}}": generation,
        f"vllm:prompt_tokens_total{{{VLLM}}}": f"5000x{HANG_AT + AFTER}",
    }


@needs_promtool
def test_engine_stopped_generating_fires_within_its_window_after_sustained_generation(
    tmp_path,
):
    """A hang after sustained generation, for each engine from its own series and for an engine
    only the exporter reads: quiet until the window has passed, firing by window + a scrape + an
    evaluation (the exporter's view: its longer window, as it reads every 15 s)."""
    n = HANG_AT + AFTER
    hung_vllm = _vllm(rising_then_flat(40, HANG_AT, AFTER))
    hung_vllm[f"vllm:kv_cache_usage_perc{{{VLLM}}}"] = rising_then_flat(0.001, HANG_AT, AFTER, 0.2)
    hung_sglang = {
        f"sglang:num_running_reqs{{{SGLANG}}}": f"4x{n}",
        f"sglang:num_queue_reqs{{{SGLANG}}}": f"0x{n}",
        # Streamed requests: the tokenizer observes the inter-token latency at every step.
        f"sglang:inter_token_latency_seconds_count{{{SGLANG}}}": rising_then_flat(
            8, HANG_AT, AFTER
        ),
        f"sglang:generation_tokens_total{{{SGLANG}}}": rising_then_flat(50, 6, n - 6),
    }
    hung_tgi = {
        f"tgi_batch_current_size{{{TGI}}}": f"2x{n}",
        f'tgi_batch_inference_count{{{TGI},method="decode"}}': rising_then_flat(30, HANG_AT, AFTER),
    }
    ours = {
        # Our process seen from the exporter (its state directory): forward passes.
        f"inference_requests_running{{{PROCESS}}}": f"3x{n}",
        f'inference_engine_steps_total{{{MODEL},stage="decode"}}': rising_then_flat(
            20, HANG_AT, AFTER
        ),
        # The same exporter probes our process too: its vigil_engine_* view of it is left out.
        f'vigil_engine_metrics_up{{{INSTANCE},target="http://127.0.0.1:8000",engine="vigil"}}': f"1x{n}",
        f'vigil_engine_requests_running{{{INSTANCE},target="http://127.0.0.1:8000",engine="vigil",model="glm"}}': f"3x{n}",
        f'vigil_engine_progress_total{{{INSTANCE},target="http://127.0.0.1:8000",engine="vigil",model="glm"}}': _exporter_reads(
            8, 7
        ),
    }
    exported = {
        f"vigil_engine_metrics_up{{{EXPORTED}}}": f"1x{n}",
        f'vigil_engine_requests_running{{{EXPORTED},model="glm"}}': f"6x{n}",
        f'vigil_engine_progress_total{{{EXPORTED},model="glm"}}': _exporter_reads(8, 7),
    }
    tests = [
        # Still firing as the hang goes on (the minute before the window has slid into it).
        _stopped(hung_vllm, {"2m16s": [], "2m22s": [AT_VLLM], "3m30s": [AT_VLLM]}),
        # SGLang's own window (45 s: its running gauge lags by up to 30 s once idle).
        _stopped(hung_sglang, {"2m40s": [], "2m49s": [AT_SGLANG]}),
        _stopped(hung_tgi, {"2m16s": [], "2m22s": [AT_TGI]}),
        _stopped(ours, {"2m16s": [], "2m22s": [AT_ENGINE]}),
        # The exporter's last read that moved is at 120 s: quiet at 120 + 40, firing by
        # 120 + 45 + a scrape + an evaluation.
        _stopped(exported, {"2m40s": [], "2m49s": [AT_EXPORTED]}),
        # vLLM scraped by Prometheus and read by the exporter at the same address: one alert,
        # from Prometheus's own view.
        _stopped(
            {
                **hung_vllm,
                **{k.replace("gpu4:8000", "gpu1:8000"): v for k, v in exported.items()},
            },
            {"3m": [AT_VLLM]},
        ),
    ]
    _run_promtool(tmp_path, tests, _fast_rules(tmp_path), evaluation_interval=FAST)


@needs_promtool
def test_engine_stopped_generating_stays_quiet_where_no_hang_is(tmp_path):
    """Idleness, decode that is slow but moves (a token a second per request), a 4 s prefill
    (and a 16 s pause) after sustained generation, a burst of 48 queued requests behind a batch
    that moves, an engine that never generated (a model load), progress that moves rarely
    (SGLang's non-streamed requests report every 50 tokens), an engine that stops answering its
    scrapes, and the exporter's frozen read (its series stand still while /metrics fails)."""
    n = HANG_AT + AFTER
    everywhere = {f"{time}s": [] for time in range(120, 211, 6)}
    fast_then = f"0+40x{HANG_AT}"
    quiet = {
        "idle": _vllm(f"0+40x30 1200x{n - 30}", running=f"8x30 0x{n - 30}"),
        # 2 requests at a token a second each: +4 per 2 s scrape.
        "slow decode": _vllm(f"{fast_then} 2400+4x{AFTER - 1}"),
        # The prefill of a new request holds the batch for 4 s (two scrapes stand still).
        "4 s prefill": _vllm(f"{fast_then} 2400x2 2440+40x{AFTER - 3}"),
        "16 s pause": _vllm(f"{fast_then} 2400x8 2440+40x{AFTER - 9}"),
        "48 queued": {
            **_vllm(f"0+32x{n}", running=f"16x{n}"),
            f"vllm:num_requests_waiting{{{VLLM}}}": f"0x{HANG_AT} 48x{AFTER}",
        },
        # Requests admitted while the model loads (or its first prefill): nothing generated yet.
        "never generated": _vllm(f"0x{n}", running=f"0x30 4x{n - 30}"),
        "rare moves": {
            f"sglang:num_running_reqs{{{SGLANG}}}": f"1x{n}",
            # One non-streamed request at a token a second: an output every 50 tokens.
            f"sglang:inter_token_latency_seconds_count{{{SGLANG}}}": values(
                [50 * (second // 50) for second in range(0, 2 * n + 1, 2)]
            ),
            f"sglang:num_used_tokens{{{SGLANG}}}": values(
                [1000 + 40 * (second // 40) for second in range(0, 2 * n + 1, 2)]
            ),
        },
        # SGLang's burst ends at 120 s: its scheduler refreshes num_running_reqs only when it
        # logs (every 40 decode steps, every 30 s once idle), so the gauge keeps 4 for 28 s
        # after the last move, then drops to 0.
        "sglang stale gauge": {
            f"sglang:num_running_reqs{{{SGLANG}}}": f"4x{HANG_AT + 14} 0x{AFTER - 15}",
            f"sglang:inter_token_latency_seconds_count{{{SGLANG}}}": rising_then_flat(
                8, HANG_AT, AFTER
            ),
            f"sglang:generation_tokens_total{{{SGLANG}}}": rising_then_flat(50, 6, n - 6),
        },
        # Our own process with its watchdog: a silence is the watchdog's to judge (its stall
        # threshold follows the step, up to --stall-timeout) and InferenceEngineStalled's to
        # page.
        "our watchdog": {
            f"inference_requests_running{{{PROCESS}}}": f"3x{n}",
            f'inference_engine_steps_total{{{MODEL},stage="decode"}}': rising_then_flat(
                20, HANG_AT, AFTER
            ),
            f"inference_watchdog_stall_timeout_seconds{{{PROCESS}}}": f"30x{n}",
        },
        # vLLM's scrapes fail from 120 s on (the series go stale): down, not a silence.
        "unscraped": _vllm(f"{fast_then} stale", running=f"8x{HANG_AT} stale"),
        # The exporter cannot read /metrics from 120 s on: the engine's last requests and a flat
        # progress stay published, vigil_engine_metrics_up is 0.
        "frozen read": {
            f"vigil_engine_metrics_up{{{EXPORTED}}}": f"1x{HANG_AT} 0x{AFTER}",
            f'vigil_engine_requests_running{{{EXPORTED},model="glm"}}': f"6x{n}",
            f'vigil_engine_progress_total{{{EXPORTED},model="glm"}}': _exporter_reads(8, 7),
        },
    }
    tests = [_stopped(series, everywhere) for series in quiet.values()]
    _run_promtool(tmp_path, tests, _fast_rules(tmp_path), evaluation_interval=FAST)
    # The same inputs with the engine stopping instead do fire (the cases can fail).
    stopped = _vllm(f"{fast_then} 2400x{AFTER}")
    _run_promtool(
        tmp_path,
        [_stopped(stopped, {"3m": [AT_VLLM]})],
        _fast_rules(tmp_path),
        evaluation_interval=FAST,
    )


@needs_promtool
def test_engine_stalled_fires_at_once_in_the_fast_group(tmp_path):
    """Our watchdog's flag raises InferenceEngineStalled at the fast group's first evaluation
    after the scrape that carries it, and a stall recorded by a process that exited right after
    keeps it firing."""
    labels = _rule_labels()["InferenceEngineStalled"]
    test = {
        "interval": FAST,
        "input_series": [
            {"series": f"inference_engine_stalled{{{PROCESS}}}", "values": "0x30 1x5 stale"},
            {
                "series": f'inference_engine_stalls_total{{{MODEL},stage="decode"}}',
                "values": "0x30 1x5 stale",
            },
        ],
        "alert_rule_test": [
            {"eval_time": t, "alertname": "InferenceEngineStalled", "exp_alerts": exp}
            for t, exp in (
                ("58s", []),
                ("62s", [{"exp_labels": {**labels, **AT_MODEL}}]),
                ("2m", [{"exp_labels": {**labels, **AT_MODEL}}]),
            )
        ],
    }
    _run_promtool(tmp_path, [test], _fast_rules(tmp_path), evaluation_interval=FAST)


def _fast_group_rules() -> list[dict]:
    return [
        rule
        for text in render().values()
        for group in yaml.safe_load(text)["groups"]
        if group["name"] == FAST_HANG_GROUP
        for rule in group["rules"]
    ]


_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "on",
    "without",
    "ignoring",
    "offset",
    "bool",
    "group_left",
    "group_right",
}


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, its matchers) of every vector selector in ``expr``: names not called as
    functions, not keywords, not label names inside by/on (...), braces or strings."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subquery steps
    found = []
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        name, start, end = match.group(0), match.start(), match.end()
        if start and (expr[start - 1].isalnum() or expr[start - 1] in "_:."):
            continue  # the tail of a number (20s) or of another word
        before = expr[:start]
        if before.count("{") > before.count("}") or name in _KEYWORDS:
            continue  # a label name in a selector's braces
        rest = expr[end:].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation
        matchers = re.match(r"\{[^}]*\}", rest)
        found.append((name, matchers.group(0) if matchers else ""))
    return found


def test_the_fast_group_reads_only_hang_series_and_no_recording_rule():
    """Every metric the fast group reads is in HANG_SERIES (scraped every 2 s), and none is a
    recording rule (evaluated every 10 s) or selected by job (the fast jobs store them)."""
    listed = {name for names in HANG_SERIES.values() for name in names}
    rules = _fast_group_rules()
    assert {rule["alert"] for rule in rules} == {
        "InferenceEngineStalled",
        "InferenceEngineStoppedGenerating",
    }
    read = set()
    for rule in rules:
        selectors = _selectors(rule["expr"])
        names = {name for name, _ in selectors}
        assert not {name for name in names if name.startswith("vigil:")}, rule["alert"]
        assert "job" not in rule["expr"], rule["alert"]
        read |= names
    read -= {"time"}
    assert read - listed == set()
    # The pattern finds them: every listed name is read (nothing is scraped fast for nothing).
    assert read == listed
    # The jobs are those of the scrape configs (compose/prometheus/*.yml, alerts/prometheus.yml).
    assert set(HANG_SERIES) == {"vigil-exporter", "vllm", "sglang", "tgi"}
    assert set(HANG_SERIES) == {profile.job for profile in engines.PROFILES}


def test_no_rule_reads_a_hang_series_by_job():
    """The hang series are stored under the fast jobs' ``job`` label (``<job>-hang``) or
    relabelled back: either way a job matcher on one of them could select nothing."""
    listed = {name for names in HANG_SERIES.values() for name in names}
    checked = 0
    for text in render().values():
        for group in yaml.safe_load(text)["groups"]:
            for rule in group["rules"]:
                for name, matchers in _selectors(rule["expr"]):
                    if name in listed:
                        checked += 1
                        assert "job" not in matchers, (rule.get("alert") or rule["record"], name)
                assert not re.search(
                    r"__name__\s*=~?\s*\"[^\"]*\"[^}]*job|job[^}]*__name__", rule["expr"]
                )
    assert checked > 20
