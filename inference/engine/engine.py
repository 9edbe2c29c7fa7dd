"""The engine thread: batched prefill and a per-token decode loop over any causal LM.

Continuous batching: requests that arrive while a batch is decoding are prefilled as a group
and merged into the running batch (their KV cache left-padded to the same length), so a long
generation never holds new requests back; finished, cancelled and timed-out rows are dropped
from the batch (and from the KV cache) at the next step. Models whose cache cannot be merged
this way (sliding-window or recurrent layers, legacy caches) still batch, but new requests join
only when the running batch is empty.

The hot path records perf_counter timestamps and counts; the observer is called once per step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from loguru import logger

from ..model.loader import LoadedModel
from .detokenizer import IncrementalDetokenizer, decode_output
from .queue import RequestQueue
from .request import EngineError, Failed, Finished, GenerationRequest, TextDelta
from .sampling import BatchSampler


class EngineObserver(Protocol):
    """What the engine reports as it works (telemetry implements it; tests may too)."""

    def step(self, stage: str, batch_size: int) -> None: ...
    def running_changed(self, running: int) -> None: ...
    def batch_formed(self, new_requests: int) -> None: ...


class NullObserver:
    def step(self, stage: str, batch_size: int) -> None:
        pass

    def running_changed(self, running: int) -> None:
        pass

    def batch_formed(self, new_requests: int) -> None:
        pass


def timeout_error(request: GenerationRequest) -> EngineError:
    timeout_s = (request.deadline_ns - request.arrival_ns) / 1e9
    where = "in the queue" if request.scheduled_ns is None else (
        f"after {request.completion_tokens} generated tokens")
    return EngineError(504, "timeout", f"the request's deadline of {timeout_s:g} s passed {where}; "
                       "try a smaller max_tokens or retry later", code="deadline_exceeded")


def shutdown_error() -> EngineError:
    return EngineError(503, "server_unavailable", "the server is shutting down; retry",
                       code="shutting_down")


@dataclass
class _Row:
    request: GenerationRequest
    detokenizer: IncrementalDetokenizer | None
    done: bool = False


@dataclass
class _Batch:
    rows: list[_Row]
    cache: Any  # a transformers Cache, or a legacy tuple of (key, value) per layer
    attention_mask: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B] position id of each row's next token
    last_tokens: torch.Tensor  # [B]
    sampler: BatchSampler
    suppress_eos: torch.Tensor | None = field(default=None)  # indices of rows that may not end yet

    def __len__(self) -> int:
        return len(self.rows)


def _mergeable(cache: Any) -> bool:
    """True for a DynamicCache made only of plain full-attention layers."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    return (type(cache) is DynamicCache and bool(getattr(cache, "layers", None))
            and all(type(layer) is DynamicLayer for layer in cache.layers))


