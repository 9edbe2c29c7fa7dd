"""The stall watchdog: a thread that notices when the engine stops making progress.

Stalled means work is pending (waiting in the queue or held by the engine) and the engine has
made no progress (no prefill, decode or vision step completed) for too long, counted from the
later of the last progress and the arrival of the oldest pending request (so an idle server, or
a long generation that keeps producing tokens, is never stalled). That time is two spans, each
judged on its own: the step under way, from its start, against that step's threshold (below);
and the time before it, outside any step (admission, a failed pass retried after running out of
memory, detokenization, a merge; all of it when no step runs), against ``--stall-floor``. The
stall report says which ran past (``span``: ``step`` or ``outside_step``).

The threshold follows the work in flight: the engine learns what its steps cost on its device
(engine/step_cost.py) and predicts how long the running one should take; the step is stalled
past ``max(--stall-floor, --stall-factor x predicted)``, and never later than ``--stall-timeout``,
the upper bound, which also applies alone while there is no prediction (the first steps after
the load, an unseen stage). By stage:
- ``prefill``, ``decode`` and ``vision`` (the vision tower): as above;
- ``schedule`` (work pending, the engine taking none): the floor (at most the bound). No step
  runs, so nothing legitimate takes long: an idle engine takes queued work within one turn of
  its loop (half a second at most), and a batch that holds new requests back (memory, a cache
  that cannot grow) is decoding, so its stage is decode;
- ``vision`` in preprocessing (a request's images being decoded by a worker thread, before the
  queue): the bound. Its cost follows the images' sizes and formats and the CPU's share, which
  nothing here learns; and such a hang holds only its own request while the engine serves the
  others, so detecting it sooner buys little, and a false alarm with ``--on-stall exit`` would
  restart the process under everyone;
- ``load``: ``--load-timeout``, the load's own allowance.

On a stall the watchdog, once per stall:
- logs at ERROR one stall report: the predicted and the actual duration and the threshold used
  (``predicted_step_s``, ``stalled_for_s``, ``threshold_s``; ``stall_timeout_s`` the bound),
  every thread's Python stack, and each pending request (id, trace id, stage, tokens so far,
  age);
- then one ERROR line per stalled request (``event`` ``stalled_request``) with its
  ``request_id`` and ``trace_id`` at the top level of the line: Loki's ``| json`` skips arrays
  (the report's ``requests``), so following a request id in the logs finds these lines;
- counts it by stage and marks the process stalled in its metrics; ``/health`` answers 503;
- answers every pending request with a 503 (``engine_stalled``), so no client waits for ever;
- with ``--on-stall exit`` (the default), exits with status 75 (STALL_EXIT_CODE) so that the
  supervisor restarts the process; with ``report``, keeps serving 503s until the engine moves
  again, and then serves as before.
The exit is armed before the report is written: a wedged log pipe cannot keep the process alive.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from .engine.errors import stalled_error
from .engine.request import GenerationRequest

STALL_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure; restarting is the cure
EXIT_GRACE_S = 1.0  # time for the 503s to reach the clients before the process exits


@dataclass
class Stall:
    stage: str  # load, schedule (pending work the engine does not take), vision, prefill, decode
    since_ns: int  # perf_counter_ns of the last progress (or of the oldest pending arrival)
    detected_ns: int
    engine_iterations: int = 0  # the engine loop's count when the stall was seen
    preprocessing: Any = None  # the PreprocessJob that hangs, for a stall in preprocessing
    threshold_s: float = 0.0  # the threshold it ran past
    predicted_s: float | None = None  # the step's predicted duration, when there was one
    units: int | None = None  # the step's units of work (tokens, batch size, patches)
    # True: the running step ran past its threshold (since_ns its start); False: the time
    # outside any step (since the last progress, up to the step's start, outside_s long) ran
    # past the floor; None: neither applies (load, preprocessing)
    in_step: bool | None = None
    outside_s: float | None = None

    def stalled_for_s(self, now_ns: int | None = None) -> float:
        return ((now_ns or time.perf_counter_ns()) - self.since_ns) / 1e9


def stall_threshold(
    predicted_s: float | None, *, floor: float, factor: float, bound: float
) -> float:
    """Seconds the running step may take before it is a stall: ``max(floor, factor x
    predicted)``, never more than ``bound``; the bound alone without a prediction."""
    if predicted_s is None:
        return bound
    return min(bound, max(floor, factor * predicted_s))


def describe_threshold(stall: Stall, *, floor: float, factor: float, bound: float) -> str:
    """Where a stall's threshold came from, in words, for the report."""
    if stall.stage == "load":
        return "--load-timeout"
    if stall.in_step is False:
        if stall.threshold_s >= bound:
            return "--stall-timeout"
        if stall.stage == "schedule":
            return "--stall-floor: no step runs"
        return (
            f"--stall-floor: {stall.outside_s:.3g} s outside any step, since the last "
            f"progress, before or between {stall.stage} steps"
        )
    if stall.preprocessing is not None:
        return "--stall-timeout: preprocessing is timed by the bound"
    if stall.predicted_s is None:
        return "--stall-timeout, no prediction for this step yet"
    predicted = f"{factor:g} x the predicted {stall.predicted_s:.3g} s"
    if stall.threshold_s >= bound:
        return f"--stall-timeout, the bound ({predicted}, floor {floor:g} s)"
    if stall.threshold_s <= floor:
        return f"--stall-floor, above {predicted}"
    return predicted


