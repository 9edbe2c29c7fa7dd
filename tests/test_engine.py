"""The engine in-process: sampling, detokenization, stop strings, and failure containment."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from inference.config import Config
from inference.engine.detokenizer import IncrementalDetokenizer, decode_output
from inference.engine.engine import Engine
from inference.engine.queue import QueueFull, RequestQueue
from inference.engine.request import (
    EngineError,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from inference.engine.sampling import BatchSampler, _top_p_filter
from inference.model.loader import load_model


@pytest.fixture(scope="module")
def loaded(demo_dir):
    return load_model(Config(demo_dir=demo_dir))


def _request(loaded, text: str, **params) -> GenerationRequest:
    params.setdefault("max_tokens", 8)
    params.setdefault("temperature", 0.0)
    return GenerationRequest(
        request_id=text,
        prompt_ids=loaded.tokenizer(text)["input_ids"],
        params=SamplingParams(**params),
        stream=True,
        deadline_ns=time.perf_counter_ns() + 60 * 10**9,
    )


def _run(engine_queue: RequestQueue, requests: list[GenerationRequest]) -> list[list]:
    """Submit requests and collect each one's events until it ends."""
    events = [[] for _ in requests]
    done = threading.Semaphore(0)
    for request, sink in zip(requests, events, strict=True):

        def emit(event, sink=sink):
            sink.append(event)
            if isinstance(event, (Finished, Failed)):
                done.release()

        request.emit = emit
        engine_queue.put(request)
    for _ in requests:
        assert done.acquire(timeout=60), "a request never ended"
    return events


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    filtered = _top_p_filter(probs, torch.tensor([0.7, 1.0]))
    assert torch.allclose(filtered[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(filtered[1], probs[1])


def test_frequency_penalty_lowers_repeated_tokens():
    params = [
        SamplingParams(max_tokens=4, temperature=0.0, frequency_penalty=2.0),
        SamplingParams(max_tokens=4, temperature=0.0),
    ]
    sampler = BatchSampler.build(params, [[1, 1], [1, 1]], 4, [3], torch.device("cpu"), None)
    logits = torch.tensor([[0.0, 3.0, 0.5, 0.0], [0.0, 3.0, 0.5, 0.0]])
    assert sampler.select(logits, None).tolist() == [2, 1]  # 3 - 2*2 < 0.5 on the first row


def test_eos_suppression_and_tiny_temperatures():
    params = [
        SamplingParams(max_tokens=4, temperature=1e-46),
        SamplingParams(max_tokens=4, temperature=0.7),
    ]
    sampler = BatchSampler.build(
        params, [[], []], 4, [3], torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    logits = torch.tensor([[0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 90.0]])
    chosen = sampler.select(logits, torch.tensor([0, 1]))
    assert 3 not in chosen.tolist()  # the end token is masked for both rows
    assert chosen[0].item() == 0  # 1e-46 is treated as greedy, not divided by


def test_detokenizer_handles_split_characters_and_stop_strings(loaded):
    tokenizer = loaded.tokenizer
    text = "Grüße, 世界! END of it"
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [65], stop=("END",))
    shown = []
    for token in ids:
        piece = detok.add(token)
        assert "\ufffd" not in piece  # never half a character
        shown.append(piece)
        if detok.stopped:
            break
    shown.append(detok.flush())
    assert "".join(shown) == "Grüße, 世界! "
    assert detok.text == "Grüße, 世界! "
    assert decode_output(tokenizer, [65], ids) == text


def test_stop_string_is_never_partly_streamed(loaded):
    tokenizer = loaded.tokenizer
    detok = IncrementalDetokenizer(tokenizer, [], stop=("STOP",))
    pieces = [detok.add(t) for t in tokenizer("abSTObSTOPc")["input_ids"]]
    assert "".join(pieces) + detok.flush() == "abSTOb"


def test_queue_is_bounded_and_gives_back_dead_requests(loaded):
    queue = RequestQueue(2)
    first, second = _request(loaded, "a"), _request(loaded, "b")
    queue.put(first)
    queue.put(second)
    with pytest.raises(QueueFull):
        queue.put(_request(loaded, "c"))
    second.cancel()
    live, dead = queue.take(8)
    assert live == [first] and dead == [second]


def test_engine_contains_a_failing_step_and_keeps_serving(loaded):
    """A step that raises fails only the requests it held, with a 500; the engine goes on."""
    queue = RequestQueue(16)
    engine = Engine(loaded, queue, max_batch_size=4)
    real_forward = engine._forward
    calls = {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step of the first batch
            raise RuntimeError("simulated kernel failure")
        return real_forward(*args, **kwargs)

    engine._forward = flaky_forward
    engine.start()
    try:
        (events,) = _run(queue, [_request(loaded, "first", max_tokens=20)])
        assert isinstance(events[-1], Failed)
        assert events[-1].error.status == 500
        assert "simulated kernel failure" in events[-1].error.message
        assert engine.alive and engine.running == 0
        (events,) = _run(queue, [_request(loaded, "second", max_tokens=5)])
        assert isinstance(events[-1], Finished)
        assert "".join(e.text for e in events if isinstance(e, TextDelta))
    finally:
        engine.stop()
    assert not engine.alive


def test_stopping_the_engine_answers_everything_waiting(loaded):
    queue = RequestQueue(16)
    engine = Engine(loaded, queue, max_batch_size=1)
    waiting = _request(loaded, "never runs")
    events: list = []
    waiting.emit = events.append
    queue.put(waiting)  # the engine is not started: it stays queued
    engine.start()
    engine.stop()
    ended = [e for e in events if isinstance(e, (Finished, Failed))]
    assert len(ended) == 1
    if isinstance(ended[0], Failed):
        assert ended[0].error.status == 503


def _bare_request(events: list) -> GenerationRequest:
    return GenerationRequest(
        request_id="r",
        prompt_ids=[1, 2],
        params=SamplingParams(max_tokens=4),
        stream=False,
        deadline_ns=time.perf_counter_ns() + 60 * 10**9,
        emit=events.append,
    )


def test_a_request_ends_once_and_the_first_end_wins_across_threads():
    """The engine, the watchdog and the API may end a request at the same moment: exactly one
    end takes effect (its outcome, its one event); the others change nothing."""
    winners = set()
    stalled = EngineError(503, "server_unavailable", "stalled", code="engine_stalled")
    for attempt in range(300):
        events: list = []
        request = _bare_request(events)
        ends = {
            "fail": lambda request=request: request.fail(stalled),
            "finish": lambda request=request: request.finish("stop", "the text"),
        }
        barrier = threading.Barrier(len(ends))
        won: dict[str, bool] = {}

        def end(name, ends=ends, barrier=barrier, won=won):
            barrier.wait()
            won[name] = ends[name]()

        names = list(ends) if attempt % 2 else list(reversed(ends))  # either may arrive last
        threads = [threading.Thread(target=end, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(won.values()) == [False, True], won
        winners.update(name for name, first in won.items() if first)
        assert request.ended and len(events) == 1
        if won["fail"]:
            assert events == [Failed(stalled)]
            assert request.error is stalled and request.finish_reason is None
            assert request.text == ""
        else:
            assert events == [Finished("stop")]
            assert request.error is None and request.finish_reason == "stop"
            assert request.text == "the text"
        finished_ns = request.finished_ns
        assert not request.fail(EngineError(500, "server_error", "late"))
        assert not request.finish("length", "other")
        assert not request.end_cancelled()
        assert len(events) == 1 and request.finished_ns == finished_ns
    assert winners == {"fail", "finish"}  # the race went both ways


def test_a_cancelled_request_ends_without_an_event():
    events: list = []
    request = _bare_request(events)
    request.cancel()
    assert request.cancelled and not request.ended  # cancelling asks; the holder ends it
    assert request.end_cancelled() and request.ended
    assert not request.fail(EngineError(504, "timeout", "late"))
    assert events == [] and request.error is None


def test_the_engine_leaves_alone_a_request_another_thread_ended(loaded):
    """A request failed from outside while it decodes (as the watchdog does on a stall) gets no
    second end from the engine, which drops it at its next step and goes on serving."""
    queue = RequestQueue(16)
    engine = Engine(loaded, queue, max_batch_size=4)
    real_forward = engine._forward
    decoding = threading.Event()

    def slow_forward(*args, **kwargs):
        if not kwargs.get("prefill"):
            decoding.set()
            time.sleep(0.02)
        return real_forward(*args, **kwargs)

    engine._forward = slow_forward
    request = _request(loaded, "failed from outside", max_tokens=200, ignore_eos=True)
    events: list = []
    request.emit = events.append
    stalled = EngineError(503, "server_unavailable", "stalled", code="engine_stalled")
    engine.start()
    try:
        queue.put(request)
        assert decoding.wait(30)
        request.cancel()
        assert request.fail(stalled)
        deadline = time.monotonic() + 30
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0 and engine.held_requests() == []
        ended = [e for e in events if isinstance(e, (Finished, Failed))]
        assert ended == [Failed(stalled)]
        assert request.error is stalled and request.finish_reason is None
        (after,) = _run(queue, [_request(loaded, "next", max_tokens=3)])
        assert isinstance(after[-1], Finished)
    finally:
        engine.stop()


def test_a_stalled_request_keeps_its_503_when_the_engine_wakes_as_it_is_cancelled(loaded):
    """The watchdog fails a stalled request before it cancels it: an engine that moves again
    between the two, and ends the cancelled row, cannot take the client's 503 away."""
    from types import SimpleNamespace

    from inference.watchdog import Watchdog

    class WakesAtCancel(GenerationRequest):
        def cancel(self) -> None:
            super().cancel()
            self.end_cancelled()  # what the engine does with a cancelled row at its next step

    queue = RequestQueue(16)
    engine = Engine(loaded, queue, max_batch_size=4)
    real_forward = engine._forward
    decoding, release = threading.Event(), threading.Event()

    def hanging_forward(*args, **kwargs):
        if not kwargs.get("prefill"):
            decoding.set()
            release.wait(30)
        return real_forward(*args, **kwargs)

    engine._forward = hanging_forward
    request = WakesAtCancel(
        request_id="stalled",
        prompt_ids=loaded.tokenizer("stalled")["input_ids"],
        params=SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True),
        stream=True,
        deadline_ns=time.perf_counter_ns() + 60 * 10**9,
    )
    events: list = []
    request.emit = events.append
    from inference.vision.preprocess import Preprocessing

    service = SimpleNamespace(
        state="loaded", engine=engine, queue=queue, metrics=None, preprocessing=Preprocessing()
    )
    watchdog = Watchdog(service, stall_timeout=1.0, load_timeout=60.0, on_stall="report")
    engine.start()
    try:
        queue.put(request)
        assert decoding.wait(30)
        watchdog.check(time.perf_counter_ns() + 5 * 10**9)  # five seconds on: a stall
        assert watchdog.stall is not None and watchdog.stall.stage == "decode"
        failed = [e for e in events if isinstance(e, Failed)]
        assert [e.error.code for e in failed] == ["engine_stalled"], events
        assert request.cancelled and request.error is failed[0].error
    finally:
        release.set()
        engine.stop()
