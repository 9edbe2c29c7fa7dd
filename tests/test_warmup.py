"""The engine's warm-up after the model load (--warmup-tokens): the step-cost predictor knows the
decode at batch size 1 and a prefill before the first client request, no client request is
counted, 0 turns it off, a hang in it is a load stall, and a hang in the first client request's
decode is reported at the floor rather than at --stall-timeout."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import torch

from inference.config import Config, ConfigError, load_config
from inference.engine.engine import Engine, warmup_plan
from inference.engine.faults import Fault
from inference.engine.queue import RequestQueue
from inference.engine.request import Failed, Finished, GenerationRequest, SamplingParams
from inference.engine.step_cost import StepCosts
from inference.model.loader import load_model
from inference.service import WARMUP_PROMPT, InferenceService
from inference.watchdog import thread_stacks

FAULTY = ("--enable-fault-injection", "--on-stall", "report")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ---- the plan ----------------------------------------------------------------------------------


def test_the_plan_gives_each_stage_the_steps_a_prediction_needs():
    costs = StepCosts()
    prefills = costs.steps_to_predict + 1
    assert costs.steps_to_predict == costs.warmup + costs.min_samples == 5
    plan = warmup_plan(24, prefills)  # the default
    assert plan == [4] * 6
    assert len(plan) - costs.warmup >= costs.min_samples  # prefills learned
    assert sum(plan) - len(plan) - costs.warmup >= costs.min_samples  # decode steps learned
    # 11 tokens, the least the option's help names: 6 prefills and 5 decode steps.
    assert warmup_plan(11, prefills) == [2, 2, 2, 2, 2, 1]
    assert warmup_plan(3, prefills) == [1, 1, 1]
    assert warmup_plan(0, prefills) == []


def test_the_option_is_a_whole_number_from_zero():
    assert Config().warmup_tokens == 24
    assert load_config(["--warmup-tokens", "0"], environ={}).warmup_tokens == 0
    assert load_config([], environ={"VIGIL_INFERENCE_WARMUP_TOKENS": "40"}).warmup_tokens == 40
    with pytest.raises(ConfigError, match="--warmup-tokens"):
        load_config(["--warmup-tokens", "-1"], environ={})


# ---- the engine ------------------------------------------------------------------------------


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


@pytest.fixture(scope="module")
def loaded(demo_dir):
    return load_model(Config(demo_dir=demo_dir))


def _sampled_text(engine: Engine, queue: RequestQueue, loaded) -> list[int]:
    """One sampled (temperature 1) completion through the running engine: its token ids."""
    ended = threading.Event()
    request = GenerationRequest(
        request_id="sampled",
        prompt_ids=loaded.tokenizer("once upon a time")["input_ids"],
        params=SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True),
        stream=False,
        deadline_ns=time.perf_counter_ns() + 60 * 10**9,
        emit=lambda event: ended.set() if isinstance(event, (Finished, Failed)) else None,
    )
    queue.put(request)
    assert ended.wait(60) and request.error is None
    return list(request.output_ids)


def test_the_engine_learns_both_stages_tells_no_observer_and_keeps_the_seeded_sampling(loaded):
    ids = loaded.tokenizer(WARMUP_PROMPT)["input_ids"]
    outputs = []
    for warm in (False, True):
        queue, observer = RequestQueue(8), RecordingObserver()
        engine = Engine(loaded, queue, max_batch_size=8, observer=observer, seed=7)
        device = engine.device_key
        if warm:
            done = engine.warm_up(ids, 24, timeout_s=60)
            assert done.error is None and done.tokens == 24 and done.generations == 6
            assert engine.step_costs.steps_seen(device, "prefill") == 6
            assert engine.step_costs.steps_seen(device, "decode") == 18
            assert engine.step_costs.predict(device, "decode", 1) is not None
            assert engine.step_costs.predict(device, "prefill", len(ids)) is not None
            assert observer.calls == []  # no step, batch or running count in the metrics
            assert len(queue) == 0 and engine.running == 0 and engine.held_requests() == []
            assert engine.stage == "idle" and engine.current_step is None
            assert engine.mean_request_seconds == 1.0
        else:
            assert engine.step_costs.predict(device, "decode", 1) is None
        engine.start()
        try:
            outputs.append(_sampled_text(engine, queue, loaded))
        finally:
            engine.stop()
        if warm:  # the client request reached the observer
            assert ("step", "decode", 1) in observer.calls
    assert outputs[0] == outputs[1]  # greedy warm-up: the seeded generator was not drawn from


def test_a_started_engine_does_not_warm_up(loaded):
    engine = Engine(loaded, RequestQueue(8), max_batch_size=8)
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="before it starts"):
            engine.warm_up([1, 2, 3], 8, timeout_s=60)
    finally:
        engine.stop()


def test_a_step_is_timed_until_the_host_has_its_tokens(loaded, monkeypatch):
    """The recorded step time includes the copy of the chosen tokens to the host, which on CUDA
    is where the step's kernels are waited for (engine._choose_and_accept). On the CPU, a copy
    made slow on the engine's clock (100 s per step, a fake clock: nothing is timed) must show
    in every recorded prefill and decode step."""
    import inference.engine.engine as engine_module
    from inference.engine.sampling import BatchSampler

    slow_s = 100.0
    offset = [0]

    class FakeTime:
        @staticmethod
        def perf_counter_ns() -> int:
            return time.perf_counter_ns() + offset[0]

    class SlowToHost(torch.Tensor):
        __torch_function__ = torch._C._disabled_torch_function_impl  # ops give plain tensors

        def tolist(self):
            offset[0] += int(slow_s * 1e9)  # the copy to the host takes 100 s
            return torch.Tensor.tolist(self)

    select = BatchSampler.select
    monkeypatch.setattr(
        BatchSampler, "select", lambda self, *a: select(self, *a).as_subclass(SlowToHost)
    )
    monkeypatch.setattr(engine_module, "time", FakeTime)
    engine = Engine(loaded, RequestQueue(8), max_batch_size=8)
    recorded: list[tuple[str, float]] = []
    learn = engine.step_costs.record
    monkeypatch.setattr(
        engine.step_costs,
        "record",
        lambda device, stage, units, seconds: (
            recorded.append((stage, seconds)),
            learn(device, stage, units, seconds),
        ),
    )
    done = engine.warm_up(loaded.tokenizer(WARMUP_PROMPT)["input_ids"], 11, timeout_s=3600)
    assert done.error is None and done.tokens == 11
    assert {stage for stage, _ in recorded} == {"prefill", "decode"}
    assert len(recorded) == 11  # each step: one copy, recorded once
    assert all(seconds >= slow_s for _, seconds in recorded), recorded


# ---- the service -------------------------------------------------------------------------------


def _service(tmp_path, demo_dir, **options) -> InferenceService:
    options.setdefault("on_stall", "report")
    return InferenceService(Config(demo_dir=demo_dir, state_dir=str(tmp_path), **options))


def test_after_the_load_decode_and_prefill_predict(tmp_path, demo_dir):
    service = _service(tmp_path, demo_dir)
    service.start()
    try:
        assert service.wait_loaded(120), service.load_error
        engine = service.engine
        ids = engine.loaded.tokenizer(WARMUP_PROMPT)["input_ids"]
        costs, device = engine.step_costs, engine.device_key
        assert costs.predict(device, "decode", 1) is not None
        assert costs.predict(device, "prefill", len(ids)) is not None
        assert len(service.queue) == 0 and engine.running == 0
    finally:
        service.stop()


def test_zero_warms_nothing_up(tmp_path, demo_dir):
    service = _service(tmp_path, demo_dir, warmup_tokens=0)
    service.start()
    try:
        assert service.wait_loaded(120), service.load_error
        costs, device = service.engine.step_costs, service.engine.device_key
        assert costs.steps_seen(device, "prefill") == costs.steps_seen(device, "decode") == 0
        assert costs.predict(device, "decode", 1) is None
    finally:
        service.stop()


def test_a_vision_language_model_warms_up_its_text_path(tmp_path, demo_dir):
    """Text only: decode and prefill predict; the vision tower has no history (its first image
    requests are judged against --stall-timeout until it has one)."""
    from inference.model.demo_vl import ensure_demo_vl_model

    ensure_demo_vl_model(demo_dir)
    service = _service(tmp_path, demo_dir, model="demo-vl")
    service.start()
    try:
        assert service.wait_loaded(180), service.load_error
        assert service.loaded.accepts_images
        costs, device = service.engine.step_costs, service.engine.device_key
        assert costs.predict(device, "decode", 1) is not None
        assert costs.predict(device, "prefill", 8) is not None
        assert costs.steps_seen(device, "vision") == 0
        assert costs.predict(device, "vision", 4) is None
    finally:
        service.stop()


def test_a_hang_in_the_warm_up_is_a_load_stall(tmp_path, demo_dir):
    """The warm-up runs on the loader's thread before the service is ready: a decode step that
    never returns there is caught by --load-timeout, as a hung load is. The allowance is cut to
    run out just after the hang begins (a whole load inside a short one would race it)."""
    service = _service(tmp_path, demo_dir, enable_fault_injection=True)
    service.faults.arm(Fault("hang", "decode", None))  # until released
    service.start()
    try:
        _wait(lambda: service.faults.fired, 120, "the hang in the warm-up's first decode step")
        assert service.state == "loading" and not service.ready
        assert service.watchdog.stall is None  # --load-timeout 900 has not run out
        loading_for = (time.perf_counter_ns() - service.load_started_ns) / 1e9
        service.watchdog.load_timeout = loading_for + 0.5
        _wait(lambda: service.watchdog.stall is not None, 30, "the load stall")
        stall = service.watchdog.stall
        assert stall.stage == "load" and stall.threshold_s == service.watchdog.load_timeout
        ok, health = service.health()
        assert not ok and health["status"] == "stalled" and health["stage"] == "load"
        assert service.engine is None  # not serving: the engine thread never started
        [loader] = [t for t in thread_stacks() if t["thread"] == "model-loader"]
        assert "warm_up" in loader["stack"] and "_decode_step" in loader["stack"]
    finally:
        service.stop()  # releases the hang; the load ends without starting the engine
    assert service.wait_loaded(60) is False
    assert service.engine is None


def test_a_failed_warm_up_is_reported_and_the_load_goes_on(tmp_path, demo_dir):
    """An error in the warm-up (here an injected out-of-memory at its first prefill) ends it
    with a warning; the model is served, and the first requests meet any lasting error."""
    service = _service(tmp_path, demo_dir, enable_fault_injection=True)
    service.faults.arm(Fault("oom", "prefill"))
    service.start()
    try:
        assert service.wait_loaded(120), service.load_error
        assert [fault.kind for fault in service.faults.fired] == ["oom"]
        costs, device = service.engine.step_costs, service.engine.device_key
        assert costs.steps_seen(device, "decode") == 0  # it stopped at the failed prefill
        assert service.engine.alive and len(service.queue) == 0
    finally:
        service.stop()


# ---- the real server ---------------------------------------------------------------------------


def _stall_reports(server) -> list[dict]:
    return [line for line in server.logs() if line["message"].startswith("stall report")]


def _requests_counted(server) -> float:
    try:
        return server.sample("inference_requests_total")
    except KeyError:  # no labelled child yet: nothing was counted
        return 0.0


def test_a_hang_in_the_first_client_decode_is_reported_at_the_floor(server_factory):
    server = server_factory(*FAULTY)
    [warmed] = [line for line in server.logs() if line["message"].startswith("engine warmed up")]
    assert warmed["predicted_decode_s"] is not None
    assert warmed["predicted_prefill_s"] is not None
    # The warm-up is no client request: not counted, not logged as one, no engine step counted.
    assert _requests_counted(server) == 0
    assert not [line for line in server.logs() if line.get("event") == "request_end"]
    for stage in ("prefill", "decode"):
        assert server.sample("inference_engine_steps_total", stage=stage) == 0

    response = requests.post(
        server.url("/debug/fault"),
        json={"fault": "hang", "stage": "decode", "seconds": 20},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    hung = requests.post(
        server.url("/v1/completions"),
        json={"model": "demo", "prompt": "hello", "max_tokens": 16, "ignore_eos": True},
        headers={"X-Request-Id": "first"},
        timeout=120,
    )
    assert hung.status_code == 503 and hung.json()["error"]["code"] == "engine_stalled"
    [report] = _stall_reports(server)
    assert report["stage"] == "decode" and report["step_units"] == 1
    assert report["predicted_step_s"] is not None
    assert report["threshold_s"] == 5.0 and report["stall_timeout_s"] == 30.0
    assert "--stall-floor" in report["message"]
    # The client's request is counted and logged, once.
    server.wait_for(lambda: _requests_counted(server) == 1, 10, "the request counted")
    ends = [line for line in server.logs() if line.get("event") == "request_end"]
    assert [line["request_id"] for line in ends] == ["first"]


def test_no_warm_up_for_a_model_that_failed_to_load(server_factory, tmp_path):
    server = server_factory(model=str(tmp_path / "no-such-model"), ready=False)
    server.wait_for(
        lambda: requests.get(server.url("/ready"), timeout=5).json()["status"] == "failed",
        timeout=60,
        what="the failed load",
    )
    messages = [line["message"] for line in server.logs()]
    assert any("model load failed" in message for message in messages)
    assert not [message for message in messages if message.startswith("engine warm")]
