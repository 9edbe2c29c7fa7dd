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

from alerts.rules import ALERTS_DIR, PARAMETERS, alert_names, render
from tools.metrics_reference import all_metric_names

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed "
                                    "(Debian package prometheus)")

L = 'instance="n1:9400",job="vigil-exporter"'
M = L + ',model="glm"'
P = M + ',pid="7"'
G = L + ',gpu="0",uuid="GPU-1",gpu_name="H100"'
TARGET = L + ',target="http://a:8000"'
WHERE = {"instance": "n1:9400"}
AT_M = {**WHERE, "model": "glm"}
AT_P = {**AT_M, "pid": "7"}
AT_G = {**WHERE, "gpu": "0", "uuid": "GPU-1", "gpu_name": "H100"}
AT_T = {**WHERE, "target": "http://a:8000"}


def case(series: dict[str, str], eval_time: str, expected: list[dict] | None = None) -> dict:
    return {"series": series, "eval_time": eval_time, "expected": expected or []}


# Alert -> (a case where it fires, a case where it does not).
CASES: dict[str, tuple[dict, dict]] = {
    "InferenceEngineStalled": (
        case({f"inference_engine_stalled{{{P}}}": "0 0 1 1 1"}, "4m", [AT_M]),
        case({f"inference_engine_stalled{{{P}}}": "0x5",
              f'inference_engine_stalls_total{{{M},stage="decode"}}': "0x5"}, "5m")),
    "InferenceHeartbeatStale": (
        case({f"vigil_process_heartbeat_age_seconds{{{P}}}": "0+10x10",
              f"inference_requests_in_flight{{{P}}}": "2x10"}, "10m", [AT_P]),
        case({f"vigil_process_heartbeat_age_seconds{{{P}}}": "0+10x10",
              f"inference_requests_in_flight{{{P}}}": "0x10"}, "10m")),
    "InferenceBusyWithoutProgress": (
        case({f"vigil_process_cpu_seconds_total{{{P}}}": "0+60x10",
              f"vigil_process_heartbeat_age_seconds{{{P}}}": "0+10x10",
              f"inference_requests_in_flight{{{P}}}": "1x10"}, "10m", [AT_P]),
        case({f"vigil_process_cpu_seconds_total{{{P}}}": "0+6x10",
              f"vigil_process_heartbeat_age_seconds{{{P}}}": "0+10x10",
              f"inference_requests_in_flight{{{P}}}": "1x10"}, "10m")),
    "InferenceProcessInDriverWait": (
        case({f'vigil_process_state{{{P},state="disk_sleep"}}': "1x10"}, "10m", [AT_P]),
        case({f'vigil_process_state{{{P},state="disk_sleep"}}': "0x10"}, "10m")),
    "InferenceProbeFailing": (
        case({f'vigil_probe_success{{{TARGET},check="canary"}}': "0x10",
              f'vigil_probe_success{{{TARGET},check="ready"}}': "1x10",
              f'vigil_probe_success{{{TARGET},check="health"}}': "1x10"}, "10m", [AT_T]),
        case({f'vigil_probe_success{{{TARGET},check="canary"}}': "0x10",
              f'vigil_probe_success{{{TARGET},check="health"}}': "0x10"}, "10m")),
    "InferenceTargetDown": (
        case({f'vigil_probe_success{{{TARGET},check="health"}}': "0x10"}, "10m", [AT_T]),
        case({f'vigil_probe_success{{{TARGET},check="health"}}': "1x10"}, "10m")),
    "InferenceProbeAbsent": (
        case({f"vigil_process_alive{{{P}}}": "1x10"}, "10m",
             [{"check": "health", "job": "vigil-exporter"}]),
        case({f'vigil_probe_success{{{TARGET},check="health"}}': "0x10"}, "10m")),
    "InferenceNoLiveProcess": (
        case({f"vigil_process_alive{{{P}}}": "0x10"}, "10m", [{}]),
        case({f"vigil_process_alive{{{P}}}": "1x10"}, "10m")),
    "InferenceProcessDied": (
        case({f"vigil_process_alive{{{P}}}": "1 1 0 0"}, "3m", [AT_P]),
        case({f"vigil_process_alive{{{P}}}": "1x5"}, "5m")),
    "InferenceCrashLoop": (
        case({f"vigil_process_unclean_exits_total{{{M}}}": "0 1 2 3 3"}, "4m", [AT_M]),
        case({f"vigil_process_unclean_exits_total{{{M}}}": "0 0 1 1 1"}, "4m")),
    "InferenceModelLoadSlow": (
        case({f"inference_model_load_started_timestamp_seconds{{{P}}}": "0x20",
              f'inference_model_load_state{{{P},state="loading"}}': "1x20"}, "20m", [AT_P]),
        case({f"inference_model_load_started_timestamp_seconds{{{P}}}": "0x20",
              f'inference_model_load_state{{{P},state="loading"}}': "0x20"}, "20m")),
    "InferenceModelLoadFailed": (
        case({f'inference_model_load_state{{{P},state="failed"}}': "1x3"}, "3m", [AT_P]),
        case({f'inference_model_load_state{{{P},state="failed"}}': "0x3"}, "3m")),
    "GpuMemoryNearlyFull": (
        case({f"vigil_gpu_memory_used_bytes{{{G}}}": "96x10",
              f"vigil_gpu_memory_total_bytes{{{G}}}": "100x10"}, "10m", [AT_G]),
        case({f"vigil_gpu_memory_used_bytes{{{G}}}": "50x10",
              f"vigil_gpu_memory_total_bytes{{{G}}}": "100x10"}, "10m")),
    "GpuMemoryFullWithinAnHour": (
        case({f"vigil_gpu_memory_used_bytes{{{G}}}": "60+2x60",
              f"vigil_gpu_memory_total_bytes{{{G}}}": "200x60"}, "40m", [AT_G]),
        case({f"vigil_gpu_memory_used_bytes{{{G}}}": "150x60",
              f"vigil_gpu_memory_total_bytes{{{G}}}": "200x60"}, "40m")),
    "InferenceOutOfMemory": (
        case({f'inference_out_of_memory_errors_total{{{M},stage="decode"}}': "0 0 1 1"}, "3m",
             [{**AT_M, "stage": "decode"}]),
        case({f'inference_out_of_memory_errors_total{{{M},stage="decode"}}': "0x3"}, "3m")),
    "InferenceAdmissionRefusalsRising": (
        case({f'inference_admission_refusals_total{{{M},reason="insufficient_memory"}}':
              "0+2x10"}, "10m", [{**AT_M, "reason": "insufficient_memory"}]),
        case({f'inference_admission_refusals_total{{{M},reason="insufficient_memory"}}':
              "0 0 0 1 1 1 1 1 1 1 1"}, "10m")),
    "InferenceQueueBacklog": (
        case({f"inference_queue_depth{{{P}}}": "40x5"}, "5m", [AT_P]),
        case({f"inference_queue_depth{{{P}}}": "5x5"}, "5m")),
    "InferenceQueueWaitLong": (
        case({f"inference_queue_oldest_enqueue_timestamp_seconds{{{P}}}": "60x5"}, "5m", [AT_P]),
        case({f"inference_queue_oldest_enqueue_timestamp_seconds{{{P}}}": "0x5"}, "5m")),
    "InferenceTimeToFirstTokenHigh": (
        case({f'gen_ai_server_time_to_first_token_seconds_bucket{{{M},le="0.5"}}': "0x20",
              f'gen_ai_server_time_to_first_token_seconds_bucket{{{M},le="5"}}': "0+10x20",
              f'gen_ai_server_time_to_first_token_seconds_bucket{{{M},le="+Inf"}}': "0+10x20"},
             "20m", [AT_M]),
        case({f'gen_ai_server_time_to_first_token_seconds_bucket{{{M},le="0.5"}}': "0+10x20",
              f'gen_ai_server_time_to_first_token_seconds_bucket{{{M},le="5"}}': "0+10x20",
              f'gen_ai_server_time_to_first_token_seconds_bucket{{{M},le="+Inf"}}': "0+10x20"},
             "20m")),
    "InferenceLatencyHigh": (
        case({f'gen_ai_server_request_duration_seconds_bucket{{{M},le="10.24"}}': "0x20",
              f'gen_ai_server_request_duration_seconds_bucket{{{M},le="81.92"}}': "0+10x20",
              f'gen_ai_server_request_duration_seconds_bucket{{{M},le="+Inf"}}': "0+10x20"},
             "20m", [AT_M]),
        case({f'gen_ai_server_request_duration_seconds_bucket{{{M},le="10.24"}}': "0+10x20",
              f'gen_ai_server_request_duration_seconds_bucket{{{M},le="81.92"}}': "0+10x20",
              f'gen_ai_server_request_duration_seconds_bucket{{{M},le="+Inf"}}': "0+10x20"},
             "20m")),
    "InferenceErrorRateHigh": (
        case({f'inference_requests_total{{{M},status="500"}}': "0+1x10",
              f'inference_requests_total{{{M},status="200"}}': "0+9x10"}, "10m", [AT_M]),
        case({f'inference_requests_total{{{M},status="500"}}': "0x10",
              f'inference_requests_total{{{M},status="200"}}': "0+9x10"}, "10m")),
    "InferenceErrorRateCritical": (
        case({f'inference_requests_total{{{M},status="503"}}': "0+5x10",
              f'inference_requests_total{{{M},status="200"}}': "0+5x10"}, "10m", [AT_M]),
        case({f'inference_requests_total{{{M},status="500"}}': "0+1x10",
              f'inference_requests_total{{{M},status="200"}}': "0+9x10"}, "10m")),
    "InferenceEmptyOutputs": (
        case({f'inference_empty_outputs_total{{{M},reason="immediate_eos"}}': "0+1x10"}, "10m",
             [{**AT_M, "reason": "immediate_eos"}]),
        case({f'inference_empty_outputs_total{{{M},reason="immediate_eos"}}':
              "0 0 0 1 1 1 1 1 1 1 1"}, "10m")),
    "InferenceCanaryEmpty": (
        case({f"vigil_probe_canary_empty{{{TARGET}}}": "1x10"}, "10m", [AT_T]),
        case({f"vigil_probe_canary_empty{{{TARGET}}}": "0x10"}, "10m")),
    "GpuXidError": (
        case({f'vigil_gpu_xid_errors_total{{{G},xid="79"}}': "_x5 1 1 1"}, "7m",
             [{**AT_G, "xid": "79"}]),
        case({f'vigil_gpu_xid_errors_total{{{G},xid="13"}}': "_x5 1 2 3"}, "7m")),
    "GpuThermalThrottling": (
        case({f'vigil_gpu_clock_event_reason{{{G},reason="hw_thermal_slowdown"}}': "1x10"},
             "10m", [AT_G]),
        case({f'vigil_gpu_clock_event_reason{{{G},reason="hw_thermal_slowdown"}}': "0x10"},
             "10m")),
    "GpuPowerBrake": (
        case({f'vigil_gpu_clock_event_reason{{{G},reason="hw_power_brake_slowdown"}}': "1x10"},
             "10m", [AT_G]),
        case({f'vigil_gpu_clock_event_reason{{{G},reason="sw_power_cap"}}': "1x10"}, "10m")),
    "GpuPowerCapped": (
        case({f'vigil_gpu_clock_event_reason{{{G},reason="sw_power_cap"}}': "1x20"}, "20m",
             [AT_G]),
        case({f'vigil_gpu_clock_event_reason{{{G},reason="sw_power_cap"}}': "0x20"}, "20m")),
    "GpuEccUncorrectable": (
        case({f'vigil_gpu_ecc_errors_total{{{G},type="uncorrected"}}': "0 0 1 1"}, "3m", [AT_G]),
        case({f'vigil_gpu_ecc_errors_total{{{G},type="corrected"}}': "0 5 10 15",
              f'vigil_gpu_ecc_errors_total{{{G},type="uncorrected"}}': "0x3"}, "3m")),
    "GpuRowRemapFailure": (
        case({f"vigil_gpu_remapped_rows_failure{{{G}}}": "1x3"}, "3m", [AT_G]),
        case({f"vigil_gpu_remapped_rows_failure{{{G}}}": "0x3"}, "3m")),
    "GpuRowRemapPending": (
        case({f"vigil_gpu_remapped_rows_pending{{{G}}}": "1x3"}, "3m", [AT_G]),
        case({f"vigil_gpu_remapped_rows_pending{{{G}}}": "0x3"}, "3m")),
    "GpuLost": (
        case({f"vigil_gpu_up{{{G}}}": "0x5"}, "5m", [AT_G]),
        case({f"vigil_gpu_up{{{G}}}": "1x5"}, "5m")),
    "GpuReadingsStale": (
        case({f"vigil_gpu_last_read_timestamp_seconds{{{G}}}": "0x5"}, "5m", [AT_G]),
        case({f"vigil_gpu_last_read_timestamp_seconds{{{G}}}": "0+60x5"}, "5m")),
    "NvmlDown": (
        case({f"vigil_nvml_up{{{L}}}": "1x10 0x10"}, "20m", [WHERE]),
        case({f"vigil_nvml_up{{{L}}}": "0x20"}, "20m")),  # a machine without GPUs
    "GpuUtilizationImbalance": (
        case({f"vigil_gpu_utilization_ratio{{{G}}}": "0.9x20",
              f'vigil_gpu_utilization_ratio{{{L},gpu="1",uuid="GPU-2",gpu_name="H100"}}': "0.1x20",
              f'vigil_gpu_process_memory_used_bytes{{{G},pid="7",model="glm"}}': "1e9x20",
              f'vigil_gpu_process_memory_used_bytes{{{L},gpu="1",uuid="GPU-2",gpu_name="H100",pid="8",model="glm"}}': "1e9x20"},
             "20m", [AT_M]),
        case({f"vigil_gpu_utilization_ratio{{{G}}}": "0.9x20",
              f'vigil_gpu_utilization_ratio{{{L},gpu="1",uuid="GPU-2",gpu_name="H100"}}': "0.8x20",
              f'vigil_gpu_process_memory_used_bytes{{{G},pid="7",model="glm"}}': "1e9x20",
              f'vigil_gpu_process_memory_used_bytes{{{L},gpu="1",uuid="GPU-2",gpu_name="H100",pid="8",model="glm"}}': "1e9x20"},
             "20m")),
    "VigilExporterDown": (
        case({'up{instance="n1:9400",job="vigil-exporter"}': "0x5"}, "5m",
             [{**WHERE, "job": "vigil-exporter"}]),
        case({'up{instance="n1:9400",job="vigil-exporter"}': "1x5"}, "5m")),
    "VigilExporterCollectorFailing": (
        case({f'vigil_exporter_collector_success{{{L},collector="gpu"}}': "0x10"}, "10m",
             [{**WHERE, "collector": "gpu"}]),
        case({f'vigil_exporter_collector_success{{{L},collector="gpu"}}': "1x10"}, "10m")),
    "Watchdog": (case({}, "1m", [{}]), case({}, "1m", [{}])),  # it always fires
}