def _left_pad(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _select_cache(cache: Any, keep: torch.Tensor) -> Any:
    if isinstance(cache, tuple):
        return tuple(tuple(t.index_select(0, keep) for t in layer) for layer in cache)
    cache.batch_select_indices(keep)
    return cache


class Engine:
    def __init__(self, loaded: LoadedModel, queue: RequestQueue, *, max_batch_size: int,
                 observer: EngineObserver | None = None,
                 seed: int | None = None):
        self.loaded = loaded
        self.queue = queue
        self.max_batch_size = max_batch_size
        self.observer = observer or NullObserver()
        self._generator = torch.Generator(device=loaded.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self._batch: _Batch | None = None
        self._admitting: list[GenerationRequest] = []  # taken from the queue, not yet in the batch
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Read by the watchdog: the time of the last prefill or decode step, and what it is doing.
        self.last_progress_ns = time.perf_counter_ns()
        self.stage = "idle"
        # Mean seconds a request spends in the engine, for Retry-After estimates.
        self.mean_request_seconds = 1.0

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
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

    def _run(self) -> None:
        final_error = shutdown_error()
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    if self._batch is None:
                        self.stage = "idle"
                        self.queue.wait(timeout=0.5)
                        if self._stopping.is_set():
                            break
                    try:
                        self._admit()
                        if self._batch is not None:
                            self._decode_step()
                    except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                        self._fail_held(exc)
        except BaseException as exc:
            final_error = EngineError(500, "server_error", f"the engine thread died: "
                                      f"{type(exc).__name__}: {exc}", code="engine_dead")
            logger.opt(exception=exc).critical("the engine thread died: {}", exc)
            raise
        finally:
            self._fail_everything(final_error)

    def _fail_held(self, exc: Exception) -> None:
        """A step failed: every request the engine holds gets the error; the queue is kept."""
        held = [row.request for row in self._batch.rows if not row.done] if self._batch else []
        held += [r for r in self._admitting if r.finished_ns is None and r not in held]
        self._fail_step(exc, held)
        self._batch = None
        self._admitting = []
        self.observer.running_changed(0)

    def _fail_step(self, exc: Exception, requests: Sequence[GenerationRequest]) -> None:
        logger.opt(exception=exc).error(
            "{} step failed for {} request(s): {}: {}", self.stage, len(requests),
            type(exc).__name__, exc, request_ids=[r.request_id for r in requests])
        error = EngineError(500, "server_error", f"generation failed in {self.stage}: "
                            f"{type(exc).__name__}: {exc}", code="generation_failed")
        for request in requests:
            self._fail(request, error)

    # ---- finishing requests ----------------------------------------------------------------

    def _finish(self, row: _Row, reason: str) -> None:
        request = row.request
        row.done = True
        if row.detokenizer is not None:
            rest = row.detokenizer.flush()
            if rest and request.stream:
                request.emit(TextDelta(rest))
            request.text = row.detokenizer.text
        else:
            request.text = decode_output(self.loaded.tokenizer, request.prompt_ids,
                                         request.output_ids)
        request.finish_reason = reason
        request.finished_ns = time.perf_counter_ns()
        if request.scheduled_ns is not None:
            seconds = (request.finished_ns - request.scheduled_ns) / 1e9
            self.mean_request_seconds += 0.1 * (seconds - self.mean_request_seconds)
        request.emit(Finished(reason))

    @staticmethod
    def _fail(request: GenerationRequest, error: EngineError) -> None:
        request.error = error
        request.finished_ns = time.perf_counter_ns()
        request.emit(Failed(error))

    def _fail_everything(self, error: EngineError) -> None:
        if self._batch is not None:
            for row in self._batch.rows:
                if not row.done:
                    self._fail(row.request, error)
            self._batch = None
            self.observer.running_changed(0)
        for request in self.queue.drain():
            self._fail(request, error)

    def _fail_dead(self, requests: Sequence[GenerationRequest]) -> None:
        """Requests found cancelled or out of time: say why (a cancelled one has no listener)."""
        for request in requests:
            if request.cancelled:
                request.finished_ns = time.perf_counter_ns()
            else:
                self._fail(request, timeout_error(request))

    # ---- admission and prefill -------------------------------------------------------------

    def _admit(self) -> None:
        batch = self._batch
        room = self.max_batch_size - (len(batch) if batch else 0)
        if room <= 0 or not len(self.queue):
            return
        if batch is not None and not _mergeable(batch.cache):
            return
        live, dead = self.queue.take(room)
        self._fail_dead(dead)
        if not live:
            return
        self._admitting = live
        try:
            new_batch = self._prefill(live)
        except Exception as exc:  # noqa: BLE001 - only the new group fails; the batch goes on
            self._fail_step(exc, live)
            self._admitting = []
            return
        self.observer.batch_formed(len(live))
        if self._batch is None:
            self._batch = new_batch
        else:
            self._merge(new_batch)
        self._admitting = []
        if not self._drop_done_rows():
            self.observer.running_changed(len(self._batch))

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: Any, prefill: bool):
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "past_key_values": cache, "use_cache": True}
        if self.loaded.accepts_position_ids:
            kwargs["position_ids"] = position_ids
        if prefill and self.loaded.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.loaded.model(**kwargs)

    def _prefill(self, requests: list[GenerationRequest]) -> _Batch:
        now = time.perf_counter_ns()
        running = self.running
        for request in requests:
            request.scheduled_ns = now
            request.prefill_start_ns = now
            request.batch_size_at_prefill = running + len(requests)
        self.stage = "prefill"
        device = self.loaded.device
        width = max(r.prompt_tokens for r in requests)
        pad = self.loaded.pad_token_id
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            n = request.prompt_tokens
            ids[i, width - n:] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        output = self._forward(ids, mask, position_ids, None, prefill=True)
        rows = [_Row(r, IncrementalDetokenizer(self.loaded.tokenizer, r.prompt_ids, r.params.stop)
                     if r.needs_incremental_text else None) for r in requests]
        batch = _Batch(
            rows=rows, cache=output.past_key_values, attention_mask=mask,
            positions=mask.sum(-1), last_tokens=torch.zeros(len(rows), dtype=torch.long,
                                                            device=device),
            sampler=self._sampler_for(rows))
        self._choose_and_accept(batch, output.logits[:, -1, :], "prefill")
        return batch

    def _sampler_for(self, rows: Sequence[_Row]) -> BatchSampler:
        return BatchSampler.build(
            [row.request.params for row in rows], [row.request.output_ids for row in rows],
            self._vocab_size, self.loaded.eos_token_ids, self.loaded.device, self._generator)

    def _merge(self, new: _Batch) -> None:
        """Append the rows of a freshly prefilled batch to the running one."""
        old = self._batch
        assert old is not None
        width = max(old.attention_mask.shape[1], new.attention_mask.shape[1])
        pad_old = width - old.attention_mask.shape[1]
        pad_new = width - new.attention_mask.shape[1]
        for old_layer, new_layer in zip(old.cache.layers, new.cache.layers):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, pad_old, -2),
                                        _left_pad(new_layer.keys, pad_new, -2)], dim=0)
            old_layer.values = torch.cat([_left_pad(old_layer.values, pad_old, -2),
                                          _left_pad(new_layer.values, pad_new, -2)], dim=0)
        old.attention_mask = torch.cat([_left_pad(old.attention_mask, pad_old, 1),
                                        _left_pad(new.attention_mask, pad_new, 1)], dim=0)
        old.positions = torch.cat([old.positions, new.positions])
        old.last_tokens = torch.cat([old.last_tokens, new.last_tokens])
        old.rows.extend(new.rows)
        old.sampler = self._sampler_for(old.rows)
        self._update_eos_suppression(old)

    # ---- decoding --------------------------------------------------------------------------

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        now = time.perf_counter_ns()
        for row in batch.rows:
            request = row.request
            if request.cancelled:
                row.done = True
                request.finished_ns = now
            elif now >= request.deadline_ns:
                row.done = True
                self._fail(request, timeout_error(request))
        if self._drop_done_rows():
            return
        self.stage = "decode"
        batch.attention_mask = torch.cat(
            [batch.attention_mask, batch.attention_mask.new_ones((len(batch), 1))], dim=1)
        output = self._forward(batch.last_tokens[:, None], batch.attention_mask,
                               batch.positions[:, None], batch.cache, prefill=False)
        batch.cache = output.past_key_values
        batch.positions += 1
        self._choose_and_accept(batch, output.logits[:, -1, :], "decode")
        self._drop_done_rows()

    def _update_eos_suppression(self, batch: _Batch) -> None:
        rows = [i for i, row in enumerate(batch.rows)
                if row.request.params.ignore_eos
                or len(row.request.output_ids) < row.request.params.min_tokens]
        batch.suppress_eos = (torch.tensor(rows, dtype=torch.long, device=self.loaded.device)
                              if rows else None)

    def _choose_and_accept(self, batch: _Batch, logits: torch.Tensor, stage: str) -> None:
        if batch.suppress_eos is None and stage == "prefill":
            self._update_eos_suppression(batch)
        tokens = batch.sampler.select(logits, batch.suppress_eos)
        batch.sampler.record(tokens)
        batch.last_tokens = tokens
        now = time.perf_counter_ns()
        self.last_progress_ns = now
        self.observer.step(stage, len(batch))
        eos_ids = self.loaded.eos_token_ids
        suppression_changed = False
        for row, token in zip(batch.rows, tokens.tolist()):
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
            self._update_eos_suppression(batch)

    def _drop_done_rows(self) -> bool:
        """Remove finished rows from the batch; True when the batch is now empty."""
        batch = self._batch
        if batch is None:
            return True
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if len(keep) == len(batch.rows):
            return False
        if not keep:
            self._batch = None
            self.observer.running_changed(0)
            return True
        index = torch.tensor(keep, dtype=torch.long, device=self.loaded.device)
        batch.cache = _select_cache(batch.cache, index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.attention_mask = batch.attention_mask.index_select(0, index)
        batch.positions = batch.positions.index_select(0, index)
        batch.last_tokens = batch.last_tokens.index_select(0, index)
        batch.sampler = self._sampler_for(batch.rows)
        self._update_eos_suppression(batch)
        self._trim_padding(batch)
        self.observer.running_changed(len(batch))
        return False

    @staticmethod
    def _trim_padding(batch: _Batch) -> None:
        """Drop cache columns that are padding in every remaining row."""
        if not _mergeable(batch.cache):
            return
        used = batch.attention_mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first == 0:
            return
        batch.attention_mask = batch.attention_mask[:, first:]
        for layer in batch.cache.layers:
            layer.keys = layer.keys[:, :, first:, :]
            layer.values = layer.values[:, :, first:, :]
