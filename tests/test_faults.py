"""The defences end to end through HTTP, with faults injected into the real engine: hangs (the
watchdog, both policies), slow steps (never a false stall), out-of-memory errors (split and
preemption, then serving on), empty outputs, crashes, and a model load that does not end."""

from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest
import requests
from conftest import chat_body

FAULTY = ("--enable-fault-injection",)
STALL_EXIT_CODE = 75


def _client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url("/v1"),
        api_key="x",
        max_retries=0,
        timeout=kwargs.pop("timeout", 60),
        **kwargs,
    )


def _arm(server, fault: str, **fields) -> dict:
    response = requests.post(
        server.url("/debug/fault"), json={"fault": fault, **fields}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def _complete(
    server, prompt: str = "tell me", request_id: str | None = None, **extra
) -> requests.Response:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 20, "temperature": 0, **extra}
    headers = {"X-Request-Id": request_id} if request_id else {}
    return requests.post(server.url("/v1/completions"), json=body, headers=headers, timeout=120)


def _fired(server, fault: str) -> float:
    try:
        return server.sample("inference_faults_injected_total", fault=fault)
    except KeyError:  # the series appears with the first fault of its kind
        return 0


def _wait_fired(server, fault: str, count: int = 1) -> None:
    server.wait_for(
        lambda: _fired(server, fault) >= count, timeout=30, what=f"the {fault} fault to fire"
    )


def _stall_reports(server) -> list[dict]:
    return [line for line in server.logs() if line["message"].startswith("stall report")]


def _stalled_request_lines(server) -> list[dict]:
    """The watchdog's line per stalled request: its ids at the top level, where Loki's | json
    finds them (the report's requests array is skipped by it)."""
    return [line for line in server.logs() if line.get("event") == "stalled_request"]


# ---- the route itself -----------------------------------------------------------------------


def test_fault_route_is_absent_without_the_flag(server_factory):
    server = server_factory()
    response = requests.post(server.url("/debug/fault"), json={"fault": "hang"}, timeout=10)
    assert response.status_code == 404
    assert "--enable-fault-injection" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"fault": "melt"}, "'fault'"),
        ({"fault": "hang", "stage": "sideways"}, "'stage'"),
        ({"fault": "slow"}, "needs 'seconds'"),
        ({"fault": "hang", "seconds": -1}, "'seconds'"),
        ({"fault": "oom", "seconds": 3}, "no meaning"),
        ({"fault": "hang", "colour": "red"}, "colour"),
    ],
)
def test_bad_fault_bodies_are_refused(faulty_server, body, message):
    response = requests.post(faulty_server.url("/debug/fault"), json=body, timeout=10)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert (
        requests.post(faulty_server.url("/debug/fault"), data=b"{", timeout=10).status_code == 400
    )


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory, demo_dir):
    from conftest import start_server

    started = start_server(tmp_path_factory.mktemp("faulty"), demo_dir, *FAULTY)
    yield started
    started.stop()


# ---- hangs and the watchdog -----------------------------------------------------------------


def test_decode_hang_is_reported_answered_and_recovered_from(server_factory):
    server = server_factory(*FAULTY, "--stall-timeout", "2", "--on-stall", "report")
    _arm(server, "hang", stage="decode", seconds=12)
    started = time.monotonic()
    response = _complete(server, request_id="hung-1", max_tokens=50, ignore_eos=True)
    waited = time.monotonic() - started
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "engine_stalled" and "decode" in error["message"]
    assert waited < 12, "the client waited for the hang to end instead of the watchdog"
    trace_id = response.headers["x-trace-id"]

    health = requests.get(server.url("/health"), timeout=5)
    assert health.status_code == 503
    assert health.json()["status"] == "stalled" and health.json()["stage"] == "decode"
    assert requests.get(server.url("/ready"), timeout=5).status_code == 503
    assert server.sample("inference_engine_stalled") == 1
    assert server.sample("inference_engine_stalls_total", stage="decode") == 1
    refused = _complete(server)  # while stalled: refused at once, not queued behind the hang
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stalled"

    [report] = _stall_reports(server)
    assert report["level"] == "ERROR" and report["stage"] == "decode"
    [pending] = report["requests"]
    assert pending["trace_id"] == trace_id and pending["stage"] == "decode"
    assert pending["request_id"] == "hung-1"
    assert pending["completion_tokens"] >= 1
    # The same request on a line of its own, ids at the top level, after the report.
    [stalled] = _stalled_request_lines(server)
    assert stalled["request_id"] == "hung-1" and stalled["trace_id"] == trace_id
    assert stalled["level"] == "ERROR" and stalled["stage"] == "decode"
    assert stalled["request_stage"] == "decode" and stalled["completion_tokens"] >= 1
    assert stalled["stalled_for_s"] == report["stalled_for_s"] and stalled["age_s"] > 0
    assert stalled["message"].startswith("stalled request hung-1 (at decode, ")
    lines = server.logs()
    assert lines.index(report) < lines.index(stalled)
    # and the request's own last line, failed by the watchdog, found by the same event field
    [ended] = [
        line
        for line in lines
        if line.get("event") == "request_end" and line["request_id"] == "hung-1"
    ]
    assert ended["outcome"] == "failed" and ended["trace_id"] == trace_id
    assert ended["status"] == 503 and ended["message"].startswith("request failed: ")
    engine_stack = next(t["stack"] for t in report["threads"] if t["thread"] == "engine")
    assert "_decode_step" in engine_stack and "fire" in engine_stack
    assert "the engine thread is at" in report["message"]

    # The hang ends: the engine moves, the process serves again.
    server.wait_for(
        lambda: requests.get(server.url("/health"), timeout=5).status_code == 200,
        timeout=30,
        what="recovery",
    )
    assert server.sample("inference_engine_stalled") == 0
    assert _complete(server).status_code == 200
    assert server.sample("inference_requests_in_flight") == 0
    assert server.sample("inference_faults_injected_total", fault="hang", stage="decode") == 1
    assert any("moves again" in line["message"] for line in server.logs())


