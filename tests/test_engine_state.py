"""The engines' own state as the exporter reads it from their /metrics: requests running and
waiting and the progress it keeps, on literal expositions written as each engine writes them
(names, types and labels from docs/engines.md), then through a real HTTP server."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from alerts.engines import PROFILES
from exporter.collectors.engines import EngineStateCollector
from exporter.engine_state import EngineStateTracker, ExpositionError, read_exposition
from exporter.probe import TargetProber
from vigil.engines import ENGINES, SERIES

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"

# vLLM 0.33.0, V1 engine with two engine cores (data parallel): prometheus_client in one
# process, so counters come with _total and a _created gauge; model_name and engine on every
# series (vllm/v1/metrics/loggers.py :527, :537, :747, :798; docs/engines.md). The
# iteration_tokens_total histogram has _total in its base name and must not be taken for a
# counter.
VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{m}"}} 3.0
vllm:num_requests_running{{engine="1",model_name="{m}"}} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{m}"}} 1.0
vllm:num_requests_waiting{{engine="1",model_name="{m}"}} 0.0
# HELP vllm:kv_cache_usage_perc KV-Cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{m}"}} 0.42
vllm:kv_cache_usage_perc{{engine="1",model_name="{m}"}} 0.4
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="{m}"}} {p0}
vllm:prompt_tokens_total{{engine="1",model_name="{m}"}} {p1}
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{{engine="0",model_name="{m}"}} 1.7679e+09
vllm:prompt_tokens_created{{engine="1",model_name="{m}"}} 1.7679e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="{m}"}} {g0}
vllm:generation_tokens_total{{engine="1",model_name="{m}"}} {g1}
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{{engine="0",model_name="{m}"}} 1.7679e+09
vllm:generation_tokens_created{{engine="1",model_name="{m}"}} 1.7679e+09
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{engine="0",le="1.0",model_name="{m}"}} 9.0
vllm:iteration_tokens_total_bucket{{engine="0",le="+Inf",model_name="{m}"}} 31.0
vllm:iteration_tokens_total_count{{engine="0",model_name="{m}"}} 31.0
vllm:iteration_tokens_total_sum{{engine="0",model_name="{m}"}} 4211.0
# HELP http_requests_total Total number of requests by method, status and handler.
# TYPE http_requests_total counter
http_requests_total{{handler="/v1/completions",method="POST",status="2xx"}} 12.0
"""


def vllm(p0=100, p1=50, g0=1000, g1=500, m=LLAMA) -> str:
    return VLLM.format(p0=float(p0), p1=float(p1), g0=float(g0), g1=float(g1), m=m)


# SGLang 0.5.23 with --enable-metrics: prometheus_client in multiprocess mode (no _created, no
# pid on mostrecent gauges). Scheduler gauges carry model_name and the ranks (attention-TP rank
# 0 only by default); the tokenizer's counters carry model_name, engine_type and is_streaming
# (observability/metrics_collector.py :364, :370, :432, :1860, :1804-1819).
SGLANG = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"}} {run}
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"}} 4.0
# HELP sglang:num_used_tokens The number of used tokens.
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"}} {used}
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"}} 0.12
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{{engine_type="unified",is_streaming="true",model_name="qwen"}} {gen}
sglang:generation_tokens_total{{engine_type="unified",is_streaming="false",model_name="qwen"}} 7.0
"""


def sglang(run=2, used=1000, gen=300) -> str:
    return SGLANG.format(run=float(run), used=float(used), gen=float(gen))


# TGI v3.3.7's router: metrics-exporter-prometheus 0.15.3 render(): counters under their bare
# name, WITHOUT _total; a blank line between families; no model label (backends/v3/src
# backend.rs :170, :305-381, queue.rs :143; docs/engines.md).
TGI = """\
# HELP tgi_batch_current_size Current batch size
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size {run}

# HELP tgi_queue_size Current queue size
# TYPE tgi_queue_size gauge
tgi_queue_size {queue}

# HELP tgi_batch_inference_count Inference calls per method (prefill or decode)
# TYPE tgi_batch_inference_count counter
tgi_batch_inference_count{{method="prefill"}} {prefill}
tgi_batch_inference_count{{method="decode"}} {decode}