# An idle, healthy server on a machine without GPUs: the heartbeat ages, nothing is in flight.
IDLE = {
    'up{instance="n1:9400",job="vigil-exporter"}': "1x20",
    f'vigil_probe_success{{{TARGET},check="health"}}': "1x20",
    f'vigil_probe_success{{{TARGET},check="ready"}}': "1x20",
    f'vigil_probe_success{{{TARGET},check="canary"}}': "1x20",
    f"vigil_probe_canary_empty{{{TARGET}}}": "0x20",
    f"vigil_process_alive{{{P}}}": "1x20",
    f'vigil_process_state{{{P},state="sleeping"}}': "1x20",
    f'vigil_process_state{{{P},state="disk_sleep"}}': "0x20",
    f"vigil_process_cpu_seconds_total{{{P}}}": "0+0.5x20",
    f"vigil_process_heartbeat_age_seconds{{{P}}}": "0+60x20",
    f"vigil_process_unclean_exits_total{{{M}}}": "0x20",
    f"inference_requests_in_flight{{{P}}}": "0x20",
    f"inference_queue_depth{{{P}}}": "0x20",
    f"inference_queue_oldest_enqueue_timestamp_seconds{{{P}}}": "0x20",
    f"inference_engine_stalled{{{P}}}": "0x20",
    f'inference_engine_stalls_total{{{M},stage="decode"}}': "0x20",
    f'inference_out_of_memory_errors_total{{{M},stage="decode"}}': "0x20",
    f'inference_admission_refusals_total{{{M},reason="insufficient_memory"}}': "0x20",
    f'inference_model_load_state{{{P},state="loaded"}}': "1x20",
    f'inference_model_load_state{{{P},state="loading"}}': "0x20",
    f'inference_model_load_state{{{P},state="failed"}}': "0x20",
    f"inference_model_load_started_timestamp_seconds{{{P}}}": "0x20",
    f'inference_requests_total{{{M},status="200"}}': "5x20",
    f"vigil_nvml_up{{{L}}}": "0x20",
    f'vigil_exporter_collector_success{{{L},collector="gpu"}}': "1x20",
}
# With no data at all, only the alerts about missing data (and the Watchdog) fire.
FIRES_WITHOUT_DATA = {
    "Watchdog": [{}],
    "InferenceProbeAbsent": [{"check": "health", "job": "vigil-exporter"}],
    "InferenceNoLiveProcess": [{}],
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
    values = {name: p.default for name, p in PARAMETERS.items()}
    from alerts.rules import groups

    return {r["alert"]: r["labels"] for body in groups(values).values() for g in body
            for r in g["rules"]}


def _test(series: dict[str, str], eval_time: str, expected: dict[str, list[dict]]) -> dict:
    labels = _rule_labels()
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [
            {"eval_time": eval_time, "alertname": name,
             "exp_alerts": [{"exp_labels": {**labels[name], **where}} for where in exp]}
            for name, exp in expected.items()],
    }


