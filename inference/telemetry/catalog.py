"""Every metric the inference process records: name, type, unit, labels and meaning.

This table is the single source: the metrics are created from it, and the metrics reference
(docs/metrics.md) is generated from it (``scripts/generate``; a test
checks that the committed file is current). Names are in base units; where OpenTelemetry's GenAI
semantic conventions define a metric, its name and bucket boundaries are used (the dots become
underscores and the unit a suffix, as the OpenTelemetry-to-Prometheus mapping does).

Gauges are per process (prometheus_client's ``liveall`` multiprocess mode adds a ``pid`` label
and drops the process's series once it is marked dead), so that one frozen process among several
is visible and an alert can pair a process's heartbeat with its own pending work.
"""

from __future__ import annotations

from vigil.metricspec import MetricSpec
from vigil.statedir import HEARTBEAT_METRIC

# OpenTelemetry GenAI semantic conventions, ExplicitBucketBoundaries.
REQUEST_DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
# Ours: a queue wait reaches up to the request deadline; batch sizes are powers of two.
QUEUE_WAIT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Ours (the GenAI conventions' server metrics are request duration, time to first token and time
# per output token only: semantic-conventions-genai docs/gen-ai/gen-ai-metrics.md): up to vLLM's and
# Open-AutoGLM's 10 images per prompt, and image tokens from a thumbnail to a 5 MP screenshot.
IMAGES_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
IMAGE_TOKENS_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


M = MetricSpec
METRICS: tuple[MetricSpec, ...] = (
    # ---- requests ---------------------------------------------------------------------------
    M(
        "inference_requests",
        "counter",
        "requests",
        ("model", "endpoint", "status", "finish_reason", "error_type"),
        "Finished requests by outcome: HTTP status, finish reason (stop, length; empty on error) "
        "and error type (empty on success; else the error's code, or its OpenAI type when it has "
        "no code: invalid_request_error, context_length_exceeded, model_not_found, "
        "invalid_api_key, request_too_large, queue_full, deadline_exceeded, "
        "client_disconnected (status 499), model_not_ready, shutting_down, server_error, "
        "internal_error).",
    ),
    M(
        "gen_ai_server_request_duration_seconds",
        "histogram",
        "seconds",
        ("model", "operation", "error_type"),
        "End-to-end request duration, from arrival to the last token or the error "
        "(OpenTelemetry gen_ai.server.request.duration).",
        REQUEST_DURATION_BUCKETS,
    ),
    M(
        "gen_ai_server_time_to_first_token_seconds",
        "histogram",
        "seconds",
        ("model", "operation"),
        "Time from arrival to the first generated token, successful requests "
        "(OpenTelemetry gen_ai.server.time_to_first_token).",
        TIME_TO_FIRST_TOKEN_BUCKETS,
    ),
    M(
        "gen_ai_server_time_per_output_token_seconds",
        "histogram",
        "seconds",
        ("model", "operation"),
        "Mean time per output token after the first, successful requests "
        "(OpenTelemetry gen_ai.server.time_per_output_token).",
        TIME_PER_OUTPUT_TOKEN_BUCKETS,
    ),
    M(
        "inference_queue_wait_seconds",
        "histogram",
        "seconds",
        ("model",),
        "Time requests spent waiting for a batch slot.",
        QUEUE_WAIT_BUCKETS,
    ),
    M(
        "inference_prefill_duration_seconds",
        "histogram",
        "seconds",
        ("model",),
        "Time from leaving the queue to the first token (the prefill of the request's batch).",
        TIME_TO_FIRST_TOKEN_BUCKETS,
    ),
    M(
        "inference_prompt_tokens",
        "counter",
        "tokens",
        ("model",),
        "Prompt tokens of finished requests.",
    ),
    M(
        "inference_generation_tokens",
        "counter",
        "tokens",
        ("model",),
        "Generated tokens of finished requests (including those of failed or cancelled ones).",
    ),
    M(
        "inference_empty_outputs",
        "counter",
        "requests",
        ("model", "reason"),
        "Successful completions that came back with no text, by reason: immediate_eos (the "
        "first token ended the sequence), stop_at_start (a stop string matched at once), "
        "empty_after_decode (tokens that decode to no text).",
    ),
    # ---- images (vision-language models) ----------------------------------------------------
    M(
        "inference_request_images",
        "histogram",
        "images",
        ("model",),
        "Images in a request that has any, counted once its images were preprocessed.",
        IMAGES_BUCKETS,
    ),
    M(
        "inference_request_image_tokens",
        "histogram",
        "tokens",
        ("model",),
        "Prompt tokens that stand for a request's images (after the processor's resize).",
        IMAGE_TOKENS_BUCKETS,
    ),
    M(
        "inference_image_preprocess_duration_seconds",
        "histogram",
        "seconds",
        ("model",),
        "Time to decode a request's images and run the model's processor on them (resize, "
        "patches, prompt placeholders), before the request is queued.",
        TIME_TO_FIRST_TOKEN_BUCKETS,
    ),
    M(
        "inference_vision_encoder_duration_seconds",
        "histogram",
        "seconds",
        ("model",),
        "Time the vision tower took on a request's images (the engine's vision stage).",
        TIME_TO_FIRST_TOKEN_BUCKETS,
    ),
    # ---- scheduler --------------------------------------------------------------------------
    M(
        "inference_queue_depth",
        "gauge",
        "requests",
        ("model",),
        "Requests waiting for a batch slot.",
    ),
    M(
        "inference_queue_oldest_enqueue_timestamp_seconds",
        "gauge",
        "seconds",
        ("model",),
        "Unix time at which the oldest waiting request arrived; 0 when none waits. Its age is "
        "time() minus this value.",
    ),
    M(
        "inference_requests_running",
        "gauge",
        "requests",
        ("model",),
        "Requests in the running batch (being prefilled or decoded).",
    ),
    M(
        "inference_requests_in_flight",
        "gauge",
        "requests",
        ("model",),
        "Requests accepted by the API and not yet answered (waiting plus running).",
    ),
    M(
        "inference_connections_open",
        "gauge",
        "connections",
        ("model",),
        "Client connections open now (at most --max-connections).",
    ),
    M(
        "inference_connections_closed",
        "counter",
        "connections",
        ("model", "reason"),
        "Client connections the server closed or refused, by reason: idle_connection (nothing "
        "sent within --header-timeout), slow_request_head (a head not complete within it: 408), "
        "slow_request_body (nothing of a request body within --body-timeout: 408), "
        "slow_unread_body (the rest of an answered request's body too slow), closed_for_room "
        "(a connection without a request in progress, closed at --max-connections for a new "
        "one), connection_limit (a new connection refused with 503: every open one busy), "
        "invalid_http_request (400), request_head_too_large (431) and keep_alive_timeout (a "
        "kept-alive connection that sent nothing within 5 s of a response; the only reason not "
        "logged). Connections the clients closed, and those closed by a server that stops, are "
        "not counted.",
    ),
    M(
        "inference_prefill_batch_size",
        "histogram",
        "requests",
        ("model",),
        "Requests prefilled together when they join the running batch.",
        BATCH_SIZE_BUCKETS,
    ),
    # ---- engine progress --------------------------------------------------------------------
    M(
        HEARTBEAT_METRIC,
        "gauge",
        "seconds",
        ("model",),
        "Unix time of the engine's last prefill or decode step (published at most every 0.25 s "
        "while it steps, when it goes idle, and when it starts). With work pending, a growing age "
        "means the engine is stuck.",
    ),
    M(
        "inference_engine_steps",
        "counter",
        "steps",
        ("model", "stage"),
        "Forward passes of the engine by stage (vision: the vision tower on one request's "
        "images; prefill, decode).",
    ),
    # ---- defences: stalls, memory, faults -----------------------------------------------------
    M(
        "inference_engine_stalled",
        "gauge",
        "",
        ("model",),
        "1 while the watchdog holds the engine stalled (work pending and no progress for longer "
        "than the running step's stall threshold, or a model load past its allowance), else 0. "
        "/health answers "
        "503 meanwhile.",
    ),
    M(
        "inference_engine_stalls",
        "counter",
        "stalls",
        ("model", "stage"),
        "Stalls the watchdog reported, by stage: load, schedule (pending work the engine did not "
        "take), vision (a request's images stuck in preprocessing or in the vision tower), "
        "prefill, decode.",
    ),
    M(
        "inference_watchdog_stall_timeout_seconds",
        "gauge",
        "seconds",
        ("model",),
        "The configured stall timeout (--stall-timeout): the upper bound of the stall threshold "
        "(which follows the step under way, from --stall-floor up), for alert rules to compare "
        "against.",
    ),
    M(
        "inference_out_of_memory_errors",
        "counter",
        "errors",
        ("model", "stage"),
        "Out-of-memory errors caught during a batch, by stage (vision, prefill, decode); the batch "
        "was retried in smaller parts or its requests answered with 503 out_of_memory.",
    ),
    M(
        "inference_admission_refusals",
        "counter",
        "requests",
        ("model", "reason"),
        "Requests refused before they ran, by reason: insufficient_memory (their estimated KV "
        "cache does not fit in the free GPU memory).",
    ),
    M(
        "inference_kv_cache_bytes_per_token",
        "gauge",
        "bytes",
        ("model",),
        "Estimated KV-cache bytes per token of context (2 x layers x KV heads x head size x "
        "dtype size), used for admission control.",
    ),
    M(
        "inference_faults_injected",
        "counter",
        "faults",
        ("model", "fault", "stage"),
        "Faults fired by fault injection (--enable-fault-injection), by kind and stage.",
    ),
    # ---- model ------------------------------------------------------------------------------
    M(
        "inference_model_info",
        "gauge",
        "",
        ("model", "architecture", "dtype", "device"),
        "Always 1 once the model is loaded; the labels describe it.",
    ),
    M(
        "inference_model_load_state",
        "gauge",
        "",
        ("model", "state"),
        "1 for the current load state (loading, loaded, failed), 0 for the others.",
    ),
    M(
        "inference_model_load_started_timestamp_seconds",
        "gauge",
        "seconds",
        ("model",),
        "Unix time at which loading the model began.",
    ),
    M(
        "inference_model_load_duration_seconds",
        "gauge",
        "seconds",
        ("model",),
        "How long loading the model took (set when it ends, loaded or failed).",
    ),
    M(
        "inference_torch_cuda_memory_allocated_bytes",
        "gauge",
        "bytes",
        ("model", "gpu"),
        "Bytes held by tensors in PyTorch's CUDA caching allocator (CUDA only).",
    ),
    M(
        "inference_torch_cuda_memory_reserved_bytes",
        "gauge",
        "bytes",
        ("model", "gpu"),
        "Bytes reserved from the driver by PyTorch's CUDA caching allocator (CUDA only).",
    ),
    M(
        "inference_torch_cuda_memory_peak_allocated_bytes",
        "gauge",
        "bytes",
        ("model", "gpu"),
        "Peak of inference_torch_cuda_memory_allocated_bytes since the process started "
        "(CUDA only).",
    ),
    M(
        "inference_build_info",
        "gauge",
        "",
        ("version", "torch", "transformers"),
        "Always 1; the labels give the versions of this package, torch and transformers.",
    ),
)

BY_NAME = {spec.name: spec for spec in METRICS}
