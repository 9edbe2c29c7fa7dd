"""Engine profiles: each serving engine's own metrics mapped to one vocabulary of recorded
series, so that the engine-agnostic alerts and dashboards are written once.

Every vocabulary series carries ``engine`` (vigil, vllm, sglang, tgi), ``instance`` and
``model``, and where the scrape has them ``cluster``, ``namespace`` and ``node`` (the rules'
generator adds them to every aggregation that keeps ``instance``: alerts/rules.py
``with_place``):

    vigil:engine_requests_running               requests in the running batch
    vigil:engine_requests_waiting               requests queued for a slot
    vigil:engine_progress:rate1m                work the engine's forward passes did, per second
                                                (0 means no forward pass finished in a minute)
    vigil:engine_generation_tokens:rate1m       generated tokens per second
    vigil:engine_kv_cache_usage_ratio           share of the KV-cache pool in use (0 to 1)
    vigil:engine_time_to_first_token_seconds    {quantile="0.5"|"0.95"}, over 5 minutes
    vigil:engine_inter_token_latency_seconds    {quantile="0.5"|"0.95"}, over 5 minutes
    vigil:engine_request_duration_seconds       {quantile="0.5"|"0.95"}, over 5 minutes
    vigil:engine_requests:rate5m                finished requests per second (failed included)
    vigil:engine_request_errors:rate5m          requests the engine failed, per second

Where an engine has no such metric the series is absent for it (TGI has no time to first token,
our own process no KV-cache pool). The names, types and labels of each engine come from its own
source, cited per profile below; docs/metrics.md says which releases each profile covers. The
gauges and the model label are those the exporter reads itself (vigil/engines.py SERIES).
Metrics are scraped from the engine itself (its API port, GET /metrics), except ours, which the
exporter publishes from the state directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from vigil.engines import SERIES

QUANTILES = ("0.5", "0.95")


def _as_model(expr: str, label: str | None) -> str:
    """``expr`` with the engine's model label copied into ``model`` (TGI has none)."""
    if label is None or label == "model":
        return expr
    return f'label_replace({expr}, "model", "$1", "{label}", "(.*)")'


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One engine's metrics, as PromQL over its own series (before aggregation)."""

    engine: str
    releases: str  # the releases whose names these are
    sources: str  # where the names come from
    model_label: str | None  # the label that holds the served model's name
    running: str  # gauge
    waiting: str  # gauge
    progress: str  # a per-second rate that is above 0 while forward passes complete
    generation_tokens: str  # per-second rate
    kv_usage: str | None  # gauge, 0 to 1
    ttft_buckets: str | None  # per-second rate of histogram buckets (with le)
    itl_buckets: str | None
    duration_buckets: str
    requests: str  # per-second rate of finished requests, failed ones included
    errors: str | None  # per-second rate of requests the engine failed
    # For the fast hang alert (alerts/rules.py, InferenceEngineStoppedGenerating), raw series
    # only: the fast rule group reads no recording rule (those are evaluated at the slower
    # interval). The scrape job the engine's series come from, the gauge of requests in the
    # running batch, and the series each of whose changes is progress (counters that move with
    # the forward passes, gauges republished while it steps), the first the one that moves most
    # often. Names exactly as scraped; alerts/rules.py HANG_SERIES lists them per job.
    job: str
    stopped_running: str
    stopped_progress: tuple[str, ...]
    # How long the running gauge must stay above 0 with no progress series moving, where the
    # engine's gauge can lag the work by longer than the engine_stopped_window parameter
    # (alerts/rules.py); None: that parameter.
    stopped_window: str | None = None

    def by_model(self, aggregation: str, expr: str, extra: str = "") -> str:
        by = f"instance, model{extra}"
        return f"{aggregation} by ({by}) ({_as_model(expr, self.model_label)})"


# This project's inference process (inference/telemetry/catalog.py), published by the exporter.
VIGIL = Profile(
    engine="vigil",
    releases="this repository",
    sources="inference/telemetry/catalog.py",
    model_label=SERIES["vigil"].model_label,
    running=SERIES["vigil"].running,
    waiting=SERIES["vigil"].waiting,
    # Forward passes (prefill and decode steps), published every 0.25 s while the engine steps.
    progress="rate(inference_engine_steps_total[1m])",
    # Counted when a request ends: a smoothed figure, not a progress signal.
    generation_tokens="rate(inference_generation_tokens_total[1m])",
    kv_usage=None,  # no KV-cache pool: the cache grows per request (see admission control)
    ttft_buckets="rate(gen_ai_server_time_to_first_token_seconds_bucket[5m])",
    itl_buckets="rate(gen_ai_server_time_per_output_token_seconds_bucket[5m])",
    duration_buckets="rate(gen_ai_server_request_duration_seconds_bucket[5m])",
    requests="rate(inference_requests_total[5m])",
    errors='rate(inference_requests_total{status=~"5.."}[5m])',
    # Published by the exporter from the state directory at each scrape (the engine writes its
    # counters every 0.25 s while it steps): a forward pass, prefill or decode, is one step.
    job="vigil-exporter",
    stopped_running=SERIES["vigil"].running,
    stopped_progress=SERIES["vigil"].progress_counters,
)

