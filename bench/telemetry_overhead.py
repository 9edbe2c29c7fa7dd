"""Telemetry overhead: engine tokens/s with all telemetry on, against all telemetry off.

What it measures
    Generated tokens per second of the continuous-batching engine
    (``inference.engine.engine.Engine``), driven in this process through
    ``inference.engine.queue.RequestQueue`` on the demo model (CPU, float32), in two arms that
    share one loaded model and the same prompts:

    off  ``NullObserver`` as the engine observer, no queue observer (a no-op, as RequestQueue's
         default), no recorder, no spans, no log lines.
    on   ``InferenceMetrics`` (after ``prepare_multiprocess_dir`` into a temporary directory, so
         every value is written to prometheus_client's mmap files) as the engine observer and as
         the queue observer; a span per request started with ``RequestRecorder.start_span`` at
         arrival (as ``inference/api/app.py`` does) from an OpenTelemetry SDK ``TracerProvider``;
         the ``inference_requests_in_flight`` gauge moved as the API layer moves it; and, for
         every finished request, ``RequestRecorder.record(CompletedRequest(...))`` (request
         metrics, the span and its three child spans, one JSON log line through
         ``inference.telemetry.logs.setup_logging`` into a file, or os.devnull with
         ``--log-to devnull``). With ``--export-spans`` the provider also gets a
         ``BatchSpanProcessor`` that serialises every span (to os.devnull), as an OTLP export
         would cost; by default, like the server with no OTLP endpoint set, spans are made but
         not exported.

How
    Both arms run on one Engine and RequestQueue over one LoadedModel; between waves, while
    the engine is idle, the arm is switched: ``engine.observer`` is set to ``NullObserver()``
    or to the ``InferenceMetrics``, and the queue's observer forwards to a no-op (what
    RequestQueue does by default) or to ``metrics.queue_changed``. (Two engines alive at once
    would not do: each thread that runs torch ops has its own OpenMP team, and on 2 cores two
    teams halve the speed of both.)

    A wave puts ``--concurrency`` requests (greedy, ``ignore_eos``, so each generates exactly
    ``--max-tokens`` tokens) on the queue at once, with one arm's telemetry, and waits for all
    of them. In the 'on' arm the calling thread records each request as its ``Finished`` event
    comes, as the API's event loop does, so recording runs concurrently with the engine thread,
    and a wave ends when its last request is recorded (a client sees its answer only after
    that). A pair is one wave per arm, back to back, on the same prompts, in ABBA order: short
    paired waves keep the machine's drift and bursts of load from other processes from landing
    on one arm only. ``--warmup`` pairs are not counted.

    The CPU time other processes take during each pair is read from /proc
    (bench/_benchutil.py): a pair during which they used more than ``--quiet-cores`` cores is
    marked, since a burst of outside work slows a wave several-fold on 2 cores and swamps a
    1 % effect.

    Printed: every pair's on/off ratio (contended ones starred); each arm's tokens/s over all
    its waves (and its median wave); the ratio of those totals and of process CPU time per
    token; each telemetry hook's cost per call timed alone in a tight loop, with the on/off
    ratio that would predict; the engine and queue observer calls timed in situ over
    ``--insitu-waves`` extra waves (between torch ops they cost about ten times more than in a
    tight loop); and the final ratio: the median of the paired on/off ratios over the quiet
    pairs (over all pairs when fewer than a quarter of them, or 5, are quiet), with a
    bootstrap 95% confidence interval and its goal (>= 0.99). Nothing asserts on time; the
    exit status is 0 either way.

Run from the repository root:
    .venv/bin/python bench/telemetry_overhead.py [--pairs 60 --max-tokens 128 --profile F]
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for bench/_benchutil.py
from _benchutil import PROMPTS, CpuMeter, median_ci  # noqa: E402

GOAL = 0.99


def parse_args(argv=None) -> argparse.Namespace:
    from inference.config import Config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo-dir",
        default=Config().demo_dir,
        help="where the demo model is built/cached (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="requests put on the queue together in each wave (default: 8)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="the engine's max_batch_size (default: 8)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="tokens generated by every request (default: 128)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=60,
        help="measured pairs; each runs one wave per arm, in ABBA order (default: 60)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="uncounted warm-up pairs (default: 2)"
    )
    parser.add_argument(
        "--insitu-waves",
        type=int,
        default=4,
        help="extra uncounted 'on' waves whose observer calls are timed where "
        "they run (default: 4; 0 to skip)",
    )
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.25,
        help="a pair during which other processes used more CPU than this many "
        "cores is left out of the final median when enough pairs are quiet "
        "(default: 0.25)",
    )
    parser.add_argument(
        "--log-to",
        choices=("file", "devnull"),
        default="file",
        help="where the JSON log lines go in the 'on' arm (default: a file in a "
        "temporary directory)",
    )
    parser.add_argument(
        "--export-spans",
        action="store_true",
        help="also export every span through a BatchSpanProcessor "
        "(ConsoleSpanExporter into os.devnull)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (JSON log lines, metrics files)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="cProfile the engine thread (both arms), write the stats to FILE "
        "and print the top entries",
    )
    args = parser.parse_args(argv)
    for name in ("concurrency", "max_batch_size", "max_tokens", "pairs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


class Telemetry:
    """Everything the 'on' arm adds, built the way ``python -m inference`` builds it."""

    def __init__(self, workdir: Path, model_name: str, log_to: str, export_spans: bool):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        from inference.telemetry.logs import setup_logging
        from inference.telemetry.metrics import InferenceMetrics, prepare_multiprocess_dir
        from inference.telemetry.recorder import RequestRecorder

        self.log_path = workdir / "requests.jsonl" if log_to == "file" else Path(os.devnull)
        self._log_stream = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115
        setup_logging("INFO", stream=self._log_stream)
        self.metrics = InferenceMetrics(model_name, prepare_multiprocess_dir(workdir / "state"))
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "vigil-inference-bench"})
        )
        self._span_sink = None
        if export_spans:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

            self._span_sink = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
            self.provider.add_span_processor(
                BatchSpanProcessor(ConsoleSpanExporter(out=self._span_sink))
            )
        self.recorder = RequestRecorder(self.metrics, self.provider.get_tracer("inference"))

    def close(self) -> None:
        self.provider.shutdown()
        self._log_stream.close()
        if self._span_sink is not None:
            self._span_sink.close()


def _no_queue_observer(depth: int, oldest_arrival_ns: int | None) -> None:
    """What RequestQueue does by default: nothing."""


class TimedMetrics:
    """Forwards the engine and queue observer calls to InferenceMetrics, timing each one where
    it really runs (between torch ops on the engine thread), for the diagnostic waves only."""

    def __init__(self, metrics):
        self._metrics = metrics
        self.in_flight = metrics.in_flight
        self.calls: dict[str, list[float]] = {}

    def _timed(self, name: str, *args) -> None:
        started = time.perf_counter()
        getattr(self._metrics, name)(*args)
        self.calls.setdefault(name, []).append(time.perf_counter() - started)

    def step(self, stage: str, batch_size: int) -> None:
        self._timed("step", stage, batch_size)

    def running_changed(self, running: int) -> None:
        self._timed("running_changed", running)

    def batch_formed(self, new_requests: int) -> None:
        self._timed("batch_formed", new_requests)

    def queue_changed(self, depth: int, oldest_arrival_ns: int | None) -> None:
        self._timed("queue_changed", depth, oldest_arrival_ns)


class Harness:
    """One Engine and one RequestQueue on the model; each wave runs with one arm's telemetry.

    Both arms run on the same engine thread. Two engines alive in one process would not do:
    every thread that runs torch ops gets its own OpenMP team, and once a second engine
    thread has run, both run at about half speed on this 2-core machine (measured: ~2700
    tokens/s with one engine, ~1300 with two, back to ~3000 once the second stops). So the
    arm is switched between waves, while the engine is idle: ``engine.observer`` becomes
    ``NullObserver()`` or the ``InferenceMetrics``, and the queue's observer forwards to
    ``metrics.queue_changed`` or to a no-op function like RequestQueue's default.
    """

    def __init__(
        self, loaded, prompt_ids: list[list[int]], args, telemetry: Telemetry, profile=None
    ):
        from inference.engine.engine import Engine, NullObserver
        from inference.engine.queue import RequestQueue
        from inference.engine.request import SamplingParams

        self.loaded = loaded
        self.prompt_ids = prompt_ids
        self.args = args
        self.telemetry = telemetry
        self._null = NullObserver()
        self._queue_observer = _no_queue_observer
        self.queue = RequestQueue(
            64, observer=lambda depth, oldest: self._queue_observer(depth, oldest)
        )
        self.engine = Engine(
            loaded, self.queue, max_batch_size=args.max_batch_size, observer=self._null, seed=0
        )
        if profile is not None:  # the whole engine thread, both arms
            original_run = self.engine._run

            def profiled_run() -> None:
                profile.enable()
                try:
                    original_run()
                finally:
                    profile.disable()

            self.engine._run = profiled_run
        self.params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        self._done: queue_module.SimpleQueue = queue_module.SimpleQueue()
        self._counter = 0
        self.sample = None  # a finished request, for the per-call cost estimate
        # Per arm: generated tokens, seconds and process CPU seconds over the counted waves.
        self.tokens = {"off": 0, "on": 0}
        self.seconds = {"off": 0.0, "on": 0.0}
        self.cpu_seconds = {"off": 0.0, "on": 0.0}
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def wave(self, arm: str, pair: int, count: bool = True) -> float:
        """Put ``--concurrency`` requests on the queue at once and wait for all of them
        (recording each as it finishes when the arm is 'on'); return the wave's tokens/s.
        Both waves of a pair get the same prompts (the set rotates from pair to pair)."""
        from inference.engine.request import Failed, Finished, GenerationRequest
        from inference.telemetry.recorder import CompletedRequest

        on = arm == "on"
        telemetry = self.telemetry if on else None
        # The engine is idle between waves (its last request finished), so this is safe.
        self.engine.observer = self.telemetry.metrics if on else self._null
        self._queue_observer = self.telemetry.metrics.queue_changed if on else _no_queue_observer
        args, done = self.args, self._done
        started = time.perf_counter()
        cpu_started = time.process_time()
        calls = {}
        for i in range(args.concurrency):
            self._counter += 1
            ids = self.prompt_ids[(pair * args.concurrency + i) % len(self.prompt_ids)]
            arrival_ns = time.perf_counter_ns()
            request_id = f"cmpl-bench-{arm}-{self._counter}"

            def emit(event, _id=request_id) -> None:  # called on the engine thread
                if isinstance(event, (Finished, Failed)):
                    done.put(_id)

            generation = GenerationRequest(
                request_id=request_id,
                prompt_ids=ids,
                params=self.params,
                stream=False,
                deadline_ns=arrival_ns + int(600e9),
                emit=emit,
                arrival_ns=arrival_ns,
            )
            record = None
            if telemetry is not None:
                span = telemetry.recorder.start_span("text_completion demo", None, arrival_ns)
                record = CompletedRequest(
                    request_id=request_id,
                    endpoint="completions",
                    model=self.loaded.name,
                    status=200,
                    arrival_ns=arrival_ns,
                    span=span,
                    generation=generation,
                    request_params={
                        "max_tokens": args.max_tokens,
                        "temperature": 0.0,
                        "top_p": None,
                        "frequency_penalty": None,
                        "presence_penalty": None,
                    },
                )
            self.queue.put(generation)
            if telemetry is not None:
                telemetry.metrics.in_flight.inc()
            calls[request_id] = (generation, record)
        tokens = 0
        for _ in range(len(calls)):
            generation, record = calls[done.get()]
            if generation.error is not None:
                raise RuntimeError(f"request failed: {generation.error.message}")
            if telemetry is not None:
                telemetry.metrics.in_flight.dec()
                telemetry.recorder.record(record)
            if generation.completion_tokens != args.max_tokens:
                raise RuntimeError(
                    f"expected {args.max_tokens} tokens, got {generation.completion_tokens}"
                )
            tokens += generation.completion_tokens
            self.sample = generation
        seconds = time.perf_counter() - started
        if count:
            self.tokens[arm] += tokens
            self.seconds[arm] += seconds
            self.cpu_seconds[arm] += time.process_time() - cpu_started
        return tokens / seconds


def per_call_costs(
    telemetry: Telemetry, sample, model: str, max_tokens: int, repeats: int = 2000
) -> dict[str, float]:
    """Seconds per call of each telemetry hook, timed alone (no engine running)."""
    import copy

    from inference.telemetry.recorder import CompletedRequest

    metrics, recorder = telemetry.metrics, telemetry.recorder
    costs: dict[str, float] = {}

    def timed(name: str, fn, n: int = repeats) -> None:
        started = time.perf_counter()
        for _ in range(n):
            fn()
        costs[name] = (time.perf_counter() - started) / n

    arrival = time.perf_counter_ns()
    timed("observer.step", lambda: metrics.step("decode", 8))
    timed("observer.running_changed", lambda: metrics.running_changed(8))
    timed("observer.batch_formed", lambda: metrics.batch_formed(8))
    timed("queue_changed", lambda: metrics.queue_changed(3, arrival))
    timed("in_flight inc+dec", lambda: (metrics.in_flight.inc(), metrics.in_flight.dec()))
    params = {
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": None,
        "frequency_penalty": None,
        "presence_penalty": None,
    }

    def span_and_record() -> None:
        generation = copy.copy(sample)
        span = recorder.start_span("text_completion demo", None, generation.arrival_ns)
        recorder.record(
            CompletedRequest(
                request_id=generation.request_id,
                endpoint="completions",
                model=model,
                status=200,
                arrival_ns=generation.arrival_ns,
                span=span,
                generation=generation,
                request_params=params,
            )
        )

    timed("start_span+record", span_and_record, max(1, repeats // 10))
    return costs


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="vigil-bench-telemetry-"))
    try:
        return run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    import torch

    from inference.config import Config
    from inference.model.loader import load_model

    # Configure logging (into the file) before loading, so nothing reaches the terminal; the
    # 'off' arm logs nothing either way (the engine logs only on errors).
    telemetry = Telemetry(workdir, "demo", args.log_to, args.export_spans)
    loaded = load_model(Config(demo_dir=args.demo_dir, device="cpu"))
    prompt_ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    print(
        f"telemetry_overhead: demo model on {loaded.device} ({loaded.dtype_name}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
    )
    print(
        f"  {args.pairs} pairs x 2 arms x 1 wave of {args.concurrency} concurrent requests x "
        f"{args.max_tokens} tokens (greedy, ignore_eos), max_batch_size {args.max_batch_size}; "
        f"spans exported: {'yes' if args.export_spans else 'no'}; log lines to "
        f"{telemetry.log_path}"
        + (
            ""
            if args.keep or args.log_to == "devnull"
            else " (removed at the end; --keep keeps it)"
        )
    )

    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
    harness = Harness(loaded, prompt_ids, args, telemetry, profile)
    try:
        for pair in range(args.warmup):  # not counted
            harness.wave("off", pair, count=False)
            harness.wave("on", pair, count=False)
        rates: dict[str, list[float]] = {"off": [], "on": []}
        meter = CpuMeter()
        foreign: list[float] = []  # per pair: the most cores other processes used in one wave
        for pair in range(args.pairs):
            order = ("off", "on") if pair % 4 in (0, 3) else ("on", "off")  # ABBA ABBA ...
            load = 0.0
            for arm in order:
                mark = meter.mark()
                rates[arm].append(harness.wave(arm, pair))
                load = max(load, meter.foreign_cores(mark))
            foreign.append(load)
        # In situ: the observer calls timed where they run, over a few uncounted 'on' waves.
        timed = TimedMetrics(telemetry.metrics)
        harness.telemetry = SimpleNamespace(metrics=timed, recorder=telemetry.recorder)
        waves_started = time.perf_counter()
        for pair in range(args.insitu_waves):
            harness.wave("on", pair, count=False)
        insitu_wave = (time.perf_counter() - waves_started) / max(1, args.insitu_waves)
        harness.telemetry = telemetry
    finally:
        harness.stop()
    ratios = [on / off for on, off in zip(rates["on"], rates["off"], strict=True)]
    quiet = [i for i, load in enumerate(foreign) if load <= args.quiet_cores]
    use_quiet = len(quiet) >= max(5, len(ratios) // 4)
    chosen = [ratios[i] for i in (quiet if use_quiet else range(len(ratios)))]
    print(
        "  per-pair on/off ratios (* = other processes used more than "
        f"{args.quiet_cores:g} cores during the pair):"
    )
    for start in range(0, len(ratios), 8):
        print(
            "    "
            + " ".join(
                f"{ratios[i]:.3f}{'*' if foreign[i] > args.quiet_cores else ' '}"
                for i in range(start, min(start + 8, len(ratios)))
            )
        )
    h = harness
    rate = {arm: h.tokens[arm] / h.seconds[arm] for arm in ("off", "on")}
    lines = None
    if args.log_to == "file":
        with open(telemetry.log_path, encoding="utf-8") as log:
            lines = sum(1 for _ in log)
    for arm, label in (("off", "telemetry off:"), ("on", "telemetry on: ")):
        print(
            f"{label} {rate[arm]:.1f} tokens/s over all waves ({h.tokens[arm]} tokens in "
            f"{h.seconds[arm]:.2f} s); median wave {statistics.median(rates[arm]):.1f} "
            "tokens/s"
            + (
                f"; {lines} JSON log lines in all (warm-up and in-situ waves too)"
                if arm == "on" and lines
                else ""
            )
        )
    cpu_ms = {arm: 1e6 * h.cpu_seconds[arm] / h.tokens[arm] for arm in ("off", "on")}
    print(
        f"ratio of totals on/off: {rate['on'] / rate['off']:.4f}; process CPU ms per 1000 "
        f"tokens: off {cpu_ms['off']:.1f}, on {cpu_ms['on']:.1f} (off/on "
        f"{cpu_ms['off'] / cpu_ms['on']:.4f})"
    )
    print(
        f"paired ratios, all {len(ratios)} pairs: min {min(ratios):.4f}  median "
        f"{statistics.median(ratios):.4f}  max {max(ratios):.4f}; quiet pairs: {len(quiet)}"
        + (f", median {statistics.median([ratios[i] for i in quiet]):.4f}" if quiet else "")
    )
    costs = per_call_costs(telemetry, h.sample, loaded.name, args.max_tokens)
    print(
        "per-call cost of each hook, timed alone in a tight loop: "
        + ", ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in costs.items())
    )
    # Per wave: one step call per generated token position, about two queue changes and a
    # few running/batch changes per request, and per request one span + record + gauge moves.
    per_wave = args.max_tokens * costs["observer.step"] + args.concurrency * (
        2 * costs["queue_changed"]
        + costs["in_flight inc+dec"]
        + costs["start_span+record"]
        + costs["observer.running_changed"]
        + costs["observer.batch_formed"]
    )
    off_wave = args.concurrency * args.max_tokens / statistics.median(rates["off"])
    print(
        f"  -> {per_wave * 1e3:.2f} ms of telemetry work per wave against a median 'off' wave "
        f"of {off_wave * 1e3:.1f} ms: on/off {off_wave / (off_wave + per_wave):.4f} if that "
        "were the whole cost"
    )
    if args.insitu_waves:
        total = sum(sum(v) for v in timed.calls.values()) / args.insitu_waves
        print(
            "per-call cost in situ (engine thread, between torch ops; queue_changed on the "
            "caller's), median: "
            + ", ".join(
                f"{name} {statistics.median(v) * 1e6:.1f} us" for name, v in timed.calls.items()
            )
            + f"; {total * 1e3:.2f} ms per wave = {100 * total / insitu_wave:.2f}% of a "
            f"{insitu_wave * 1e3:.0f} ms wave"
        )
    telemetry.close()
    if profile is not None:
        import pstats

        profile.dump_stats(args.profile)
        print(
            f"engine thread profile (both arms, warm-up included) written to "
            f"{args.profile}; top by tottime:"
        )
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    median = statistics.median(chosen)
    low, high = median_ci(chosen)
    verdict = "met" if median >= GOAL else "NOT met"
    which = (
        "all quiet"
        if len(quiet) == len(ratios)
        else "quiet"
        if use_quiet
        else "all (too few quiet)"
    )
    print(
        f"RATIO telemetry on/off tokens/s (median of {len(chosen)} paired waves, {which}; "
        f"95% CI {low:.4f}-{high:.4f}): {median:.4f}  goal >= {GOAL}  ({verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