def test_prefill_hang_with_exit_policy_exits_with_its_code(server_factory):
    server = server_factory(*FAULTY, "--stall-timeout", "2")  # --on-stall exit is the default
    _arm(server, "hang", stage="prefill")  # for ever
    response = _complete(server, request_id="hung-2")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_stalled"
    assert server.process.wait(timeout=30) == STALL_EXIT_CODE
    [report] = _stall_reports(server)
    assert report["stage"] == "prefill" and report["on_stall"] == "exit"
    [stalled] = _stalled_request_lines(server)  # written before the exit
    assert stalled["request_id"] == "hung-2"
    assert stalled["trace_id"] == response.headers["x-trace-id"]
    assert stalled["stage"] == "prefill" and stalled["request_stage"] == "prefill"
    assert "exiting with status 75" in report["message"]
    engine_stack = next(t["stack"] for t in report["threads"] if t["thread"] == "engine")
    assert "_prefill" in engine_stack


def test_progress_and_idleness_are_never_a_stall(server_factory):
    server = server_factory(*FAULTY, "--stall-timeout", "1", "--on-stall", "report")
    # Each decode step takes 0.4 s, 15 of them: 6 s of generation, always below the threshold
    # between two steps, far above it in total.
    _arm(server, "slow", stage="decode", seconds=0.4, steps=15)
    response = _complete(server, max_tokens=20, ignore_eos=True)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 20
    time.sleep(3)  # idle for three thresholds
    assert requests.get(server.url("/health"), timeout=5).status_code == 200
    for stage in ("load", "schedule", "prefill", "decode"):
        assert server.sample("inference_engine_stalls_total", stage=stage) == 0
    assert server.sample("inference_engine_stalled") == 0
    assert _stall_reports(server) == []


def test_a_load_past_its_allowance_is_a_stall(server_factory):
    from test_loading import _StalledHub

    hub = _StalledHub()
    try:
        server = server_factory(
            *FAULTY,
            "--load-timeout",
            "1",
            "--on-stall",
            "report",
            model="example-org/stalled-model",
            ready=False,
            env={
                "HF_ENDPOINT": hub.url,
                "HF_HUB_OFFLINE": "0",
                "HF_HUB_ETAG_TIMEOUT": "120",
                "HF_HUB_DOWNLOAD_TIMEOUT": "120",
                "HF_HOME": str(server_factory.tmp / "hf"),
            },
        )
        server.wait_for(lambda: _stall_reports(server), timeout=30, what="the stall report")
        health = requests.get(server.url("/health"), timeout=5)
        assert health.status_code == 503 and health.json()["stage"] == "load"
        assert server.sample("inference_engine_stalls_total", stage="load") == 1
        [report] = _stall_reports(server)
        assert _stalled_request_lines(server) == []  # no request had arrived
        loader = next(t["stack"] for t in report["threads"] if t["thread"] == "model-loader")
        assert "load_model" in loader
        assert "model-loader thread is at" in report["message"]
    finally:
        hub.close()


# ---- out of memory --------------------------------------------------------------------------


