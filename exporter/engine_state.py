"""A serving engine's state read from its own /metrics by the exporter: requests running and
waiting, and whether its forward passes still complete, per model.

The probe reads the target's ``GET /metrics`` every round (exporter/probe.py) and hands the text
to an :class:`EngineStateTracker`. Only the series vigil/engines.py names for the engine are
kept (the running and waiting gauges, the counters that move with each forward pass, the gauges
whose changes count), summed per model (vLLM's engine-core index, SGLang's ranks, our own pids).

Progress is a counter the exporter keeps itself: it adds each increase of the engine's progress
counters (after a reset, an engine restart, the new value: what was done since) and one for each
change of a progress gauge, so it never goes down. When /metrics cannot be read (a frozen engine
does not answer), the last known running and waiting stay and progress stays flat: "work pending
and no progress" holds for a frozen engine too, which is what the hang reports watch
(exporter/hang_dumps.py).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from vigil.engines import SERIES, EngineSeries

# A metric name at the start of a sample line of the text format.
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SHOWN = 200  # characters of a bad line quoted in an error

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]  # name, labels sorted


class ExpositionError(ValueError):
    """A /metrics text whose engine series cannot be read; the message quotes the line."""


@dataclass
class ModelReading:
    """One model's series in one /metrics text."""

    running: float | None = None
    waiting: float | None = None
    counters: dict[SeriesKey, float] = field(default_factory=dict)
    gauges: dict[SeriesKey, float] = field(default_factory=dict)


def sample_lines(text: str, names: frozenset[str]) -> list[str]:
    """The sample lines of ``text`` whose metric name is one of ``names``, as written.

    Comments go: prometheus_client's parser renames samples after their ``# TYPE`` (a TGI
    counter, exposed without ``_total``, would come out as ``..._total``; a vLLM counter typed
    under its name without ``_total`` lands in another family), while untyped samples keep their
    names. Leaving the rest out also spares parsing every histogram bucket of the exposition.
    """
    kept = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _NAME.match(line)
        if (
            match is not None
            and match.group() in names
            and line[match.end() : match.end() + 1] in "{ \t"
        ):
            kept.append(line)
    return kept


def read_exposition(text: str, series: EngineSeries) -> dict[str, ModelReading]:
    """The engine's series in a /metrics text, per model (the value of the engine's model label,
    "" where it has none); ExpositionError for a line of those series that cannot be parsed."""
    models: dict[str, ModelReading] = {}
    for line in sample_lines(text, series.names):
        try:
            samples = [s for f in text_string_to_metric_families(line + "\n") for s in f.samples]
        except Exception as exc:  # noqa: BLE001 - the parser raises ValueError, IndexError...
            raise ExpositionError(
                f"cannot parse the line {line[:_SHOWN]!r} ({type(exc).__name__}: {exc})"
            ) from None
        for sample in samples:
            if not math.isfinite(sample.value):
                continue
            model = sample.labels.get(series.model_label, "") if series.model_label else ""
            reading = models.setdefault(model, ModelReading())
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if sample.name == series.running:
                reading.running = (reading.running or 0.0) + sample.value
            elif sample.name == series.waiting:
                reading.waiting = (reading.waiting or 0.0) + sample.value
            elif sample.name in series.progress_counters:
                reading.counters[key] = sample.value
            else:
                reading.gauges[key] = sample.value
    return models


@dataclass(frozen=True)
class ModelState:
    """What the exporter knows of one model of an engine."""

    model: str  # the engine's model label value ("" where the engine has none)
    running: float | None  # None: not in the last /metrics read
    waiting: float | None
    progress_total: float  # kept by the exporter: never decreases
    last_progress_at: float  # Unix time progress was last seen (or the model first read)
    pending_since: float | None  # Unix time pending work was first seen; None: none pending

    @property
    def pending(self) -> bool:
        return (self.running or 0.0) + (self.waiting or 0.0) > 0

    def stalled_for(self, now: float) -> float:
        """Seconds with work pending and no progress (0 when nothing is pending)."""
        if not self.pending or self.pending_since is None:
            return 0.0
        return max(0.0, now - max(self.last_progress_at, self.pending_since))


