"""The engine thread: batched prefill and a per-token decode loop over any causal LM.

Continuous batching: requests that arrive while a batch is decoding are prefilled as a group
and merged into the running batch (their KV cache left-padded to the same length), so a long
generation never holds new requests back; finished, cancelled and timed-out rows are dropped
from the batch (and from the KV cache) at the next step. Models whose cache cannot be merged
this way (sliding-window or recurrent layers, legacy caches) still batch, but new requests join
only when the running batch is empty.

Out of memory: a prefill group that runs out of memory is retried in halves; a decode step that
does is undone (the KV cache cut back to its length before the step) and the newer half of the
batch is preempted, to be prefilled again (prompt plus the tokens so far) once there is room;
the batch size stays capped until the batch drains. A single request that does not fit gets a
503 naming the memory figures. On CUDA, a request whose estimated KV cache cannot fit in the
free memory waits while others run (memory frees as they finish) and is refused when nothing
runs.

The hot path records perf_counter timestamps and counts; the observer is called once per step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from loguru import logger

from ..model.loader import LoadedModel
from .batch import Batch, Row, left_padded, prefill_groups
from .detokenizer import IncrementalDetokenizer, decode_output
from .errors import (
    engine_dead_error,
    insufficient_memory_error,
    out_of_memory_error,
    shutdown_error,
    step_failed_error,
    timeout_error,
)
from .faults import Fault, FaultInjector, middle_layer
from .memory import KvCacheShape, MemoryProbe, cuda_figures, describe_figures, is_out_of_memory
from .queue import RequestQueue
from .request import EngineError, GenerationRequest, SamplingParams, TextDelta
from .sampling import BatchSampler
from .step_cost import StepCosts


def returned_cache(output: Any) -> Any:
    """The KV cache a forward pass returns (``cache`` since transformers 5.x renamed it)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# The warm-up's generations are named warmup-1, warmup-2, ... in the engine's log lines.
WARMUP_REQUEST_PREFIX = "warmup-"
# Prefills beyond the ones a step-cost bucket needs before it predicts (one, in case a step of
# the warm-up is an outlier: the median then still has a majority of ordinary steps).
WARMUP_MARGIN_PREFILLS = 1


def warmup_plan(tokens: int, prefills: int) -> list[int]:
    """The ``max_tokens`` of each warm-up generation: ``tokens`` in all, over ``prefills``
    generations (fewer when there are fewer tokens), as evenly as possible. A generation of n
    tokens is one prefill and n - 1 decode steps at batch size 1, so the warm-up runs
    min(tokens, prefills) prefills and the rest as decode steps."""
    if tokens <= 0:
        return []
    rounds = max(1, min(tokens, prefills))
    share, extra = divmod(tokens, rounds)
    return [share + (1 if index < extra else 0) for index in range(rounds)]


@dataclass(frozen=True)
class WarmUp:
    """What a warm-up did: its generations, the tokens generated, its seconds, and the error
    that ended it early (None when it completed)."""

    generations: int
    tokens: int
    seconds: float
    error: str | None = None


class EngineObserver(Protocol):
    """What the engine reports as it works (telemetry implements it; tests may too)."""

    def step(self, stage: str, batch_size: int) -> None: ...
    def running_changed(self, running: int) -> None: ...
    def batch_formed(self, new_requests: int) -> None: ...
    def out_of_memory(self, stage: str) -> None: ...
    def admission_refused(self, reason: str) -> None: ...
    def fault_fired(self, fault: str, stage: str) -> None: ...


