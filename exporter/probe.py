"""A black-box probe of OpenAI-compatible servers, with ``requests``, one thread per target.

Every ``interval`` seconds: ``GET /health`` and ``GET /ready``; every ``canary_interval``
seconds: a streamed ``POST /v1/completions`` of a few tokens, timed to its first token. Any
OpenAI-compatible server can be a target (vLLM and SGLang too; a server without ``/ready``
shows its 404 there). A target's engine (vigil, vllm, sglang, tgi) is the one ``--target``
names, or else recognised from the metric names of its ``GET /metrics``. Once the engine is
known, its ``/metrics`` is read every round for its requests and progress
(exporter/engine_state.py). The model for the canary is ``canary_model``, or the first that
``GET /v1/models`` lists. Results are kept for the collector; nothing here runs on the scrape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

import requests
from loguru import logger

from vigil.engines import SERIES, recognise

from .engine_state import EngineSnapshot, EngineStateTracker

CHECKS = ("health", "ready", "canary")
USER_AGENT = "llm-vigil-exporter/0.1 (probe)"
CANARY_PROMPT = "Say hello."
MAX_BODY_BYTES = 1 << 20
# An engine's /metrics (vLLM's histograms per model) is larger than an API answer.
METRICS_MAX_BYTES = 16 << 20
# A target whose engine is not named is recognised at start, then checked again this often
# (an engine replaced behind the same address).
RECOGNISE_EVERY_S = 600.0


def target_label(url: str) -> str:
    """The target's URL without credentials, query or fragment, for a label."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class CheckResult:
    success: bool
    status: int  # 0: no answer
    duration_s: float
    finished_at: float
    error: str = ""
    ttft_s: float | None = None  # canary only
    empty: bool | None = None  # canary only


@dataclass
class TargetState:
    label: str
    results: dict[str, CheckResult] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    engine: str | None = None  # vigil, vllm, sglang, tgi; None: not known (yet)
    engine_source: str = ""  # configured (named in --target) or recognised (from /metrics)
    model: str | None = None  # what GET /v1/models lists first; None while not known
    engine_state: EngineSnapshot | None = None  # from its /metrics; None until first read


