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

from alerts.rules import ALERTS_DIR, PARAMETERS, alert_names, defaults, groups, render
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


def case(series: dict[str, str], eval_time: str, expected: list[dict] | None = None) -> dict:
    return {"series": series, "eval_time": eval_time, "expected": expected or []}


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


def _promtool_test(series: dict[str, str], eval_time: str, expected: dict[str, list[dict]]) -> dict:
    """One test of promtool test rules: the input series (selector -> values) and, per alert
    name, the places (labels beyond the rule's own) it fires at by eval_time."""
    labels = _rule_labels()
    return {
        "interval": "1m",
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
    for name, (fires, quiet) in CASES.items():
        tests.append(_promtool_test(fires["series"], fires["eval_time"], {name: fires["expected"]}))
        tests.append(_promtool_test(quiet["series"], quiet["eval_time"], {name: quiet["expected"]}))
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
    groups_seen = 0
    for text in render().values():
        for group in yaml.safe_load(text)["groups"]:
            groups_seen += 1
            assert group.get("interval") == interval, group["name"]
            for rule in group["rules"]:
                assert not re.search(r":\s*\]", rule["expr"]), (group["name"], rule["expr"])
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
        assert unknown == set(), (rule.get("alert") or rule["record"], unknown)


def test_every_alert_has_a_runbook_with_its_sections():
    for name in alert_names():
        path = ALERTS_DIR / "runbooks" / f"{name}.md"
        assert path.exists(), path
        text = path.read_text()
        for section in ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation"):
            assert section in text, (name, section)
