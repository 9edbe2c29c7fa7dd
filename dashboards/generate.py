"""The Grafana dashboards, written as code and generated into the JSON files Grafana provisions.

    python -m dashboards.generate      # writes dashboards/*.json

``scripts/generate`` (tools/generate.py) writes them with every other generated file, and a test
fails when a committed one is stale.

Conventions (checked by tests/test_dashboards.py): one datasource variable per data source kind
(no ``__inputs``), a stable ``uid``, ``"id": null``, ``$__rate_interval`` in every
``rate``/``increase``, variables for instance, model and GPU, a unit and a description on every
panel. Logs come from Loki with the low-cardinality labels ``service`` and ``level``; request and
trace ids are JSON fields of the line (the Loki datasource's ``trace_id`` derived field links a
line to its trace in Tempo).

The Overview and Hang forensics boards hold for every engine (vigil, vLLM, SGLang, TGI): their
engine-agnostic panels read the engine vocabulary recorded by alerts/engines.py
(``vigil:engine_*``, labels ``engine``, ``instance``, ``model``; the recording rules carry their
own windows, so those panels need no ``rate``), chosen with an ``engine`` variable. Their panels
on this project's own richer series say so in their description (ENGINE_VIGIL_ONLY).

Place: in Kubernetes every series carries ``node``, ``namespace`` and ``pod`` (relabelled from
its pod), and ``cluster`` (an external label, present in a central store such as Mimir or
Thanos and on remote-written data). Every Prometheus board has ``cluster``, ``namespace`` and
``node`` variables, chained in that order before ``instance``, and every PromQL selector carries
their matchers (PLACE_FILTER, inside INSTANCE_FILTER). Outside Kubernetes no series has these
labels: the variables find no values and stay at All, whose value ``.*`` matches the absent
label (Prometheus compares a missing label as the empty string), so the boards show what they
show without them. The fleet board (``fleet.json``) reads the per-node recording rules of
alerts/rules.py (group ``vigil-fleet``, labels ``cluster`` and ``node``): its place is cluster
and node. Log lines carry no place (Alloy labels them with ``service`` and ``level`` only):
Loki panels are not filtered by it, and say so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parent
PROMETHEUS_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
LOKI_DATASOURCE = {"type": "loki", "uid": "${loki_datasource}"}
# Where a series comes from, outermost first: the place variables, chained in this order.
PLACE_LABELS = ("cluster", "namespace", "node")
# The fleet board's series are per node (alerts/rules.py, group vigil-fleet: by cluster, node).
FLEET_PLACE_LABELS = ("cluster", "node")


def place_filter(labels: tuple[str, ...] = PLACE_LABELS) -> str:
    """The label matchers for the places chosen in the board's variables."""
    return ",".join(f'{label}=~"${label}"' for label in labels)


PLACE_FILTER = place_filter()
# Label matchers for the places, instances, models and GPUs chosen in the dashboard's variables.
INSTANCE_FILTER = PLACE_FILTER + ',instance=~"$instance"'
INSTANCE_MODEL_FILTER = INSTANCE_FILTER + ',model=~"$model"'
INSTANCE_GPU_FILTER = INSTANCE_FILTER + ',gpu=~"$gpu"'
# The engine vocabulary (alerts/engines.py) for the engines, instances and models chosen.
ENGINE_FILTER = INSTANCE_FILTER + ',engine=~"$engine",model=~"$model"'
ENGINE_VOCABULARY = "vigil:engine_requests_running"  # every engine has it: the variables' source
ENGINE_LEGEND = "{{engine}} {{model}}"
ENGINE_VIGIL_ONLY = "Only this project's inference process (engine vigil) fills this panel."
FOREIGN_PROCESSES = (
    "Other engines' processes (vLLM, SGLang, TGI) appear when the exporter finds them from "
    "the target's port."
)
RATE_INTERVAL = "$__rate_interval"
# One process of one exporter: a pid within its instance, an instance within its place (the same
# node name, or address, in two clusters of a central store; without cluster the join would find
# both and fail as many-to-many). Every series of an exporter carries the same place.
PROCESS_JOIN = "cluster, namespace, node, instance, pid"
# The inference process's log lines, as Loki's `| json` sees them. Each request ends with one
# line whose event is request_end (message "request finished", "request rejected: ..." or
# "request failed: ..."); the watchdog writes a stall report and one line per stalled request.
REQUEST_END = 'event = "request_end"'
SLOW_REQUEST_S = 10  # a request slower than this is listed with the failed ones
STALL_LINES = '|~ "stall report|stalled request"'
# The Logs board's levels, as Alloy labels them (compose/alloy/config.alloy): loguru's and the
# Go services' levels in lower case; `error` also for a line of our processes that is not JSON
# (a crash's stack); `unknown` for another service's line without a level.
LOG_LEVELS = (
    "trace",
    "debug",
    "info",
    "success",
    "warning",
    "warn",
    "error",
    "critical",
    "unknown",
)
GPU_LEGEND = "{{gpu}} {{gpu_name}}"
GRID_COLUMNS = 24  # the width of Grafana's grid
# Where the place variables find their values, per kind of board.
EXPORTERS = "vigil_exporter_build_info"
FLEET_SERIES = "vigil:node_gpus|vigil:node_engines"  # every node has both (0 when none)
NO_PLACE_IN_LOGS = (
    "Not filtered by cluster, namespace or node: log lines carry no such label (Alloy labels "
    "them with service and level only)."
)
# Our alerts firing: every rule of alerts/rules.py carries a cause (an Alert cannot be declared
# without one), which other stacks' alerts in a shared Prometheus do not (kube-prometheus-stack's
# KubeNodeNotReady carries node, not cause): this stays true as rules are added, where a list of
# alert names would not. Our Watchdog (cause watchdog) always fires, the pipeline's heartbeat for
# the dead man's switch, not a problem: left out, else the count is never 0.
OUR_ALERTS_FIRING = 'alertstate="firing",cause!="",cause!="watchdog"'
# A cell that turns red from 1 up (a count of broken things).
RED_FROM_ONE = [{"color": "green", "value": None}, {"color": "red", "value": 1}]


