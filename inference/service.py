"""The inference service: loads the model in the background and owns the queue and engine.

``/health`` answers from the moment the process starts; ``ready`` turns true only once the model
is loaded, the engine warmed up (a few short generations of its own, so that kernels are
compiled and step costs learned before the first client request) and the engine thread runs.
A failed load is logged with its cause and leaves the service not ready for good (it never
pretends to serve); the supervisor decides what to do.
"""

from __future__ import annotations

import copy
import gc
import threading
import time
from typing import Any

from loguru import logger

from vigil.statedir import remove_identity, write_identity

from . import __version__
from .api.tokenizers import make_copies
from .config import Config
from .doctor.startup import StartupCheckFailed, run_startup_checks
from .engine.engine import Engine
from .engine.faults import FaultInjector
from .engine.memory import CudaMemory, kv_cache_shape
from .engine.queue import RequestQueue
from .model.loader import LoadedModel, load_model
from .telemetry.metrics import InferenceMetrics
from .vision.preprocess import Preprocessing
from .watchdog import Watchdog

# The warm-up's prompt (tokenized as a completion's is): a few tokens with any tokenizer.
WARMUP_PROMPT = "Warming up the engine."


class InferenceService:
    def __init__(self, config: Config, metrics: InferenceMetrics | None = None):
        self.config = config
        self.metrics = metrics
        self.model_name = config.model_name
        self.queue = RequestQueue(
            config.max_queue, metrics.queue_changed if metrics else lambda *_: None
        )
        self.state = "loading"  # loading, loaded, failed
        self.load_error: str | None = None
        self.load_started_at: float | None = None
        self.load_started_ns: int | None = None  # perf_counter_ns, for the watchdog
        self.load_duration_s: float | None = None
        self.loaded: LoadedModel | None = None
        self.api_tokenizers: tuple[Any, ...] = ()  # the API's copies of the tokenizer
        self.engine: Engine | None = None
        self._loader: threading.Thread | None = None
        self._stopping = threading.Event()  # stop() was called: a load under way starts nothing
        self.faults = FaultInjector() if config.enable_fault_injection else None
        self.preprocessing = Preprocessing()  # requests' images being decoded, for the watchdog
        self.watchdog = Watchdog(
            self,
            stall_timeout=config.stall_timeout,
            stall_floor=config.stall_floor,
            stall_factor=config.stall_factor,
            load_timeout=config.load_timeout,
            on_stall=config.on_stall,
        )

    @property
    def loader_thread_id(self) -> int | None:
        return self._loader.ident if self._loader is not None else None

    @property
    def ready(self) -> bool:
        """Loaded, the engine thread is running (it may die, and then we must say so), and it
        is not stalled."""
        return (
            self.state == "loaded"
            and self.engine is not None
            and self.engine.alive
            and self.watchdog.stall is None
        )

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness for a supervisor: fine while loading or serving; not when the engine is
        stalled (or the load is overdue) or its thread has died."""
        stall = self.watchdog.stall
        if stall is not None:
            return False, {
                "status": "stalled",
                "stage": stall.stage,
                "stalled_for_s": round(stall.stalled_for_s(), 3),
                "threshold_s": round(stall.threshold_s, 3),
                "predicted_step_s": (
                    None if stall.predicted_s is None else round(stall.predicted_s, 6)
                ),
                "on_stall": self.config.on_stall,
            }
        if self.state == "loaded" and (self.engine is None or not self.engine.alive):
            return False, {"status": "engine_dead"}
        return True, {"status": "ok"}

    def start(self) -> None:
        self._write_identity()
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self.load_started_ns = time.perf_counter_ns()
        self._loader.start()
        self.watchdog.start()

    def stop(self) -> None:
        self._stopping.set()
        self.watchdog.stop()
        if self.faults is not None:
            self.faults.release()
        if self.engine is not None:
            self.engine.stop()
        remove_identity(self.config.state_dir)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def _write_identity(self) -> None:
        write_identity(
            self.config.state_dir,
            self.model_name,
            role="inference",
            version=__version__,
            host=self.config.host,
            port=self.config.port,
            state=self.state,
            started_at=time.time() if self.load_started_at is None else self.load_started_at,
        )

    def _load(self) -> None:
        started = time.perf_counter()
        self.load_started_at = time.time()
        if self.metrics is not None:
            self.metrics.load_started(self.load_started_at)
        logger.info(
            "loading model {!r} on device {}",
            self.config.model,
            self.config.device,
            model=self.model_name,
        )
        try:
            run_startup_checks(self.config)
            loaded = load_model(self.config)
            engine_view = copy.copy(loaded)
            # The engine decodes while the API thread tokenizes: each gets its own tokenizer,
            # as fast tokenizers are not safe to share across threads.
            engine_view.tokenizer = copy.deepcopy(loaded.tokenizer)
            # And the API's tokenizer pool its own, made here rather than by the first requests:
            # a deep copy holds the GIL, and with it the event loop (api/tokenizers.py).
            api_tokenizers = make_copies(loaded.tokenizer)
            kv_cache = kv_cache_shape(loaded.model.config, loaded.dtype.itemsize)
            engine = Engine(
                engine_view,
                self.queue,
                max_batch_size=self.config.max_batch_size,
                observer=self.metrics,
                seed=self.config.seed,
                faults=self.faults,
                kv_cache=kv_cache,
                memory=(CudaMemory(loaded.device) if loaded.device.type == "cuda" else None),
            )
            if self.config.warmup_tokens:
                self._warm_up(engine, engine_view)
            if self._stopping.is_set():
                return  # stopped while loading: the engine is never started
            engine.start()
        except Exception as exc:  # noqa: BLE001 - whatever it is, say it and stay not-ready
            self.load_duration_s = time.perf_counter() - started
            self.state = "failed"
            self.load_error = str(exc)
            if self.metrics is not None:
                self.metrics.load_finished(self.load_duration_s, ok=False)
            # A failed start-up check is already explained (verdict and fix): no traceback.
            explained = isinstance(exc, StartupCheckFailed)
            logger.opt(exception=None if explained else exc).error(
                "model load failed after {:.1f} s: {}",
                self.load_duration_s,
                exc,
                model=self.model_name,
                load_duration_s=round(self.load_duration_s, 3),
            )
            self._write_identity()
            return
        self.load_duration_s = time.perf_counter() - started
        self.api_tokenizers = api_tokenizers
        self.loaded, self.engine = loaded, engine
        self.state = "loaded"
        # The model's objects (modules, parameters, the tokenizers) live as long as the process,
        # as the imports frozen before serving do: out of the collector's sight, so that its
        # full passes stay short (__main__.serve).
        gc.freeze()
        if self.metrics is not None:
            self.metrics.load_finished(self.load_duration_s, ok=True, loaded=loaded)
            if kv_cache is not None:
                self.metrics.kv_cache_bytes_per_token(kv_cache.bytes_per_token)
        if kv_cache is None:
            logger.warning(
                "the KV cache of {} has no per-token estimate (an attention layout "
                "other than multi-head or grouped-query): no admission control",
                self.model_name,
            )
        logger.info(
            "model loaded in {:.1f} s: {} ({}, {}, context {} tokens)",
            self.load_duration_s,
            self.model_name,
            loaded.dtype_name,
            loaded.device,
            loaded.context_length,
            model=self.model_name,
            load_duration_s=round(self.load_duration_s, 3),
        )
        self._write_identity()

    def _warm_up(self, engine: Engine, loaded: LoadedModel) -> None:
        """The engine's warm-up, on this (the loader's) thread before the engine thread starts
        and before the service is ready: part of the load, under --load-timeout (a hang here is
        a load stall, this thread's stack in its report), and no client request. Text only: a
        vision-language model's tower and image prefills learn from their first requests. A
        warm-up that fails is reported and the load goes on: the error is the one the first
        requests will meet, and they get it with their own context."""
        ids = [i for i in loaded.tokenizer(WARMUP_PROMPT)["input_ids"] if i < loaded.vocab_size]
        ids = ids or [loaded.pad_token_id]
        tokens = min(self.config.warmup_tokens, max(loaded.context_length - len(ids), 0))
        done = engine.warm_up(ids, tokens, timeout_s=self.config.load_timeout)
        costs, device = engine.step_costs, engine.device_key
        decode = costs.predict(device, "decode", 1)
        prefill = costs.predict(device, "prefill", len(ids))
        fields = {
            "warmup_tokens": done.tokens,
            "warmup_s": round(done.seconds, 3),
            "predicted_decode_s": None if decode is None else round(decode, 6),
            "predicted_prefill_s": None if prefill is None else round(prefill, 6),
        }
        if done.error is not None:
            logger.warning(
                "engine warm-up failed after {} token(s) in {:.2f} s: {}; serving without it",
                done.tokens,
                done.seconds,
                done.error,
                model=self.model_name,
                **fields,
            )
            return
        logger.info(
            "engine warmed up in {:.2f} s: {} token(s) over {} generation(s) of a {}-token "
            "prompt (not client requests); predicted steps: decode at batch size 1 {}, "
            "prefill of {} tokens {}",
            done.seconds,
            done.tokens,
            done.generations,
            len(ids),
            "none yet" if decode is None else f"{decode * 1000:.3g} ms",
            len(ids),
            "none yet" if prefill is None else f"{prefill * 1000:.3g} ms",
            model=self.model_name,
            **fields,
        )

    def describe(self) -> dict[str, Any]:
        state = self.state
        if self.watchdog.stall is not None:
            state = "stalled"
        elif state == "loaded" and not self.ready:
            state = "engine_stopped"
        info: dict[str, Any] = {"model": self.model_name, "state": state}
        if self.load_error:
            info["error"] = self.load_error
        if self.loaded is not None:
            info.update(
                device=str(self.loaded.device),
                dtype=self.loaded.dtype_name,
                context_length=self.loaded.context_length,
            )
        return info
