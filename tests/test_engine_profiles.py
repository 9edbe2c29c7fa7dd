"""The engine profiles under promtool: each engine's series, named and labelled exactly as that
engine exposes them, recorded into the one vocabulary (alerts/engines.py), and the any-engine
hang alert on them: it fires when work is pending and no forward pass finishes, and stays quiet
for an idle engine, for one long prefill, and for generation that is slow but moves."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_alert_rules import _labels_only_rules, _rule_labels, _run_promtool, needs_promtool

pytestmark = needs_promtool
STEP = "15s"  # the scrape and evaluation interval of these tests

# One fixture per profile and release family. Each series is named and labelled as the engine
# exposes it; the sources are those cited in alerts/engines.py.
ENGINES = {
    # vLLM V1 >= 0.9.2 (vllm/v1/metrics/loggers.py @0.33.0: model_name and engine on every
    # series; counters scrape with _total).
    "vllm": {
        "labels": 'instance="gpu1:8000",job="vllm",model_name="glm",engine="0"',
        "running": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "progress": ["vllm:generation_tokens_total", "vllm:prompt_tokens_total"],
        "kv": "vllm:kv_cache_usage_perc",
        "at": {"instance": "gpu1:8000", "model": "glm", "engine": "vllm"},
    },
    # vLLM 0.8.0-0.8.2 (no engine label yet) with the KV gauge of its time,
    # vllm:gpu_cache_usage_perc (removed in 0.12.0).
    "vllm-0.8": {
        "labels": 'instance="gpu2:8000",job="vllm",model_name="glm"',
        "running": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "progress": ["vllm:generation_tokens_total", "vllm:prompt_tokens_total"],
        "kv": "vllm:gpu_cache_usage_perc",
        "at": {"instance": "gpu2:8000", "model": "glm", "engine": "vllm"},
    },
    # SGLang 0.4.10+ scheduler gauges (model_name, engine_type, tp_rank, pp_rank;
    # observability/metrics_collector.py @0.5.23); the KV pool's used tokens are republished
    # every decode log interval while it decodes.
    "sglang": {
        "labels": 'instance="gpu1:30000",job="sglang",model_name="glm",engine_type="unified",'
        'tp_rank="0",pp_rank="0"',
        "running": "sglang:num_running_reqs",
        "waiting": "sglang:num_queue_reqs",
        "progress": ["sglang:num_used_tokens"],
        "kv": "sglang:token_usage",
        "at": {"instance": "gpu1:30000", "model": "glm", "engine": "sglang"},
    },
    # TGI v3 router (router/src/server.rs, backends/v3/src/backend.rs @v3.3.7): no model label;
    # counters scrape WITHOUT _total (metrics-exporter-prometheus 0.15.3).
    "tgi": {
        "labels": 'instance="gpu1:3000",job="tgi"',
        "running": "tgi_batch_current_size",
        "waiting": "tgi_queue_size",
        "progress": ['tgi_batch_inference_count{method="decode"}'],
        "kv": None,
        "at": {"instance": "gpu1:3000", "engine": "tgi"},
    },
    # This project's process, published by the exporter (inference/telemetry/catalog.py).
    "vigil": {
        "labels": 'instance="n1:9400",job="vigil-exporter",model="glm",pid="7"',
        "running": "inference_requests_running",
        "waiting": "inference_queue_depth",
        "progress": ['inference_engine_steps_total{stage="decode"}'],
        "kv": None,
        "at": {"instance": "n1:9400", "model": "glm", "engine": "vigil"},
    },
}


def _series(name: str, labels: str) -> str:
    if "{" in name:  # a name with labels of its own
        base, own = name[:-1].split("{", 1)
        return f"{base}{{{labels},{own}}}"
    return f"{name}{{{labels}}}"


def _input(engine: dict, running: str, waiting: str, progress: str, kv: str = "0.5x40") -> list:
    labels = engine["labels"]
    series = [
        {"series": _series(engine["running"], labels), "values": running},
        {"series": _series(engine["waiting"], labels), "values": waiting},
    ]
    series += [{"series": _series(name, labels), "values": progress} for name in engine["progress"]]
    if engine["kv"]:
        series.append({"series": _series(engine["kv"], labels), "values": kv})
    return series


def _run(tmp_path: Path, tests: list[dict]) -> None:
    _run_promtool(tmp_path, tests, _labels_only_rules(tmp_path), evaluation_interval=STEP)


# 40 samples of 15 s: ten minutes. Scenario -> (running, waiting, progress, fires).
PENDING = ("1x40", "2x40")
ARRIVES_AT_2M = ("0x8 1x32", "0x40")  # an idle engine gets one request at minute 2
SCENARIOS = {
    # Work pending throughout; the engine stops at minute 2: no forward pass for 8 minutes.
    "hung": (*PENDING, "0+20x8 160x32", True),
    # Idle: nothing pending, nothing moves.
    "idle": ("0x40", "0x40", "0x40", False),
    # One forward pass of 105 s (a long prefill of an unchunked prompt), then decoding.
    "long prefill": (*PENDING, "0+20x8 160x6 180+20x26", False),
    # The same prefill as the first work of an idle engine, whose progress rate is already 0.
    "long prefill from idle": (*ARRIVES_AT_2M, "0x15 20+20x24", False),
    # The first request of an idle engine hangs in its prefill.
    "hung from idle": (*ARRIVES_AT_2M, "0x40", True),
    # Slow generation: one step every 30 s.
    "slow but moving": (
        *PENDING,
        " ".join(f"{n} {n}" for n in range(20)),
        False,
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_hang_alert_holds_for_every_engine(tmp_path, scenario):
    running, waiting, progress, fires = SCENARIOS[scenario]
    labels = _rule_labels()["InferenceEngineNoProgress"]
    tests = []
    for name, engine in ENGINES.items():
        tests.append(
            {
                "interval": STEP,
                "name": f"{name}: {scenario}",
                "input_series": _input(engine, running, waiting, progress),
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "InferenceEngineNoProgress",
                        "exp_alerts": [{"exp_labels": {**labels, **engine["at"]}}] if fires else [],
                    },
                    # Not before two minutes without progress (the hangs begin at 2m).
                    {
                        "eval_time": "3m45s",
                        "alertname": "InferenceEngineNoProgress",
                        "exp_alerts": [],
                    },
                ],
            }
        )
    _run(tmp_path, tests)


def test_every_engine_is_recorded_in_the_vocabulary(tmp_path):
    tests = []
    for name, engine in ENGINES.items():
        at = engine["at"]
        selector = ",".join(f'{k}="{v}"' for k, v in at.items())
        expected = [
            ("vigil:engine_requests_running", 1.0),
            ("vigil:engine_requests_waiting", 2.0),
        ]
        if engine["kv"]:
            expected.append(("vigil:engine_kv_cache_usage_ratio", 0.5))
        checks = [
            {
                "expr": f"{record}{{{selector}}}",
                "eval_time": "5m",
                "exp_samples": [{"labels": f"{record}{{{selector}}}", "value": value}],
            }
            for record, value in expected
        ]
        # Progress: above zero while the engine steps (the rate itself depends on the engine's
        # unit: tokens for vLLM, KV-pool updates for SGLang, forward passes for TGI and ours).
        checks.append(
            {
                "expr": f"vigil:engine_progress:rate1m{{{selector}}} > bool 0",
                "eval_time": "5m",
                "exp_samples": [{"labels": f"{{{selector}}}", "value": 1}],
            }
        )
        tests.append(
            {
                "interval": STEP,
                "name": f"{name}: vocabulary",
                "input_series": _input(engine, *PENDING, "0+20x40"),
                "promql_expr_test": checks,
            }
        )
    _run(tmp_path, tests)


# The exporter's own view of a target (exporter/engine_state.py), published under its job.
EXPORTER_VIEW = (
    'instance="n1:9400",job="vigil-exporter",target="http://gpu1:8000",engine="vllm",model="glm"'
)


def test_an_engine_prometheus_cannot_scrape_is_seen_hung_through_the_exporter(tmp_path):
    """A frozen engine answers no scrape (its own series go stale), but the exporter keeps
    publishing its last pending work and a progress counter that no longer moves."""
    labels = _rule_labels()["InferenceEngineNoProgress"]
    pending = [
        {"series": f"vigil_engine_requests_running{{{EXPORTER_VIEW}}}", "values": "1x40"},
        {"series": f"vigil_engine_requests_waiting{{{EXPORTER_VIEW}}}", "values": "2x40"},
    ]
    at = {
        "instance": "n1:9400",
        "target": "http://gpu1:8000",
        "address": "gpu1:8000",
        "engine": "vllm",
        "model": "glm",
    }
    vllm = ENGINES["vllm"]["labels"]

    def alert_test(name: str, extra: list, progress: str, fires: bool) -> dict:
        return {
            "interval": STEP,
            "name": name,
            "input_series": pending
            + [{"series": f"vigil_engine_progress_total{{{EXPORTER_VIEW}}}", "values": progress}]
            + extra,
            "alert_rule_test": [
                {
                    "eval_time": "10m",
                    "alertname": "InferenceEngineNoProgress",
                    "exp_alerts": [{"exp_labels": {**labels, **at}}] if fires else [],
                }
            ],
        }

    # vLLM's own series stop at minute 2 (it answers no scrape); the exporter's view goes on.
    frozen = [
        {"series": f"vllm:num_requests_running{{{vllm}}}", "values": "1x8"},
        {"series": f"vllm:generation_tokens_total{{{vllm}}}", "values": "0+20x8"},
    ]
    # Prometheus sees the engine progress itself: the exporter's stale view does not count.
    moving = [
        {"series": f"vllm:num_requests_running{{{vllm}}}", "values": "1x40"},
        {"series": f"vllm:num_requests_waiting{{{vllm}}}", "values": "2x40"},
        {"series": f"vllm:generation_tokens_total{{{vllm}}}", "values": "0+20x40"},
    ]
    _run(
        tmp_path,
        [
            alert_test("frozen: only the exporter sees it", frozen, "0+20x8 160x32", True),
            alert_test("exporter-only engine, moving", [], "0+20x40", False),
            alert_test(
                "the exporter's view lags, the engine moves", moving, "0+20x8 160x32", False
            ),
        ],
    )


def test_the_canary_alert_holds_for_engines_without_ready(tmp_path):
    """vLLM, SGLang and TGI answer /ready with 404: their failing canary fires the alert."""
    labels = _rule_labels()["InferenceProbeFailing"]
    probe = 'instance="n1:9400",job="vigil-exporter",target="http://gpu1:8000"'

    def case(ready_status: str, fires: bool) -> dict:
        return {
            "interval": STEP,
            "name": f"/ready answers {ready_status}",
            "input_series": [
                {"series": f'vigil_probe_success{{{probe},check="canary"}}', "values": "0x40"},
                {"series": f'vigil_probe_success{{{probe},check="health"}}', "values": "1x40"},
                {"series": f'vigil_probe_success{{{probe},check="ready"}}', "values": "0x40"},
                {
                    "series": f'vigil_probe_http_status{{{probe},check="ready"}}',
                    "values": f"{ready_status}x40",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "10m",
                    "alertname": "InferenceProbeFailing",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                **labels,
                                "instance": "n1:9400",
                                "target": "http://gpu1:8000",
                            }
                        }
                    ]
                    if fires
                    else [],
                }
            ],
        }

    # 404: no /ready at all (a foreign engine); 503: our server still loading its model.
    _run(tmp_path, [case("404", True), case("503", False)])
