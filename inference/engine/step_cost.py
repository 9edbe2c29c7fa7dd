"""What the engine's steps cost, learned as it runs, so the watchdog can predict how long the
running step should take (and call a stall sooner than a fixed timeout would).

Per device and stage, a step's cost is measured in units of its work:
- ``prefill``: tokens in the prefill batch as computed (rows x padded length: what the forward
  pass processes, prompts plus the tokens a preempted row recomputes);
- ``decode``: the batch size;
- ``vision``: the image patches the vision tower encodes.

Samples go to buckets of units, powers of two (1, 2-3, 4-7, 8-15, ...), each holding the last
``window`` steps. A bucket predicts once it holds ``min_samples`` steps: the median over its
window of each step's time scaled to the asked units (up only, in proportion: a bigger step in
the same bucket costs more, a smaller one is not assumed to cost less). The median makes one
slow step (a page fault, a GC pass, a neighbour's burst) move nothing; a lasting change (a
throttled GPU, a busier CPU) moves the prediction once it fills half the window. The first
``warmup`` steps of each device and stage (CUDA context and kernel selection, lazy module
initialisation, caches filling) are not learned at all.

An unseen size is predicted conservatively from its neighbours: from the nearest smaller
bucket, scaled up by the ratio of units to the power of the stage's exponent (1 for decode,
where a bigger batch costs at most in proportion; 2 for prefill and vision, whose attention is
quadratic in the tokens or patches), else from the nearest bigger bucket, unscaled. A device or
stage with no bucket ready predicts nothing (``None``): the caller falls back to its fixed bound.
The engine's warm-up, right after the model load, runs enough prefills and decode steps of one
small size for both stages to predict before the first client request (``Engine.warm_up``).

Cheap in the hot path: ``record`` is a lock, a dict lookup and a deque append, once per step;
the medians are computed only by ``predict`` (the watchdog, at most once per check). Pure
Python, no torch: tested on literal timings.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque

STAGE_UNITS = {"prefill": "tokens", "decode": "batch size", "vision": "patches"}
# How a step's cost grows with its units when predicting an unseen, bigger size.
EXTRAPOLATION_EXPONENT = {"prefill": 2.0, "vision": 2.0, "decode": 1.0}

DEFAULT_WINDOW = 32
DEFAULT_WARMUP = 2
DEFAULT_MIN_SAMPLES = 3


def bucket(units: int) -> int:
    """The power-of-two bucket of a step's units: 1 -> 1, 2-3 -> 2, 4-7 -> 3, 8-15 -> 4."""
    return max(int(units), 1).bit_length()


class StepCosts:
    """Learned step costs per (device, stage, bucket of units); see the module's docstring."""

    def __init__(
        self,
        *,
        window: int = DEFAULT_WINDOW,
        warmup: int = DEFAULT_WARMUP,
        min_samples: int = DEFAULT_MIN_SAMPLES,
    ):
        if window < 1 or min_samples < 1 or min_samples > window or warmup < 0:
            raise ValueError("need window >= min_samples >= 1 and warmup >= 0")
        self.window = window
        self.warmup = warmup
        self.min_samples = min_samples
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}  # (device, stage) -> steps recorded
        # (device, stage, bucket) -> the last steps' (units, seconds)
        self._samples: dict[tuple[str, str, int], deque[tuple[int, float]]] = {}
        self._buckets: dict[tuple[str, str], set[int]] = {}  # (device, stage) -> its buckets

    def record(self, device: str, stage: str, units: int, seconds: float) -> None:
        """One completed step of ``stage`` on ``device``: ``units`` of work in ``seconds``."""
        units = max(int(units), 1)
        key = (device, stage)
        with self._lock:
            seen = self._seen.get(key, 0) + 1
            self._seen[key] = seen
            if seen <= self.warmup:
                return
            b = bucket(units)
            samples = self._samples.get((device, stage, b))
            if samples is None:
                samples = self._samples[(device, stage, b)] = deque(maxlen=self.window)
                self._buckets.setdefault(key, set()).add(b)
            samples.append((units, seconds))

    def predict(self, device: str, stage: str, units: int) -> float | None:
        """Seconds a step of ``stage`` with ``units`` of work should take on ``device``; None
        when nothing learned there can say."""
        units = max(int(units), 1)
        with self._lock:
            buckets = sorted(self._buckets.get((device, stage), ()))
            ready = {
                b: tuple(self._samples[(device, stage, b)])
                for b in buckets
                if len(self._samples[(device, stage, b)]) >= self.min_samples
            }
        if not ready:
            return None
        own = bucket(units)
        if own in ready:
            return statistics.median(s * max(1.0, units / u) for u, s in ready[own])
        smaller = [b for b in ready if b < own]
        if smaller:
            exponent = EXTRAPOLATION_EXPONENT.get(stage, 1.0)
            samples = ready[max(smaller)]
            return statistics.median(s * (units / u) ** exponent for u, s in samples)
        samples = ready[min(b for b in ready if b > own)]
        return statistics.median(s for _, s in samples)

    @property
    def steps_to_predict(self) -> int:
        """Steps of one stage and size a fresh device needs before that size predicts: the
        ignored warm-up steps and then a bucket's worth (the engine's warm-up runs as many)."""
        return self.warmup + self.min_samples

    def steps_seen(self, device: str, stage: str) -> int:
        with self._lock:
            return self._seen.get((device, stage), 0)
