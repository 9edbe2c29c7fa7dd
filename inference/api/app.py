"""The OpenAI-compatible HTTP API (Starlette, asyncio). It never touches torch.

A generation request is validated and tokenized here, put on the bounded queue, and then waited
for on an asyncio queue that the engine thread feeds. The wait is bounded by the request's
deadline (queue time counts) and by the client's connection: a client that goes away cancels
its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.errors import timeout_error
from ..engine.faults import Fault
from ..engine.queue import QueueFull
from ..engine.request import Event, Failed, Finished, GenerationRequest, TextDelta
from ..model.loader import LoadedModel
from ..telemetry.recorder import CompletedRequest, RequestRecorder
from ..vision.content import ChatContent, ContentError, read_messages
from ..vision.images import EncodedImage, ImageLimits
from ..vision.inputs import VisionInputs
from ..vision.preprocess import (
    ImageFailure,
    decode_images,
    read_images,
    run_processor,
    template_prompt,
)
from .errors import CLOSED_BY_SERVER, ApiError, from_validation_error
from .prompts import (
    chat_prompt_ids,
    completion_chars,
    completion_prompt_ids,
    prompt_chars,
    sampling_params,
    too_long,
)
from .responses import ChunkWriter, completion_body
from .schemas import ChatCompletionRequest, CompletionRequest, FaultRequest
from .tokenizers import TokenizerPool

if TYPE_CHECKING:  # only a type here: the service module builds the engine, which needs torch
    from ..service import InferenceService

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first


def _request_id(request: Request, endpoint: str) -> str:
    given = request.headers.get("x-request-id", "")
    if _REQUEST_ID.match(given):
        return given
    prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
    return prefix + uuid.uuid4().hex


BODY_BUDGET_BODIES = 8  # request bodies held at once (their bytes): 8 x --max-body-bytes


class BodyBudget:
    """The bytes of request bodies the API holds at once, while they are read, wait for a
    parse thread and are parsed: without a bound, a crowd of clients each sending 32 MiB would
    have the process hold all of it. Used from the event loop only."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        """Hold ``size`` more bytes, or a 503 when that would pass the limit."""
        if self.held + size > self.limit:
            raise ApiError(
                503,
                f"the server holds {self.held} bytes of request bodies being read or parsed, "
                f"and this one would pass its limit of {self.limit} bytes "
                f"({BODY_BUDGET_BODIES} x --max-body-bytes); retry shortly",
                error_type="server_unavailable",
                code="request_bodies_over_budget",
                headers={"Retry-After": "1"},
            )
        self.held += size

    def give_back(self, size: int) -> None:
        self.held -= size


async def _read_body(
    request: Request, limit: int, budget: BodyBudget | None = None, held: list[int] | None = None
) -> bytearray:
    """The request's body, at most ``limit`` bytes (413 past it); with a ``budget``, its bytes
    are taken from it as they come (what is taken is added to ``held[0]``, for the caller to
    give back). A bytearray grown in place: no second copy of the whole, as a join makes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413,
            f"the request body is {declared} bytes, above the limit of {limit} bytes",
            code="request_too_large",
        )
    if budget is not None and held is not None and declared.isdigit():
        budget.take(int(declared))  # all of it at once: refused before a byte is read
        held[0] += int(declared)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise ApiError(
                413,
                f"the request body is over the limit of {limit} bytes",
                code="request_too_large",
            )
        if budget is not None and held is not None and len(body) + len(chunk) > held[0]:
            more = len(body) + len(chunk) - held[0]  # no Content-Length: taken as it comes
            budget.take(more)
            held[0] += more
        body += chunk
    return body


# A body this large is parsed and validated in a worker thread: reading hundreds of thousands
# of JSON values takes the CPU for a second, which on the event loop would hold up /health and
# every other request. Smaller ones take microseconds and stay on the loop.
LARGE_BODY_BYTES = 64 * 1024
MAX_OBJECT_MEMBERS = 1024  # no field of the API is an object this large
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
# JSON values a request may need besides its messages and prompt (stop, stream_options...),
# and per message or content part (the object, its members, the list around the parts).
VALUES_BESIDES = 1024
VALUES_PER_MESSAGE = 16
_COUNT_CHUNK = 1 << 20  # bytes counted per call: the GIL changes hands between calls