def _selector(series: str, matchers: str = "") -> str:
    """A selector of ``series`` (a metric name, or an alternation of names) with ``matchers``."""
    if "|" in series:
        inside = f'__name__=~"{series}"' + (f",{matchers}" if matchers else "")
        return "{" + inside + "}"
    return f"{series}{{{matchers}}}" if matchers else series


class Board:
    def __init__(
        self,
        uid: str,
        title: str,
        description: str,
        loki: bool = False,
        gpu: bool = False,
        engines: bool = False,
        fleet: bool = False,
    ):
        self.uid, self.title, self.description = uid, title, description
        self.loki, self.gpu, self.engines, self.fleet = loki, gpu, engines, fleet
        self.place = FLEET_PLACE_LABELS if fleet else PLACE_LABELS
        self.panels: list[dict] = []
        self._next_x = self._row_y = 0
        self._row_height = 0

    def _place(self, width: int, height: int) -> dict:
        """The next panel's grid position: left to right, then on a new row."""
        if self._next_x + width > GRID_COLUMNS:
            self._next_x, self._row_y = 0, self._row_y + self._row_height
            self._row_height = 0
        position = {"x": self._next_x, "y": self._row_y, "w": width, "h": height}
        self._next_x += width
        self._row_height = max(self._row_height, height)
        return position

    def panel(
        self,
        kind: str,
        title: str,
        description: str,
        unit: str,
        targets: list[tuple[str, str]],
        width: int = 12,
        height: int = 8,
        logs: bool = False,
        cuda_only: bool = False,
        instant: bool = False,
        mappings: list | None = None,
        overrides: list | None = None,
        transformations: list | None = None,
        thresholds: list | None = None,
        sort_by: tuple[str, bool] | None = None,
    ) -> None:
        """Add a panel; ``targets`` are (query, legend) pairs. ``thresholds`` are the steps of
        absolute thresholds; ``sort_by`` is a table's initial sort, (column, descending)."""
        datasource = LOKI_DATASOURCE if logs else PROMETHEUS_DATASOURCE
        instant_table = {"instant": True, "range": False, "format": "table"} if instant else {}
        defaults: dict = {"unit": unit}
        if mappings:
            defaults["mappings"] = mappings
        if thresholds:
            defaults["thresholds"] = {"mode": "absolute", "steps": thresholds}
            defaults["color"] = {"mode": "thresholds"}
        options: dict = {}
        if sort_by:
            # The table's initial sort (Grafana's schema: TableSortByFieldState, displayName and
            # desc; packages/grafana-schema/src/common/mudball.cue): the worst rows on top.
            options["sortBy"] = [{"displayName": sort_by[0], "desc": sort_by[1]}]
        panel = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": datasource,
            "gridPos": self._place(width, height),
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": options,
            "targets": [
                {
                    "refId": chr(ord("A") + index),
                    "datasource": datasource,
                    "expr": expr,
                    "legendFormat": legend,
                    **instant_table,
                }
                for index, (expr, legend) in enumerate(targets)
            ],
        }
        if transformations:
            panel["transformations"] = transformations
        if cuda_only:
            panel["tags"] = ["cuda-only"]  # read by the tests: empty on a machine without CUDA
        self.panels.append(panel)

    def variables(self) -> list[dict]:
        variables = [
            {
                "type": "datasource",
                "name": "datasource",
                "label": "Prometheus",
                "query": "prometheus",
                # Grafana's default data source when it is a Prometheus one, else the first
                # Prometheus by name (dashboard-scene's transformSaveModelToScene enables the
                # "default" option for this current value; kube-prometheus-stack's own
                # dashboards say the same). Both the compose stack's (uid vigil-prometheus) and
                # kube-prometheus-stack's sidecar data source (uid prometheus, values.yaml
                # grafana.sidecar.datasources.isDefaultDatasource: true) are the default.
                "current": {"selected": True, "text": "default", "value": "default"},
                "hide": 0,
            }
        ]
        if self.loki:
            variables.append(
                {
                    "type": "datasource",
                    "name": "loki_datasource",
                    "label": "Loki",
                    "query": "loki",
                    "current": {},
                    "hide": 0,
                }
            )
        if self.fleet:
            source = FLEET_SERIES
        elif self.engines:
            # The exporters, and the engines scraped on their own port (their instance is not
            # an exporter's); the models every engine serves.
            source = f"{EXPORTERS}|{ENGINE_VOCABULARY}"
        else:
            source = EXPORTERS
        # Chained: each place's values within the places chosen before it. A board without a
        # Prometheus panel (Logs) keeps them hidden, only to carry the choice between boards.
        hide = 0 if any(p["datasource"] == PROMETHEUS_DATASOURCE for p in self.panels) else 2
        for index, label in enumerate(self.place):
            within = place_filter(self.place[:index])
            variables.append(
                _query_variable(label, f"label_values({_selector(source, within)}, {label})", hide)
            )
        if self.fleet:
            return variables
        variables.append(
            _query_variable(
                "instance", f"label_values({_selector(source, PLACE_FILTER)}, instance)"
            )
        )
        if self.engines:
            variables.append(
                _query_variable(
                    "engine",
                    f"label_values({_selector(ENGINE_VOCABULARY, INSTANCE_FILTER)}, engine)",
                )
            )
            variables.append(
                _query_variable(
                    "model",
                    f"label_values({ENGINE_VOCABULARY}"
                    f'{{{INSTANCE_FILTER},engine=~"$engine"}}, model)',
                )
            )
        else:
            variables.append(
                _query_variable(
                    "model", f"label_values(inference_model_info{{{INSTANCE_FILTER}}}, model)"
                )
            )
        if self.gpu:
            variables.append(
                _query_variable("gpu", f"label_values(vigil_gpu_up{{{INSTANCE_FILTER}}}, gpu)")
            )
        return variables

    def json(self, extra_variables: list[dict] | None = None) -> dict:
        return {
            "id": None,
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["llm-vigil"],
            "timezone": "browser",
            "editable": True,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "10s",
            "graphTooltip": 1,
            "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": self.variables() + (extra_variables or [])},
            "annotations": {"list": []},
            "links": [
                {
                    "type": "dashboards",
                    "tags": ["llm-vigil"],
                    "asDropdown": True,
                    "title": "llm-vigil",
                    "includeVars": True,
                    "keepTime": True,
                }
            ],
            "panels": self.panels,
        }