def thread_stacks() -> list[dict[str, Any]]:
    """Every thread's current Python stack, innermost frame last."""
    frames = sys._current_frames()
    stacks = []
    for thread in threading.enumerate():
        frame = frames.get(thread.ident)
        if frame is not None:
            stacks.append(
                {
                    "thread": thread.name,
                    "thread_id": thread.ident,
                    "daemon": thread.daemon,
                    "stack": "".join(traceback.format_stack(frame)),
                }
            )
    return stacks


def thread_name(name: str) -> str:
    """``engine`` -> "engine thread"; a name that says thread already is kept."""
    return name if name.lower().endswith("thread") else f"{name} thread"


def _request_stage(request: GenerationRequest) -> str:
    if request.scheduled_ns is None:
        return "queued"
    if request.vision_started_ns is not None and request.vision_finished_ns is None:
        return "vision"
    return "prefill" if request.first_token_ns is None else "decode"


def describe_requests(requests: list[GenerationRequest], now_ns: int) -> list[dict[str, Any]]:
    return [
        {
            "request_id": r.request_id,
            "trace_id": r.trace_id,
            "stage": _request_stage(r),
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "age_s": round((now_ns - r.arrival_ns) / 1e9, 3),
        }
        for r in requests
    ]


def log_stalled_requests(stall: Stall, described: list[dict[str, Any]], seconds: float) -> None:
    """One ERROR line per stalled request, after the stall report.

    The report lists the requests in an array, which Loki's ``| json`` skips ("Arrays are
    skipped": https://grafana.com/docs/loki/latest/query/log_queries/#json), so a search by
    request or trace id would miss the stall. Here ``request_id`` and ``trace_id`` are top-level
    fields, with the request's own stage (``request_stage``) beside the stall's (``stage``).
    """
    for request in described:
        counts = {k: request[k] for k in ("prompt_tokens", "completion_tokens") if k in request}
        logger.bind(
            event="stalled_request",
            request_id=request["request_id"],
            trace_id=request["trace_id"],
            request_stage=request["stage"],
            **counts,
            age_s=request["age_s"],
            stage=stall.stage,
            stalled_for_s=round(seconds, 3),
        ).error(
            "stalled request {} (at {}, {:.1f} s since it arrived): the engine made no progress "
            "in {} for {:.1f} s; see the stall report",
            request["request_id"],
            request["stage"],
            request["age_s"],
            stall.stage,
            seconds,
        )