def test_oom_in_decode_preempts_half_the_batch_and_everyone_finishes(server_factory):
    # float32: recomputing a preempted row must give the very tokens decoding would have.
    server = server_factory(*FAULTY, "--seed", "1", "--dtype", "float32")
    client = _client(server)
    prompts = ["first prompt", "second one", "and a third"]

    def run(prompt: str):
        return client.completions.create(
            model="demo",
            prompt=prompt,
            max_tokens=40,
            temperature=0,
            extra_body={"ignore_eos": True},
        )

    alone = [run(p).choices[0].text for p in prompts]
    # Three arrive while one slow step holds the engine, so they join its batch as one group;
    # then an OOM in the middle of the model's next decode step.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # long enough to be seen running on a fast GPU too
        warm = pool.submit(
            lambda: client.completions.create(
                model="demo",
                prompt="keep the engine busy",
                max_tokens=400,
                extra_body={"ignore_eos": True},
            )
        )
        server.wait_for(
            lambda: server.sample("inference_requests_running") == 1,
            timeout=30,
            what="the first request to run",
        )
        _arm(server, "slow", stage="decode", seconds=2)
        _wait_fired(server, "slow")
        futures = [pool.submit(run, p) for p in prompts]
        _arm(server, "oom", stage="decode")
        answers = [f.result() for f in futures]
        warm.result()
    assert [a.choices[0].text for a in answers] == alone  # the recomputed rows lost nothing
    assert all(a.usage.completion_tokens == 40 for a in answers)
    assert server.sample("inference_out_of_memory_errors_total", stage="decode") == 1
    assert any("preempted after running out of memory" in line["message"] for line in server.logs())
    assert server.sample("inference_requests_running") == 0
    assert server.sample("inference_requests_in_flight") == 0


def test_oom_in_prefill_splits_the_group_or_answers_503(server_factory):
    server = server_factory(*FAULTY)
    # A group of four prefilled together (queued behind one slow step) runs out of memory:
    # retried in halves, all four are answered.
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        first = pool.submit(_complete, server, "occupy", max_tokens=400, ignore_eos=True)
        server.wait_for(
            lambda: server.sample("inference_requests_running") == 1,
            timeout=30,
            what="the first request to run",
        )
        _arm(server, "slow", stage="decode", seconds=2)
        _wait_fired(server, "slow")
        _arm(server, "oom", stage="prefill")
        group = [pool.submit(_complete, server, f"group {i}") for i in range(4)]
        results = [f.result() for f in group]
        assert first.result().status_code == 200
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 200, 200], [r.text for r in results]
    assert server.sample("inference_out_of_memory_errors_total", stage="prefill") == 1
    assert any("prefill retried with 2 of 4" in line["message"] for line in server.logs())

    # A single request that runs out of memory gets a 503 that names the condition.
    _arm(server, "oom", stage="prefill")
    response = _complete(server)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "out_of_memory" and "out of memory during prefill" in error["message"]
    assert response.headers["Retry-After"]
    assert server.sample("inference_out_of_memory_errors_total", stage="prefill") == 2
    # ...and the next request is served: nothing leaked.
    assert _complete(server).status_code == 200
    assert server.sample("inference_requests_in_flight") == 0
    assert server.sample("inference_requests_running") == 0
    assert server.sample("inference_requests_total", status="503", error_type="out_of_memory") == 1


# ---- silent failures and crashes ------------------------------------------------------------


def test_empty_output_is_counted_and_logged(server_factory):
    server = server_factory(*FAULTY)
    _arm(server, "empty")
    response = requests.post(
        server.url("/v1/chat/completions"), json=chat_body(max_tokens=10), timeout=60
    )
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 0
    assert server.sample("inference_empty_outputs_total", reason="immediate_eos") == 1
    warnings = [line for line in server.logs() if line["message"].startswith("empty output")]
    assert [w["request_id"] for w in warnings] == [body["id"]]
    assert warnings[0]["level"] == "WARNING" and warnings[0]["empty_reason"] == "immediate_eos"
    assert "event" not in warnings[0]  # only the request's last line is its request_end
    assert server.sample("inference_faults_injected_total", fault="empty", stage="prefill") == 1


def test_crash_kills_the_process_and_leaves_its_stacks(server_factory):
    server = server_factory(*FAULTY)
    _arm(server, "crash", stage="decode")
    with pytest.raises(requests.ConnectionError):
        _complete(server, max_tokens=10, ignore_eos=True)
    assert server.process.wait(timeout=30) == -11  # SIGSEGV
    text = server.log_path.read_text(errors="replace")
    assert "Fatal Python error: Segmentation fault" in text
    assert "_decode_step" in text  # faulthandler's dump of the engine thread