def _query_variable(name: str, query: str, hide: int = 0) -> dict:
    """A multi-value query variable with All, whose value is ``.*`` (Grafana's custom all value,
    never escaped): it matches every value and also a series without the label. When the query
    finds no value (no series has the label: a place outside Kubernetes), Grafana chooses All
    (grafana/scenes MultiValueVariable: with no options and includeAll, the value is All, and a
    custom all value is what is interpolated), so every matcher on it still matches."""
    return {
        "type": "query",
        "name": name,
        "label": name,
        "datasource": PROMETHEUS_DATASOURCE,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "sort": 1,
        "current": {},
        "hide": hide,
    }


def _engine_quantiles(series: str) -> list[tuple[str, str]]:
    """The vocabulary's recorded p50 and p95 (over 5 minutes) per engine and model: the highest
    over the chosen instances, since quantiles cannot be added."""
    return [
        (
            f'max by (engine, model) ({series}{{{ENGINE_FILTER},quantile="{quantile}"}})',
            f"{name} {ENGINE_LEGEND}",
        )
        for quantile, name in (("0.5", "p50"), ("0.95", "p95"))
    ]


def _engine_sum(series: str, by: str = "engine, model") -> str:
    return f"sum by ({by}) ({series}{{{ENGINE_FILTER}}})"


RIGHT_AXIS_B = [  # the second query (refId B) on its own axis, at the right
    {
        "matcher": {"id": "byFrameRefID", "options": "B"},
        "properties": [{"id": "custom.axisPlacement", "value": "right"}],
    }
]


