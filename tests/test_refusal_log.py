"""Refusals under a storm: one full line per interval and a summary, the metrics exact."""

from __future__ import annotations

import concurrent.futures

import requests
from conftest import chat_body

from inference.telemetry.refusals import RefusalLog, is_refusal


def test_the_first_refusal_of_an_interval_is_logged_and_the_rest_summed():
    timers: list = []
    log = RefusalLog(interval_s=10, timer=lambda seconds, action: timers.append(action))
    full: list[str] = []
    for reason in ["queue_full"] * 5 + ["model_not_ready"] * 2:
        log.refused(lambda reason=reason: full.append(reason), reason)
    assert full == ["queue_full"]  # the first in full, at once
    assert len(timers) == 1
    summaries: list[dict] = []
    from loguru import logger

    sink = logger.add(lambda message: summaries.append(message.record["extra"]), level="WARNING")
    try:
        timers[0]()  # the interval ends
    finally:
        logger.remove(sink)
    assert summaries == [{"refusals": {"queue_full": 4, "model_not_ready": 2}, "interval_s": 10}]
    # A new interval: its first refusal is logged in full again.
    log.refused(lambda: full.append("again"), "queue_full")
    assert full == ["queue_full", "again"] and len(timers) == 2


def test_what_counts_as_a_refusal():
    assert is_refusal(429, started=False)
    assert is_refusal(503, started=False)  # loading, stalled: turned away at the door
    assert not is_refusal(503, started=True)  # accepted work that failed: logged in full
    assert not is_refusal(400, started=False) and not is_refusal(200, started=True)


def test_a_429_storm_logs_a_summary_and_counts_every_refusal(server_factory):
    server = server_factory(
        "--max-queue",
        "1",
        "--max-batch-size",
        "1",
        "--enable-fault-injection",
        # The batch is held on purpose: the watchdog out of the way (the bound, and the floor
        # that applies once the step has a prediction from the load's warm-up).
        "--stall-timeout",
        "3600",
        "--stall-floor",
        "3600",
    )
    server.hang_a_request(seconds=60)  # holds the batch; the next request fills the queue
    server.wait_for(lambda: server.sample("inference_requests_running") == 1, what="running")
    url = server.url("/v1/chat/completions")
    queued = concurrent.futures.ThreadPoolExecutor(1).submit(
        requests.post, url, json=chat_body(max_tokens=2), timeout=120
    )
    server.wait_for(lambda: server.sample("inference_queue_depth") == 1, what="a queued request")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda _: requests.post(url, json=chat_body(max_tokens=2), timeout=30).status_code,
                range(120),
            )
        )
    assert statuses == [429] * 120
    assert server.sample("inference_requests_total", status="429") == 120  # exact

    def summed() -> int:
        return sum(line.get("refusals", {}).get("queue_full", 0) for line in server.logs())

    server.wait_for(lambda: summed() > 0, 30, "the refusals' summary")
    full = [line for line in server.logs() if line["message"].startswith("request rejected")]
    assert len(full) + summed() == 120
    # The summaries carry a request's last-line fields: the query for requests finds them.
    summaries = [line for line in server.logs() if "refusals" in line]
    assert summaries and all(
        (line["event"], line["outcome"], line["status"], line["level"])
        == ("request_end", "rejected", 429, "WARNING")
        for line in summaries
    )
    assert len(full) <= 4  # one per 10 s interval (the storm lasts a few seconds)
    assert not queued.done() or queued.result().status_code in (200, 503, 504)
