"""How far a step's actual duration strays from the step-cost model's prediction, under load:
the figures behind ``--stall-factor``.

The real engine runs the demo model in this process (the CPU by default, ``--device cuda`` on a
GPU) with the step-cost model the server uses (inference/engine/step_cost.py), wrapped so that
before each step is learned, the prediction for it is taken: each step gives a ratio
actual / predicted (steps without a prediction, the first ones, give none). Client threads
send completions with prompts of 10 to ``--max-prompt`` tokens and 1 to 64 output tokens, at a
concurrency that changes every few seconds (1 to ``--max-batch``), so prefill sizes and batch
sizes vary; meanwhile ``--hogs`` processes spin on the CPU (default: one per core) and a thread
here holds the GIL in bursts (as the API thread does), so the engine is preempted as on a
busy host.

Printed per stage and over all: the count, and p50, p90, p99, p99.9 and max of the ratio, and the
same for the steps whose predicted duration was at least ``--long-step`` seconds; the ratios by
band of predicted duration (the factor sets the threshold only where factor x predicted is above
the floor); how many steps each factor would have called stalls with the floor and the bound;
and the slowest steps. A factor above the worst ratio of long steps, with margin, raises no
stall from a step that is merely slow.

Run: ``.venv/bin/python bench/step_time_ratios.py`` (about 2 minutes on the CPU).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.config import Config  # noqa: E402
from inference.engine.engine import Engine  # noqa: E402
from inference.engine.queue import QueueFull, RequestQueue  # noqa: E402
from inference.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from inference.engine.step_cost import StepCosts  # noqa: E402
from inference.model.demo import ensure_demo_model  # noqa: E402
from inference.model.loader import load_model  # noqa: E402
from inference.watchdog import stall_threshold  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90, help="how long to run (default 90)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--max-batch", type=int, default=8, help="most concurrent requests")
    parser.add_argument("--max-prompt", type=int, default=1800, help="longest prompt, tokens")
    parser.add_argument(
        "--hogs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes spinning on the CPU meanwhile (default: one per core)",
    )
    parser.add_argument("--long-step", type=float, default=0.05, help="seconds (default 0.05)")
    parser.add_argument("--floor", type=float, default=5.0, help="--stall-floor (default 5)")
    parser.add_argument("--bound", type=float, default=30.0, help="--stall-timeout (default 30)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--demo-dir",
        default=os.environ.get("VIGIL_TEST_DEMO_DIR") or str(Path.home() / ".cache" / "llm-vigil"),
    )
    return parser.parse_args(argv)


class MeasuredCosts(StepCosts):
    """The server's step-cost model, noting the prediction for each step before learning it.

    The actual duration noted is the one the watchdog measures: from the engine's previous
    progress when a batch was running (the work between two steps counts), else from the step's
    start (after idleness the watchdog counts from the request's arrival, a moment before)."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: Engine | None = None
        self.steps: list[tuple[str, int, float | None, float]] = []  # stage, units, pred, actual
        self._previous_end_ns: int | None = None

    def record(self, device: str, stage: str, units: int, seconds: float) -> None:
        predicted = self.predict(device, stage, units)
        assert self.engine is not None and self.engine.current_step is not None
        started_ns = self.engine.current_step[2]
        busy = stage == "decode" or self.engine.running > 0
        actual = seconds
        if busy and self._previous_end_ns is not None:
            actual += max(0, started_ns - self._previous_end_ns) / 1e9
        self._previous_end_ns = started_ns + round(seconds * 1e9)
        self.steps.append((stage, units, predicted, actual))
        super().record(device, stage, units, seconds)


def _spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _gil_bursts(stop: threading.Event, rng: random.Random) -> None:
    """Pure-Python work in bursts of up to 50 ms, as the API thread's parsing and tokenizing."""
    while not stop.is_set():
        until = time.perf_counter() + rng.uniform(0.001, 0.05)
        while time.perf_counter() < until:
            sum(i * i for i in range(1000))
        time.sleep(rng.uniform(0.01, 0.2))


def _client(
    loaded, queue: RequestQueue, rng: random.Random, args, concurrency: list[int], index: int
) -> None:
    end = time.monotonic() + args.seconds
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    while time.monotonic() < end:
        if index >= concurrency[0]:
            time.sleep(0.05)
            continue
        length = int(math.exp(rng.uniform(math.log(10), math.log(args.max_prompt))))
        text = "".join(rng.choice(alphabet) for _ in range(length))
        ids = loaded.tokenizer(text)["input_ids"][: args.max_prompt]
        request = GenerationRequest(
            request_id=f"c{index}-{time.monotonic_ns()}",
            prompt_ids=ids,
            params=SamplingParams(max_tokens=rng.randint(1, 64), temperature=0.0, ignore_eos=True),
            stream=False,
            deadline_ns=time.perf_counter_ns() + 300 * 10**9,
        )
        done = threading.Event()
        request.emit = lambda event, done=done: (
            done.set() if type(event).__name__ in ("Finished", "Failed") else None
        )
        try:
            queue.put(request)
        except QueueFull:
            time.sleep(0.05)
            continue
        done.wait(300)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _line(name: str, ratios: list[float]) -> str:
    if not ratios:
        return f"{name:<22} {0:>7}"
    qs = [_quantile(ratios, q) for q in (0.5, 0.9, 0.99, 0.999)]
    return f"{name:<22} {len(ratios):>7} " + " ".join(f"{v:>7.2f}" for v in qs + [max(ratios)])


def main(argv=None) -> int:
    args = parse_args(argv)
    ensure_demo_model(args.demo_dir)
    loaded = load_model(Config(demo_dir=args.demo_dir, device=args.device))
    queue = RequestQueue(256)
    costs = MeasuredCosts()
    engine = Engine(loaded, queue, max_batch_size=args.max_batch, step_costs=costs, seed=0)
    costs.engine = engine
    stop_hogs = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_spin, args=(stop_hogs,)) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    stop = threading.Event()
    rng = random.Random(args.seed)
    gil = threading.Thread(target=_gil_bursts, args=(stop, random.Random(args.seed + 1)))
    gil.start()
    concurrency = [1]
    clients = [
        threading.Thread(
            target=_client,
            args=(loaded, queue, random.Random(args.seed + 10 + i), args, concurrency, i),
        )
        for i in range(args.max_batch)
    ]
    engine.start()
    started = time.monotonic()
    try:
        for client in clients:
            client.start()
        while time.monotonic() - started < args.seconds:
            concurrency[0] = rng.randint(1, args.max_batch)
            time.sleep(rng.uniform(2, 6))
        for client in clients:
            client.join(330)
    finally:
        stop.set()
        stop_hogs.set()
        engine.stop()
        gil.join()
        for hog in hogs:
            hog.join(10)
    print(
        f"step time / predicted on {loaded.device}, {args.seconds:g} s, {args.hogs} CPU "
        f"hog(s), batch up to {args.max_batch}, prompts up to {args.max_prompt} tokens"
    )
    print(f"{'steps':<22} {'count':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>7}")
    predicted = [(s, u, p, a) for s, u, p, a in costs.steps if p is not None]
    everything: list[float] = []
    long: list[float] = []
    for stage in ("prefill", "decode", "vision"):
        rows = [(p, a) for s, _, p, a in predicted if s == stage]
        if not rows and stage == "vision":
            continue
        ratios = [a / p for p, a in rows]
        long_ratios = [a / p for p, a in rows if p >= args.long_step]
        everything += ratios
        long += long_ratios
        print(_line(stage, ratios))
        print(_line(f"{stage} (>= {args.long_step:g} s)", long_ratios))
        seconds = [a for s, _, _, a in costs.steps if s == stage]
        if seconds:
            unpredicted = sum(1 for s, _, p, _ in costs.steps if s == stage and p is None)
            print(
                f"{'':<22} actual: p50 {_quantile(seconds, 0.5) * 1000:.1f} ms, p99 "
                f"{_quantile(seconds, 0.99) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms; "
                f"{unpredicted} step(s) without a prediction"
            )
    print(_line("all", everything))
    print(_line(f"all (>= {args.long_step:g} s)", long))
    print("actual/predicted by predicted duration (where the factor, not the floor, matters):")
    bands = (0.0, 0.05, 0.2, 0.6, 2.0, math.inf)
    for low, high in zip(bands, bands[1:], strict=False):
        rows = [(p, a) for _, _, p, a in predicted if low <= p < high]
        if rows:
            ratios = [a / p for p, a in rows]
            print(
                f"  predicted {low:g}-{high:g} s: {len(rows):>5} step(s), ratio p50 "
                f"{_quantile(ratios, 0.5):.2f} p99 {_quantile(ratios, 0.99):.2f} max "
                f"{max(ratios):.2f}; actual max {max(a for _, a in rows):.3f} s"
            )
    print(
        f"false stalls by --stall-factor, with --stall-floor {args.floor:g} and --stall-timeout "
        f"{args.bound:g} (steps past the threshold; no prediction: the bound):"
    )
    for factor in (1, 2, 3, 4, 6, 8, 12, 16):
        over = [
            (s, u, p, a)
            for s, u, p, a in costs.steps
            if a > stall_threshold(p, floor=args.floor, factor=factor, bound=args.bound)
        ]
        print(f"  factor {factor:>3}: {len(over)} of {len(costs.steps)} step(s)")
    print("the slowest steps (stage, units, predicted, actual, actual/predicted):")
    for s, u, p, a in sorted(costs.steps, key=lambda step: step[3], reverse=True)[:8]:
        ratio = f"{a / p:.2f}" if p else "-"
        pred = f"{p:.3f}" if p is not None else "-"
        print(f"  {s:<8} {u:>6} {pred:>8} s {a:>8.3f} s {ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