def overview() -> Board:
    board = Board(
        "vigil-overview",
        "llm-vigil / Overview",
        "Is it serving, how fast, what fails, and the alerts firing now, for every engine "
        "(vigil, vLLM, SGLang, TGI) through the engine vocabulary; this project's own process "
        "adds its richer panels.",
        engines=True,
    )
    board.panel(
        "stat",
        "Serving",
        "The black-box probe's verdict per target, whatever its engine: 1 when "
        "/health, /ready and a canary completion all succeed, 0 when any fails.",
        "none",
        [(f"min by (target) (vigil_probe_success{{{INSTANCE_FILTER}}})", "{{target}}")],
        width=6,
        height=5,
        mappings=[
            {
                "type": "value",
                "options": {
                    "0": {"text": "NOT SERVING", "color": "red"},
                    "1": {"text": "serving", "color": "green"},
                },
            }
        ],
    )
    board.panel(
        "stat",
        "In flight",
        "Requests the engine holds, running in the batch plus waiting for a slot, per engine "
        "and model.",
        "short",
        [
            (
                f"{_engine_sum('vigil:engine_requests_running')} + "
                f"{_engine_sum('vigil:engine_requests_waiting')}",
                ENGINE_LEGEND,
            )
        ],
        width=6,
        height=5,
    )
    board.panel(
        "table",
        "Alerts firing now",
        "Our alerts Prometheus evaluates as firing (ALERTS with a cause: not other stacks' in a "
        "shared Prometheus; not the Watchdog, always firing), by name, severity and place. With a "
        "cluster, namespace or node chosen, only the alerts that carry it (an alert with no "
        "instance, such as a missing series, carries no node).",
        "none",
        [
            (
                "sort_desc(max by (alertname, severity, cluster, node, instance, model, gpu) "
                f"(ALERTS{{{OUR_ALERTS_FIRING},{PLACE_FILTER}}}))",
                "",
            )
        ],
        width=12,
        height=5,
        instant=True,
    )
    board.panel(
        "timeseries",
        "Request and error rates",
        "Finished requests per second (failed ones included) and the requests the engine "
        "failed, per engine and model, over 5 minutes (recorded).",
        "reqps",
        [
            (_engine_sum("vigil:engine_requests:rate5m"), "finished " + ENGINE_LEGEND),
            (_engine_sum("vigil:engine_request_errors:rate5m"), "failed " + ENGINE_LEGEND),
        ],
    )
    board.panel(
        "timeseries",
        "Errors by type",
        "Failed or refused requests per second by error type (HTTP 4xx and 5xx). "
        + ENGINE_VIGIL_ONLY,
        "reqps",
        [
            (
                f"sum by (error_type) (rate(inference_requests_total"
                f'{{{INSTANCE_MODEL_FILTER},error_type!=""}}[{RATE_INTERVAL}]))',
                "{{error_type}}",
            )
        ],
    )
    board.panel(
        "timeseries",
        "Time to first token",
        "p50 and p95 over 5 minutes of the time from arrival to the first token (queue and "
        "prefill included), per engine and model, the highest over the instances chosen. TGI "
        "has none.",
        "s",
        _engine_quantiles("vigil:engine_time_to_first_token_seconds"),
        width=8,
    )
    board.panel(
        "timeseries",
        "Inter-token latency",
        "p50 and p95 over 5 minutes of the time between output tokens, per engine and model, "
        "the highest over the instances chosen (TGI's is its mean time per token, prefill "
        "included).",
        "s",
        _engine_quantiles("vigil:engine_inter_token_latency_seconds"),
        width=8,
    )
    board.panel(
        "timeseries",
        "Request duration",
        "p50 and p95 over 5 minutes of the end-to-end duration, per engine and model, the "
        "highest over the instances chosen.",
        "s",
        _engine_quantiles("vigil:engine_request_duration_seconds"),
        width=8,
    )
    board.panel(
        "timeseries",
        "Generated tokens per second",
        "Generated tokens per second per engine and model, over 1 minute (recorded); the "
        "prompt tokens come from this project's inference process (engine vigil) only.",
        "short",
        [
            (_engine_sum("vigil:engine_generation_tokens:rate1m"), "generated " + ENGINE_LEGEND),
            (
                f"sum by (model) (rate(inference_prompt_tokens_total"
                f"{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}]))",
                "prompt vigil {{model}}",
            ),
        ],
        width=8,
    )
    board.panel(
        "timeseries",
        "Progress",
        "The work the engine's forward passes did per second, over 1 minute: engine steps "
        "(vigil), batch calls (TGI), prompt and generated tokens (vLLM), tokens or KV updates "
        "(SGLang). 0 means no forward pass finished for a minute.",
        "short",
        [(_engine_sum("vigil:engine_progress:rate1m"), ENGINE_LEGEND)],
        width=8,
    )
    board.panel(
        "timeseries",
        "KV-cache usage",
        "Share of the KV-cache pool in use, per engine and model, the highest over the "
        "instances chosen; near 1 new requests wait. This project's inference process has no "
        "pool (its cache grows per request, see admission control): no engine vigil here.",
        "percentunit",
        [
            (
                f"max by (engine, model) (vigil:engine_kv_cache_usage_ratio{{{ENGINE_FILTER}}})",
                ENGINE_LEGEND,
            )
        ],
        width=8,
    )
    board.panel(
        "timeseries",
        "Requests running and waiting",
        "Requests in the running batch and requests queued for a slot, per engine and model.",
        "short",
        [
            (_engine_sum("vigil:engine_requests_running"), "running " + ENGINE_LEGEND),
            (_engine_sum("vigil:engine_requests_waiting"), "waiting " + ENGINE_LEGEND),
        ],
    )
    board.panel(
        "timeseries",
        "Oldest queued request",
        "How long the oldest waiting request has waited; 0 when nothing waits. "
        + ENGINE_VIGIL_ONLY,
        "s",
        [
            (
                f"(time() - max by (model, pid) (inference_queue_oldest_enqueue_timestamp_seconds"
                f"{{{INSTANCE_MODEL_FILTER}}} > 0)) "
                f"or max by (model, pid) (inference_queue_oldest_enqueue_timestamp_seconds"
                f"{{{INSTANCE_MODEL_FILTER}}}) * 0",
                "{{model}} pid {{pid}}",
            )
        ],
    )
    board.panel(
        "timeseries",
        "Stalls, out-of-memory errors, empty outputs",
        "Engine stalls found by the "
        "watchdog, out-of-memory errors and successful completions without text, per second. "
        + ENGINE_VIGIL_ONLY,
        "cps",
        [
            (
                f"sum by (stage) (rate(inference_engine_stalls_total"
                f"{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}]))",
                "stall {{stage}}",
            ),
            (
                f"sum by (stage) (rate(inference_out_of_memory_errors_total"
                f"{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}]))",
                "OOM {{stage}}",
            ),
            (
                f"sum by (reason) (rate(inference_empty_outputs_total"
                f"{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}]))",
                "empty {{reason}}",
            ),
        ],
        width=24,
    )
    board.panel(
        "timeseries",
        "Images per request",
        "Requests with images per second, and the mean images and image tokens (prompt tokens "
        "that stand for the images, after the processor's resize) per such request; a "
        "vision-language model's cost grows with the tokens. " + ENGINE_VIGIL_ONLY,
        "short",
        [
            (
                f"sum by (model) (rate(inference_request_images_count"
                f"{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}]))",
                "image requests/s {{model}}",
            ),
            (
                f"sum by (model) (rate(inference_request_images_sum"
                f"{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}])) / sum by (model) "
                f"(rate(inference_request_images_count{{{INSTANCE_MODEL_FILTER}}}"
                f"[{RATE_INTERVAL}]))",
                "images/request {{model}}",
            ),
            (
                f"sum by (model) (rate(inference_request_image_tokens_sum"
                f"{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}])) / sum by (model) "
                f"(rate(inference_request_image_tokens_count{{{INSTANCE_MODEL_FILTER}}}"
                f"[{RATE_INTERVAL}]))",
                "image tokens/request {{model}}",
            ),
        ],
    )
    board.panel(
        "timeseries",
        "Image preprocessing and vision encoder, p95",
        "95th percentile of the time to decode a request's images and run the model's "
        "processor (before the queue), and of the vision tower's pass on them (the engine's "
        "vision stage). " + ENGINE_VIGIL_ONLY,
        "s",
        [
            (
                f"histogram_quantile(0.95, sum by (model, le) (rate("
                f"inference_image_preprocess_duration_seconds_bucket{{{INSTANCE_MODEL_FILTER}}}"
                f"[{RATE_INTERVAL}])))",
                "preprocess {{model}}",
            ),
            (
                f"histogram_quantile(0.95, sum by (model, le) (rate("
                f"inference_vision_encoder_duration_seconds_bucket{{{INSTANCE_MODEL_FILTER}}}"
                f"[{RATE_INTERVAL}])))",
                "vision encoder {{model}}",
            ),
        ],
    )
    return board