def _run_promtool(tmp_path: Path, tests: list[dict], rule_files: list[str]) -> None:
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump({"rule_files": rule_files, "evaluation_interval": "1m",
                                    "tests": tests}))
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_every_alert_has_cases():
    assert set(CASES) == set(alert_names())


@needs_promtool
def test_each_alert_fires_and_stays_quiet(tmp_path):
    tests = []
    for name, (fires, quiet) in CASES.items():
        tests.append(_test(fires["series"], fires["eval_time"], {name: fires["expected"]}))
        tests.append(_test(quiet["series"], quiet["eval_time"], {name: quiet["expected"]}))
    _run_promtool(tmp_path, tests, _labels_only_rules(tmp_path))


@needs_promtool
def test_an_idle_server_raises_nothing_but_the_watchdog(tmp_path):
    expected = {name: [] for name in alert_names()}
    expected["Watchdog"] = [{}]
    _run_promtool(tmp_path, [_test(IDLE, "20m", expected)], _labels_only_rules(tmp_path))


@needs_promtool
def test_missing_data_fires_only_the_absence_alerts(tmp_path):
    expected = {name: FIRES_WITHOUT_DATA.get(name, []) for name in alert_names()}
    _run_promtool(tmp_path, [_test({}, "20m", expected)], _labels_only_rules(tmp_path))