class NullObserver:
    def step(self, stage: str, batch_size: int) -> None:
        pass

    def running_changed(self, running: int) -> None:
        pass

    def batch_formed(self, new_requests: int) -> None:
        pass

    def out_of_memory(self, stage: str) -> None:
        pass

    def admission_refused(self, reason: str) -> None:
        pass

    def fault_fired(self, fault: str, stage: str) -> None:
        pass


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        queue: RequestQueue,
        *,
        max_batch_size: int,
        observer: EngineObserver | None = None,
        seed: int | None = None,
        faults: FaultInjector | None = None,
        kv_cache: KvCacheShape | None = None,
        memory: MemoryProbe | None = None,
        step_costs: StepCosts | None = None,
    ):
        self.loaded = loaded
        self.queue = queue
        self.max_batch_size = max_batch_size
        self.observer = observer or NullObserver()
        self.faults = faults
        # Prefill and decode faults fire in the language model (a VL model's vision tower may
        # have as many blocks, or more, and runs only in stage vision).
        language_model = loaded.vision.language_model() if loaded.vision is not None else None
        self._fault_layer = (
            middle_layer(language_model or loaded.model) if faults is not None else None
        )
        self._vision_fault_layer = (
            loaded.vision.middle_block()
            if faults is not None and loaded.vision is not None
            else None
        )
        self._force_eos = False  # an injected empty output, for the prefill under way
        self.kv_cache = kv_cache
        self.memory = memory  # admission control runs only with both an estimate and a probe
        self._preempted: list[Row] = []  # rows pushed out of the batch by an OOM
        self._oom_cap: int | None = None  # batch size limit after an OOM, until the batch drains
        self._generator = torch.Generator(device=loaded.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self._batch: Batch | None = None
        self._admitting: list[GenerationRequest] = []  # taken from the queue, not yet in the batch
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Read by the watchdog: the time of the last prefill or decode step, and what it is doing.
        self.last_progress_ns = time.perf_counter_ns()
        self.stage = "idle"
        self.iterations = 0  # turns of the engine loop: a stuck step stops it
        # What each step costs on this device, learned as it runs (step_cost.py), and the step
        # under way: (stage, units, perf_counter_ns at its start), one tuple assigned at once so
        # that the watchdog reads a consistent view; it predicts that step's duration from both.
        # A step runs while its start is at or after last_progress_ns (a completed step makes
        # progress at its end); a failed one is set back to None, so that the time after it
        # counts as outside any step.
        self.step_costs = step_costs if step_costs is not None else StepCosts()
        self.device_key = str(loaded.device)
        self.current_step: tuple[str, int, int] | None = None
        # Mean seconds a request spends in the engine, for Retry-After estimates.
        self.mean_request_seconds = 1.0

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self.faults is not None:
            self.faults.release()
        self.queue.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        batch = self._batch
        return len(batch) if batch is not None else 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident if self._thread is not None else None

    def held_requests(self) -> list[GenerationRequest]:
        """The requests the engine has taken from the queue and not finished (a snapshot, safe
        to take from another thread)."""
        batch = self._batch
        rows = list(batch.rows) if batch is not None else []
        held = [row.request for row in rows + list(self._preempted) if not row.done]
        held += [r for r in list(self._admitting) if r not in held]
        return [r for r in held if not r.ended]

    def _run(self) -> None:
        final_error = shutdown_error()
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self.iterations += 1
                    if self._batch is None and not self._preempted:
                        self.stage = "idle"
                        self.queue.wait(timeout=0.5)
                        if self._stopping.is_set():
                            break
                    self._turn()
        except BaseException as exc:
            final_error = engine_dead_error(exc)
            logger.opt(exception=exc).critical("the engine thread died: {}", exc)
            raise
        finally:
            self._fail_everything(final_error)

    def _turn(self) -> None:
        """One turn of the loop's work: admit (and prefill) what waits, then one decode step."""
        try:
            self._admit()
            if self._batch is not None:
                self._decode_step()
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            self.current_step = None
            self._fail_held(exc)

    # ---- warm-up ---------------------------------------------------------------------------

    def warm_up(self, prompt_ids: Sequence[int], tokens: int, *, timeout_s: float) -> WarmUp:
        """Generate ``tokens`` tokens from ``prompt_ids`` through the engine's own path
        (queue, admission, prefill, decode steps, sampling), on the calling thread, before the
        engine thread starts: kernels are selected and compiled, caches filled, and the step
        costs learned, before the first client request (see ``warmup_plan`` for the split).

        Nothing of it reaches the observer (the metrics count client work only) or the client
        queue; a failed generation ends the warm-up and is returned, not raised. Greedy
        sampling: the seeded generator is not drawn from. Each generation must end within
        ``timeout_s`` of the start (the engine's deadline check); a step that never returns
        is the caller's watchdog's to catch."""
        if self._thread is not None:
            raise RuntimeError("the engine warms up before it starts")
        plan = warmup_plan(tokens, self.step_costs.steps_to_predict + WARMUP_MARGIN_PREFILLS)
        started = time.perf_counter_ns()
        deadline = started + int(timeout_s * 1e9)
        observer, queue, mean = self.observer, self.queue, self.mean_request_seconds
        self.observer, self.queue = NullObserver(), RequestQueue(1)
        generated, error = 0, None
        try:
            with torch.inference_mode():
                for index, max_tokens in enumerate(plan, 1):
                    request = GenerationRequest(
                        request_id=f"{WARMUP_REQUEST_PREFIX}{index}",
                        prompt_ids=list(prompt_ids),
                        params=SamplingParams(
                            max_tokens=max_tokens, temperature=0.0, ignore_eos=True
                        ),
                        stream=False,
                        deadline_ns=deadline,
                    )
                    self.queue.put(request)
                    while not request.ended:
                        self._turn()
                    generated += request.completion_tokens
                    if request.error is not None:
                        error = request.error.message
                        break
        finally:
            self.observer, self.queue, self.mean_request_seconds = observer, queue, mean
            self._batch, self._preempted, self._admitting = None, [], []
            self._oom_cap = None
            self.stage, self.current_step = "idle", None
            self.last_progress_ns = time.perf_counter_ns()
        return WarmUp(
            generations=len(plan),
            tokens=generated,
            seconds=(time.perf_counter_ns() - started) / 1e9,
            error=error,
        )

    def _fail_held(self, exc: Exception) -> None:
        """A step failed: every request the engine holds gets the error; the queue is kept."""
        held = self.held_requests()
        if is_out_of_memory(exc, self.loaded.device):
            self._out_of_memory(exc, held)
        else:
            self._fail_step(exc, held)
        self._batch = None
        self._admitting = []
        self._preempted = []
        self.observer.running_changed(0)

    def _fail_step(self, exc: Exception, requests: Sequence[GenerationRequest]) -> None:
        logger.opt(exception=exc).error(
            "{} step failed for {} request(s): {}: {}",
            self.stage,
            len(requests),
            type(exc).__name__,
            exc,
            request_ids=[r.request_id for r in requests],
        )
        error = step_failed_error(self.stage, exc)
        for request in requests:
            request.fail(error)

    # ---- finishing requests ----------------------------------------------------------------

    def _finish(self, row: Row, reason: str) -> None:
        request = row.request
        row.done = True
        if row.detokenizer is not None:
            rest = row.detokenizer.flush()
            if rest and request.stream:
                request.emit(TextDelta(rest))
            text = row.detokenizer.text
        else:
            text = decode_output(self.loaded.tokenizer, request.prompt_ids, request.output_ids)
        if request.finish(reason, text) and request.scheduled_ns is not None:
            seconds = (request.finished_ns - request.scheduled_ns) / 1e9
            self.mean_request_seconds += 0.1 * (seconds - self.mean_request_seconds)

    def _fail_everything(self, error: EngineError) -> None:
        for request in self.held_requests():
            request.fail(error)
        if self._batch is not None:
            self._batch = None
            self.observer.running_changed(0)
        self._preempted = []
        for request in self.queue.drain():
            request.fail(error)

    def _out_of_memory(self, exc: BaseException, failed: Sequence[GenerationRequest]) -> None:
        """Count an OOM, give the allocator's cache back, and fail ``failed`` with the figures."""
        self.observer.out_of_memory(self.stage)
        device = self.loaded.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        figures = cuda_figures(device)
        text = describe_figures(figures, device)
        logger.error(
            "out of memory during {} with {} request(s) in the batch: {}{}",
            self.stage,
            len(failed) + self.running,
            str(exc).splitlines()[0] if str(exc) else "",
            f"; {text}" if text else "",
            stage=self.stage,
            request_ids=[r.request_id for r in failed],
            memory=figures,
        )
        error = out_of_memory_error(self.stage, exc, text)
        for request in failed:
            request.fail(error)

    def _fail_dead(self, requests: Sequence[GenerationRequest]) -> None:
        """Requests found cancelled or out of time: say why (a cancelled one has no listener)."""
        for request in requests:
            if request.cancelled:
                request.end_cancelled()
            else:
                request.fail(timeout_error(request))

    # ---- admission and prefill -------------------------------------------------------------

    def _admit(self) -> None:
        batch = self._batch
        running = len(batch) if batch else 0
        if batch is None and not self._preempted:
            self._oom_cap = None  # drained: the next batch may be full size again
        limit = self.max_batch_size if self._oom_cap is None else self._oom_cap
        room = limit - running
        if room <= 0 or not (self._preempted or len(self.queue)):
            return
        if batch is not None and not batch.mergeable:
            return
        rows = self._take_preempted(room)
        if len(rows) < room:
            live, dead = self.queue.take(room - len(rows))
            self._fail_dead(dead)
            rows += [
                Row(
                    r,
                    IncrementalDetokenizer(self.loaded.tokenizer, r.prompt_ids, r.params.stop)
                    if r.needs_incremental_text
                    else None,
                )
                for r in live
            ]
        if self.memory is not None and self.kv_cache is not None:
            rows = self._admit_by_memory(rows)
        if not rows:
            return
        self._admitting = [row.request for row in rows]
        groups = prefill_groups(rows)
        formed = 0
        for index, group in enumerate(groups):
            if self._batch is not None and not self._batch.mergeable:
                # A cache that cannot grow: the other groups wait for the batch to drain.
                self._preempted[:0] = [row for later in groups[index:] for row in later]
                break
            new_batch = self._prefill_with_retry(group, running + formed)
            if new_batch is None:
                continue
            formed += len(new_batch)
            self.observer.batch_formed(len(new_batch))
            if self._batch is None:
                self._batch = new_batch
            else:
                self._merge(new_batch)
        self._admitting = []
        if self._batch is not None and not self._drop_done_rows():
            self.observer.running_changed(len(self._batch))

    def _prefill_with_retry(self, rows: list[Row], running: int) -> Batch | None:
        """Prefill a group; out of memory, retry it in halves (the rest waits, preempted)."""
        attempted = len(rows)
        while rows:
            try:
                return self._prefill(rows)
            except Exception as exc:  # noqa: BLE001 - only the new group fails; the batch goes on
                self.current_step = None  # the failed pass runs no more (see the watchdog)
                if not is_out_of_memory(exc, self.loaded.device):
                    self._fail_step(exc, [row.request for row in rows])
                    return None
                if len(rows) == 1:  # out of memory, alone: answer it
                    self._out_of_memory(exc, [rows[0].request])
                    return None
                self._out_of_memory(exc, [])
                half = len(rows) // 2
                self._preempted[:0] = rows[half:]
                rows = rows[:half]
                self._oom_cap = running + half
                logger.warning(
                    "prefill retried with {} of {} request(s) after running out of memory",
                    half,
                    attempted,
                )
        return None

    def _take_preempted(self, room: int) -> list[Row]:
        now = time.perf_counter_ns()
        dead = [
            row
            for row in self._preempted
            if row.request.cancelled or now >= row.request.deadline_ns
        ]
        if dead:
            self._fail_dead([row.request for row in dead])
            self._preempted = [row for row in self._preempted if row not in dead]
        rows, self._preempted = self._preempted[:room], self._preempted[room:]
        for row in rows:
            row.preempted = False
        return rows

    def _admit_by_memory(self, rows: list[Row]) -> list[Row]:
        """Keep the rows whose KV cache fits in the free memory; the others wait for running
        requests to finish, or are refused when none runs (the memory will not come)."""
        assert self.memory is not None and self.kv_cache is not None
        kv = self.kv_cache
        available = self.memory.available_bytes()
        batch = self._batch
        if batch is not None:  # what the running rows will still add, one token at a time
            available -= sum(
                kv.bytes_for(row.request.params.max_tokens - row.request.completion_tokens)
                for row in batch.rows
                if not row.done
            )
        admitted: list[Row] = []
        for i, row in enumerate(rows):
            request = row.request
            need = kv.bytes_for(request.prompt_tokens + request.params.max_tokens)
            if need <= available:
                admitted.append(row)
                available -= need
                continue
            if batch is not None or admitted:
                self._preempted[:0] = rows[i:]  # wait, in order, for memory to free up
                break
            self.observer.admission_refused("insufficient_memory")
            error = insufficient_memory_error(
                request, kv, need, max(available, 0), self.loaded.device
            )
            logger.warning(
                "request refused before it ran: {}",
                error.message,
                request_id=request.request_id,
                trace_id=request.trace_id,
                kv_cache_bytes=need,
                available_bytes=available,
            )
            request.fail(error)
        return admitted

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        prefill: bool,
        **extra: Any,
    ):
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            self.loaded.cache_argument: cache,
            "use_cache": True,
            **extra,
        }
        if self.loaded.accepts_position_ids:
            kwargs["position_ids"] = position_ids
        if prefill and self.loaded.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self._run_stage(self.loaded.model, kwargs, self._fault_layer)

    def _run_stage(self, module: Any, kwargs: dict[str, Any], fault_layer: Any):
        """``module(**kwargs)``, firing a fault armed for the current stage inside it."""
        if self.faults is not None and self.faults.pending:
            fault = self.faults.take(self.stage)
            if fault is not None:
                return self._forward_with_fault(fault, module, kwargs, fault_layer)
        return module(**kwargs)

    def _forward_with_fault(
        self, fault: Fault, module: Any, kwargs: dict[str, Any], fault_layer: Any
    ):
        self.observer.fault_fired(fault.kind, self.stage)
        logger.warning(
            "injected fault {} fires in {}",
            fault.kind,
            self.stage,
            fault=fault.describe(),
            request_ids=[r.request_id for r in self.held_requests()],
        )
        if fault.kind == "empty":
            self._force_eos = True
            return module(**kwargs)
        handle = fault_layer.register_forward_pre_hook(lambda layer, args: self.faults.fire(fault))
        try:
            return module(**kwargs)
        finally:
            handle.remove()

    def _prefill(self, rows: list[Row]) -> Batch:
        """Prefill a group of rows: new requests, or preempted ones (prompt plus their tokens so
        far, recomputed)."""
        now = time.perf_counter_ns()
        running = self.running
        for row in rows:
            request = row.request
            if request.scheduled_ns is None:
                request.scheduled_ns = now
                request.batch_size_at_prefill = running + len(rows)
        self._force_eos = False  # before the vision stage, where an empty fault may fire
        vision = rows[0].request.vision
        features = self._encode_images(rows[0].request) if vision is not None else None
        self.stage = "prefill"
        device = self.loaded.device
        ids, mask = left_padded(
            [row.request.prompt_ids + row.request.output_ids for row in rows],
            self.loaded.pad_token_id,
        )
        self.current_step = ("prefill", ids.numel(), time.perf_counter_ns())
        ids, mask = ids.to(device), mask.to(device)
        if features is None:
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            positions = mask.sum(-1)
            output = self._forward(ids, mask, position_ids, None, prefill=True)
        else:  # one request with images: its 3-D positions, its encoded images
            request = rows[0].request
            token_types = vision.mm_token_type_ids + [0] * len(request.output_ids)
            position_ids, positions = self.loaded.vision.positions(
                ids,
                torch.tensor([token_types], dtype=torch.long, device=device),
                vision.image_grid_thw.to(device),
                mask,
            )
            output = self._forward(
                ids, mask, position_ids, None, prefill=True, mm_encoder_outputs={"image": features}
            )
        batch = Batch(
            rows=rows,
            cache=returned_cache(output),
            attention_mask=mask,
            positions=positions,
            last_tokens=torch.zeros(len(rows), dtype=torch.long, device=device),
            sampler=self._sampler_for(rows),
        )
        self._choose_and_accept(batch, output.logits[:, -1, :], "prefill")
        return batch

    def _encode_images(self, request: GenerationRequest) -> Any:
        """Run the vision tower on one request's images (the stage ``vision``)."""
        self.stage = "vision"
        vision, tower = request.vision, self.loaded.vision
        device = self.loaded.device
        started = request.vision_started_ns = time.perf_counter_ns()
        request.vision_finished_ns = None  # a preempted request's images are encoded again
        self.current_step = ("vision", int(vision.pixel_values.shape[0]), started)
        features = self._run_stage(
            tower.encode,
            {
                "pixel_values": vision.pixel_values.to(device),
                "image_grid_thw": vision.image_grid_thw.to(device),
            },
            self._vision_fault_layer,
        )
        # The tower's kernels run asynchronously on CUDA (see _choose_and_accept): its end is
        # taken after waiting for them, so that its GPU time is the vision step's, not charged
        # to the prefill that consumes the features. One wait per request with images, off the
        # decode path; on the CPU the pass has finished already.
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter_ns()
        request.vision_finished_ns = now
        self.last_progress_ns = now  # the tower's pass is progress: the watchdog sees it move
        self._step_done(now)
        self.observer.step("vision", 1)
        return features

    def _step_done(self, now_ns: int) -> None:
        """The step under way completed at ``now_ns``: learn what it cost."""
        step = self.current_step
        if step is not None:
            stage, units, started_ns = step
            self.step_costs.record(self.device_key, stage, units, (now_ns - started_ns) / 1e9)

    def _sampler_for(self, rows: Sequence[Row]) -> BatchSampler:
        return BatchSampler.build(
            [row.request.params for row in rows],
            [row.request.output_ids for row in rows],
            self._vocab_size,
            self.loaded.eos_token_ids,
            self.loaded.device,
            self._generator,
        )

    def _merge(self, new: Batch) -> None:
        """Append the rows of a freshly prefilled batch to the running one."""
        old = self._batch
        assert old is not None
        old.append(new)
        old.sampler = self._sampler_for(old.rows)
        old.update_eos_suppression()

    # ---- decoding --------------------------------------------------------------------------

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        now = time.perf_counter_ns()
        for row in batch.rows:
            request = row.request
            if request.cancelled:
                row.done = True
                request.end_cancelled()
            elif now >= request.deadline_ns:
                row.done = True
                request.fail(timeout_error(request))
        if self._drop_done_rows():
            return
        self.stage = "decode"
        self.current_step = ("decode", len(batch), time.perf_counter_ns())
        mask_before, positions_before = batch.attention_mask, batch.positions
        batch.attention_mask = torch.cat(
            [batch.attention_mask, batch.attention_mask.new_ones((len(batch), 1))], dim=1
        )
        try:
            output = self._forward(
                batch.last_tokens[:, None],
                batch.attention_mask,
                batch.positions[:, None],
                batch.cache,
                prefill=False,
            )
            batch.cache = returned_cache(output)
            batch.positions = batch.positions + 1
            self._choose_and_accept(batch, output.logits[:, -1, :], "decode")
        except Exception as exc:
            self.current_step = None  # the failed pass runs no more (see the watchdog)
            if (
                not is_out_of_memory(exc, self.loaded.device)
                or len(batch) == 1
                or not batch.mergeable
            ):
                raise  # not memory, nothing to split, or a cache that cannot be cut back
            batch.rewind(mask_before, positions_before)
            self._out_of_memory(exc, [])
            self._preempt_newer_half(batch)
            return
        self._drop_done_rows()

    def _preempt_newer_half(self, batch: Batch) -> None:
        keep = len(batch) // 2
        preempted = batch.rows[keep:]
        for row in preempted:
            row.preempted = True
        self._preempted[:0] = preempted
        self._oom_cap = keep
        logger.warning(
            "{} request(s) preempted after running out of memory during decode; they "
            "are prefilled again when there is room",
            len(preempted),
            request_ids=[row.request.request_id for row in preempted],
        )
        self._drop_done_rows()

    def _choose_and_accept(self, batch: Batch, logits: torch.Tensor, stage: str) -> None:
        if batch.suppress_eos is None and stage == "prefill":
            batch.update_eos_suppression()
        tokens = batch.sampler.select(logits, batch.suppress_eos)
        if self._force_eos and stage == "prefill":  # an injected empty output
            tokens = torch.full_like(tokens, min(self.loaded.eos_token_ids))
            self._force_eos = False
        batch.sampler.record(tokens)
        batch.last_tokens = tokens
        # The step ends when the host has its tokens, not before: on CUDA, kernel launches
        # return at once and the work runs later ("By default, GPU operations are asynchronous
        # [...] PyTorch automatically performs necessary synchronization when copying data
        # between CPU and GPU", https://docs.pytorch.org/docs/stable/notes/cuda.html
        # #asynchronous-execution), so a clock read before this copy would time the launches
        # of the forward pass and the sampling, not their work. This copy is the step's own
        # synchronisation (the tokens are needed here anyway): nothing is added to the hot path.
        chosen = tokens.tolist()
        now = time.perf_counter_ns()
        self.last_progress_ns = now
        self._step_done(now)
        self.observer.step(stage, len(batch))
        eos_ids = self.loaded.eos_token_ids
        suppression_changed = False
        for row, token in zip(batch.rows, chosen, strict=True):
            request = row.request
            if row.done:
                continue
            if request.first_token_ns is None:
                request.first_token_ns = now
            params = request.params
            if token in eos_ids and not params.ignore_eos:
                self._finish(row, "stop")
                continue
            request.output_ids.append(token)
            request.last_token_ns = now
            generated = len(request.output_ids)
            if generated == params.min_tokens and not params.ignore_eos:
                suppression_changed = True
            if row.detokenizer is not None:
                delta = row.detokenizer.add(token)
                if delta and request.stream:
                    request.emit(TextDelta(delta))
                if row.detokenizer.stopped:
                    request.stop_string_matched = True
                    self._finish(row, "stop")
                    continue
            if generated >= params.max_tokens:
                self._finish(row, "length")
        if suppression_changed:
            batch.update_eos_suppression()

    def _drop_done_rows(self) -> bool:
        """Remove finished rows from the batch; True when the batch is now empty."""
        batch = self._batch
        if batch is None:
            return True
        keep = [i for i, row in enumerate(batch.rows) if not (row.done or row.preempted)]
        if len(keep) == len(batch.rows):
            return False
        if not keep:
            self._batch = None
            self.observer.running_changed(0)
            return True
        batch.keep(keep)
        batch.sampler = self._sampler_for(batch.rows)
        batch.update_eos_suppression()
        batch.trim_padding()
        self.observer.running_changed(len(batch))
        return False