def gpus() -> Board:
    board = Board(
        "vigil-gpus",
        "llm-vigil / GPUs",
        "Every GPU through NVML, beside PyTorch's allocator and the inference processes' share.",
        gpu=True,
    )
    board.panel(
        "stat",
        "GPU up",
        "1 when the GPU's last read succeeded and is fresh; 0 when it is lost "
        "or its readings are stale.",
        "none",
        [(f"vigil_gpu_up{{{INSTANCE_GPU_FILTER}}}", GPU_LEGEND)],
        width=12,
        height=5,
    )
    board.panel(
        "table",
        "Driver",
        "NVIDIA driver, the newest CUDA it supports, and NVML.",
        "none",
        [(f"vigil_gpu_driver_info{{{INSTANCE_FILTER}}}", "")],
        width=12,
        height=5,
        instant=True,
    )
    board.panel(
        "timeseries",
        "Utilization",
        "Share of time a kernel ran (GPU) and device memory was busy (memory).",
        "percentunit",
        [
            (f"vigil_gpu_utilization_ratio{{{INSTANCE_GPU_FILTER}}}", "GPU " + GPU_LEGEND),
            (
                f"vigil_gpu_memory_utilization_ratio{{{INSTANCE_GPU_FILTER}}}",
                "memory " + GPU_LEGEND,
            ),
        ],
    )
    board.panel(
        "timeseries",
        "VRAM used and total",
        "Device memory used and total per GPU (NVML).",
        "bytes",
        [
            (f"vigil_gpu_memory_used_bytes{{{INSTANCE_GPU_FILTER}}}", "used " + GPU_LEGEND),
            (f"vigil_gpu_memory_total_bytes{{{INSTANCE_GPU_FILTER}}}", "total " + GPU_LEGEND),
        ],
    )
    board.panel(
        "timeseries",
        "PyTorch allocator",
        "Bytes held by tensors (allocated), reserved from the "
        "driver (reserved) and the allocated peak, per inference process (CUDA only).",
        "bytes",
        [
            (
                f"sum by (gpu, pid) (inference_torch_cuda_memory_allocated_bytes"
                f"{{{INSTANCE_MODEL_FILTER}}})",
                "allocated gpu {{gpu}} pid {{pid}}",
            ),
            (
                f"sum by (gpu, pid) (inference_torch_cuda_memory_reserved_bytes"
                f"{{{INSTANCE_MODEL_FILTER}}})",
                "reserved gpu {{gpu}} pid {{pid}}",
            ),
            (
                f"sum by (gpu, pid) (inference_torch_cuda_memory_peak_allocated_bytes"
                f"{{{INSTANCE_MODEL_FILTER}}})",
                "peak gpu {{gpu}} pid {{pid}}",
            ),
        ],
        cuda_only=True,
    )
    board.panel(
        "timeseries",
        "Memory per process",
        "Device memory of each compute process, model named "
        "for the inference processes (NVML's host pid).",
        "bytes",
        [
            (
                f"vigil_gpu_process_memory_used_bytes{{{INSTANCE_GPU_FILTER}}}",
                "gpu {{gpu}} pid {{pid}} {{model}}",
            )
        ],
    )
    board.panel(
        "timeseries",
        "Temperature",
        "GPU core temperature.",
        "celsius",
        [(f"vigil_gpu_temperature_celsius{{{INSTANCE_GPU_FILTER}}}", GPU_LEGEND)],
        width=8,
    )
    board.panel(
        "timeseries",
        "Power",
        "Power draw and the enforced limit.",
        "watt",
        [
            (f"vigil_gpu_power_watts{{{INSTANCE_GPU_FILTER}}}", "draw " + GPU_LEGEND),
            (f"vigil_gpu_power_limit_watts{{{INSTANCE_GPU_FILTER}}}", "limit " + GPU_LEGEND),
        ],
        width=8,
    )
    board.panel(
        "timeseries",
        "Clocks",
        "SM and memory clocks.",
        "hertz",
        [(f"vigil_gpu_clock_hertz{{{INSTANCE_GPU_FILTER}}}", "{{clock}} " + GPU_LEGEND)],
        width=8,
    )
    board.panel(
        "state-timeline",
        "Throttle reasons",
        "The clock-event reasons holding the clocks down now (1), per GPU.",
        "none",
        [(f"vigil_gpu_clock_event_reason{{{INSTANCE_GPU_FILTER}}} == 1", "{{gpu}} {{reason}}")],
    )
    board.panel(
        "timeseries",
        "XID and ECC errors",
        "XID errors by code and ECC errors by type, counted "
        "since the exporter or the driver started.",
        "short",
        [
            (
                f"sum by (gpu, xid) (vigil_gpu_xid_errors_total{{{INSTANCE_GPU_FILTER}}})",
                "XID {{xid}} gpu {{gpu}}",
            ),
            (
                f"sum by (gpu, type) (vigil_gpu_ecc_errors_total{{{INSTANCE_GPU_FILTER}}})",
                "ECC {{type}} gpu {{gpu}}",
            ),
        ],
    )
    board.panel(
        "timeseries",
        "Reading age",
        "Seconds since the last successful read of each GPU (grows when a driver call is wedged).",
        "s",
        [(f"time() - vigil_gpu_last_read_timestamp_seconds{{{INSTANCE_GPU_FILTER}}}", GPU_LEGEND)],
        width=24,
    )
    return board