@needs_promtool
def test_annotations_render_with_the_place_and_the_value(tmp_path):
    labels = _rule_labels()["GpuMemoryNearlyFull"]
    tests = [{
        "interval": "1m",
        "input_series": [{"series": f"vigil_gpu_memory_used_bytes{{{G}}}", "values": "97x10"},
                         {"series": f"vigil_gpu_memory_total_bytes{{{G}}}", "values": "100x10"}],
        "alert_rule_test": [{"eval_time": "10m", "alertname": "GpuMemoryNearlyFull",
                             "exp_alerts": [{"exp_labels": {**labels, **AT_G}, "exp_annotations": {
                                 "summary": "GPU 0 memory nearly full on n1:9400",
                                 "description": "GPU 0 (H100, GPU-1) has 97% of its memory in use.",
                                 "runbook_url": PARAMETERS["runbook_base"].default
                                 + "/GpuMemoryNearlyFull.md"}}]}],
    }]
    _run_promtool(tmp_path, tests, [str(p) for p in sorted(ALERTS_DIR.glob("*.rules.yml"))])


def test_rule_files_are_current_and_complete():
    for name, text in render().items():
        assert (ALERTS_DIR / name).read_text() == text, "regenerate: python -m alerts.rules"
    for name in alert_names():
        rule_labels = _rule_labels()[name]
        assert rule_labels["severity"] in ("critical", "warning", "info")