class Watchdog:
    def __init__(
        self,
        service: Any,
        *,
        stall_timeout: float,
        load_timeout: float,
        on_stall: str,
        stall_floor: float = 5.0,
        stall_factor: float = 10.0,
        exit_process: Callable[[int], None] = os._exit,
        interval: float | None = None,
    ):
        self.service = service
        self.stall_timeout = stall_timeout  # the upper bound, and the threshold with no prediction
        self.stall_floor = stall_floor
        self.stall_factor = stall_factor
        self.load_timeout = load_timeout
        self.on_stall = on_stall
        self._exit = exit_process
        shortest = min(stall_timeout, stall_floor)
        self.interval = interval or min(1.0, max(0.05, shortest / 20))
        self.stall: Stall | None = None  # the current stall, read by the API
        self._load_reported = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watchdog must outlive its own bugs
                logger.opt(exception=exc).error("the watchdog's check failed: {}", exc)

    # ---- one check ---------------------------------------------------------------------------

    def check(self, now_ns: int | None = None) -> None:
        now_ns = now_ns or time.perf_counter_ns()
        service = self.service
        if service.state == "loading":
            self._check_load(now_ns)
            return
        engine = service.engine
        if engine is None or not engine.alive:
            return
        if self.stall is not None and self.stall.preprocessing is not None:
            if not service.preprocessing.running(self.stall.preprocessing):
                self._recovered(now_ns)  # the stuck job returned
            return
        if self.stall is not None:
            # Moving again: a step completed, or the loop came round (a failed step ends there).
            if (
                engine.last_progress_ns > self.stall.detected_ns
                or engine.iterations >= self.stall.engine_iterations + 2
            ):
                self._recovered(now_ns)
            return
        pending = service.queue.snapshot() + engine.held_requests()
        job = service.preprocessing.oldest()
        if job is not None and (now_ns - job.watched_from_ns) / 1e9 > self.stall_timeout:
            # A request's images stuck in decoding or in the processor (a worker thread): the
            # bound (see the module's docstring).
            since = job.watched_from_ns
            stall = Stall(
                "vision",
                since,
                now_ns,
                engine.iterations,
                preprocessing=job,
                threshold_s=self.stall_timeout,
            )
            self._stalled(stall, pending, job.thread_id)
            return
        if not pending:
            return
        # Pending work is timed from when it reached the queue (a download before is not ours).
        since = max(engine.last_progress_ns, min(r.queued_ns for r in pending))
        floor = min(self.stall_floor, self.stall_timeout)
        if (now_ns - since) / 1e9 <= floor:
            return  # below every threshold: nothing to predict
        stage = engine.stage if engine.stage != "idle" else "schedule"
        step = engine.current_step
        # A step runs when one has started since the last progress (a completed one made
        # progress at its end; a failed one is cleared by the engine).
        running = step is not None and stage != "schedule" and step[2] >= engine.last_progress_ns
        # Two spans, each against its own threshold: the running step, from its start, against
        # that step's threshold; the time before it since the last progress (admission, a failed
        # pass retried after running out of memory, detokenization, a merge; all of it when no
        # step runs), against the floor: no step ran then. Charged to the step, that earlier
        # work would count against a threshold predicted for the step alone.
        step_start = max(step[2], since) if running else now_ns
        if (step_start - since) / 1e9 > floor:
            stall = Stall(
                stage,
                since,
                now_ns,
                engine.iterations,
                threshold_s=floor,
                in_step=False,
                outside_s=(step_start - since) / 1e9,
            )
            self._stalled(stall, pending, engine.thread_id)
            return
        if not running:
            return
        predicted, units = self._prediction(engine, stage)
        threshold = stall_threshold(
            predicted,
            floor=self.stall_floor,
            factor=self.stall_factor,
            bound=self.stall_timeout,
        )
        if (now_ns - step_start) / 1e9 <= threshold:
            return
        stall = Stall(
            stage,
            step_start,
            now_ns,
            engine.iterations,
            threshold_s=threshold,
            predicted_s=predicted,
            units=units,
            in_step=True,
        )
        self._stalled(stall, pending, engine.thread_id)

    @staticmethod
    def _prediction(engine: Any, stage: str) -> tuple[float | None, int | None]:
        """The running step's predicted duration and units, when the engine runs one of
        ``stage`` and has learned enough to predict it."""
        step = engine.current_step
        if step is None or step[0] != stage:
            return None, None
        _, units, _ = step
        return engine.step_costs.predict(engine.device_key, stage, units), units

    def _check_load(self, now_ns: int) -> None:
        started = self.service.load_started_ns
        if self._load_reported or started is None:
            return
        if (now_ns - started) / 1e9 > self.load_timeout:
            self._load_reported = True
            stall = Stall("load", started, now_ns, threshold_s=self.load_timeout)
            self._stalled(stall, [], self.service.loader_thread_id)

    # ---- acting on a stall -------------------------------------------------------------------

    def _stalled(
        self, stall: Stall, pending: list[GenerationRequest], culprit_thread: int | None
    ) -> None:
        self.stall = stall
        exiting = self.on_stall == "exit"
        if exiting:  # armed first: nothing below may keep a stalled process alive
            threading.Thread(target=self._exit_later, name="watchdog-exit", daemon=True).start()
        metrics = self.service.metrics
        if metrics is not None:
            metrics.stalled(stall.stage)
        seconds = stall.stalled_for_s(stall.detected_ns)
        threshold = stall.threshold_s
        bound = self.load_timeout if stall.stage == "load" else self.stall_timeout
        why = describe_threshold(
            stall, floor=self.stall_floor, factor=self.stall_factor, bound=bound
        )
        stacks = thread_stacks()
        culprit = next((s for s in stacks if s["thread_id"] == culprit_thread), None)
        where = ""
        if culprit is not None:
            last = culprit["stack"].strip().splitlines()
            where = (
                f"; the {thread_name(culprit['thread'])} is at {last[-2].strip()}"
                if len(last) >= 2
                else ""
            )
        job = stall.preprocessing
        if job is not None:  # not yet a queued request: name it from its preprocessing job
            where = f"{where} (preprocessing the images of request {job.request_id})"
        described = describe_requests(pending, stall.detected_ns)
        logger.bind(
            **(
                {"preprocessing": {"request_id": job.request_id, "trace_id": job.trace_id}}
                if job is not None
                else {}
            ),
            stage=stall.stage,
            stalled_for_s=round(seconds, 3),
            threshold_s=round(threshold, 3),
            predicted_step_s=None if stall.predicted_s is None else round(stall.predicted_s, 6),
            step_units=stall.units,
            # which span ran past its threshold: the running step, or the time outside any step
            span={True: "step", False: "outside_step"}.get(stall.in_step),
            stall_timeout_s=bound,
            on_stall=self.on_stall,
            requests=described,
            threads=stacks,
        ).error(
            "stall report: the engine made no progress in {}{} for {:.1f} s "
            "(threshold {:.3g} s: {}) with {} request(s) pending{}; {}",
            stall.stage,
            {True: " (the running step)", False: " (outside any step)"}.get(stall.in_step, ""),
            seconds,
            threshold,
            why,
            len(pending),
            where,
            f"exiting with status {STALL_EXIT_CODE}"
            if exiting
            else "answering 503 until it moves again",
        )
        if job is not None:  # only the request whose images hang: the engine's work goes on
            stalled = [
                {
                    "request_id": job.request_id,
                    "trace_id": job.trace_id,
                    "stage": "preprocess",
                    "age_s": round((stall.detected_ns - job.started_ns) / 1e9, 3),
                }
            ]
        else:
            stalled = described
        log_stalled_requests(stall, stalled, seconds)
        error = stalled_error(stall.stage, seconds, threshold)
        self.service.preprocessing.fail_all(error)
        if stall.preprocessing is not None:
            return  # the engine itself moves: its requests go on (unless the process exits)
        for request in self.service.queue.drain() + pending:
            # Failed first, then cancelled: were it cancelled first, an engine that moves again
            # in between would end it as cancelled, and the client would get no answer.
            if request.fail(error):
                request.cancel()  # the engine drops the row if it ever moves again

    def _exit_later(self) -> None:
        time.sleep(EXIT_GRACE_S)
        _flush_traces()  # the failed requests' spans say where they stopped: send them first
        self._exit(STALL_EXIT_CODE)

    def _recovered(self, now_ns: int) -> None:
        stall = self.stall
        assert stall is not None
        self.stall = None
        if self.service.metrics is not None:
            self.service.metrics.stall_ended()
        logger.warning(
            "the engine moves again after a stall in {} of {:.1f} s",
            stall.stage,
            stall.stalled_for_s(now_ns),
            stage=stall.stage,
        )


def _flush_traces(timeout_ms: int = 2000) -> None:
    """Export the finished spans still batched in memory (os._exit skips every shutdown hook)."""
    try:
        from opentelemetry import trace

        flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if flush is not None:
            flush(timeout_ms)
    except Exception as exc:  # noqa: BLE001 - exiting matters more than the last spans
        logger.warning("the last spans could not be exported before the exit: {}", exc)