def hang_forensics() -> Board:
    board = Board(
        "vigil-hang-forensics",
        "llm-vigil / Hang forensics",
        "Is the engine moving? For every engine: progress against the pending work, KV-cache "
        "usage and the engine's processes; for this project's own process also the heartbeat, "
        "the stall flag and the stall reports, slow and failed requests from the logs, each "
        "linked to its trace; probes of every target.",
        loki=True,
        engines=True,
    )
    # An instance is named within its cluster (the same node name in two clusters of a central
    # store): cluster beside it, or two clusters' engines add up under one name.
    by = "cluster, engine, instance, model"
    board.panel(
        "timeseries",
        "Progress against pending work",
        "Pending work (requests running plus waiting, left axis) and the work the engine's "
        "forward passes did per second over 1 minute (right axis), per engine, instance and "
        "model. Pending above 0 with progress at 0 is a hang (InferenceEngineNoProgress); both "
        "at 0 is idle.",
        "short",
        [
            (
                f"{_engine_sum('vigil:engine_requests_running', by)} + "
                f"{_engine_sum('vigil:engine_requests_waiting', by)}",
                "pending {{engine}} {{model}} {{instance}}",
            ),
            (
                _engine_sum("vigil:engine_progress:rate1m", by),
                "progress {{engine}} {{model}} {{instance}}",
            ),
        ],
        overrides=RIGHT_AXIS_B,
    )
    board.panel(
        "timeseries",
        "KV-cache usage",
        "Share of the KV-cache pool in use per engine, instance and model: a full pool keeps "
        "requests waiting (InferenceKvCacheFull). This project's inference process has no pool "
        "(its cache grows per request): no engine vigil here.",
        "percentunit",
        [
            (
                f"max by ({by}) (vigil:engine_kv_cache_usage_ratio{{{ENGINE_FILTER}}})",
                "{{engine}} {{model}} {{instance}}",
            )
        ],
    )
    board.panel(
        "table",
        "Engine processes",
        "The processes the exporter finds behind each local target's port (the listener and "
        "its descendants: an API server, engine core, workers), with their /proc state and the "
        "CPU cores each uses now (the value). A busy hang burns a core with no progress; a "
        "process in disk_sleep is often stuck in the driver.",
        "short",
        [
            (
                "max by (cluster, node, instance, target, engine, model, role, comm, pid, state) ("
                f"vigil_engine_process_info{{{ENGINE_FILTER}}} "
                f"* on ({PROCESS_JOIN}) group_left (state) "
                f"(vigil_process_state{{{INSTANCE_FILTER}}} == 1) "
                f"* on ({PROCESS_JOIN}) group_left () "
                f"rate(vigil_process_cpu_seconds_total{{{INSTANCE_FILTER}}}[{RATE_INTERVAL}]))",
                "",
            )
        ],
        width=24,
        instant=True,
        transformations=[
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True}, "renameByName": {"Value": "CPU"}},
            }
        ],
    )
    board.panel(
        "timeseries",
        "Heartbeat age",
        "Seconds since the engine's last prefill or decode step, "
        "computed by the exporter at scrape time. It grows while idle too: read it with the "
        "requests in flight beside it. " + ENGINE_VIGIL_ONLY,
        "s",
        [
            (
                f"vigil_process_heartbeat_age_seconds{{{INSTANCE_MODEL_FILTER}}}",
                "{{model}} pid {{pid}}",
            )
        ],
    )
    board.panel(
        "timeseries",
        "Requests in flight",
        "Requests accepted and not yet answered, per "
        "process: with a growing heartbeat age, a hang. " + ENGINE_VIGIL_ONLY,
        "short",
        [(f"inference_requests_in_flight{{{INSTANCE_MODEL_FILTER}}}", "{{model}} pid {{pid}}")],
    )
    board.panel(
        "state-timeline",
        "Process state",
        "Each inference process's state from /proc (running, "
        "sleeping, disk_sleep: uninterruptible, often in the driver; stopped; zombie). "
        + FOREIGN_PROCESSES,
        "none",
        [
            (
                f"max by (pid, state) (vigil_process_state{{{INSTANCE_MODEL_FILTER}}}) == 1",
                "pid {{pid}} {{state}}",
            )
        ],
    )
    board.panel(
        "timeseries",
        "CPU",
        "CPU cores each inference process uses: a full core with no heartbeat or progress is a "
        "busy hang. " + FOREIGN_PROCESSES,
        "short",
        [
            (
                f"rate(vigil_process_cpu_seconds_total{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}])",
                "pid {{pid}}",
            )
        ],
    )
    board.panel(
        "timeseries",
        "Probe results",
        "The exporter's checks of each target, whatever its engine: /health, /ready "
        "and the canary completion (1 success, 0 failure).",
        "none",
        [(f"vigil_probe_success{{{INSTANCE_FILTER}}}", "{{check}} {{target}}")],
    )
    board.panel(
        "timeseries",
        "Canary latency",
        "Duration of the last canary completion and its time to first token, per target, "
        "whatever its engine.",
        "s",
        [
            (
                f'vigil_probe_duration_seconds{{{INSTANCE_FILTER},check="canary"}}',
                "duration {{target}}",
            ),
            (
                f"vigil_probe_canary_time_to_first_token_seconds{{{INSTANCE_FILTER}}}",
                "TTFT {{target}}",
            ),
        ],
    )
    board.panel(
        "timeseries",
        "Engine stalled",
        "1 while the watchdog holds the engine stalled; stalls counted by stage. "
        + ENGINE_VIGIL_ONLY,
        "short",
        [
            (
                f"max by (model) (inference_engine_stalled{{{INSTANCE_MODEL_FILTER}}})",
                "stalled {{model}}",
            ),
            (
                f"sum by (stage) (increase(inference_engine_stalls_total"
                f"{{{INSTANCE_MODEL_FILTER}}}[{RATE_INTERVAL}]))",
                "stalls {{stage}}",
            ),
        ],
    )
    board.panel(
        "timeseries",
        "Process alive and exits",
        "1 while the inference process exists; unclean "
        "exits (crash, kill, watchdog exit 75) counted per model, for this project's inference "
        "processes (engine vigil) only. " + FOREIGN_PROCESSES,
        "short",
        [
            (f"vigil_process_alive{{{INSTANCE_MODEL_FILTER}}}", "alive pid {{pid}}"),
            (
                f"sum by (model) (vigil_process_unclean_exits_total{{{INSTANCE_MODEL_FILTER}}})",
                "exits {{model}}",
            ),
        ],
    )
    board.panel(
        "logs",
        "Stall reports and stalled requests",
        "The watchdog's ERROR lines: the stall report (stage, the engine thread's line, every "
        "thread's stack in threads, the pending requests) and one line per stalled request with "
        "its request_id and trace_id, which links to the trace. "
        + ENGINE_VIGIL_ONLY
        + " "
        + NO_PLACE_IN_LOGS,
        "none",
        [(f'{{service="inference"}} {STALL_LINES} | json', "")],
        logs=True,
        width=24,
        height=10,
    )
    board.panel(
        "logs",
        "Slow or failed requests",
        f"Requests that took more than {SLOW_REQUEST_S} s or were answered with a 5xx: the "
        "last line of each request (event request_end), with its duration, status, error and "
        "trace id. " + ENGINE_VIGIL_ONLY + " " + NO_PLACE_IN_LOGS,
        "none",
        [
            (
                f'{{service="inference"}} | json | {REQUEST_END} '
                f"| duration_s > {SLOW_REQUEST_S} or status >= 500",
                "",
            )
        ],
        logs=True,
        width=24,
    )
    return board


