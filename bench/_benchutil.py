"""Helpers of the benchmarks: other processes' CPU load, and a median's confidence interval.

``CpuMeter``: how much CPU other processes took while a benchmark ran (Linux /proc; zero
elsewhere). The benchmarks run on a shared 2-core machine; a burst of work from another
process slows a measured interval several-fold (two PyTorch processes each running two OpenMP
threads on two cores wait on each other's preempted threads). ``CpuMeter`` lets a benchmark
tell quiet intervals from contended ones: the machine's busy time (steal included) minus the
CPU time of the processes being measured, in cores.

``median_ci``: a bootstrap confidence interval of a median.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from vigil import procfs


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _process_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        stat = procfs.read_stat(pid)
    except procfs.ProcUnreadable:
        return 0
    return round(stat.cpu_seconds * procfs.CLOCK_TICKS) if stat is not None else 0


class CpuMeter:
    """``mark()`` then ``foreign_cores(mark)``: cores used by other processes in between."""

    def __init__(self, pids: Callable[[], Iterable[int]] = lambda: ()):
        self._pids = pids
        self.available = os.path.exists("/proc/stat")
        self._cpus = os.cpu_count() or 1

    def mark(self) -> tuple[int, int, int]:
        if not self.available:
            return (0, 0, 0)
        busy, total = _machine_ticks()
        own = _process_ticks(os.getpid()) + sum(_process_ticks(p) for p in self._pids())
        return busy, total, own

    def foreign_cores(self, start: tuple[int, int, int]) -> float:
        if not self.available:
            return 0.0
        busy, total, own = self.mark()
        elapsed = total - start[1]
        if elapsed <= 0:
            return 0.0
        foreign = (busy - start[0]) - (own - start[2])
        return max(0.0, foreign / elapsed * self._cpus)


def median_ci(
    values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap confidence interval of the median (percentile method, fixed seed)."""
    import random
    import statistics

    if len(values) < 2:
        value = values[0] if values else float("nan")
        return value, value
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    cut = int((1 - level) / 2 * resamples)
    return medians[cut], medians[resamples - 1 - cut]


# The same prompts for every benchmark, so that their figures compare.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):",
    "Observability for inference servers means",
    "Q: What is the capital of France?\nA:",
    "In 1969, the first humans",
    "The metrics exporter reads memory-mapped files written by",
    "Hello",
    "A list of prime numbers: 2, 3, 5, 7, 11,",
    "Continuous batching merges new requests into the running batch so that",
    "Tokens per second is",
    "Roses are red, violets are blue,",
]