@needs_promtool
def test_promtool_accepts_the_rules_and_the_prometheus_config():
    for args in (["check", "rules", *map(str, sorted(ALERTS_DIR.glob("*.rules.yml")))],
                 ["check", "config", str(ALERTS_DIR / "prometheus.yml")]):
        result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(AMTOOL is None, reason="amtool is not installed (Debian package "
                    "prometheus-alertmanager)")
@pytest.mark.parametrize("name", ["alertmanager.yml", "alertmanager.examples.yml"])
def test_amtool_accepts_the_alertmanager_configs(name):
    result = subprocess.run([AMTOOL, "check-config", name], capture_output=True, text=True,
                            cwd=ALERTS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_in_a_rule_is_in_the_reference():
    known = all_metric_names() | {"up"}
    functions = {"max", "min", "sum", "count", "rate", "increase", "time", "absent", "vector",
                 "histogram_quantile", "predict_linear", "max_over_time", "by", "on", "and",
                 "or", "unless", "offset", "bool", "group_left", "le", "instance", "model",
                 "pid", "gpu", "uuid", "gpu_name", "stage", "reason", "target", "collector",
                 "xid"}
    for name, text in render().items():
        for group in yaml.safe_load(text)["groups"]:
            for rule in group["rules"]:
                expr = re.sub(r'"[^"]*"', "", rule["expr"])  # label values
                expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
                words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr))
                metrics = {w for w in words if w not in functions and not re.fullmatch(
                    r"\d+[smhd]?", w) and "_" in w or w == "up"}
                assert metrics - known == set(), (rule["alert"], metrics - known)


def test_every_alert_has_a_runbook_with_its_sections():
    for name in alert_names():
        path = ALERTS_DIR / "runbooks" / f"{name}.md"
        assert path.exists(), path
        text = path.read_text()
        for section in ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation"):
            assert section in text, (name, section)


def test_parameters_table_in_the_alerts_readme_is_current():
    from alerts.rules import parameters_table

    assert parameters_table() in (ALERTS_DIR / "README.md").read_text(), \
        "paste python -c 'from alerts.rules import parameters_table as t; print(t())' there"