FLEET_FILTER = place_filter(FLEET_PLACE_LABELS)


def _node_links(*boards: tuple[str, str]) -> list[dict]:
    """Links from a table's ``node`` cell to other boards (uid, title), on that node, keeping
    the data source, the cluster chosen and the time range. Grafana's data link variables:
    ``${__value.raw}`` is the cell's value, ``${__url_time_range}`` the time range as from and
    to (grafana.com/docs/grafana/latest/panels-visualizations/configure-data-links/), and
    ``${name:queryparam}`` a variable as ``var-name=value`` (.../dashboards/variables/
    variable-syntax/). kube-prometheus-stack's own tables link to a namespace the same way."""
    return [
        {
            "matcher": {"id": "byName", "options": "node"},
            "properties": [
                {
                    "id": "links",
                    "value": [
                        {
                            "title": f"{title} on ${{__value.raw}}",
                            "url": f"/d/{uid}?${{datasource:queryparam}}&${{cluster:queryparam}}"
                            "&var-node=${__value.raw}&${__url_time_range}",
                        }
                        for uid, title in boards
                    ],
                }
            ],
        }
    ]


def _columns(names: dict[str, str]) -> list[dict]:
    """An instant table's frames (one per query: Grafana names their values "Value #<refId>"
    when a panel has more than one query, else "Value"; public/app/plugins/datasource/
    prometheus/result_transformer.ts getValueText) merged into one row per node, without the
    time column, the values renamed."""
    return [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": names}},
    ]