class TargetProber:
    def __init__(
        self,
        url: str,
        interval: float = 15.0,
        timeout: float = 5.0,
        canary_interval: float = 60.0,
        canary_model: str | None = None,
        canary_max_tokens: int = 2,
        api_key: str | None = None,
        clock: Callable[[], float] = time.time,
        engine: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.label = target_label(url)
        self.interval, self.timeout = interval, timeout
        self.canary_interval, self.canary_model = canary_interval, canary_model
        self.canary_max_tokens = canary_max_tokens
        self.clock = clock
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._state = TargetState(
            self.label,
            counts={(check, result): 0 for check in CHECKS for result in ("success", "failure")},
            engine=engine,
            engine_source="configured" if engine else "",
            model=canary_model,
        )
        self._next_recognition = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._model: str | None = canary_model
        self._next_canary = 0.0
        self._canaries = 0
        self._tracker: EngineStateTracker | None = None

    def start(self) -> None:
        threading.Thread(target=self._loop, name=f"probe {self.label}", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def state(self) -> TargetState:
        with self._lock:
            tracker = self._tracker
            state = replace(
                self._state, results=dict(self._state.results), counts=dict(self._state.counts)
            )
        return replace(state, engine_state=tracker.snapshot() if tracker is not None else None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - a probe bug must not end probing
                logger.exception("probe of {} failed", self.label)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def run_once(self) -> None:
        # The engine: until it is recognised, every round; then now and again. Its /metrics,
        # read once for both, then says what it is doing.
        due = time.monotonic() >= self._next_recognition
        recognising = self._state.engine_source != "configured" and due
        metrics: bytes | str | None = None  # the body, or why it could not be read
        if recognising or self._state.engine is not None:
            metrics = self._fetch_metrics()
        if recognising and isinstance(metrics, bytes) and self._recognise(metrics):
            self._next_recognition = time.monotonic() + RECOGNISE_EVERY_S
        if metrics is not None:
            self._track(metrics)
        if self._state.model is None and self.canary_interval == 0:
            self._learn_model()  # the canary learns it otherwise
        self._record("health", self._get("/health"))
        self._record("ready", self._get("/ready"))
        if self.canary_interval > 0 and time.monotonic() >= self._next_canary:
            result = self._canary()
            # A failed canary is tried again at the next round, not a canary interval later:
            # at start-up the server is not listening yet, and the probe alert must not stay
            # pending for a minute once it is.
            self._next_canary = time.monotonic() + (self.canary_interval if result.success else 0)
            self._record("canary", result)

    def _record(self, check: str, result: CheckResult) -> None:
        with self._lock:
            previous = self._state.results.get(check)
            self._state.results[check] = result
            key = (check, "success" if result.success else "failure")
            self._state.counts[key] = self._state.counts.get(key, 0) + 1
        if not result.success and (previous is None or previous.success):
            logger.warning(
                "probe {} of {} failed: {}",
                check,
                self.label,
                result.error or f"HTTP {result.status}",
            )
        elif result.success and previous is not None and not previous.success:
            logger.info("probe {} of {} succeeds again", check, self.label)

    def _get(self, path: str) -> CheckResult:
        start = time.monotonic()
        try:
            with self.session.get(self.url + path, timeout=self.timeout, stream=True) as response:
                for _chunk in self._within_deadline(response, start):
                    pass  # read (and drop) the body, but never past the deadline
        except (requests.RequestException, ProbeTimeout) as exc:
            return CheckResult(False, 0, time.monotonic() - start, self.clock(), _short(exc))
        return CheckResult(
            response.status_code == 200,
            response.status_code,
            time.monotonic() - start,
            self.clock(),
            "" if response.status_code == 200 else f"HTTP {response.status_code}",
        )

    def _within_deadline(
        self, response: requests.Response, start: float, limit: int = MAX_BODY_BYTES
    ):
        """The body's chunks as they arrive; ProbeTimeout once the whole check has taken longer
        than the timeout (requests' own timeout bounds each read, not the whole answer: a
        server that drips a byte at a time would hold the probe for ever) or the body is huge."""
        size = 0
        raw = response.raw
        while True:
            # read1 returns whatever has arrived (urllib3 2), decoded (gzip) as requests would.
            chunk = raw.read1(65536, decode_content=True)
            if not chunk:
                return
            size += len(chunk)
            if time.monotonic() - start > self.timeout:
                raise ProbeTimeout(f"the answer took longer than {self.timeout:g} s")
            if size > limit:
                raise ProbeTimeout(f"the answer is larger than {limit} bytes")
            yield chunk

    def _fetch_metrics(self) -> bytes | str:
        """The target's /metrics, read within the timeout and the size limit; else why not."""
        start = time.monotonic()
        try:
            with self.session.get(self.url + "/metrics", timeout=self.timeout, stream=True) as r:
                body = b"".join(self._within_deadline(r, start, METRICS_MAX_BYTES))
                r.raise_for_status()
        except (requests.RequestException, ProbeTimeout) as exc:
            logger.debug("cannot read /metrics of {}: {}", self.label, _short(exc))
            return _short(exc)
        return body

    def _track(self, metrics: bytes | str) -> None:
        """Feed the engine's state with this round's /metrics (or its failure)."""
        engine = self._state.engine
        if engine not in SERIES:
            return
        tracker = self._tracker
        if tracker is None or tracker.engine != engine:  # first known, or another engine now
            tracker = EngineStateTracker(self.label, engine, self.clock)
            with self._lock:
                self._tracker = tracker
        if isinstance(metrics, bytes):
            tracker.observe(metrics.decode("utf-8", "replace"))
        else:
            # Refused (nothing listens): gone, not frozen; a timeout keeps the last state.
            tracker.failed(metrics, gone=metrics.startswith("ConnectionError"))

    def _recognise(self, body: bytes) -> bool:
        """Tell the engine from the names in its /metrics; whether it could (an engine known
        before is kept when /metrics cannot be read now)."""
        engine = recognise(body.decode("utf-8", "replace"))
        if engine is None:
            return False
        if engine != self._state.engine:
            logger.info("target {} serves with {}", self.label, engine, engine=engine)
            with self._lock:
                self._state.engine, self._state.engine_source = engine, "recognised"
        return True

    def _learn_model(self) -> None:
        try:
            self._discover_model()
        except (requests.RequestException, ProbeTimeout, ValueError) as exc:
            logger.debug("no model listed by {}: {}", self.label, _short(exc))

    def _discover_model(self) -> str:
        start = time.monotonic()
        with self.session.get(
            self.url + "/v1/models", timeout=self.timeout, stream=True
        ) as response:
            body = b"".join(self._within_deadline(response, start))
            response.raise_for_status()
        listing = json.loads(body)
        models = listing.get("data") if isinstance(listing, dict) else None
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise ValueError("GET /v1/models lists no model")
        model = str(models[0]["id"])
        with self._lock:
            self._state.model = model
        return model

    def _canary(self) -> CheckResult:
        start = time.monotonic()

        def failed(status: int, error: str) -> CheckResult:
            return CheckResult(False, status, time.monotonic() - start, self.clock(), error)

        try:
            if self._model is None:
                self._model = self._discover_model()
        except (requests.RequestException, ProbeTimeout, ValueError) as exc:
            return failed(0, f"no model for the canary: {_short(exc)}")
        self._canaries += 1
        body = {
            "model": self._model,
            "prompt": CANARY_PROMPT,
            "max_tokens": self.canary_max_tokens,
            "temperature": 0,
            "stream": True,
        }
        headers = {"X-Request-Id": f"vigil-canary-{self._canaries}"}
        status = 0
        try:
            with self.session.post(
                self.url + "/v1/completions",
                json=body,
                headers=headers,
                timeout=self.timeout,
                stream=True,
            ) as response:
                status = response.status_code
                chunks = self._within_deadline(response, start)
                if status != 200:
                    if status == 404 and self.canary_model is None:
                        self._model = None  # the served model may have changed
                    text = b"".join(chunks)[:200].decode("utf-8", "replace")
                    return failed(status, f"HTTP {status}: {text}")
                return self._read_stream(chunks, start, failed)
        except (requests.RequestException, ProbeTimeout) as exc:
            return failed(status, _short(exc))

    def _read_stream(self, chunks, start: float, failed) -> CheckResult:
        """Server-sent events of an OpenAI streaming completion, up to ``data: [DONE]``."""
        buffer, text, first_token = b"", [], None
        for chunk in chunks:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return CheckResult(
                        True,
                        200,
                        time.monotonic() - start,
                        self.clock(),
                        ttft_s=first_token,
                        empty=not "".join(text),
                    )
                try:
                    event = json.loads(payload)
                    if "error" in event:
                        return failed(200, f"error event: {str(event['error'])[:200]}")
                    piece = "".join(str(c.get("text") or "") for c in event["choices"])
                except (ValueError, TypeError, AttributeError, KeyError) as exc:
                    return failed(200, f"malformed stream event: {_short(exc)}")
                if piece and first_token is None:
                    first_token = time.monotonic() - start
                text.append(piece)
        return failed(200, "the stream ended without data: [DONE]")


class ProbeTimeout(Exception):
    """A check ran past its deadline."""


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