def count_values(raw: bytes) -> int:
    """An upper bound on the JSON values in ``raw``: its commas, '[' and '{' (those inside
    strings count too, and only make it larger). Cheap (C, a few milliseconds for 32 MiB),
    and counted a megabyte at a time, so that in a worker thread the event loop runs between
    the calls: ``json.loads`` builds arrays and objects in C holding the GIL, and a body of
    millions of empty arrays, or one object of millions of members, took the loop for
    seconds; only the object hook's calls let it run, and arrays have none."""
    total = 0
    for start in range(0, len(raw), _COUNT_CHUNK):
        end = start + _COUNT_CHUNK
        total += raw.count(b",", start, end) + raw.count(b"[", start, end)
        total += raw.count(b"{", start, end)
    return total


def _read_object(members: dict[str, Any]) -> dict[str, Any]:
    """json's object hook: a bound on each object's size (validating a copy of one with
    millions of members takes seconds). Being Python, it also lets the event loop run between
    objects while a worker thread reads a large body (the C parser holds the GIL otherwise)."""
    if len(members) > MAX_OBJECT_MEMBERS:
        raise ApiError(
            400,
            f"the request body holds a JSON object of {len(members)} members; no object of "
            f"this API takes more than {MAX_OBJECT_MEMBERS}",
        )
    return members


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
        ) from None
    if not text.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        body = json.loads(text, object_hook=_read_object)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}",
        ) from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal of thousands of digits
        raise ApiError(400, f"the request body has a value that cannot be read: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    if not _SURROGATE_ESCAPE.search(raw):  # valid UTF-8 holds none: only escapes spell them
        return body
    try:
        # JSON escapes can spell lone UTF-16 surrogates, which are no text at all.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400,
            "the request body holds an unpaired UTF-16 surrogate escape "
            "(such as \\ud800); send valid Unicode text",
        ) from None
    return body


async def _wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Call:
    """One generation request on its way through the API."""

    endpoint: str
    request_id: str
    arrival_ns: int
    record: CompletedRequest
    generation: GenerationRequest | None = None
    events: asyncio.Queue | None = None
    ended: bool = False


