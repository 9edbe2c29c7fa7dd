"""Everything recorded about a request once it is answered: metrics, spans, one log line.

Called once per request, from the API layer, after the response (or the error) is known; the
engine only took timestamps and counts along the way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from ..engine.request import GenerationRequest, to_epoch_ns
from .metrics import InferenceMetrics
from .refusals import RefusalLog, is_refusal

OPERATIONS = {"chat": "chat", "completions": "text_completion"}
REQUEST_END = "request_end"  # the event field of each request's last line


def request_outcome(status: int) -> str:
    """The outcome field of a request's last line, as its message says it: finished (2xx),
    rejected (4xx: the client's request, or the queue full) or failed (5xx)."""
    if status >= 500:
        return "failed"
    return "rejected" if status >= 400 else "finished"


@dataclass
class CompletedRequest:
    request_id: str
    endpoint: str  # chat or completions
    model: str
    status: int
    arrival_ns: int
    stream: bool = False
    error_type: str = ""  # empty on success
    error_message: str = ""
    generation: GenerationRequest | None = None  # None when rejected before the engine
    span: Span | None = None
    request_params: dict[str, Any] = field(default_factory=dict)
    prompt_text: str | None = None  # only kept with --log-prompts

    @property
    def operation(self) -> str:
        return OPERATIONS.get(self.endpoint, self.endpoint)


def empty_output_reason(generation: GenerationRequest) -> str | None:
    """Why a successful completion has no text, or None when it has some."""
    if generation.text:
        return None
    if not generation.output_ids:
        return "immediate_eos"
    if generation.stop_string_matched:
        return "stop_at_start"
    return "empty_after_decode"


class RequestRecorder:
    def __init__(
        self, metrics: InferenceMetrics | None, tracer: trace.Tracer, log_prompts: bool = False
    ):
        self.metrics = metrics
        self.tracer = tracer
        self.log_prompts = log_prompts
        # A storm of refusals logs a summary per interval, not a line each: one log for the
        # 429s (rejected) and one for the 503s before the engine (failed), whose summary lines
        # carry the fields of the requests' last lines, so the queries for them count them too.
        self.refusals = {
            status: RefusalLog(
                fields={
                    "event": REQUEST_END,
                    "outcome": request_outcome(status),
                    "status": status,
                },
                level="ERROR" if status >= 500 else "WARNING",
            )
            for status in (429, 503)
        }

    def start_span(self, name: str, context, arrival_ns: int) -> Span:
        return self.tracer.start_span(
            name, context=context, kind=trace.SpanKind.SERVER, start_time=to_epoch_ns(arrival_ns)
        )

    def record(self, done: CompletedRequest) -> None:
        gen = done.generation
        end_ns = gen.finished_ns if gen is not None and gen.finished_ns else time.perf_counter_ns()
        ok = done.status < 400
        empty_reason = empty_output_reason(gen) if ok and gen is not None else None
        if self.metrics is not None:
            self._metrics(done, gen, end_ns, ok, empty_reason)
        if done.span is not None:
            self._spans(done, gen, end_ns, ok)
        self._log(done, gen, end_ns, empty_reason)

    # ---- metrics -----------------------------------------------------------------------------

    def _metrics(
        self,
        done: CompletedRequest,
        gen: GenerationRequest | None,
        end_ns: int,
        ok: bool,
        empty_reason: str | None,
    ) -> None:
        m = self.metrics
        f = m.family
        finish_reason = (gen.finish_reason or "") if (ok and gen is not None) else ""
        f["inference_requests"].labels(
            model=m.model,
            endpoint=done.endpoint,
            status=str(done.status),
            finish_reason=finish_reason,
            error_type=done.error_type,
        ).inc()
        f["gen_ai_server_request_duration_seconds"].labels(
            model=m.model, operation=done.operation, error_type=done.error_type
        ).observe((end_ns - done.arrival_ns) / 1e9)
        if gen is None:
            return
        vision = gen.vision
        if vision is not None:
            m.request_images.observe(vision.images)
            m.request_image_tokens.observe(vision.image_tokens)
            m.image_preprocess.observe(vision.preprocess_seconds)
            if gen.vision_started_ns is not None and gen.vision_finished_ns is not None:
                m.vision_encoder.observe((gen.vision_finished_ns - gen.vision_started_ns) / 1e9)
        m.prompt_tokens.inc(gen.prompt_tokens)
        m.generation_tokens.inc(gen.completion_tokens)
        # A request that timed out or was abandoned in the queue waited until it ended: leaving
        # it out would hide the worst waits exactly when the server is overloaded.
        m.queue_wait.observe(((gen.scheduled_ns or end_ns) - gen.queued_ns) / 1e9)
        if not ok:
            return
        if gen.first_token_ns is not None:
            f["gen_ai_server_time_to_first_token_seconds"].labels(
                model=m.model, operation=done.operation
            ).observe((gen.first_token_ns - gen.arrival_ns) / 1e9)
            if gen.scheduled_ns is not None:
                m.prefill_duration.observe((gen.first_token_ns - gen.scheduled_ns) / 1e9)
            if gen.completion_tokens > 1 and gen.last_token_ns:
                f["gen_ai_server_time_per_output_token_seconds"].labels(
                    model=m.model, operation=done.operation
                ).observe(
                    (gen.last_token_ns - gen.first_token_ns) / 1e9 / (gen.completion_tokens - 1)
                )
        if empty_reason is not None:
            f["inference_empty_outputs"].labels(model=m.model, reason=empty_reason).inc()

    # ---- spans -------------------------------------------------------------------------------

    def _spans(
        self, done: CompletedRequest, gen: GenerationRequest | None, end_ns: int, ok: bool
    ) -> None:
        span = done.span
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": done.operation,
            "gen_ai.provider.name": "llm-vigil",
            "gen_ai.request.model": done.model,
            "gen_ai.response.id": done.request_id,
            "http.response.status_code": done.status,
        }
        for key, value in done.request_params.items():
            if value is not None:
                attributes[f"gen_ai.request.{key}"] = value
        if gen is not None:
            attributes["gen_ai.response.model"] = done.model
            attributes["gen_ai.usage.input_tokens"] = gen.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = gen.completion_tokens
            if gen.finish_reason:
                attributes["gen_ai.response.finish_reasons"] = [gen.finish_reason]
            self._child_spans(span, gen, end_ns)
        if not ok:
            attributes["error.type"] = done.error_type or "_OTHER"
            span.set_status(Status(StatusCode.ERROR, done.error_message))
        span.set_attributes(attributes)
        span.end(end_time=to_epoch_ns(end_ns))

    def _child_spans(self, parent: Span, gen: GenerationRequest, end_ns: int) -> None:
        context = trace.set_span_in_context(parent)
        vision = gen.vision
        if vision is not None and vision.download_ns is not None:
            child = self.tracer.start_span(
                "image download", context=context, start_time=to_epoch_ns(vision.download_ns[0])
            )
            child.end(end_time=to_epoch_ns(vision.download_ns[1]))
        if vision is not None:  # before the queue: the images were decoded and processed
            child = self.tracer.start_span(
                "preprocess", context=context, start_time=to_epoch_ns(vision.preprocess_started_ns)
            )
            child.set_attributes(
                {
                    "inference.images": vision.images,
                    "inference.image_tokens": vision.image_tokens,
                    "inference.image_bytes": vision.encoded_bytes,
                }
            )
            child.end(end_time=to_epoch_ns(vision.preprocess_finished_ns))
            if gen.vision_started_ns is not None:
                child = self.tracer.start_span(
                    "vision encode", context=context, start_time=to_epoch_ns(gen.vision_started_ns)
                )
                child.set_attribute("inference.images", vision.images)
                child.end(end_time=to_epoch_ns(gen.vision_finished_ns or end_ns))
        queue_end = gen.scheduled_ns or end_ns
        phases = [("queue wait", gen.queued_ns, queue_end)]
        if gen.scheduled_ns is not None:
            prefill_end = gen.first_token_ns or end_ns
            phases.append(("prefill", gen.scheduled_ns, prefill_end))
            if gen.first_token_ns is not None:
                phases.append(("decode", gen.first_token_ns, end_ns))
        for name, start, stop in phases:
            child = self.tracer.start_span(name, context=context, start_time=to_epoch_ns(start))
            if name == "prefill":
                child.set_attribute("inference.batch_size", gen.batch_size_at_prefill)
                child.set_attribute("gen_ai.usage.input_tokens", gen.prompt_tokens)
            elif name == "decode":
                child.set_attribute("gen_ai.usage.output_tokens", gen.completion_tokens)
            child.end(end_time=to_epoch_ns(max(stop, start)))

    # ---- the per-request log line --------------------------------------------------------------

    def _log(
        self,
        done: CompletedRequest,
        gen: GenerationRequest | None,
        end_ns: int,
        empty_reason: str | None,
    ) -> None:
        fields: dict[str, Any] = {
            "request_id": done.request_id,
            "endpoint": done.endpoint,
            "model": done.model,
            "status": done.status,
            "stream": done.stream,
            "duration_s": round((end_ns - done.arrival_ns) / 1e9, 6),
        }
        if done.span is not None:
            context = done.span.get_span_context()
            fields["trace_id"] = format(context.trace_id, "032x")
            fields["span_id"] = format(context.span_id, "016x")
        if done.error_type:
            fields["error_type"] = done.error_type
            fields["error"] = done.error_message
        if gen is not None:
            fields.update(
                finish_reason=gen.finish_reason or "",
                prompt_tokens=gen.prompt_tokens,
                completion_tokens=gen.completion_tokens,
                batch_size=gen.batch_size_at_prefill,
            )
            if gen.scheduled_ns is not None:
                fields["queue_s"] = round((gen.scheduled_ns - gen.queued_ns) / 1e9, 6)
            if gen.first_token_ns is not None:
                fields["ttft_s"] = round((gen.first_token_ns - gen.arrival_ns) / 1e9, 6)
            vision = gen.vision
            if vision is not None:  # counts and timings; never the images themselves
                fields.update(
                    images=vision.images,
                    image_tokens=vision.image_tokens,
                    preprocess_s=round(vision.preprocess_seconds, 6),
                )
                if gen.vision_started_ns is not None and gen.vision_finished_ns is not None:
                    fields["vision_encode_s"] = round(
                        (gen.vision_finished_ns - gen.vision_started_ns) / 1e9, 6
                    )
            if self.log_prompts:
                fields["prompt"] = done.prompt_text
                fields["output"] = gen.text
                if vision is not None:  # their sizes, not their bytes
                    fields["image_sizes"] = [f"{w}x{h}" for w, h in vision.image_sizes]
                    fields["image_bytes"] = vision.encoded_bytes
        bound = logger.bind(**fields)
        # The one line that ends the request, whatever its outcome, carries event request_end:
        # a query for slow or failed requests filters on it (the messages differ by outcome).
        end = bound.bind(event=REQUEST_END, outcome=request_outcome(done.status))
        if is_refusal(done.status, started=gen is not None):
            if done.status >= 500:
                full = lambda: end.error("request failed: {}", done.error_message)  # noqa: E731
            else:
                full = lambda: end.warning("request rejected: {}", done.error_message)  # noqa: E731
            self.refusals[done.status].refused(full, done.error_type or str(done.status))
        elif done.status >= 500:
            end.error("request failed: {}", done.error_message)
        elif done.status >= 400:
            end.warning("request rejected: {}", done.error_message)
        else:
            end.info("request finished")
        if empty_reason is not None:
            bound.warning(
                "empty output ({}): the completion has no text",
                empty_reason,
                empty_reason=empty_reason,
            )
