"""The hang fast path end to end, with the shipped configuration files as they are (issue 18):
the inference process on the demo model with its default stall options (fault injection on),
the exporter, real Prometheus with alerts/prometheus.yml and every alerts/*.rules.yml, real
Alertmanager with alerts/alertmanager.yml, and a webhook receiver run here
(tests/shipped_pipeline.py moves only the addresses).

One pipeline serves every case. First the quiet ones, none of which may bring a hang-typed
notification (cause="hang") or a stall in the process: the model load (the inference process
starts while the rest already runs), idleness, decode that is slow but moves (one step a
second), a prefill slowed to 4 s, and a burst of 48 requests, more than a batch, that queue.
Then a decode that hangs must be notified, by InferenceEngineStalled or the fast any-engine
alert (both in the fast hang group). No assertion here is on time: the alert-latency benchmark
(bench/alert_latency.py) prints how long the notification took.

Not covered: a slowed model load. No fault slows the load (inference/engine/faults.py has the
stages preprocess, vision, prefill and decode); the quiet load here is the demo model's own.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml
from shipped_pipeline import HANG_CAUSE, Pipeline, log_time, start_pipeline

from alerts.rules import ALERTS_DIR
from inference.service import WARMUP_PROMPT

FAST_GROUP = "vigil-hangs-fast"
BURST = 48  # requests sent at once: more than --max-batch-size (8), fewer than --max-queue (64)


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    raise ValueError(duration)


def fast_group() -> dict:
    """The shipped fast hang group (alerts/hangs.rules.yml)."""
    groups = yaml.safe_load((ALERTS_DIR / "hangs.rules.yml").read_text())["groups"]
    [group] = [g for g in groups if g["name"] == FAST_GROUP]
    return group


def settle_seconds() -> float:
    """How long after a quiet case a hang alert it caused would still be on its way: the fast
    group's longest ``for``, a scrape and an evaluation interval each (the fast job scrapes at
    the group's interval), the hang route's group wait, and a margin."""
    group = fast_group()
    longest_for = max(_seconds(rule.get("for", "0s")) for rule in group["rules"])
    return longest_for + 2 * _seconds(group["interval"]) + 5


def _arm(server, fault: str, **fields) -> None:
    response = requests.post(
        server.url("/debug/fault"), json={"fault": fault, **fields}, timeout=10
    )
    assert response.status_code == 200, response.text


def _complete(server, max_tokens: int, prompt: str = "tell me") -> requests.Response:
    return requests.post(
        server.url("/v1/completions"),
        json={
            "model": "demo",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
        timeout=120,
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, demo_dir):
    started = start_pipeline(
        tmp_path_factory.mktemp("hang-fast-path"), demo_dir, server_first=False
    )
    yield started
    started.stop()


def _assert_quiet(pipeline: Pipeline, since: float, what: str) -> None:
    """No hang-typed notification since ``since``, no hang alert firing in Prometheus over that
    time, and no stall declared by the process."""
    noted = pipeline.hang_alerts(after=since)
    assert not noted, f"{what}: hang-typed notification(s): {[a['labels'] for a in noted]}"
    window = max(1, round(time.time() - since))
    fired = pipeline.prometheus.query(
        f'max_over_time(ALERTS{{cause="{HANG_CAUSE}", alertstate="firing"}}[{window}s])'
    )
    assert not fired, f"{what}: hang alerts fired in Prometheus: {[s['metric'] for s in fired]}"
    stalls = pipeline.server.sample("inference_engine_stalls_total")
    assert stalls == 0, f"{what}: the watchdog declared {stalls} stall(s)"


def test_quiet_cases_raise_nothing_hang_typed(pipeline):
    settle = settle_seconds()
    began = time.time()

    # The model load, watched: Prometheus scrapes the exporter (which already probes the
    # inference port) while the process starts and loads its model.
    server = pipeline.start_server()
    pipeline.receiver.wait_for("Watchdog", timeout=120)  # the whole pipeline works
    pipeline.prometheus.wait_for(
        'max(inference_model_load_state{state="loaded"})', lambda v: v == 1, timeout=60
    )
    time.sleep(settle)
    _assert_quiet(pipeline, began, "model load")

    # Idleness: several evaluations of the fast group with nothing to do.
    idle = time.time()
    time.sleep(settle)
    _assert_quiet(pipeline, idle, "idle")

    # Decode that is slow but moves: 16 steps of one second each, at batch size 1, which the
    # load's warm-up taught the predictor (milliseconds a step on the demo model). The threshold
    # in force is the floor (5 s, above 10 x the learned step) until the 1 s steps fill half
    # the predictor's window; its median then moves to 1 s and the threshold to 10 x 1 s =
    # 10 s (below the 30 s bound). Either way each 1 s step is far inside it: no stall.
    slow = time.time()
    _arm(server, "slow", stage="decode", seconds=1, steps=16)
    response = _complete(server, max_tokens=20)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 20
    assert time.time() - slow >= 16  # the steps were slowed (a fact, not a goal)

    # A prefill slowed to 4 s, of the warm-up's own prompt: its size bucket has a prediction
    # from the load (tests/test_warmup.py checks it), so the threshold in force is the floor
    # (5 s, above 10 x the learned milliseconds), not the 30 s bound a prompt of an unseen
    # size would get. 4 s against the floor: no stall counted (asserted below).
    _arm(server, "slow", stage="prefill", seconds=4, steps=1)
    response = _complete(server, max_tokens=8, prompt=WARMUP_PROMPT)
    assert response.status_code == 200, response.text

    # A burst that queues: 48 requests at once, a batch holds 8.
    waited = server.sample("inference_queue_wait_seconds_sum")
    with ThreadPoolExecutor(BURST) as pool:
        answers = list(pool.map(lambda i: _complete(server, 48, f"burst {i}"), range(BURST)))
    assert [a.status_code for a in answers] == [200] * BURST, [a.text for a in answers[:3]]
    assert server.sample("inference_queue_wait_seconds_sum") - waited > 1.0  # they queued

    time.sleep(settle)
    _assert_quiet(pipeline, slow, "slow decode, slow prefill, queued burst")
    faults = [line["fault"] for line in server.logs() if line["message"].startswith("injected")]
    fired = [(f["fault"], f["stage"]) for f in faults]
    assert fired.count(("slow", "decode")) == 16 and fired.count(("slow", "prefill")) == 1, fired


def test_an_injected_hang_is_notified(pipeline):
    server = pipeline.server or pipeline.start_server()
    pipeline.receiver.wait_for("Watchdog", timeout=120)
    armed = server.hang_a_request(max_tokens=32)
    alert = pipeline.wait_for_hang_alert(after=armed, timeout=180)
    fast = {rule["alert"] for rule in fast_group()["rules"] if "alert" in rule}
    assert "InferenceEngineStalled" in fast and len(fast) >= 2, fast
    assert alert["labels"]["alertname"] in fast, alert["labels"]
    assert alert["labels"]["severity"] == "critical"
    assert log_time(server, "injected fault hang fires", armed - 1) is not None
    # With the default --on-stall exit the watchdog reports the stall and the process exits 75.
    server.process.wait(timeout=60)
    assert server.process.returncode == 75
    assert any(line["message"].startswith("stall report") for line in server.logs())
