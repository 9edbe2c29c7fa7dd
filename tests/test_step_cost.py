"""A stall threshold that follows the work in flight: the step-cost model on literal step
timings, the watchdog's threshold with a fake engine and a fake clock (the defaults' logic:
the floor for a short-step engine, factor x prediction for a long-step one, never past the
bound), and through a real server with faults injected (slow steps raise no stall, a hang is
reported with its predicted and actual durations)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import requests

from inference.config import Config
from inference.engine.errors import stalled_error
from inference.engine.request import GenerationRequest, SamplingParams
from inference.engine.step_cost import StepCosts, bucket
from inference.vision.preprocess import Preprocessing
from inference.watchdog import Watchdog, stall_threshold

CPU = "cpu"
S = 10**9  # nanoseconds in a second


def _learn(costs: StepCosts, stage: str, units: int, seconds: list[float], device=CPU) -> None:
    for s in seconds:
        costs.record(device, stage, units, s)


# ---- the step-cost model on literal timings -----------------------------------------------


def test_buckets_are_powers_of_two():
    assert [bucket(u) for u in (0, 1, 2, 3, 4, 7, 8, 15, 16, 1000)] == [
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        10,
    ]


def test_steady_state_predicts_the_median_step():
    costs = StepCosts()
    _learn(costs, "decode", 1, [0.010, 0.011, 0.009] * 10)
    assert costs.predict(CPU, "decode", 1) == pytest.approx(0.010)


def test_warm_up_steps_are_not_learned_and_few_steps_predict_nothing():
    costs = StepCosts(warmup=2, min_samples=3)
    # The first steps after the load: kernels chosen, caches filled.
    _learn(costs, "decode", 1, [4.0, 1.5])
    assert costs.predict(CPU, "decode", 1) is None
    _learn(costs, "decode", 1, [0.02, 0.02])
    assert costs.predict(CPU, "decode", 1) is None  # two steps learned: not enough to say
    _learn(costs, "decode", 1, [0.03])
    assert costs.predict(CPU, "decode", 1) == pytest.approx(0.02)
    assert costs.steps_seen(CPU, "decode") == 5
    # Warm-up is per stage: the first prefills are not learned either.
    _learn(costs, "prefill", 100, [9.0, 9.0, 0.1, 0.1, 0.1])
    assert costs.predict(CPU, "prefill", 100) == pytest.approx(0.1)


def test_one_outlier_does_not_move_the_prediction():
    costs = StepCosts()
    _learn(costs, "decode", 2, [0.05] * 20)
    before = costs.predict(CPU, "decode", 2)
    _learn(costs, "decode", 2, [30.0])  # one step that took 600 times as long
    assert costs.predict(CPU, "decode", 2) == before == pytest.approx(0.05)


def test_a_lasting_change_moves_the_prediction_once_it_fills_half_the_window():
    costs = StepCosts(window=32, warmup=0)
    _learn(costs, "decode", 1, [0.01] * 32)
    _learn(costs, "decode", 1, [0.2] * 15)
    assert costs.predict(CPU, "decode", 1) == pytest.approx(0.01)
    _learn(costs, "decode", 1, [0.2] * 2)
    assert costs.predict(CPU, "decode", 1) == pytest.approx(0.2)
    _learn(costs, "decode", 1, [0.01] * 32)  # and back: the window holds the last 32 only
    assert costs.predict(CPU, "decode", 1) == pytest.approx(0.01)


def test_a_change_of_batch_size():
    costs = StepCosts(warmup=0)
    _learn(costs, "decode", 1, [0.010] * 5)
    # Unseen, bigger: scaled up from the nearest smaller size, in proportion.
    assert costs.predict(CPU, "decode", 4) == pytest.approx(0.040)
    assert costs.predict(CPU, "decode", 3) == pytest.approx(0.030)
    # Once a size is seen, its own steps say (batching costs less than in proportion).
    _learn(costs, "decode", 4, [0.015] * 5)
    assert costs.predict(CPU, "decode", 4) == pytest.approx(0.015)
    # Same bucket (4-7), more rows: scaled up; fewer rows of the bucket: not scaled down.
    assert costs.predict(CPU, "decode", 6) == pytest.approx(0.0225)
    _learn(costs, "decode", 7, [0.021] * 6)
    # Batches of 4 and of 7 share a bucket: of their steps, the median (a 7's, scaled to 4: no
    # less), so that a bucket's smaller sizes are never under-predicted.
    assert costs.predict(CPU, "decode", 4) == pytest.approx(0.021)
    assert costs.predict(CPU, "decode", 7) == pytest.approx(0.021)
    # Bigger than anything seen: from the nearest smaller bucket (4-7), not from batch 1:
    # 0.021 x 8/7.
    assert costs.predict(CPU, "decode", 8) == pytest.approx(0.024)
    # Smaller than anything seen: the nearest bigger bucket, unscaled.
    only_big = StepCosts(warmup=0)
    _learn(only_big, "decode", 8, [0.05] * 5)
    assert only_big.predict(CPU, "decode", 2) == pytest.approx(0.05)


def test_an_unseen_longer_prefill_is_scaled_quadratically():
    costs = StepCosts(warmup=0)
    _learn(costs, "prefill", 100, [0.1] * 5)
    assert costs.predict(CPU, "prefill", 100) == pytest.approx(0.1)
    assert costs.predict(CPU, "prefill", 120) == pytest.approx(0.12)  # same bucket: in proportion
    assert costs.predict(CPU, "prefill", 400) == pytest.approx(1.6)  # 4x the tokens: 16x


def test_a_device_or_stage_with_no_history_predicts_nothing():
    costs = StepCosts(warmup=0)
    _learn(costs, "decode", 1, [0.01] * 10)
    _learn(costs, "prefill", 50, [0.02] * 10)
    assert costs.predict("cuda:0", "decode", 1) is None
    assert costs.predict("cuda:1", "prefill", 50) is None
    assert costs.predict(CPU, "vision", 1000) is None
    _learn(costs, "decode", 1, [0.5] * 10, device="cuda:0")
    assert costs.predict("cuda:0", "decode", 1) == pytest.approx(0.5)
    assert costs.predict(CPU, "decode", 1) == pytest.approx(0.01)  # each device its own


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        StepCosts(window=2, min_samples=3)


# ---- the threshold ------------------------------------------------------------------------


def test_the_threshold_is_the_factor_times_the_prediction_between_floor_and_bound():
    limits = {"floor": 5.0, "factor": 8.0, "bound": 30.0}
    assert stall_threshold(0.01, **limits) == 5.0  # a short step: the floor
    assert stall_threshold(2.0, **limits) == 16.0  # a long one: the factor
    assert stall_threshold(10.0, **limits) == 30.0  # never past the bound
    assert stall_threshold(None, **limits) == 30.0  # no prediction: the bound
    # A bound below the floor wins (as --stall-timeout 2 does in tests).
    assert stall_threshold(0.01, floor=5.0, factor=8.0, bound=2.0) == 2.0


class FakeEngine:
    """What the watchdog reads of the engine, on a clock the test moves."""

    def __init__(self, step_costs: StepCosts):
        self.step_costs = step_costs
        self.device_key = CPU
        self.alive = True
        self.iterations = 10
        self.thread_id = None
        self.last_progress_ns = 0
        self.stage = "idle"
        self.current_step: tuple[str, int, int] | None = None
        self.held: list[GenerationRequest] = []

    def held_requests(self) -> list[GenerationRequest]:
        return list(self.held)

    def run(self, stage: str, units: int, at_ns: int) -> None:
        """A step of ``stage`` starts at ``at_ns``, right after the last progress."""
        self.stage = stage
        self.current_step = (stage, units, at_ns)
        self.last_progress_ns = at_ns


class FakeQueue:
    def __init__(self) -> None:
        self.items: list[GenerationRequest] = []

    def snapshot(self) -> list[GenerationRequest]:
        return list(self.items)

    def drain(self) -> list[GenerationRequest]:
        items, self.items = self.items, []
        return items


def _pending(arrival_ns: int) -> GenerationRequest:
    return GenerationRequest(
        request_id="r1",
        prompt_ids=[1, 2, 3],
        params=SamplingParams(max_tokens=8),
        stream=False,
        deadline_ns=arrival_ns + 3600 * S,
        arrival_ns=arrival_ns,
    )


@pytest.fixture
def setup():
    """A watchdog with the shipped defaults (floor, factor, bound) over a fake engine that has
    learned a short decode (10 ms at batch 1), a long prefill (2 s for 512 tokens) and a short
    one (30 ms for 8 tokens)."""
    defaults = Config()
    costs = StepCosts()
    _learn(costs, "decode", 1, [0.010] * 10)
    _learn(costs, "prefill", 512, [2.0] * 10)
    _learn(costs, "prefill", 8, [0.03] * 10)
    engine = FakeEngine(costs)
    queue = FakeQueue()
    service = SimpleNamespace(
        state="loaded", engine=engine, queue=queue, metrics=None, preprocessing=Preprocessing()
    )
    watchdog = Watchdog(
        service,
        stall_timeout=defaults.stall_timeout,
        stall_floor=defaults.stall_floor,
        stall_factor=defaults.stall_factor,
        load_timeout=defaults.load_timeout,
        on_stall="report",
        exit_process=lambda code: pytest.fail(f"exit({code}) with --on-stall report"),
    )
    request = _pending(0)
    engine.held.append(request)
    return SimpleNamespace(
        engine=engine, queue=queue, watchdog=watchdog, request=request, defaults=defaults
    )


def _first_stall_s(watchdog: Watchdog, start_ns: int, until_s: float, step_s: float = 0.05):
    """Seconds after ``start_ns`` at which the watchdog first calls a stall (None: never)."""
    ticks = int(until_s / step_s)
    for i in range(1, ticks + 1):
        watchdog.check(start_ns + round(i * step_s * S))
        if watchdog.stall is not None:
            return i * step_s
    return None


def test_defaults_are_the_documented_ones():
    defaults = Config()
    assert defaults.stall_floor == 5.0 and defaults.stall_timeout == 30.0
    assert defaults.stall_factor == 10.0  # see --stall-factor's help for the measurements


def test_a_short_step_engine_stalls_at_the_floor(setup):
    start = 1000 * S
    setup.engine.run("decode", 1, start)
    fired = _first_stall_s(setup.watchdog, start, 40)
    floor = setup.defaults.stall_floor
    assert fired is not None and floor < fired <= floor + 0.05 + 1e-9
    stall = setup.watchdog.stall
    assert stall.stage == "decode" and stall.threshold_s == floor
    assert stall.predicted_s == pytest.approx(0.010) and stall.units == 1
    assert setup.request.error.code == "engine_stalled"


def test_a_long_step_engine_stalls_at_the_factor_times_its_prediction(setup):
    start = 1000 * S
    setup.engine.run("prefill", 512, start)
    fired = _first_stall_s(setup.watchdog, start, 40)
    expected = setup.defaults.stall_factor * 2.0
    assert setup.defaults.stall_floor < expected < setup.defaults.stall_timeout
    assert fired is not None and expected < fired <= expected + 0.05 + 1e-9
    stall = setup.watchdog.stall
    assert stall.stage == "prefill" and stall.threshold_s == pytest.approx(expected)
    assert stall.predicted_s == pytest.approx(2.0) and stall.units == 512


def test_never_past_the_bound(setup):
    start = 1000 * S
    # Four times the tokens learned: predicted 16 x 2 s, far beyond the bound.
    setup.engine.run("prefill", 2048, start)
    bound = setup.defaults.stall_timeout
    fired = _first_stall_s(setup.watchdog, start, 60)
    assert fired is not None and bound < fired <= bound + 0.05 + 1e-9
    assert setup.watchdog.stall.threshold_s == bound
    assert setup.watchdog.stall.predicted_s == pytest.approx(32.0)


def test_with_no_prediction_the_bound_applies(setup):
    start = 1000 * S
    setup.engine.run("vision", 4096, start)  # nothing learned for the vision tower
    fired = _first_stall_s(setup.watchdog, start, 60)
    bound = setup.defaults.stall_timeout
    assert fired is not None and bound < fired <= bound + 0.05 + 1e-9
    assert setup.watchdog.stall.predicted_s is None


def test_pending_work_the_engine_does_not_take_stalls_at_the_floor(setup):
    setup.engine.held.clear()
    setup.engine.stage, setup.engine.current_step = "idle", None
    setup.engine.last_progress_ns = 0
    arrival = 1000 * S
    setup.queue.items.append(_pending(arrival))
    fired = _first_stall_s(setup.watchdog, arrival, 40)
    floor = setup.defaults.stall_floor
    assert fired is not None and floor < fired <= floor + 0.05 + 1e-9
    assert setup.watchdog.stall.stage == "schedule"


def test_a_slow_but_moving_decode_is_never_stalled(setup):
    """One step a second for 15 s: each step well below the floor."""
    start = 1000 * S
    for second in range(15):
        setup.engine.run("decode", 1, start + second * S)
        for tick in range(1, 20):
            setup.watchdog.check(start + second * S + tick * S // 20)
        setup.engine.step_costs.record(CPU, "decode", 1, 1.0)
    assert setup.watchdog.stall is None
    assert setup.request.error is None


def test_a_prefill_of_4_s_is_not_a_stall(setup):
    start = 1000 * S
    setup.engine.run("prefill", 8, start)  # a short prompt: predicted 30 ms
    assert _first_stall_s(setup.watchdog, start, 4.0) is None
    assert setup.watchdog.stall is None
    fired = _first_stall_s(setup.watchdog, start, 40)  # and had it hung: the floor
    assert fired is not None and setup.watchdog.stall.threshold_s == setup.defaults.stall_floor


def test_the_report_and_the_error_give_predicted_actual_and_threshold(setup):
    from loguru import logger

    records: list[dict] = []
    sink = logger.add(lambda message: records.append(message.record), level="ERROR")
    try:
        start = 1000 * S
        setup.engine.run("prefill", 512, start)
        setup.watchdog.check(start + 25 * S)
    finally:
        logger.remove(sink)
    [report] = [r for r in records if r["message"].startswith("stall report")]
    extra = report["extra"]
    factor = setup.defaults.stall_factor
    assert extra["predicted_step_s"] == pytest.approx(2.0)
    assert extra["threshold_s"] == pytest.approx(factor * 2.0)
    assert extra["stalled_for_s"] == pytest.approx(25.0)
    assert extra["stall_timeout_s"] == setup.defaults.stall_timeout
    assert extra["step_units"] == 512
    assert f"{factor:g} x the predicted 2 s" in report["message"]
    assert setup.request.error.message == stalled_error("prefill", 25.0, factor * 2.0).message


def test_the_reason_names_the_floor_and_the_bound(setup):
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="ERROR")
    try:
        setup.engine.run("decode", 1, 1000 * S)
        setup.watchdog.check(1006 * S)
    finally:
        logger.remove(sink)
    [report] = [m for m in messages if m.startswith("stall report")]
    assert "(threshold 5 s: --stall-floor, above" in report


def test_time_before_the_step_is_not_charged_to_the_step(setup):
    """4 s of work outside any step (admission, a failed pass retried) before a long prefill:
    the prefill is judged from its own start against its own threshold."""
    progress = 1000 * S
    setup.engine.run("prefill", 512, progress)  # its threshold: 10 x 2 s
    setup.engine.current_step = ("prefill", 512, progress + 4 * S)
    expected = setup.defaults.stall_factor * 2.0
    assert _first_stall_s(setup.watchdog, progress, 4 + expected - 0.1) is None
    fired = _first_stall_s(setup.watchdog, progress, 40)
    assert fired is not None and 4 + expected < fired <= 4 + expected + 0.05 + 1e-9
    stall = setup.watchdog.stall
    assert stall.in_step is True and stall.since_ns == progress + 4 * S
    assert stall.stalled_for_s(stall.detected_ns) == pytest.approx(fired - 4)


def test_time_outside_any_step_is_judged_against_the_floor(setup):
    """6 s between the last progress and the start of a long prefill: past the floor, though
    the prefill's own threshold (20 s) is far off; the report says it was outside a step."""
    from loguru import logger

    progress = 1000 * S
    setup.engine.run("prefill", 512, progress)
    setup.engine.current_step = ("prefill", 512, progress + 6 * S)
    records: list[dict] = []
    sink = logger.add(lambda message: records.append(message.record), level="ERROR")
    try:
        setup.watchdog.check(progress + 6 * S + S // 10)
    finally:
        logger.remove(sink)
    stall = setup.watchdog.stall
    assert stall is not None and stall.in_step is False
    assert stall.threshold_s == setup.defaults.stall_floor
    assert stall.outside_s == pytest.approx(6.0)
    [report] = [r for r in records if r["message"].startswith("stall report")]
    assert report["extra"]["span"] == "outside_step"
    assert "(outside any step)" in report["message"]
    assert "6 s outside any step" in report["message"]


def test_work_after_a_completed_step_is_judged_against_the_floor(setup):
    """A long prefill completed (progress at its end), then the engine spends time outside any
    step (stage still prefill): the floor applies, not the finished prefill's 20 s."""
    start = 1000 * S
    setup.engine.run("prefill", 512, start)
    setup.engine.last_progress_ns = start + 2 * S  # it completed after 2 s
    fired = _first_stall_s(setup.watchdog, start + 2 * S, 40)
    floor = setup.defaults.stall_floor
    assert fired is not None and floor < fired <= floor + 0.05 + 1e-9
    assert setup.watchdog.stall.in_step is False and setup.watchdog.stall.threshold_s == floor


def test_a_step_stall_says_it_was_the_step(setup):
    from loguru import logger

    records: list[dict] = []
    sink = logger.add(lambda message: records.append(message.record), level="ERROR")
    try:
        setup.engine.run("decode", 1, 1000 * S)
        setup.watchdog.check(1006 * S)
    finally:
        logger.remove(sink)
    [report] = [r for r in records if r["message"].startswith("stall report")]
    assert report["extra"]["span"] == "step"
    assert "(the running step)" in report["message"]


# ---- through a real server, faults injected --------------------------------------------------

FAULTY = ("--enable-fault-injection", "--on-stall", "report")


def _arm(server, fault: str, **fields) -> None:
    response = requests.post(
        server.url("/debug/fault"), json={"fault": fault, **fields}, timeout=10
    )
    assert response.status_code == 200, response.text


def _complete(server, request_id: str, **extra) -> requests.Response:
    body = {"model": "demo", "prompt": "tell me", "max_tokens": 8, "temperature": 0, **extra}
    return requests.post(
        server.url("/v1/completions"),
        json=body,
        headers={"X-Request-Id": request_id},
        timeout=120,
    )


def _warm_up(server, requests_: int = 6) -> None:
    """Enough steps for predictions: the first two of each stage are not learned, then three
    prefills of one size, and decode steps by the dozen."""
    for i in range(requests_):
        assert _complete(server, f"warm-{i}").status_code == 200


def _stall_reports(server) -> list[dict]:
    return [line for line in server.logs() if line["message"].startswith("stall report")]


def _no_stall(server) -> None:
    assert _stall_reports(server) == []
    for stage in ("load", "schedule", "vision", "prefill", "decode"):
        assert server.sample("inference_engine_stalls_total", stage=stage) == 0
    assert server.sample("inference_engine_stalled") == 0


def test_slow_steps_raise_no_stall_and_a_hang_is_reported_at_the_floor(server_factory):
    """The shipped floor, factor and bound: a decode at one step a second for 15 s and a
    prefill of 4 s are no stall; a hung decode step (predicted at milliseconds) is one past the
    5 s floor, long before the 30 s bound, and its report says so."""
    server = server_factory(*FAULTY)
    _warm_up(server)
    _arm(server, "slow", stage="decode", seconds=1.0, steps=15)
    slow = _complete(server, "slow-decode", max_tokens=20, ignore_eos=True)
    assert slow.status_code == 200, slow.text
    assert slow.json()["usage"]["completion_tokens"] == 20
    _arm(server, "slow", stage="prefill", seconds=4.0, steps=1)
    slow = _complete(server, "slow-prefill")
    assert slow.status_code == 200, slow.text
    _no_stall(server)

    _arm(server, "hang", stage="decode", seconds=15)
    hung = _complete(server, "hung", max_tokens=20, ignore_eos=True)
    assert hung.status_code == 503 and hung.json()["error"]["code"] == "engine_stalled"
    [report] = _stall_reports(server)
    assert report["stage"] == "decode" and report["step_units"] == 1
    predicted = report["predicted_step_s"]
    factor = Config().stall_factor
    assert predicted is not None and 0 < predicted * factor < 5.0
    assert report["threshold_s"] == 5.0 and report["stall_timeout_s"] == 30.0
    assert 5.0 < report["stalled_for_s"] < 30.0
    assert f"(threshold 5 s: --stall-floor, above {factor:g} x the predicted " in report["message"]
    health = requests.get(server.url("/health"), timeout=5).json()
    assert health["threshold_s"] == 5.0 and health["predicted_step_s"] == predicted


def test_a_hang_after_long_steps_is_reported_at_the_factor_times_their_prediction(
    server_factory,
):
    """Decode steps slowed to 0.5 s are learned; then a hang is called at the default factor
    (10) times that, above a floor of 2.5 s (smaller than the default, to keep the test short)."""
    server = server_factory(*FAULTY, "--stall-floor", "2.5")
    _warm_up(server, 1)
    _arm(server, "slow", stage="decode", seconds=0.5, steps=20)
    _arm(server, "hang", stage="decode", seconds=30)  # fires at the step after the slow ones
    hung = _complete(server, "hung-late", max_tokens=40, ignore_eos=True)
    assert hung.status_code == 503 and hung.json()["error"]["code"] == "engine_stalled"
    [report] = _stall_reports(server)
    assert report["stage"] == "decode"
    predicted, factor = report["predicted_step_s"], Config().stall_factor
    assert 0.5 <= predicted < 30 / factor
    assert report["threshold_s"] == pytest.approx(factor * predicted, abs=1e-3)
    assert report["threshold_s"] > 2.5
    assert report["stalled_for_s"] > report["threshold_s"]
    # threshold_s is rounded to 3 decimals, the message's figure to 3 significant digits: the
    # two can differ in the last digit (5.055... gives 5.05 and 5.06), so the words are checked.
    assert f"s: {factor:g} x the predicted" in report["message"]
    assert report["requests"][0]["completion_tokens"] > 20  # the slow steps went through
