"""The Grafana dashboards, written as code and generated into the JSON files Grafana provisions.

    python -m dashboards.generate      # writes dashboards/*.json (a test checks they are current)

Conventions (checked by tests/test_dashboards.py): one datasource variable per data source kind
(no ``__inputs``), a stable ``uid``, ``"id": null``, ``$__rate_interval`` in every
``rate``/``increase``, variables for instance, model and GPU, a unit and a description on every
panel. Logs come from Loki with the low-cardinality labels ``service`` and ``level``; request and
trace ids are JSON fields of the line (the Loki datasource's ``trace_id`` derived field links a
line to its trace in Tempo).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DIR = Path(__file__).resolve().parent
PROM = {"type": "prometheus", "uid": "${datasource}"}
LOKI = {"type": "loki", "uid": "${loki_datasource}"}
I = 'instance=~"$instance"'  # noqa: E741
IM = I + ',model=~"$model"'
IG = I + ',gpu=~"$gpu"'
RATE = "$__rate_interval"


class Board:
    def __init__(self, uid: str, title: str, description: str, loki: bool = False,
                 gpu: bool = False):
        self.uid, self.title, self.description = uid, title, description
        self.loki, self.gpu = loki, gpu
        self.panels: list[dict] = []
        self._x = self._y = 0
        self._row_h = 0

    def _place(self, w: int, h: int) -> dict:
        if self._x + w > 24:
            self._x, self._y = 0, self._y + self._row_h
            self._row_h = 0
        pos = {"x": self._x, "y": self._y, "w": w, "h": h}
        self._x += w
        self._row_h = max(self._row_h, h)
        return pos

    def panel(self, kind: str, title: str, description: str, unit: str,
              targets: list[tuple[str, str]], w: int = 12, h: int = 8, logs: bool = False,
              cuda_only: bool = False, instant: bool = False, options: dict | None = None,
              mappings: list | None = None) -> None:
        datasource = LOKI if logs else PROM
        panel = {
            "id": len(self.panels) + 1, "type": kind, "title": title,
            "description": description, "datasource": datasource,
            "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": {"unit": unit, **({"mappings": mappings} if mappings
                                                           else {})}, "overrides": []},
            "options": options or {},
            "targets": [{"refId": chr(ord("A") + i), "datasource": datasource, "expr": expr,
                         "legendFormat": legend, **({"instant": True, "range": False,
                                                      "format": "table"} if instant else {})}
                        for i, (expr, legend) in enumerate(targets)],
        }
        if cuda_only:
            panel["tags"] = ["cuda-only"]  # read by the tests: empty on a machine without CUDA
        self.panels.append(panel)

    def variables(self) -> list[dict]:
        out = [{"type": "datasource", "name": "datasource", "label": "Prometheus",
                "query": "prometheus", "current": {}, "hide": 0}]
        if self.loki:
            out.append({"type": "datasource", "name": "loki_datasource", "label": "Loki",
                        "query": "loki", "current": {}, "hide": 0})
        out.append(_query_var("instance", "label_values(vigil_exporter_build_info, instance)"))
        out.append(_query_var("model", f"label_values(inference_model_info{{{I}}}, model)"))
        if self.gpu:
            out.append(_query_var("gpu", f"label_values(vigil_gpu_up{{{I}}}, gpu)"))
        return out

    def json(self, extra_variables: list[dict] | None = None) -> dict:
        return {
            "id": None, "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["llm-vigil"], "timezone": "browser", "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "graphTooltip": 1,
            "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": self.variables() + (extra_variables or [])},
            "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["llm-vigil"], "asDropdown": True,
                       "title": "llm-vigil", "includeVars": True, "keepTime": True}],
            "panels": self.panels,
        }


def _query_var(name: str, query: str) -> dict:
    return {"type": "query", "name": name, "label": name, "datasource": PROM,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {}, "hide": 0}


def _quantiles(metric: str, labels: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, model) (rate({metric}_bucket{{{labels}}}[{RATE}])))",
             f"p{int(q * 100)} {{{{model}}}}") for q in (0.5, 0.95, 0.99)]


def overview() -> Board:
    b = Board("vigil-overview", "llm-vigil / Overview",
              "Is it serving, how fast, what fails, and the alerts firing now.")
    b.panel("stat", "Serving", "The black-box probe's verdict per target and check: 1 when "
            "/health, /ready and a canary completion all succeed, 0 when any fails.", "none",
            [(f'min by (target) (vigil_probe_success{{{I}}})', "{{target}}")], w=6, h=5,
            mappings=[{"type": "value", "options": {"0": {"text": "NOT SERVING", "color": "red"},
                                                    "1": {"text": "serving", "color": "green"}}}])
    b.panel("stat", "In flight", "Requests accepted and not yet answered (waiting plus "
            "running), per model.", "short",
            [(f"sum by (model) (inference_requests_in_flight{{{IM}}})", "{{model}}")], w=6, h=5)
    b.panel("table", "Alerts firing now", "Alerts Prometheus evaluates as firing (ALERTS), by "
            "name, severity and place.", "none",
            [('sort_desc(max by (alertname, severity, instance, model, gpu) '
              '(ALERTS{alertstate="firing"}))', "")], w=12, h=5, instant=True)
    b.panel("timeseries", "Request rate by status", "Finished requests per second by model "
            "and HTTP status.", "reqps",
            [(f"sum by (model, status) (rate(inference_requests_total{{{IM}}}[{RATE}]))",
              "{{model}} {{status}}")])
    b.panel("timeseries", "Errors by type", "Failed or refused requests per second by error "
            "type (HTTP 4xx and 5xx).", "reqps",
            [(f'sum by (error_type) (rate(inference_requests_total{{{IM},error_type!=""}}[{RATE}]))',
              "{{error_type}}")])
    b.panel("timeseries", "Time to first token", "p50, p95 and p99 of the time from arrival to "
            "the first token (queue and prefill included).", "s",
            _quantiles("gen_ai_server_time_to_first_token_seconds", IM), w=8)
    b.panel("timeseries", "Time per output token", "p50, p95 and p99 of the time between output "
            "tokens after the first.", "s",
            _quantiles("gen_ai_server_time_per_output_token_seconds", IM), w=8)
    b.panel("timeseries", "Request duration", "p50, p95 and p99 of the end-to-end duration.",
            "s", _quantiles("gen_ai_server_request_duration_seconds", IM), w=8)
    b.panel("timeseries", "Tokens per second", "Generated and prompt tokens per second, per "
            "model.", "short",
            [(f"sum by (model) (rate(inference_generation_tokens_total{{{IM}}}[{RATE}]))",
              "generated {{model}}"),
             (f"sum by (model) (rate(inference_prompt_tokens_total{{{IM}}}[{RATE}]))",
              "prompt {{model}}")])
    b.panel("timeseries", "Queue", "Requests waiting for a batch slot, and the running batch, "
            "per process.", "short",
            [(f"sum by (model, pid) (inference_queue_depth{{{IM}}})", "queued {{model}} pid {{pid}}"),
             (f"sum by (model, pid) (inference_requests_running{{{IM}}})",
              "running {{model}} pid {{pid}}")])
    b.panel("timeseries", "Oldest queued request", "How long the oldest waiting request has "
            "waited; 0 when nothing waits.", "s",
            [(f"(time() - max by (model, pid) (inference_queue_oldest_enqueue_timestamp_seconds{{{IM}}} > 0)) "
              f"or max by (model, pid) (inference_queue_oldest_enqueue_timestamp_seconds{{{IM}}}) * 0",
              "{{model}} pid {{pid}}")])
    b.panel("timeseries", "Stalls, out-of-memory errors, empty outputs", "Engine stalls found "
            "by the watchdog, out-of-memory errors and successful completions without text, per "
            "second.", "cps",
            [(f"sum by (stage) (rate(inference_engine_stalls_total{{{IM}}}[{RATE}]))",
              "stall {{stage}}"),
             (f"sum by (stage) (rate(inference_out_of_memory_errors_total{{{IM}}}[{RATE}]))",
              "OOM {{stage}}"),
             (f"sum by (reason) (rate(inference_empty_outputs_total{{{IM}}}[{RATE}]))",
              "empty {{reason}}")], w=24)
    return b


def gpus() -> Board:
    b = Board("vigil-gpus", "llm-vigil / GPUs", "Every GPU through NVML, beside PyTorch's "
              "allocator and the inference processes' share.", gpu=True)
    G = "{{gpu}} {{gpu_name}}"  # noqa: N806
    b.panel("stat", "GPU up", "1 when the GPU's last read succeeded and is fresh; 0 when it is "
            "lost or its readings are stale.", "none",
            [(f"vigil_gpu_up{{{IG}}}", G)], w=12, h=5)
    b.panel("table", "Driver", "NVIDIA driver, the newest CUDA it supports, and NVML.", "none",
            [(f"vigil_gpu_driver_info{{{I}}}", "")], w=12, h=5, instant=True)
    b.panel("timeseries", "Utilization", "Share of time a kernel ran (GPU) and device memory "
            "was busy (memory).", "percentunit",
            [(f"vigil_gpu_utilization_ratio{{{IG}}}", "GPU " + G),
             (f"vigil_gpu_memory_utilization_ratio{{{IG}}}", "memory " + G)])
    b.panel("timeseries", "VRAM used and total", "Device memory used and total per GPU "
            "(NVML).", "bytes",
            [(f"vigil_gpu_memory_used_bytes{{{IG}}}", "used " + G),
             (f"vigil_gpu_memory_total_bytes{{{IG}}}", "total " + G)])
    b.panel("timeseries", "PyTorch allocator", "Bytes held by tensors (allocated), reserved "
            "from the driver (reserved) and the allocated peak, per inference process (CUDA "
            "only).", "bytes",
            [(f"sum by (gpu, pid) (inference_torch_cuda_memory_allocated_bytes{{{IM}}})",
              "allocated gpu {{gpu}} pid {{pid}}"),
             (f"sum by (gpu, pid) (inference_torch_cuda_memory_reserved_bytes{{{IM}}})",
              "reserved gpu {{gpu}} pid {{pid}}"),
             (f"sum by (gpu, pid) (inference_torch_cuda_memory_peak_allocated_bytes{{{IM}}})",
              "peak gpu {{gpu}} pid {{pid}}")], cuda_only=True)
    b.panel("timeseries", "Memory per process", "Device memory of each compute process, model "
            "named for the inference processes (NVML's host pid).", "bytes",
            [(f"vigil_gpu_process_memory_used_bytes{{{IG}}}",
              "gpu {{gpu}} pid {{pid}} {{model}}")])
    b.panel("timeseries", "Temperature", "GPU core temperature.", "celsius",
            [(f"vigil_gpu_temperature_celsius{{{IG}}}", G)], w=8)
    b.panel("timeseries", "Power", "Power draw and the enforced limit.", "watt",
            [(f"vigil_gpu_power_watts{{{IG}}}", "draw " + G),
             (f"vigil_gpu_power_limit_watts{{{IG}}}", "limit " + G)], w=8)
    b.panel("timeseries", "Clocks", "SM and memory clocks.", "hertz",
            [(f"vigil_gpu_clock_hertz{{{IG}}}", "{{clock}} " + G)], w=8)
    b.panel("state-timeline", "Throttle reasons", "The clock-event reasons holding the clocks "
            "down now (1), per GPU.", "none",
            [(f"vigil_gpu_clock_event_reason{{{IG}}} == 1", "{{gpu}} {{reason}}")])
    b.panel("timeseries", "XID and ECC errors", "XID errors by code and ECC errors by type, "
            "counted since the exporter or the driver started.", "short",
            [(f"sum by (gpu, xid) (vigil_gpu_xid_errors_total{{{IG}}})", "XID {{xid}} gpu {{gpu}}"),
             (f"sum by (gpu, type) (vigil_gpu_ecc_errors_total{{{IG}}})",
              "ECC {{type}} gpu {{gpu}}")])
    b.panel("timeseries", "Reading age", "Seconds since the last successful read of each GPU "
            "(grows when a driver call is wedged).", "s",
            [(f"time() - vigil_gpu_last_read_timestamp_seconds{{{IG}}}", G)], w=24)
    return b


def hang_forensics() -> Board:
    b = Board("vigil-hang-forensics", "llm-vigil / Hang forensics", "Is the engine moving? "
              "Heartbeat, process state, probes, and the stall reports and slow or failed "
              "requests from the logs, each linked to its trace.", loki=True)
    b.panel("timeseries", "Heartbeat age", "Seconds since the engine's last prefill or decode "
            "step, computed by the exporter at scrape time. It grows while idle too: read it "
            "with the requests in flight beside it.", "s",
            [(f"vigil_process_heartbeat_age_seconds{{{IM}}}", "{{model}} pid {{pid}}")])
    b.panel("timeseries", "Requests in flight", "Requests accepted and not yet answered, per "
            "process: with a growing heartbeat age, a hang.", "short",
            [(f"inference_requests_in_flight{{{IM}}}", "{{model}} pid {{pid}}")])
    b.panel("state-timeline", "Process state", "The inference process's state from /proc "
            "(running, sleeping, disk_sleep: uninterruptible, often in the driver; stopped; "
            "zombie).", "none",
            [(f"max by (pid, state) (vigil_process_state{{{IM}}}) == 1", "pid {{pid}} {{state}}")])
    b.panel("timeseries", "CPU", "CPU cores each inference process uses: a full core with no "
            "heartbeat is a busy hang.", "short",
            [(f"rate(vigil_process_cpu_seconds_total{{{IM}}}[{RATE}])", "pid {{pid}}")])
    b.panel("timeseries", "Probe results", "The exporter's checks of each target: /health, "
            "/ready and the canary completion (1 success, 0 failure).", "none",
            [(f"vigil_probe_success{{{I}}}", "{{check}} {{target}}")])
    b.panel("timeseries", "Canary latency", "Duration of the last canary completion and its "
            "time to first token.", "s",
            [(f'vigil_probe_duration_seconds{{{I},check="canary"}}', "duration {{target}}"),
             (f"vigil_probe_canary_time_to_first_token_seconds{{{I}}}", "TTFT {{target}}")])
    b.panel("timeseries", "Engine stalled", "1 while the watchdog holds the engine stalled; "
            "stalls counted by stage.", "short",
            [(f"max by (model) (inference_engine_stalled{{{IM}}})", "stalled {{model}}"),
             (f"sum by (stage) (increase(inference_engine_stalls_total{{{IM}}}[{RATE}]))",
              "stalls {{stage}}")])
    b.panel("timeseries", "Process alive and exits", "1 while the inference process exists; "
            "unclean exits (crash, kill, watchdog exit 75) counted per model.", "short",
            [(f"vigil_process_alive{{{IM}}}", "alive pid {{pid}}"),
             (f"sum by (model) (vigil_process_unclean_exits_total{{{IM}}})", "exits {{model}}")])
    b.panel("logs", "Stall reports", "The watchdog's ERROR line: stage, the engine thread's "
            "line, every thread's stack (threads) and the requests with their trace ids.",
            "none", [('{service="inference"} |= "stall report" | json', "")], logs=True, w=24,
            h=10)
    b.panel("logs", "Slowest requests", "Requests that took more than 10 s; the trace_id field "
            "links to the trace.", "none",
            [('{service="inference"} | json | message = "request finished" | duration_s > 10',
              "")], logs=True)
    b.panel("logs", "Failed requests", "Requests answered with a 5xx, with their error and trace "
            "id.", "none", [('{service="inference"} | json | status >= 500', "")], logs=True)
    return b


def logs() -> tuple[Board, list[dict]]:
    b = Board("vigil-logs", "llm-vigil / Logs", "Every log line of the stack, searchable by "
              "service, level (as Alloy labels it: lower case), request id and trace id.", loki=True)
    extra = [
        {"type": "custom", "name": "service", "label": "service", "query": "inference,exporter",
         "includeAll": True, "multi": True, "allValue": ".+", "current": {}, "hide": 0},
        {"type": "custom", "name": "level", "label": "level",
         "query": "trace,debug,info,success,warning,error,critical", "includeAll": True,
         "multi": True, "allValue": ".+", "current": {}, "hide": 0},
        {"type": "textbox", "name": "request_id", "label": "request id", "query": "",
         "current": {"text": "", "value": ""}, "hide": 0},
        {"type": "textbox", "name": "trace_id", "label": "trace id", "query": "",
         "current": {"text": "", "value": ""}, "hide": 0},
    ]
    selector = '{service=~"$service", level=~"$level"}'
    filters = '| json | request_id =~ "$request_id.*" | trace_id =~ "$trace_id.*"'
    b.panel("timeseries", "Log lines by level", "Lines per second by level.", "short",
            [(f"sum by (level) (rate({selector} [{RATE}]))", "{{level}}")], logs=True, w=24,
            h=6)
    b.panel("logs", "Lines", "The lines matching the service, level, request id and trace id "
            "above; trace_id links to Tempo.", "none", [(f"{selector} {filters}", "")],
            logs=True, w=24, h=18)
    return b, extra


def boards() -> dict[str, dict]:
    log_board, log_vars = logs()
    return {"overview.json": overview().json(), "gpus.json": gpus().json(),
            "hang-forensics.json": hang_forensics().json(),
            "logs.json": log_board.json(log_vars)}


def render() -> dict[str, str]:
    return {name: json.dumps(board, indent=2) + "\n" for name, board in boards().items()}


def main() -> int:
    for name, text in render().items():
        (DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