class _GuardedStream(StreamingResponse):
    """A streamed response whose cleanup also runs when it is cancelled before its body starts
    (a client that disconnects at once), so that no request is left unrecorded or running."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


class InferenceApi:
    def __init__(self, service: InferenceService, recorder: RequestRecorder):
        self.service = service
        self.config = service.config
        self.recorder = recorder
        self._tokenizers = TokenizerPool()
        # Large bodies are read two at a time at most: each takes a CPU, and memory several
        # times its size while it is being read.
        self._large_bodies = ThreadPoolExecutor(2, thread_name_prefix="parse")
        self._body_budget = BodyBudget(BODY_BUDGET_BODIES * self.config.max_body_bytes)
        self._preprocess_slot = asyncio.Lock()
        self._image_limits = ImageLimits(
            max_header_pixels=self.config.max_image_header_pixels,
            max_request_pixels=self.config.max_request_image_pixels,
            max_bytes=self.config.max_image_bytes,
            fetch_timeout_s=self.config.image_fetch_timeout,
        )

    # ---- plain routes ------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        ok, info = self.service.health()
        return JSONResponse(info, status_code=200 if ok else 503)

    async def fault(self, request: Request) -> Response:
        """Arm a fault (only with --enable-fault-injection; a 404 otherwise)."""
        faults = self.service.faults
        if faults is None:
            raise ApiError(
                404,
                f"no route {request.method} {request.url.path} (fault injection "
                "is off; start the server with --enable-fault-injection)",
                code="not_found",
            )
        self._authorize(request)
        body = _parse_json(await _read_body(request, 64 * 1024))
        try:
            parsed = FaultRequest.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        loaded = self.service.loaded
        if parsed.stage in ("preprocess", "vision") and (
            loaded is None or not loaded.accepts_images
        ):
            raise ApiError(
                400,
                f"stage {parsed.stage!r} needs a vision-language model; this one reads text only",
                param="stage",
            )
        fault = Fault(
            parsed.fault,
            parsed.stage,
            float(parsed.seconds) if parsed.seconds is not None else None,
            parsed.steps,
        )
        faults.arm(fault)
        from loguru import logger

        logger.warning(
            "fault armed for the next batch: {} at {}",
            fault.kind,
            fault.stage,
            fault=fault.describe(),
        )
        return JSONResponse({"armed": [f.describe() for f in faults.armed()]})

    async def ready(self, request: Request) -> Response:
        info = self.service.describe()
        return JSONResponse(
            {"status": "ready" if self.service.ready else info["state"], **info},
            status_code=200 if self.service.ready else 503,
        )

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if self.service.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        body = await run_in_threadpool(self.service.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        created = int(self.service.load_started_at or time.time())
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.service.model_name,
                        "object": "model",
                        "created": created,
                        "owned_by": "llm-vigil",
                    }
                ],
            }
        )

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise ApiError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                error_type="authentication_error",
                code="invalid_api_key",
            )

    # ---- generation --------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def _generate(self, request: Request, endpoint: str) -> Response:
        arrival_ns = time.perf_counter_ns()
        request_id = _request_id(request, endpoint)
        parent = propagate.extract(request.headers)
        span = self.recorder.start_span(
            f"{'chat' if endpoint == 'chat' else 'text_completion'} {self.service.model_name}",
            parent,
            arrival_ns,
        )
        record = CompletedRequest(
            request_id=request_id,
            endpoint=endpoint,
            model=self.service.model_name,
            status=200,
            arrival_ns=arrival_ns,
            span=span,
        )
        call = _Call(endpoint, request_id, arrival_ns, record)
        context = span.get_span_context()
        headers = {"X-Request-Id": request_id, "X-Trace-Id": format(context.trace_id, "032x")}
        with trace.use_span(span, end_on_exit=False):
            try:
                response = await self._admit_and_run(request, call, headers)
            except ApiError as error:
                self._end(call, error.status, error.kind, error.message)
                return error.response(headers)
            except Exception as exc:  # noqa: BLE001 - never a bare 500 page or a hang
                from loguru import logger

                logger.opt(exception=exc).error(
                    "unexpected error while handling {}: {}", call.request_id, exc
                )
                self._end(call, 500, "internal_error", f"{type(exc).__name__}: {exc}")
                return ApiError(
                    500, f"internal error: {type(exc).__name__}: {exc}", error_type="server_error"
                ).response(headers)
            except BaseException:  # cancelled (the server is stopping): still account for it
                self._end(call, 503, "shutting_down", "the server stopped before answering")
                raise
        return response

    async def _admit_and_run(
        self, request: Request, call: _Call, headers: dict[str, str]
    ) -> Response:
        """Parse the request, check that it can be served, enqueue it, and answer."""
        self._authorize(request)
        timeout_s = self._timeout(request)
        parsed = await self._parse(request, call, timeout_s)
        loaded = self._check_serving(parsed)
        await self._enqueue(
            call, parsed, loaded, call.arrival_ns + int(timeout_s * 1e9), headers["X-Trace-Id"]
        )
        return await self._respond(request, call, parsed, headers)

    async def _parse(
        self, request: Request, call: _Call, timeout_s: float
    ) -> ChatCompletionRequest | CompletionRequest:
        """Read the body within the deadline and validate it against the endpoint's schema."""
        held = [0]  # bytes taken from the budget, given back once the body is parsed
        try:
            return await self._read_and_validate(request, call, timeout_s, held)
        finally:
            if held[0]:
                self._body_budget.give_back(held[0])

    async def _read_and_validate(
        self, request: Request, call: _Call, timeout_s: float, held: list[int]
    ) -> ChatCompletionRequest | CompletionRequest:
        try:
            raw = await asyncio.wait_for(
                _read_body(request, self.config.max_body_bytes, self._body_budget, held),
                timeout_s,
            )
        except TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within the request's deadline of {timeout_s:g} s",
                error_type="timeout",
                code="deadline_exceeded",
            ) from None
        except ClientDisconnect:
            closed_by_server = request.scope.get(CLOSED_BY_SERVER)
            if isinstance(closed_by_server, ApiError):  # the body timed out, or gave way
                raise closed_by_server from None
            raise ApiError(
                CLIENT_CLOSED,
                "the client disconnected while sending the request",
                error_type="client_closed_request",
                code="client_disconnected",
            ) from None
        if len(raw) < LARGE_BODY_BYTES:
            parsed = self._validate(raw, call.endpoint)
        else:
            parsed = await self._validate_large(request, raw, call, held, timeout_s)
        call.record.stream = parsed.stream
        call.record.request_params = {
            "max_tokens": parsed.requested_max_tokens,
            "temperature": parsed.temperature,
            "top_p": parsed.top_p,
            "frequency_penalty": parsed.frequency_penalty,
            "presence_penalty": parsed.presence_penalty,
        }
        return parsed

    async def _validate_large(
        self, request: Request, raw: bytearray, call: _Call, held: list[int], timeout_s: float
    ) -> ChatCompletionRequest | CompletionRequest:
        """``_validate`` in a parse thread, waited for within the request's deadline and while
        the client stays: a request given up before its turn is never parsed; one given up
        while it is, has its budget given back when the thread is done with the bytes."""
        deadline_ns = call.arrival_ns + int(timeout_s * 1e9)
        job = self._large_bodies.submit(self._validate_in_thread, raw, call.endpoint, deadline_ns)
        loop = asyncio.get_running_loop()
        waiting = asyncio.wrap_future(job)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            remaining = max((deadline_ns - time.perf_counter_ns()) / 1e9, 0)
            done, _ = await asyncio.wait(
                {waiting, watcher}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watcher.cancel()
        if waiting in done:
            return waiting.result()
        if not job.cancel():  # the thread is at it: the budget goes back when it is done
            taken, held[0] = held[0], 0
            job.add_done_callback(
                lambda _: loop.call_soon_threadsafe(self._body_budget.give_back, taken)
            )
        waiting.add_done_callback(lambda future: future.cancelled() or future.exception())
        if watcher in done:
            raise ApiError(
                CLIENT_CLOSED,
                "the client disconnected before its request was read",
                error_type="client_closed_request",
                code="client_disconnected",
            )
        raise self._deadline_error("reading the request's body")

    @staticmethod
    def _deadline_error(what: str) -> ApiError:
        return ApiError(
            504,
            f"{what} did not finish within the request's deadline",
            error_type="timeout",
            code="deadline_exceeded",
        )

    def _validate(self, raw: bytes, endpoint: str) -> ChatCompletionRequest | CompletionRequest:
        """The body read and validated against the endpoint's schema, or a 400 that says why
        not (on the event loop or in a worker thread)."""
        self._check_values(raw)
        body = _parse_json(raw)
        self._check_size(body, endpoint)
        schema = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
        try:
            parsed = schema.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        loaded = self.service.loaded
        messages = getattr(parsed, "messages", None)
        if loaded is not None and messages is not None and len(messages) > loaded.context_length:
            # Each message costs a token at least: refused here (a worker thread for a large
            # body), not after reading them all on the event loop (_read_content).
            raise too_long(loaded, f"{len(messages)} messages", len(messages), "messages")
        return parsed

    def _validate_in_thread(
        self, raw: bytes, endpoint: str, deadline_ns: int
    ) -> ChatCompletionRequest | CompletionRequest:
        """``_validate`` in a worker thread, unless the request's deadline passed while it
        waited for one. A 400 leaves without the frames and the pydantic error it came from,
        which hold the parsed body: freeing hundreds of thousands of objects takes tens of
        milliseconds, here rather than on the event loop."""
        if time.perf_counter_ns() >= deadline_ns:
            raise self._deadline_error("reading the request's body")
        try:
            return self._validate(raw, endpoint)
        except ApiError as error:
            error.__traceback__ = error.__context__ = error.__cause__ = None
            raise error from None

    def value_limit(self) -> int:
        """The most JSON values a body may hold (by ``count_values``): what the most messages
        and content parts (--max-messages-per-request) and the longest prompt (the model's
        context: a prompt of N token ids is N values) need, and a little more."""
        loaded = self.service.loaded
        context = loaded.context_length if loaded is not None else 0
        return VALUES_PER_MESSAGE * self.config.max_messages_per_request + context + VALUES_BESIDES

    def _check_values(self, raw: bytes) -> None:
        """A 400 for a body of more JSON values than any request that can be served holds,
        before it is parsed (see ``count_values``); a 503 while the model loads, as the limit
        then lacks the context length."""
        limit = self.value_limit()
        if len(raw) <= limit:  # fewer bytes than the limit: fewer values too
            return
        found = count_values(raw)
        if found <= limit:
            return
        loaded = self.service.loaded
        if loaded is None:
            raise self._unavailable()
        raise ApiError(
            400,
            f"the request body holds up to {found} JSON values (its commas, '[' and '{{' "
            f"counted, those in strings too); this server reads at most {limit} in one "
            f"request: {VALUES_PER_MESSAGE} for each of at most "
            f"{self.config.max_messages_per_request} messages or content parts "
            "(--max-messages-per-request), "
            f"one for each of the {loaded.context_length} tokens of the model's context, "
            f"and {VALUES_BESIDES} more; send fewer or shorter items",
            code="too_many_json_values",
        )

    def _check_size(self, body: dict[str, Any], endpoint: str) -> None:
        """A 400 for more messages, content parts or prompt items than can be served, before
        pydantic validates them one by one."""
        messages, prompt = body.get("messages"), body.get("prompt")
        if endpoint == "chat" and isinstance(messages, list):
            limit = self.config.max_messages_per_request
            parts = sum(
                len(message["content"])
                for message in messages
                if isinstance(message, dict) and isinstance(message.get("content"), list)
            )
            if len(messages) > limit or parts > limit:
                raise ApiError(
                    400,
                    f"the request has {len(messages)} message(s) with {parts} content part(s) "
                    f"in all; at most {limit} of each are accepted in one request "
                    "(--max-messages-per-request)",
                    param="messages",
                    code="too_many_messages",
                )
        loaded = self.service.loaded
        if endpoint != "completions" or not isinstance(prompt, list) or loaded is None:
            return
        if len(prompt) >= loaded.context_length:  # token ids, or one string
            raise ApiError(
                400,
                f"This model's maximum context length is {loaded.context_length} tokens, but "
                f"the prompt is a list of {len(prompt)} items; shorten the prompt",
                param="prompt",
                code="context_length_exceeded",
            )

    def _check_serving(self, parsed: ChatCompletionRequest | CompletionRequest) -> LoadedModel:
        """The loaded model, if the request names it and the server can serve now; else the
        404 or 503 that says why not."""
        if parsed.model != self.service.model_name:
            raise ApiError(
                404,
                f"The model '{parsed.model}' does not exist; this server serves "
                f"'{self.service.model_name}'",
                param="model",
                code="model_not_found",
            )
        loaded = self.service.loaded
        if not self.service.ready and self.service.watchdog.stall is None or loaded is None:
            raise self._unavailable()
        stall = self.service.watchdog.stall
        if stall is not None and stall.preprocessing is None:
            raise ApiError(
                503,
                f"the engine is stalled in {stall.stage} (no progress for "
                f"{stall.stalled_for_s():.1f} s); retry later",
                error_type="server_unavailable",
                code="engine_stalled",
                headers={"Retry-After": "5"},
            )
        return loaded

    def _unavailable(self) -> ApiError:
        """The 503 for a server that does not serve now: loading, failed or stopped."""
        state = self.service.state
        if state == "loading":
            message = "the model is still loading; retry shortly"
        elif state == "failed":
            message = f"the model failed to load: {self.service.load_error}"
        else:
            message = "the engine has stopped; the server is not serving"
        return ApiError(
            503,
            message,
            error_type="server_unavailable",
            code="model_not_ready",
            headers={"Retry-After": "5"},
        )

    async def _enqueue(
        self,
        call: _Call,
        parsed: ChatCompletionRequest | CompletionRequest,
        loaded: LoadedModel,
        deadline_ns: int,
        trace_id: str,
    ) -> None:
        """Tokenize the prompt and put the generation request on the engine's queue (a 429 when
        it is full); its events arrive on ``call.events``."""
        vision = None
        if call.endpoint == "chat":
            content = self._read_content(parsed, loaded)
            if content.has_images:
                prompt_ids, prompt_text, vision = await self._preprocess(
                    call, loaded, content, deadline_ns, trace_id
                )
            else:
                # Tokenizing a long prompt takes a while: off the event loop, with a tokenizer of
                # the pool (copied at load), which keeps one for short prompts (tokenizers.py).
                messages = content.messages
                prompt_ids, prompt_text = await self._tokenize(
                    prompt_chars(messages),
                    lambda tokenizer: chat_prompt_ids(loaded, messages, tokenizer),
                    deadline_ns,
                )
        else:
            prompt_ids, prompt_text = await self._tokenize(
                completion_chars(parsed),
                lambda tokenizer: completion_prompt_ids(loaded, parsed, tokenizer),
                deadline_ns,
            )
        if self.recorder.log_prompts:
            call.record.prompt_text = prompt_text
        params = sampling_params(loaded, parsed, len(prompt_ids), self.config.max_tokens_limit)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            # RuntimeError: the loop is closed, the server is shutting down.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        generation = GenerationRequest(
            request_id=call.request_id,
            prompt_ids=prompt_ids,
            params=params,
            stream=parsed.stream,
            deadline_ns=deadline_ns,
            emit=emit,
            arrival_ns=call.arrival_ns,
            trace_id=trace_id,
            vision=vision,
        )
        try:
            self.service.queue.put(generation)
        except QueueFull as exc:
            raise self._queue_full(f"{exc}; retry later") from None
        call.generation, call.events = generation, events
        call.record.generation = generation
        if self.service.metrics is not None:
            self.service.metrics.in_flight.inc()

    async def _tokenize(
        self, chars: int, work: Callable[[Any], tuple[list[int], str]], deadline_ns: int
    ) -> tuple[list[int], str]:
        """``work`` with a tokenizer of the pool, waited for (the turn and the work) within the
        request's deadline: a 504 past it."""
        remaining = max((deadline_ns - time.perf_counter_ns()) / 1e9, 0)
        try:
            return await asyncio.wait_for(
                self._tokenizers.run(self.service.api_tokenizers, chars, work), remaining
            )
        except TimeoutError:
            raise self._deadline_error("tokenizing the prompt") from None

    def _read_content(self, parsed: ChatCompletionRequest, loaded: LoadedModel) -> ChatContent:
        """The messages' text and image parts; a 400 for a bad part, an image for a text-only
        model, or more images than allowed."""
        try:
            content = read_messages(parsed.messages, loaded.name, loaded.accepts_images)
        except ContentError as exc:
            raise ApiError(400, f"'{exc.param}': {exc.message}", param=exc.param) from None
        limit = self.config.max_images_per_request
        if len(content.images) > limit:
            raise ApiError(
                400,
                f"the request has {len(content.images)} images; at most {limit} may be "
                "provided in one request (--max-images-per-request)",
                param="messages",
                code="too_many_images",
            )
        return content

    async def _preprocess(
        self,
        call: _Call,
        loaded: LoadedModel,
        content: ChatContent,
        deadline_ns: int,
        trace_id: str,
    ) -> tuple[list[int], str, VisionInputs]:
        """Download the images (worker threads, in parallel), then decode them and run the
        processor (one request at a time), within the deadline.

        One at a time: decoding and the processor are CPU work, and running them for many
        requests at once only makes each slower; and so a request's local work is timed alone
        (the watchdog's view), never its wait for the slot."""
        preprocessing = self.service.preprocessing
        stall = self.service.watchdog.stall
        if stall is not None:  # a request's images are stuck in preprocessing: no slot comes
            raise ApiError(
                503,
                f"image preprocessing is stalled (no progress for {stall.stalled_for_s():.1f} "
                "s); requests without images are served; retry later",
                error_type="server_unavailable",
                code="engine_stalled",
                headers={"Retry-After": "5"},
            )
        if preprocessing.count() + len(self.service.queue) >= self.config.max_queue:
            raise self._queue_full(  # the queue's limit, counted before the costly work
                f"{preprocessing.count()} requests' images are being prepared and "
                f"{len(self.service.queue)} requests wait (limit {self.config.max_queue}); "
                "retry later"
            )
        job = preprocessing.begin(call.request_id, trace_id)
        limits = self._image_limits
        local_started = False

        def download() -> tuple[list[EncodedImage], int]:
            job.thread_id = threading.get_ident()
            started = time.perf_counter_ns()
            return read_images(content, limits), started

        def local_work(encoded: list[EncodedImage]) -> tuple[list[int], str, VisionInputs]:
            job.thread_id = threading.get_ident()
            job.watched_from_ns = time.perf_counter_ns()
            try:
                self._preprocess_fault()
                images = decode_images(content, encoded, limits)
                prompt = template_prompt(loaded.processor, content.messages)
                ids, vision = run_processor(loaded.processor, prompt, images, job.watched_from_ns)
                return ids, prompt, vision
            finally:
                preprocessing.end(job)  # here, not in the API: a hung job stays in view

        async def run() -> tuple[list[int], str, VisionInputs]:
            nonlocal local_started
            try:
                encoded, download_started = await run_in_threadpool(download)
                downloaded = time.perf_counter_ns()
                async with self._preprocess_slot:
                    local_started = True
                    ids, prompt, vision = await run_in_threadpool(local_work, encoded)
                if any(image.source == "http" for image in encoded):
                    vision.download_ns = (download_started, downloaded)
                return ids, prompt, vision
            finally:
                if not local_started:
                    preprocessing.end(job)

        loop = asyncio.get_running_loop()
        stalled: asyncio.Future = loop.create_future()

        def notify(error: Any) -> None:  # the watchdog declared a stall: answer now
            def settle() -> None:
                if not stalled.done():
                    stalled.set_result(error)

            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to answer
                loop.call_soon_threadsafe(settle)

        job.notify = notify
        remaining = (deadline_ns - time.perf_counter_ns()) / 1e9
        worker = asyncio.ensure_future(run())
        try:
            done, _ = await asyncio.wait(
                {worker, stalled}, timeout=max(remaining, 0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stalled.cancel()
        if worker in done:
            try:
                return worker.result()
            except ImageFailure as exc:
                code = getattr(exc.error, "code", None)
                raise ApiError(
                    400, f"'{exc.param}': {exc.error}", param=exc.param, code=code
                ) from None
        # Not wanted any more: out of the slot's line; a thread at work runs on, its result
        # dropped (a hung one keeps its job in the watchdog's view).
        worker.cancel()
        worker.add_done_callback(lambda future: future.cancelled() or future.exception())
        if stalled in done:
            raise self._engine_error(Failed(stalled.result()))
        raise ApiError(
            504,
            "preprocessing the request's images did not finish within its deadline",
            error_type="timeout",
            code="deadline_exceeded",
        )

    def _preprocess_fault(self) -> None:
        """Fire a fault armed for stage preprocess here, in the worker thread."""
        faults = self.service.faults
        if faults is None or not faults.pending:
            return
        fault = faults.take("preprocess")
        if fault is None:
            return
        from loguru import logger

        logger.warning("injected fault {} fires in preprocess", fault.kind, fault=fault.describe())
        if self.service.metrics is not None:
            self.service.metrics.fault_fired(fault.kind, "preprocess")
        faults.fire(fault)

    async def _respond(
        self,
        request: Request,
        call: _Call,
        parsed: ChatCompletionRequest | CompletionRequest,
        headers: dict[str, str],
    ) -> Response:
        """Wait for the engine's first event, then answer: one JSON body once the request
        finishes, or a stream of its events. An engine error before the stream starts is an
        HTTP error."""
        watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            first = await self._next_event(call, watcher)
        except BaseException:
            watcher.cancel()
            raise
        if isinstance(first, Failed):
            watcher.cancel()
            raise self._engine_error(first)
        if not parsed.stream:
            return await self._respond_whole(call, first, watcher, headers)
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        writer = ChunkWriter(call.endpoint, call.request_id, self.service.model_name, include_usage)
        return _GuardedStream(
            self._stream(call, writer, first, watcher),
            cleanup=lambda: self._abandon(call, watcher),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _respond_whole(
        self, call: _Call, event: Event, watcher: asyncio.Future, headers: dict[str, str]
    ) -> Response:
        """The non-streamed answer: wait for the end, then one completion body."""
        try:
            while not isinstance(event, Finished):
                event = await self._next_event(call, watcher)
                if isinstance(event, Failed):
                    raise self._engine_error(event)
        finally:
            watcher.cancel()
        self._end(call, 200)
        return JSONResponse(
            completion_body(
                call.endpoint,
                call.request_id,
                self.service.model_name,
                int(time.time()),
                call.generation,
            ),
            headers=headers,
        )

    async def _stream(
        self, call: _Call, writer: ChunkWriter, first: Event, watcher: asyncio.Future
    ) -> AsyncIterator[bytes]:
        """The SSE body; the HTTP status is already sent, so errors become error events."""
        status, error_type, message = (
            CLIENT_CLOSED,
            "client_disconnected",
            "the client disconnected",
        )
        try:
            opening = writer.start()
            if opening:
                yield opening
            event = first
            while True:
                if isinstance(event, TextDelta):
                    yield writer.delta(event.text)
                elif isinstance(event, Finished):
                    yield writer.finish(call.generation)
                    yield writer.DONE
                    status, error_type, message = 200, "", ""
                    return
                elif isinstance(event, Failed):
                    error = self._engine_error(event)
                    status, error_type, message = error.status, error.kind, error.message
                    yield writer.error(error.body())
                    yield writer.DONE
                    return
                try:
                    event = await self._next_event(call, watcher)
                except ApiError as error:
                    status, error_type, message = error.status, error.kind, error.message
                    if status != CLIENT_CLOSED:
                        yield writer.error(error.body())
                        yield writer.DONE
                    return
        finally:
            watcher.cancel()
            self._end(call, status, error_type, message)

    def _abandon(self, call: _Call, watcher: asyncio.Future) -> None:
        """After a stream: if its body never ran, the client left first; say so and stop
        (a no-op when the body ran and recorded the outcome itself)."""
        watcher.cancel()
        self._end(call, CLIENT_CLOSED, "client_disconnected", "the client disconnected")

    async def _next_event(self, call: _Call, watcher: asyncio.Future) -> Event:
        """The engine's next event, or an ApiError at the deadline or on disconnect."""
        generation, events = call.generation, call.events
        assert generation is not None and events is not None
        if not events.empty():
            return events.get_nowait()
        remaining = (generation.deadline_ns - time.perf_counter_ns()) / 1e9
        getter = asyncio.ensure_future(events.get())
        try:
            done, _ = await asyncio.wait(
                {getter, watcher}, timeout=max(remaining, 0), return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            getter.cancel()
            self._cancel(generation)
            raise
        if getter in done:
            return getter.result()
        getter.cancel()
        self._cancel(generation)
        if watcher in done:
            raise ApiError(
                CLIENT_CLOSED,
                "the client disconnected before the answer was ready",
                error_type="client_closed_request",
                code="client_disconnected",
            )
        error = timeout_error(generation)
        raise ApiError(error.status, error.message, error_type=error.error_type, code=error.code)

    def _timeout(self, request: Request) -> float:
        """The request's deadline in seconds: --request-timeout, or less if the client asks
        (a gateway passing on what is left of its own budget)."""
        limit = self.config.request_timeout
        given = request.headers.get("x-request-timeout")
        if given is None:
            return limit
        try:
            seconds = float(given)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds < float("inf"):
            raise ApiError(
                400,
                f"the X-Request-Timeout header must be a positive number of seconds, got {given!r}",
                param="X-Request-Timeout",
            )
        return min(seconds, limit)

    def _cancel(self, generation: GenerationRequest) -> None:
        """Stop work on a request nobody will read: out of the queue now, out of the batch at the
        engine's next step."""
        generation.cancel()
        if self.service.queue.remove(generation):
            generation.end_cancelled()

    @staticmethod
    def _engine_error(event: Failed) -> ApiError:
        error = event.error
        # Worth a retry, except a request too big for the memory there is.
        retry = error.status == 503 and error.code != "insufficient_memory"
        headers = {"Retry-After": "5"} if retry else None
        return ApiError(
            error.status,
            error.message,
            error_type=error.error_type,
            code=error.code,
            headers=headers,
        )

    def _queue_full(self, message: str) -> ApiError:
        return ApiError(
            429,
            message,
            error_type="rate_limit_exceeded",
            code="queue_full",
            headers={"Retry-After": str(self._retry_after())},
        )

    def _retry_after(self) -> int:
        engine = self.service.engine
        per_request = engine.mean_request_seconds if engine is not None else 1.0
        waves = len(self.service.queue) / max(1, self.config.max_batch_size) + 1
        return max(1, min(60, math.ceil(waves * per_request)))

    def _end(self, call: _Call, status: int, error_type: str = "", message: str = "") -> None:
        if call.ended:
            return
        call.ended = True
        if call.generation is not None and not call.generation.ended:
            self._cancel(call.generation)  # answered without its result: nobody will read it
        record = call.record
        record.status, record.error_type, record.error_message = status, error_type, message
        if call.generation is not None and self.service.metrics is not None:
            self.service.metrics.in_flight.dec()
        self.recorder.record(record)


def build_app(service: InferenceService, recorder: RequestRecorder) -> Starlette:
    api = InferenceApi(service, recorder)

    async def not_found(request: Request, exc: Exception) -> Response:
        return ApiError(
            404, f"no route {request.method} {request.url.path}", code="not_found"
        ).response()

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        allowed = next(
            (
                ", ".join(sorted(route.methods or ()))
                for route in routes
                if route.path == request.url.path
            ),
            "",
        )
        return ApiError(
            405,
            f"{request.method} is not allowed on {request.url.path}"
            + (f"; use {allowed}" if allowed else ""),
            code="method_not_allowed",
            headers={"Allow": allowed} if allowed else None,
        ).response()

    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/ready", api.ready, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/debug/fault", api.fault, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, ApiError: api_error},
    )