# vLLM, V1 engine (vllm/v1/metrics/loggers.py), 0.8.0 to 0.33.0 (read from the released wheels).
# Every series carries model_name (and engine, the engine-core index, from 0.8.3). Counters
# scrape with _total. kv_cache_usage_perc appeared in 0.9.2, gpu_cache_usage_perc was hidden in
# 0.11.x and removed in 0.12.0 (both a 0-1 fraction); inter_token_latency_seconds appeared in
# 0.10.2, time_per_output_token_seconds (the same observations) was removed in 0.15.0.
VLLM = Profile(
    engine="vllm",
    releases="0.8.0 to 0.33.0 (V1 engine; older names included where they changed)",
    sources="vllm-project/vllm vllm/v1/metrics/loggers.py, vllm/v1/metrics/buckets.py",
    model_label=SERIES["vllm"].model_label,
    running=SERIES["vllm"].running,
    waiting=SERIES["vllm"].waiting,
    # Generated tokens (counted at every iteration that decodes), prompt tokens (counted when a
    # request's prefill is done: IterationStats.update_from_output), and the KV-cache usage,
    # republished at every step and changed by every prefill chunk.
    progress="(rate(vllm:generation_tokens_total[1m])"
    ' or label_replace(rate(vllm:prompt_tokens_total[1m]), "vigil_signal", "prompt", "", "")'
    ' or label_replace(changes(vllm:kv_cache_usage_perc[1m]) / 60, "vigil_signal", "kv", "", "")'
    ' or label_replace(changes(vllm:gpu_cache_usage_perc[1m]) / 60, "vigil_signal", "kv", "", ""))',
    generation_tokens="rate(vllm:generation_tokens_total[1m])",
    kv_usage='{__name__=~"vllm:(kv|gpu)_cache_usage_perc"}',
    ttft_buckets="rate(vllm:time_to_first_token_seconds_bucket[5m])",
    # The newer name where both are exposed (0.10.2 to 0.14.x: the same observations).
    itl_buckets="(rate(vllm:inter_token_latency_seconds_bucket[5m]) "
    "or rate(vllm:time_per_output_token_seconds_bucket[5m]))",
    duration_buckets="rate(vllm:e2e_request_latency_seconds_bucket[5m])",
    requests="rate(vllm:request_success_total[5m])",
    # finished_reason error (0.13.0 on) and abort (the engine gave the request up); client
    # disconnects are not counted by vLLM.
    errors='rate(vllm:request_success_total{finished_reason=~"error|abort"}[5m])',
    # The generation counter moves at every engine iteration that decodes (loggers.py:798,
    # recorded per iteration by the output handler); the prompt counter when a prefill is done,
    # the KV-cache usage at every step that allocates (every prefill chunk): a long chunked
    # prefill is progress too.
    job="vllm",
    stopped_running=SERIES["vllm"].running,
    stopped_progress=(*SERIES["vllm"].progress_counters, *SERIES["vllm"].progress_gauges),
)

# SGLang (python/sglang/srt/metrics/collector.py up to 0.5.9, observability/metrics_collector.py
# from 0.5.10), 0.4.5 to 0.5.23. Served only with --enable-metrics. Scheduler gauges carry
# model_name plus rank labels (only attention-TP rank 0 reports by default); the token counters
# move once per finished request, so progress also counts updates of num_used_tokens, which the
# scheduler republishes every decode log interval (40 steps by default) while it decodes.
SGLANG = Profile(
    engine="sglang",
    releases="0.4.5 to 0.5.23",
    sources="sgl-project/sglang python/sglang/srt/observability/metrics_collector.py",
    model_label=SERIES["sglang"].model_label,
    running=SERIES["sglang"].running,
    waiting=SERIES["sglang"].waiting,
    progress="(rate(sglang:generation_tokens_total[1m]) or label_replace(changes("
    'sglang:num_used_tokens[1m]) / 60, "vigil_signal", "kv", "", ""))',
    generation_tokens="rate(sglang:generation_tokens_total[1m])",
    kv_usage="sglang:token_usage",
    ttft_buckets="rate(sglang:time_to_first_token_seconds_bucket[5m])",
    itl_buckets="(rate(sglang:inter_token_latency_seconds_bucket[5m]) "
    "or rate(sglang:time_per_output_token_seconds_bucket[5m]))",
    duration_buckets="rate(sglang:e2e_request_latency_seconds_bucket[5m])",
    requests="rate(sglang:num_requests_total[5m])",
    # No engine-failure counter: num_aborted_requests counts client aborts and disconnects too,
    # and http_responses_total has no model_name. Absent rather than wrong.
    errors=None,
    # generation_tokens_total moves once per finished request (:1860), num_used_tokens every
    # decode log interval (40 steps): too rare alone. The tokenizer manager observes the
    # inter-token latency histogram whenever a request's completion tokens grew
    # (managers/tokenizer_manager.py collect_metrics; the buckets, and so _count, grow by the
    # new tokens: observe_inter_token_latency), at every output the scheduler streams: every
    # decode step for a streamed request (--stream-interval 1), every 50 tokens for another
    # (DEFAULT_FORCE_STREAM_INTERVAL); time_to_first_token_seconds_count moves at each
    # request's first token (the end of its prefill).
    job="sglang",
    stopped_running=SERIES["sglang"].running,
    stopped_progress=(
        "sglang:inter_token_latency_seconds_count",
        "sglang:time_to_first_token_seconds_count",
        *SERIES["sglang"].progress_counters,
        *SERIES["sglang"].progress_gauges,
    ),
    # num_running_reqs is a stale gauge after a burst: the scheduler sets it only when it logs
    # its stats, every decode log interval (40 steps) while it decodes and, once idle, every
    # 30 s ("During idle time, also collect metrics every 30 seconds": Scheduler.check_memory,
    # python/sglang/srt/managers/scheduler.py, later the scheduler's runtime-checker mixin,
    # `time.perf_counter() > self.metrics_collector.last_log_time + 30`). So when the last
    # requests finish, the gauge keeps their number for up to 30 s while nothing moves: with
    # the 20 s window every burst that ends would look like a hang. SGLang has no prompter
    # in-flight gauge (the tokenizer manager counts requests only when they finish), so its
    # window is longer than that refresh: 30 s plus 15 s of margin (the idle loop's own
    # period, a scrape, a slow log round). A hang is then notified some 25 s later than on
    # the other engines; InferenceEngineNoProgress stays the backstop.
    stopped_window="45s",
)