# HELP tgi_batch_inference_success Number of successful inference calls per method
# TYPE tgi_batch_inference_success counter
tgi_batch_inference_success{{method="prefill"}} {prefill}
tgi_batch_inference_success{{method="decode"}} {decode}

# TYPE tgi_request_success counter
tgi_request_success 12

# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{{le="0.00015"}} 0
tgi_request_duration_bucket{{le="+Inf"}} 12
tgi_request_duration_sum 31.5
tgi_request_duration_count 12
"""


def tgi(run=4, queue=2, prefill=10, decode=900) -> str:
    return TGI.format(run=run, queue=queue, prefill=prefill, decode=decode)


# This project's own server (inference/telemetry/catalog.py), as its GET /metrics writes it:
# multiprocess mode, gauges per live pid, forward passes by stage.
VIGIL = """\
# HELP inference_engine_steps_total Forward passes of the engine by stage (prefill, decode).
# TYPE inference_engine_steps_total counter
inference_engine_steps_total{{model="demo",stage="prefill"}} {prefill}
inference_engine_steps_total{{model="demo",stage="decode"}} {decode}
# HELP inference_queue_depth Requests waiting for a batch slot.
# TYPE inference_queue_depth gauge
inference_queue_depth{{model="demo",pid="26876"}} {queue}
# HELP inference_requests_running Requests in the running batch (being prefilled or decoded).
# TYPE inference_requests_running gauge
inference_requests_running{{model="demo",pid="26876"}} {run}
"""


def vigil(prefill=1, decode=3, queue=0, run=1) -> str:
    return VIGIL.format(
        prefill=float(prefill), decode=float(decode), queue=float(queue), run=float(run)
    )


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _tracker(engine: str) -> tuple[EngineStateTracker, Clock]:
    clock = Clock()
    return EngineStateTracker("http://127.0.0.1:8000", engine, clock), clock


def _model(tracker: EngineStateTracker, model: str = ""):
    (state,) = [m for m in tracker.snapshot().models if m.model == model]
    return state


def test_the_series_are_those_of_the_recording_rules():
    """vigil/engines.py names what alerts/engines.py maps: the same gauges, model label and
    progress series, for every engine."""
    assert set(SERIES) == set(ENGINES) == {p.engine for p in PROFILES}
    for profile in PROFILES:
        series = SERIES[profile.engine]
        assert series.running == profile.running and series.waiting == profile.waiting
        assert series.model_label == profile.model_label
        in_rules = set(
            re.findall(r"(?:rate|changes)\(([a-zA-Z_:][a-zA-Z0-9_:]*)\[", profile.progress)
        )
        assert in_rules == set(series.progress_counters) | set(series.progress_gauges)
        assert set(re.findall(r"changes\(([a-zA-Z0-9_:]+)\[", profile.progress)) == set(
            series.progress_gauges
        )


def test_vllm_two_engine_cores_are_summed_per_model_and_both_token_counters_move():
    two_models = vllm() + vllm(p0=7, p1=0, g0=9, g1=0, m="other")
    readings = read_exposition(two_models, SERIES["vllm"])
    assert set(readings) == {LLAMA, "other"}
    assert readings[LLAMA].running == 5.0 and readings[LLAMA].waiting == 1.0
    assert sorted(readings[LLAMA].counters.values()) == [50.0, 100.0, 500.0, 1000.0]
    # The KV-cache gauge per engine core (its changes are progress); neither _created nor the
    # _total histogram.
    assert sorted(readings[LLAMA].gauges.values()) == [0.4, 0.42]
    tracker, clock = _tracker("vllm")
    tracker.observe(vllm())
    first = _model(tracker, LLAMA)
    assert (first.running, first.waiting, first.progress_total) == (5.0, 1.0, 0.0)
    assert first.pending and first.last_progress_at == clock.now
    clock.now += 10
    tracker.observe(vllm(p0=164, g0=1001, g1=502))  # a chunked prefill on core 0, decoding
    later = _model(tracker, LLAMA)
    assert later.progress_total == 64 + 1 + 2 and later.last_progress_at == clock.now
    assert later.stalled_for(clock.now + 30) == 30.0


def test_tgi_counters_without_total_are_read_under_their_own_name():
    # prometheus_client's parser renames a typed counter's samples to ..._total: the reason
    # the comments are left out before parsing.
    typed = {s.name for f in text_string_to_metric_families(tgi()) for s in f.samples}
    assert "tgi_batch_inference_count_total" in typed
    readings = read_exposition(tgi(), SERIES["tgi"])
    assert set(readings) == {""}  # no model label
    assert readings[""].running == 4.0 and readings[""].waiting == 2.0
    assert sorted(readings[""].counters.values()) == [10.0, 900.0]
    tracker, clock = _tracker("tgi")
    tracker.observe(tgi())
    clock.now += 5
    tracker.observe(tgi(prefill=11, decode=950))
    state = _model(tracker)
    assert state.progress_total == 51.0 and state.last_progress_at == clock.now


def test_sglang_counts_each_change_of_its_used_tokens_gauge():
    tracker, clock = _tracker("sglang")
    tracker.observe(sglang())
    assert _model(tracker, "qwen").running == 2.0 and _model(tracker, "qwen").waiting == 4.0
    clock.now += 1
    tracker.observe(sglang(used=1040))  # decoding: the gauge republished, no request finished
    assert _model(tracker, "qwen").progress_total == 1.0
    clock.now += 1
    tracker.observe(sglang(used=1040))  # the same value: no progress
    assert _model(tracker, "qwen").progress_total == 1.0
    assert _model(tracker, "qwen").last_progress_at == clock.now - 1
    tracker.observe(sglang(used=980, gen=340))  # a request finished with 40 tokens
    assert _model(tracker, "qwen").progress_total == 1.0 + 1.0 + 40.0


def test_our_own_server_per_pid_gauges_and_steps():
    tracker, clock = _tracker("vigil")
    tracker.observe(vigil())
    clock.now += 1
    tracker.observe(vigil(decode=40, queue=2))
    state = _model(tracker, "demo")
    assert (state.running, state.waiting, state.progress_total) == (1.0, 2.0, 37.0)


def test_a_counter_reset_keeps_the_progress_monotonic():
    """The engine restarted: its counters start again from 0; what it did since is added."""
    tracker, clock = _tracker("vllm")
    seen = []
    for p0, g0 in ((100, 1000), (150, 1200), (0, 0), (20, 30), (25, 31)):
        clock.now += 1
        tracker.observe(vllm(p0=p0, p1=50, g0=g0, g1=500))
        seen.append(_model(tracker, LLAMA).progress_total)
    assert seen == [0.0, 250.0, 250.0, 300.0, 306.0]
    assert seen == sorted(seen)


def test_a_failed_read_keeps_the_last_requests_and_stops_progress():
    tracker, clock = _tracker("vllm")
    tracker.observe(vllm())
    clock.now += 1
    tracker.observe(vllm(g0=1100))
    moved_at = clock.now
    for _ in range(3):
        clock.now += 5
        tracker.failed("ReadTimeout: read timed out")
    snapshot = tracker.snapshot()
    assert not snapshot.up and snapshot.error == "ReadTimeout: read timed out"
    (state,) = snapshot.models
    assert (state.running, state.waiting, state.progress_total) == (5.0, 1.0, 100.0)
    assert state.last_progress_at == moved_at and state.stalled_for(clock.now) == 15.0
    tracker.observe(vllm(g0=1100))
    assert tracker.snapshot().up


def test_an_engine_that_refuses_connections_is_gone_not_hung():
    """Connection refused: nothing listens (stopped or crashed), so its requests are no longer
    known and it is not reported hung; its progress total stays."""
    tracker, clock = _tracker("vllm")
    tracker.observe(vllm())
    clock.now += 1
    tracker.observe(vllm(g0=1100))
    tracker.failed("ConnectionError: connection refused", gone=True)
    (state,) = tracker.snapshot().models
    assert (state.running, state.waiting, state.progress_total) == (None, None, 100.0)
    assert state.stalled_for(clock.now + 600) in (None, 0.0)


def test_a_stall_counts_from_when_work_arrived_not_from_the_last_progress():
    tracker, clock = _tracker("tgi")
    tracker.observe(tgi(run=0, queue=0))
    clock.now += 3600  # idle for an hour: not stalled
    tracker.observe(tgi(run=0, queue=0))
    assert _model(tracker).stalled_for(clock.now) == 0.0 and not _model(tracker).pending
    tracker.observe(tgi(run=0, queue=1))  # a request arrives and is not taken
    clock.now += 20
    tracker.observe(tgi(run=0, queue=1))
    assert _model(tracker).stalled_for(clock.now) == 20.0


def test_series_that_appear_later_count_from_zero_and_gone_models_are_not_pending():
    tracker, clock = _tracker("sglang")
    tracker.observe(sglang().split("# HELP sglang:generation_tokens_total")[0])
    tracker.observe(sglang(gen=300))  # the tokenizer's counters appear at the first request
    assert _model(tracker, "qwen").progress_total == 307.0
    tracker.observe(vigil())  # none of SGLang's series now: nothing known to be pending
    state = _model(tracker, "qwen")
    assert state.running is None and not state.pending and state.progress_total == 307.0


def test_a_bad_line_is_a_failed_read_that_quotes_it():
    with pytest.raises(ExpositionError, match=r"vllm:num_requests_running\{engine=\\?\"0"):
        read_exposition('vllm:num_requests_running{engine="0" 3\n', SERIES["vllm"])
    tracker, _ = _tracker("vllm")
    tracker.observe('vllm:num_requests_running{engine="0",model_name="m"} three\n')
    snapshot = tracker.snapshot()
    assert not snapshot.up and "cannot parse the line" in snapshot.error
    assert "three" in snapshot.error
    # Another engine's text, or none: read, but nothing of this engine in it.
    assert read_exposition(tgi(), SERIES["vllm"]) == {}
    assert read_exposition("", SERIES["vllm"]) == {}
    # Values that are not numbers of requests (NaN) are left out.
    readings = read_exposition("tgi_queue_size NaN\ntgi_batch_current_size 1\n", SERIES["tgi"])
    assert readings[""].waiting is None and readings[""].running == 1.0


class _Engine:
    """A real HTTP server that answers GET /metrics with whatever text it holds now."""

    def __init__(self, text: str):
        self.text = text
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path == "/metrics":
                    body, status = engine.text.encode(), 200
                elif self.path == "/v1/models":
                    body, status = b'{"data": [{"id": "bigcode/starcoder"}]}', 200
                else:
                    body, status = b"not here", 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _published(collector: EngineStateCollector) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


def test_the_probe_reads_the_engine_and_the_collector_publishes_it():
    engine = _Engine(tgi())
    try:
        prober = TargetProber(engine.url, engine="tgi", timeout=2, canary_interval=0)
        collector = EngineStateCollector([prober])
        assert _published(collector) == {}  # nothing read yet
        prober.run_once()
        engine.text = tgi(decode=905)
        prober.run_once()
        target = (("engine", "tgi"), ("model", "bigcode/starcoder"), ("target", engine.url))
        published = _published(collector)
        assert published[("vigil_engine_metrics_up", target[:1] + target[2:])] == 1.0
        assert published[("vigil_engine_requests_running", target)] == 4.0
        assert published[("vigil_engine_requests_waiting", target)] == 2.0
        assert published[("vigil_engine_progress_total", target)] == 5.0
        assert ("vigil_engine_last_progress_timestamp_seconds", target) in published
    finally:
        engine.stop()
    prober.run_once()  # nothing answers now (refused): gone, not frozen
    published = _published(collector)
    assert published[("vigil_engine_metrics_up", target[:1] + target[2:])] == 0.0
    assert ("vigil_engine_requests_running", target) not in published
    assert published[("vigil_engine_progress_total", target)] == 5.0


def test_a_recognised_engine_is_read_from_the_same_fetch():
    engine = _Engine(vllm())
    try:
        prober = TargetProber(engine.url, timeout=2, canary_interval=0)
        prober.run_once()
        state = prober.state()
        assert state.engine == "vllm" and state.engine_source == "recognised"
        assert state.engine_state is not None and state.engine_state.up
        assert [m.model for m in state.engine_state.models] == [LLAMA]
    finally:
        engine.stop()