@dataclass(frozen=True)
class EngineSnapshot:
    engine: str
    up: bool  # the last /metrics read succeeded
    error: str  # why it did not ("" when up)
    models: tuple[ModelState, ...]


@dataclass
class _Model:
    running: float | None
    waiting: float | None
    last_progress_at: float
    progress_total: float = 0.0
    pending_since: float | None = None

    def frozen(self, model: str) -> ModelState:
        return ModelState(
            model,
            self.running,
            self.waiting,
            self.progress_total,
            self.last_progress_at,
            self.pending_since,
        )


class EngineStateTracker:
    """One target's engine state, fed by the probe thread, read by the collector and the hang
    dumper (a lock between them)."""

    def __init__(self, target: str, engine: str, clock: Callable[[], float] = time.time):
        self.target, self.engine, self.series = target, engine, SERIES[engine]
        self.clock = clock
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._values: dict[SeriesKey, float] = {}  # the progress series' last values
        self._read_once = False
        self._up: bool | None = None
        self._error = ""
        self._warned_empty = False

    def observe(self, text: str) -> None:
        """A /metrics text just read; a text that cannot be read counts as a failed read."""
        try:
            readings = read_exposition(text, self.series)
        except ExpositionError as exc:
            self.failed(str(exc))
            return
        now = self.clock()
        with self._lock:
            self._update(readings, now)
            was_up, self._up, self._error = self._up, True, ""
        if was_up is False:
            logger.info("the /metrics of {} can be read again", self.target)
        if not readings and not self._warned_empty:
            self._warned_empty = True
            logger.warning(
                "the /metrics of {} has none of {}'s series ({}): its requests and progress "
                "are not known",
                self.target,
                self.engine,
                ", ".join(sorted(self.series.names)),
            )

    def failed(self, error: str, gone: bool = False) -> None:
        """A /metrics read that failed: the last known state stays, progress does not move (a
        frozen engine). ``gone``: nothing answers at its address (connection refused: stopped or
        crashed, not hung), so its requests are no longer known."""
        with self._lock:
            was_up, self._up, self._error = self._up, False, error
            if gone:
                for model in self._models.values():
                    model.running = model.waiting = None
                    model.pending_since = None
        if was_up is not False:
            logger.warning(
                "cannot read the /metrics of {} ({}): {}",
                self.target,
                error,
                "nothing answers there, its requests are no longer known"
                if gone
                else "its last known requests stay published and its progress stands still",
            )

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            return EngineSnapshot(
                self.engine,
                bool(self._up),
                self._error,
                tuple(m.frozen(name) for name, m in sorted(self._models.items())),
            )

    def _update(self, readings: dict[str, ModelReading], now: float) -> None:
        first = not self._read_once
        self._read_once = True
        for name, reading in readings.items():
            model = self._models.get(name)
            if model is None:
                model = self._models[name] = _Model(None, None, last_progress_at=now)
            moved = self._progress(reading, first)
            if moved > 0:
                model.progress_total += moved
                model.last_progress_at = now
            model.running, model.waiting = reading.running, reading.waiting
        for name, model in self._models.items():
            if name not in readings:  # its series are gone: nothing known pending
                model.running = model.waiting = None
            pending = (model.running or 0.0) + (model.waiting or 0.0) > 0
            if not pending:
                model.pending_since = None
            elif model.pending_since is None:
                model.pending_since = now

    def _progress(self, reading: ModelReading, first: bool) -> float:
        moved = 0.0
        for key, value in reading.counters.items():
            before = self._values.get(key)
            self._values[key] = value
            if before is None:
                # Seen at the first read: where counting starts. A series that appears later
                # started from 0 (a labelled counter created on first use).
                moved += 0.0 if first else value
            elif value >= before:
                moved += value - before
            else:  # a reset (the engine restarted): what it did since
                moved += value
        for key, value in reading.gauges.items():
            before = self._values.get(key)
            self._values[key] = value
            if before is not None and value != before:
                moved += 1.0
        return moved