# TGI (huggingface/text-generation-inference router and backends/v3), v1.4.0 to v3.3.7. Router
# metrics only, with no model label; counters scrape WITHOUT _total (metrics-exporter-prometheus).
# No time-to-first-token metric; the mean time per token includes the prefill. The KV usage is
# the current batch's reserved tokens over the pool's capacity (v2.3.1 on), an approximation.
TGI = Profile(
    engine="tgi",
    releases="v1.4.0 to v3.3.7 (KV usage from v2.3.1)",
    sources="huggingface/text-generation-inference router/src/server.rs, backends/v3/src",
    model_label=SERIES["tgi"].model_label,
    running=SERIES["tgi"].running,
    waiting=SERIES["tgi"].waiting,
    progress="rate(tgi_batch_inference_count[1m])",  # prefill and decode calls of the batch
    generation_tokens="rate(tgi_request_generated_tokens_sum[1m])",
    kv_usage="(tgi_batch_current_max_tokens / tgi_batch_max_total_tokens)",
    ttft_buckets=None,
    itl_buckets="rate(tgi_request_mean_time_per_token_duration_bucket[5m])",
    duration_buckets="rate(tgi_request_duration_bucket[5m])",
    requests="(rate(tgi_request_success[5m]) or rate(tgi_request_failure[5m]))",
    # The engine's failures, not the client's (validation, template; dropped: the client went
    # away) nor back-pressure (overloaded).
    errors='rate(tgi_request_failure{err=~"generation|incomplete"}[5m])',
    # Every prefill and decode call of the batch (label method), counted per call.
    job="tgi",
    stopped_running=SERIES["tgi"].running,
    stopped_progress=SERIES["tgi"].progress_counters,
)

PROFILES = (VIGIL, VLLM, SGLANG, TGI)


def _quantiles(profile: Profile, name: str, buckets: str | None) -> list[dict]:
    if buckets is None:
        return []
    return [
        {
            "record": name,
            "expr": f"histogram_quantile({q}, {profile.by_model('sum', buckets, ', le')})",
            "labels": {"engine": profile.engine, "quantile": q},
        }
        for q in QUANTILES
    ]


def recording_rules(profile: Profile) -> list[dict]:
    """The vocabulary's recording rules for one engine."""
    p = profile

    def record(name: str, aggregation: str, expr: str | None) -> list[dict]:
        if expr is None:
            return []
        return [
            {"record": name, "expr": p.by_model(aggregation, expr), "labels": {"engine": p.engine}}
        ]

    return [
        *record("vigil:engine_requests_running", "sum", p.running),
        *record("vigil:engine_requests_waiting", "sum", p.waiting),
        *record("vigil:engine_progress:rate1m", "sum", p.progress),
        *record("vigil:engine_generation_tokens:rate1m", "sum", p.generation_tokens),
        *record("vigil:engine_kv_cache_usage_ratio", "max", p.kv_usage),
        *_quantiles(p, "vigil:engine_time_to_first_token_seconds", p.ttft_buckets),
        *_quantiles(p, "vigil:engine_inter_token_latency_seconds", p.itl_buckets),
        *_quantiles(p, "vigil:engine_request_duration_seconds", p.duration_buckets),
        *record("vigil:engine_requests:rate5m", "sum", p.requests),
        *record("vigil:engine_request_errors:rate5m", "sum", p.errors),
    ]


def recording_groups() -> list[dict]:
    return [{"name": f"vigil-engine-{p.engine}", "rules": recording_rules(p)} for p in PROFILES]