def fleet() -> Board:
    board = Board(
        "vigil-fleet",
        "LLM fleet",
        "Every node of the fleet in one view, worst first: its hung engines, its GPU memory "
        "headroom and its faulty GPUs (the per-node rules of group vigil-fleet, by cluster and "
        "node), and the alerts firing on it. A node's name links to its GPUs, its Overview and "
        "its Hang forensics. Outside Kubernetes no series has a node: the whole stack is one "
        "row without one.",
        fleet=True,
    )
    gpus = ("vigil-gpus", "GPUs")
    overview_board = ("vigil-overview", "Overview")
    hangs = ("vigil-hang-forensics", "Hang forensics")
    board.panel(
        "stat",
        "Nodes",
        "Nodes with an exporter's GPUs or an engine.",
        "short",
        [(f"count(count by (cluster, node) ({_selector(FLEET_SERIES, FLEET_FILTER)}))", "")],
        width=4,
        height=4,
    )
    board.panel(
        "stat",
        "GPUs",
        "GPUs the nodes' exporters read, each counted once by its uuid.",
        "short",
        [(f"sum(vigil:node_gpus{{{FLEET_FILTER}}})", "")],
        width=4,
        height=4,
    )
    board.panel(
        "stat",
        "Faulty GPUs",
        "GPUs lost, with a failed or pending row remap, an uncorrected ECC error or a critical "
        "XID in 10 minutes (vigil:node_gpus_unhealthy; throttling is no fault here).",
        "short",
        [(f"sum(vigil:node_gpus_unhealthy{{{FLEET_FILTER}}})", "")],
        width=4,
        height=4,
        thresholds=RED_FROM_ONE,
    )
    board.panel(
        "stat",
        "Hung engines",
        "Engines with work pending and no progress (vigil:node_engines_hung), of all the "
        "engines on the nodes.",
        "short",
        [(f"sum(vigil:node_engines_hung{{{FLEET_FILTER}}})", "")],
        width=4,
        height=4,
        thresholds=RED_FROM_ONE,
    )
    board.panel(
        "stat",
        "Least GPU memory headroom",
        "The smallest share of a GPU's memory still free, over every GPU of the nodes "
        "(vigil:node_gpu_memory_headroom_ratio).",
        "percentunit",
        [(f"min(vigil:node_gpu_memory_headroom_ratio{{{FLEET_FILTER}}})", "")],
        width=4,
        height=4,
        thresholds=[
            {"color": "red", "value": None},
            {"color": "orange", "value": 0.05},
            {"color": "green", "value": 0.1},
        ],
    )
    board.panel(
        "stat",
        "Alerts firing",
        "Our alerts firing now on the nodes chosen (ALERTS with a cause: not other stacks' in a "
        "shared Prometheus; not the Watchdog, always firing); with every node, those without a "
        "node too.",
        "short",
        [(f"count(ALERTS{{{OUR_ALERTS_FIRING},{FLEET_FILTER}}}) or vector(0)", "")],
        width=4,
        height=4,
        thresholds=RED_FROM_ONE,
    )
    board.panel(
        "table",
        "Hung engines by node",
        "Per node, the engines with work pending and no progress, of its engines; the most "
        "hung first. The node links to its Hang forensics, Overview and GPUs.",
        "short",
        [
            (f"sort_desc(vigil:node_engines_hung{{{FLEET_FILTER}}})", ""),
            (f"vigil:node_engines{{{FLEET_FILTER}}}", ""),
        ],
        width=6,
        height=10,
        instant=True,
        transformations=_columns({"Value #A": "Hung", "Value #B": "Engines"}),
        sort_by=("Hung", True),
        overrides=_node_links(hangs, overview_board, gpus),
    )
    board.panel(
        "table",
        "GPU memory headroom by node",
        "Per node, the smallest share of a GPU's memory still free; the least first. The node "
        "links to its GPUs and Overview.",
        "percentunit",
        [(f"sort(vigil:node_gpu_memory_headroom_ratio{{{FLEET_FILTER}}})", "")],
        width=6,
        height=10,
        instant=True,
        transformations=_columns({"Value": "Headroom"}),
        sort_by=("Headroom", False),
        overrides=_node_links(gpus, overview_board),
    )
    board.panel(
        "table",
        "Faulty GPUs by node",
        "Per node, its faulty GPUs (lost, row remap failed or pending, uncorrected ECC, "
        "critical XID; throttling is on the GPUs board) of its GPUs; the most faulty first. "
        "The node links to its GPUs and Overview.",
        "short",
        [
            (f"sort_desc(vigil:node_gpus_unhealthy{{{FLEET_FILTER}}})", ""),
            (f"vigil:node_gpus{{{FLEET_FILTER}}}", ""),
        ],
        width=6,
        height=10,
        instant=True,
        transformations=_columns({"Value #A": "Faulty", "Value #B": "GPUs"}),
        sort_by=("Faulty", True),
        overrides=_node_links(gpus, overview_board),
    )
    board.panel(
        "table",
        "Alerts firing by node",
        "Per node, our alerts firing on it (ALERTS with a cause that carry its node); the most "
        "first. The node links to its Overview, whose table names them.",
        "short",
        [
            (
                "sort_desc(count by (cluster, node) "
                f'(ALERTS{{{OUR_ALERTS_FIRING},node!="",{FLEET_FILTER}}}))',
                "",
            )
        ],
        width=6,
        height=10,
        instant=True,
        transformations=_columns({"Value": "Alerts"}),
        sort_by=("Alerts", True),
        overrides=_node_links(overview_board, gpus),
    )
    return board


def logs() -> tuple[Board, list[dict]]:
    """The logs board and its variables beyond the datasources, instance and model."""
    board = Board(
        "vigil-logs",
        "llm-vigil / Logs",
        "Every log line of the stack, searchable by service, level (as Alloy labels it: lower "
        "case; error includes a crash's stack and any other line of the inference or exporter "
        "process that is not JSON; unknown is another service's line without a level), request "
        "id and trace id. " + NO_PLACE_IN_LOGS,
        loki=True,
    )
    log_variables = [
        {
            "type": "custom",
            "name": "service",
            "label": "service",
            "query": "inference,exporter",
            "includeAll": True,
            "multi": True,
            "allValue": ".+",
            "current": {},
            "hide": 0,
        },
        {
            "type": "custom",
            "name": "level",
            "label": "level",
            "query": ",".join(LOG_LEVELS),
            "includeAll": True,
            "multi": True,
            # All is every line, one without a level label too: ".+" would need a level (Loki
            # matches an absent label as the empty string, as Prometheus does). The service
            # matcher beside it never matches the empty string, as Loki requires of a selector.
            "allValue": ".*",
            "current": {},
            "hide": 0,
        },
        {
            "type": "textbox",
            "name": "request_id",
            "label": "request id",
            "query": "",
            "current": {"text": "", "value": ""},
            "hide": 0,
        },
        {
            "type": "textbox",
            "name": "trace_id",
            "label": "trace id",
            "query": "",
            "current": {"text": "", "value": ""},
            "hide": 0,
        },
    ]
    selector = '{service=~"$service", level=~"$level"}'
    filters = '| json | request_id =~ "$request_id.*" | trace_id =~ "$trace_id.*"'
    board.panel(
        "timeseries",
        "Log lines by level",
        "Lines per second by level.",
        "short",
        [(f"sum by (level) (rate({selector} [{RATE_INTERVAL}]))", "{{level}}")],
        logs=True,
        width=24,
        height=6,
    )
    board.panel(
        "logs",
        "Lines",
        "The lines matching the service, level, request id and trace id above; "
        "trace_id links to Tempo.",
        "none",
        [(f"{selector} {filters}", "")],
        logs=True,
        width=24,
        height=18,
    )
    return board, log_variables


def boards() -> dict[str, dict]:
    """File name -> dashboard."""
    logs_board, logs_variables = logs()
    return {
        "overview.json": overview().json(),
        "gpus.json": gpus().json(),
        "hang-forensics.json": hang_forensics().json(),
        "fleet.json": fleet().json(),
        "logs.json": logs_board.json(logs_variables),
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(board, indent=2) + "\n" for name, board in boards().items()}


def main() -> int:
    for name, text in render().items():
        (DASHBOARDS_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
