"""The alert rules, written once here with their thresholds as named parameters.

    python -m alerts.rules                       # writes alerts/*.rules.yml with the defaults
    python -m alerts.rules --set hang_for=10s --out DIR   # other thresholds (tests, your site)

The committed ``alerts/*.rules.yml`` are this module's output with the defaults, so they can be
read and loaded as they are; the table of parameters in alerts/README.md comes from
``PARAMETERS``. ``scripts/generate`` (tools/generate.py) writes both with every other generated
file, and a test fails when a committed one is stale. Every alert carries ``severity``
(critical, warning, info), ``cause`` (what Alertmanager inhibits on), a summary, a description
naming the instance, model or GPU and the value, and a ``runbook_url``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import engines

ALERTS_DIR = Path(__file__).resolve().parent
README = ALERTS_DIR / "README.md"
PARAMETERS_TABLE_HEADER = "| Parameter | Default | Meaning |"

# Where a series comes from besides its ``instance``: in Kubernetes every scraped series carries
# the node and namespace of its pod (relabelled from __meta_kubernetes_pod_node_name and
# __meta_kubernetes_namespace), and ``cluster`` is an external label of each Prometheus, which
# a central ruler (Mimir, Thanos) sees on every series. Every aggregation and vector match that
# keeps ``instance`` keeps these too (``with_place``), so that an alert says in which cluster and
# on which node it fires and two clusters' instances of the same name never merge. Outside
# Kubernetes none of them exists, and a label that no series has changes no aggregation: "by"
# groups on the empty value and "on" matches empty with empty ("A label with an empty label
# value is considered equivalent to a label that does not exist", prometheus.io/docs/concepts/
# data_model).
PLACE = ("cluster", "namespace", "node")
_GROUPING = re.compile(r"\b(by|on)\s*\(([^()]*)\)")


def with_place(expr: str) -> str:
    """``expr`` with cluster, namespace and node added to each ``by (...)`` and ``on (...)``
    that names ``instance`` (and lacks them)."""

    def add(match: re.Match) -> str:
        labels = [label.strip() for label in match.group(2).split(",") if label.strip()]
        if "instance" not in labels:
            return match.group(0)
        labels += [label for label in PLACE if label not in labels]
        return f"{match.group(1)} ({', '.join(labels)})"

    return _GROUPING.sub(add, expr)


# The rule group evaluated every hang_evaluation_interval (2 s) instead of evaluation_interval.
FAST_HANG_GROUP = "vigil-hangs-fast"

# What the fast hang group reads, per scrape job: job name (as alerts/prometheus.yml and
# compose/prometheus/*.yml name the jobs) -> the exact metric names, as scraped (counters with
# the suffix they are exposed with: TGI's without _total; a histogram's _count), that the fast
# group's rules read from that job's targets. Prometheus scrapes exactly these every
# hang_evaluation_interval in a job of its own per entry (``<job>-hang``) and drops them from
# the normal job, so each series is stored once, under the fast job's ``job`` label: hence no
# rule (fast or not) reads one of these names with a ``job`` matcher, and the fast group never
# filters on ``job``. The fast group reads no recording rule (those are evaluated at
# evaluation_interval). tests/test_alert_rules.py checks both.
HANG_SERIES: dict[str, tuple[str, ...]] = {
    PROFILE.job: tuple(
        dict.fromkeys(
            (
                # Our watchdog's flag and stall counter (InferenceEngineStalled), and the
                # exporter's view of the engines it probes (InferenceEngineStoppedGenerating).
                *(
                    (
                        "inference_engine_stalled",
                        "inference_engine_stalls_total",
                        # A process with our watchdog is left to InferenceEngineStalled.
                        "inference_watchdog_stall_timeout_seconds",
                        "vigil_engine_metrics_up",
                        "vigil_engine_requests_running",
                        "vigil_engine_progress_total",
                    )
                    if PROFILE is engines.VIGIL
                    else ()
                ),
                PROFILE.stopped_running,
                *PROFILE.stopped_progress,
            )
        )
    )
    for PROFILE in engines.PROFILES
}


@dataclass(frozen=True)
class Parameter:
    default: str
    doc: str


PARAMETERS: dict[str, Parameter] = {
    "exporter_job": Parameter("vigil-exporter", "Prometheus job name of the exporter."),
    "evaluation_interval": Parameter(
        "10s",
        "How often every rule group is evaluated (each group's interval), and the step of the "
        "rules' subqueries: the evaluation_interval of alerts/prometheus.yml, written into the "
        "groups so that they keep it in a Prometheus whose global interval is another "
        "(kube-prometheus-stack's 30s).",
    ),
    "hang_evaluation_interval": Parameter(
        "2s",
        "How often the fast hang group (vigil-hangs-fast: InferenceEngineStalled, "
        "InferenceEngineStoppedGenerating) is evaluated, its own interval; the series it reads "
        "(HANG_SERIES in alerts/rules.py) are scraped as often, in jobs of their own.",
    ),
    "runbook_base": Parameter(
        "https://github.com/llm-vigil/llm-vigil/blob/main/alerts/runbooks",
        "Where the runbooks are published; each alert links <runbook_base>/<Alert>.md.",
    ),
    "stall_for": Parameter(
        "0s",
        "How long the engine's own stall flag must hold (the watchdog already waited its "
        "stall threshold: the running step's, from --stall-floor up to --stall-timeout).",
    ),
    "stall_window": Parameter(
        "5m",
        "Window in which a recorded stall (counter) keeps the "
        "alert firing, also when the process exited right after it.",
    ),
    "heartbeat_max_age": Parameter(
        "60", "Seconds without engine progress while requests are in flight that count as a hang."
    ),
    "hang_for": Parameter("30s", "How long a heartbeat-based hang must last."),
    "engine_hang_for": Parameter(
        "1m",
        "How long an engine (any: vLLM, SGLang, TGI, ours) must have had requests running or "
        "waiting (for engine_pending_window already) and no forward pass finishing (its "
        "progress rate over 1m at 0) to count as hung: with that 1m window, at least 2 minutes "
        "without progress while work waits, longer than one long prefill and shorter than "
        "vLLM's and SGLang's own 300 s timeouts.",
    ),
    "engine_stopped_window": Parameter(
        "20s",
        "InferenceEngineStoppedGenerating: how long requests must have been running with none of "
        "the engine's progress series moving (read from the engine's own metrics, or ours from "
        "the exporter's state-directory view). Five times a 4 s prefill (a pause that is no "
        "hang), ten fast scrapes, and short enough for a notification within 30 s. SGLang's "
        "profile has its own, longer window (alerts/engines.py: its running gauge lags by up "
        "to 30 s once idle).",
    ),
    "engine_stopped_before": Parameter(
        "1m",
        "InferenceEngineStoppedGenerating: the window before the silence (offset by its length) "
        "in which the engine must have been moving often (engine_stopped_moves).",
    ),
    "engine_stopped_moves": Parameter(
        "12",
        "InferenceEngineStoppedGenerating: changes of the engine's busiest progress series "
        "within engine_stopped_before before the silence (at most 29 at a 2 s scrape): 12 is "
        "a move every 5 s on average, so that engine_stopped_window is four such gaps. An "
        "engine that was idle, loading, or moving rarely (SGLang's non-streamed requests "
        "report every 50 tokens) is left to InferenceEngineNoProgress.",
    ),
    "engine_stopped_hold": Parameter(
        "5m",
        "InferenceEngineStoppedGenerating: how far back the moves before the silence are "
        "looked for, so that the alert keeps firing while the silence lasts (the minute before "
        "the window slides into the silence); longer than InferenceEngineNoProgress takes "
        "(about 2 to 3 minutes), which carries a longer hang on.",
    ),
    "engine_stopped_exporter_window": Parameter(
        "45s",
        "InferenceEngineStoppedGenerating from the exporter's view of an engine Prometheus "
        "does not scrape itself (vigil_engine_progress_total): the exporter reads the "
        "engine's /metrics once per probe round, every 15 s (--probe-interval), longer when "
        "the round's checks take their 5 s timeouts (up to about 25 s between two reads): "
        "the window spans at least one more read than that.",
    ),
    "engine_stopped_exporter_moves": Parameter(
        "3",
        "InferenceEngineStoppedGenerating from the exporter's view: reads of the minute "
        "before the silence (four at the default 15 s probe interval) in which the engine's "
        "progress had moved.",
    ),
    "hang_scrape_failing_for": Parameter(
        "1m",
        "VigilHangScrapeFailing: how long a fast hang job's scrapes (<job>-hang) must fail while "
        "the normal job's succeed (30 failed 2 s scrapes: not one slow response).",
    ),
    "engine_pending_window": Parameter(
        "1m",
        "How long an engine must have had requests running or waiting, without a break, before "
        "no progress can count as a hang: a prefill that is an idle engine's first work (its "
        "progress rate already 0) then has this long plus engine_hang_for (2 minutes).",
    ),
    "engine_progress_window": Parameter(
        "1m",
        "Window over which the exporter's view of an engine's progress "
        "(vigil_engine_progress_total) must not move, for an engine Prometheus cannot scrape "
        "itself (frozen, or no scrape job of its own).",
    ),
    "kv_full_ratio": Parameter(
        "0.98", "Share of an engine's KV-cache pool in use that counts as full (with a queue)."
    ),
    "kv_full_for": Parameter("5m", "How long the KV cache must stay full while requests wait."),
    "probe_for": Parameter("1m", "How long a failing probe must fail."),
    "busy_cpu_ratio": Parameter("0.9", "CPU cores' share a process must use to count as busy."),
    "disk_sleep_for": Parameter("2m", "How long a process may sit in uninterruptible wait."),
    "load_max_seconds": Parameter(
        "600",
        "Seconds a model load may take before a warning; keep "
        "it below the server's --load-timeout (900), after which the "
        "watchdog reports a stall in stage load.",
    ),
    "crash_loop_exits": Parameter(
        "3", "Unclean exits within crash_loop_window that make a crash loop."
    ),
    "crash_loop_window": Parameter("15m", "Window of crash_loop_exits."),
    "vram_full_ratio": Parameter(
        "0.95", "Used share of a GPU's memory that counts as nearly full."
    ),
    "vram_full_for": Parameter("5m", "How long memory must stay nearly full."),
    "vram_predict_window": Parameter("30m", "History predict_linear extrapolates from."),
    "oom_window": Parameter("5m", "Window in which out-of-memory errors alert."),
    "refusals_window": Parameter("10m", "Window of admission refusals."),
    "refusals_max": Parameter("5", "Admission refusals within refusals_window that alert."),
    "queue_depth_max": Parameter("32", "Queued requests that count as a backlog."),
    "queue_wait_max": Parameter("30", "Seconds the oldest queued request may wait."),
    "backlog_for": Parameter("2m", "How long a backlog must last."),
    "ttft_p95_max": Parameter("2", "Objective for time to first token, p95, seconds."),
    "latency_p95_max": Parameter("60", "Objective for end-to-end request duration, p95, seconds."),
    "latency_for": Parameter("10m", "How long latency must exceed its objective."),
    "error_ratio_warning": Parameter("0.05", "Share of 5xx answers that warns."),
    "error_ratio_critical": Parameter("0.25", "Share of 5xx answers that is critical."),
    "error_for": Parameter("5m", "How long the error share must hold."),
    "empty_outputs_max": Parameter("3", "Empty completions within 10 minutes that alert."),
    "xid_critical_codes": Parameter(
        "48|61|62|63|64|74|79|92|94|95|119|120",
        "XID codes that need a person (regular expression).",
    ),
    "throttle_for": Parameter("5m", "How long a thermal or power slowdown must last."),
    "gpu_stale_seconds": Parameter("120", "Seconds after which GPU readings count as stale."),
    "gpu_lost_for": Parameter("1m", "How long a GPU must stay down."),
    "imbalance_ratio": Parameter("0.5", "Spread of utilization between the GPUs of one model."),
    "imbalance_for": Parameter("15m", "How long the spread must last."),
    "exporter_down_for": Parameter("1m", "How long the exporter may be unreachable."),
    "node_unhealthy_gpus": Parameter(
        "2",
        "Faulty GPUs (vigil:node_gpus_unhealthy) that make a node the news: NodeGpusFaulty "
        "pages once for the node and Alertmanager holds back its per-GPU and per-engine alerts.",
    ),
    "node_faulty_for": Parameter(
        "0s",
        "How long a node must have that many faulty GPUs. 0s: the faults carry their own windows "
        "(lost for gpu_lost_for, an XID or ECC error within 10 minutes), and the node alert must "
        "reach Alertmanager within the node route's group_wait after the per-GPU alerts it "
        "holds back (alerts/alertmanager.yml).",
    ),
    "node_vanished_window": Parameter(
        "1h",
        "How far back a node's exporter or GPU series count as present: a node whose series "
        "were there within this window and are gone now has vanished (and the alert ends this "
        "long after it went).",
    ),
    "node_vanished_for": Parameter(
        "5m",
        "How long a node must stay gone (longer than an exporter pod's restart or rollout).",
    ),
    "own_process_window": Parameter(
        "1h",
        "How long after an exporter last published our inference process "
        "(inference_build_info) that process still counts as expected there, for "
        "InferenceNoLiveProcess, where the exporter does not (or no longer) know a target of "
        "engine vigil.",
    ),
}


@dataclass(frozen=True, kw_only=True)
class Alert:
    """One alerting rule, declared with keywords only: summary and description (and the other
    strings) cannot be swapped unnoticed."""

    name: str
    expr: str  # PromQL; each line's indentation is dropped
    for_: str  # how long expr must hold before the alert fires (the rule's ``for``)
    severity: str  # critical, warning or info
    cause: str  # what Alertmanager groups and inhibits on
    summary: str
    description: str

    def rule(self, runbook_base: str) -> dict:
        """The rule as Prometheus reads it."""
        return {
            "alert": self.name,
            "expr": _dedent(self.expr),
            "for": self.for_,
            "labels": {"severity": self.severity, "cause": self.cause},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": f"{runbook_base}/{self.name}.md",
            },
        }


def _dedent(expr: str) -> str:
    lines = [line.strip() for line in expr.strip().splitlines()]
    return "\n".join(lines)


def groups(p: dict[str, str]) -> dict[str, list[dict]]:
    """File stem -> its rule groups."""
    # The fast group (vigil-hangs-fast, evaluated every hang_evaluation_interval): the hang
    # signals that are unambiguous within seconds. It reads raw series only, each listed in
    # HANG_SERIES (scraped as often, in jobs of their own), never a recording rule (those are
    # evaluated at evaluation_interval) and never by job.
    hangs_fast = [
        Alert(
            name="InferenceEngineStalled",
            for_=p["stall_for"],
            severity="critical",
            cause="hang",
            expr=f"""(max by (instance, model) (inference_engine_stalled) > 0)
            or
            (sum by (instance, model) (increase(inference_engine_stalls_total[{p["stall_window"]}])) > 0)""",
            summary="Inference engine stalled on {{ $labels.model }}",
            description=(
                "The watchdog of {{ $labels.model }} on {{ $labels.instance }} found work "
                "pending and no engine progress for longer than its stall threshold (now, or "
                f"within the last {p['stall_window']}: with --on-stall exit the process "
                "restarted right after); the waiting requests were answered 503 engine_stalled. "
                "The stall report in the log holds every thread's stack and the requests' trace "
                "ids."
            ),
        ),
        Alert(
            name="InferenceEngineStoppedGenerating",
            for_="0s",
            severity="critical",
            cause="hang",
            expr=_engines_stopped(p),
            summary="{{ $labels.engine }} engine of {{ $labels.model }} stopped generating",
            description=(
                "{{ $value }} requests have been running on {{ $labels.model }} "
                "({{ $labels.engine }}) at {{ $labels.instance }} for "
                f"{p['engine_stopped_window']} (SGLang: {engines.SGLANG.stopped_window}, its "
                "running gauge lags; seen by the exporter: "
                f"{p['engine_stopped_exporter_window']}) and none of the engine's progress "
                "series has moved (generated tokens, forward passes, KV-cache updates), right "
                "after it had been moving every few seconds: the engine stopped mid-work (a "
                "collective that never returns, a wedged GPU, a deadlocked scheduler). Any "
                "engine where our watchdog does not run (a process of ours that publishes its "
                "watchdog is InferenceEngineStalled's); an exporter's view names "
                "{{ $labels.target }}."
            ),
        ),
    ]
    hangs = [
        Alert(
            name="InferenceEngineNoProgress",
            for_=p["engine_hang_for"],
            severity="critical",
            cause="hang",
            expr=_engines_hung(p),
            summary="{{ $labels.engine }} engine of {{ $labels.model }} makes no progress",
            description=(
                "{{ $value }} requests run or wait on {{ $labels.model }} ({{ $labels.engine }}) "
                "at {{ $labels.instance }}, and no forward pass has finished for over "
                f"{p['engine_hang_for']} plus a minute: the engine is hung (a collective that "
                "never returns, a wedged GPU, a frozen process). Any engine: the hang layer "
                "for the servers whose own watchdog we do not run. Seen by Prometheus from the "
                "engine's own metrics or, when it cannot scrape them (a frozen engine), by the "
                "exporter ({{ $labels.target }})."
            ),
        ),
        Alert(
            name="InferenceHeartbeatStale",
            for_=p["hang_for"],
            severity="critical",
            cause="hang",
            expr=f"""max by (instance, model, pid) (vigil_process_heartbeat_age_seconds) > {p["heartbeat_max_age"]}
            and on (instance, model, pid)
            max by (instance, model, pid) (inference_requests_in_flight) > 0""",
            summary="No engine progress on {{ $labels.model }} with requests in flight",
            description=(
                "Process {{ $labels.pid }} on {{ $labels.instance }} made no prefill or decode "
                "step for {{ $value | humanizeDuration }} while requests wait (seen from the "
                "exporter: the process may be frozen, its GIL held, or its --stall-timeout "
                "longer than this threshold)."
            ),
        ),
        Alert(
            name="InferenceBusyWithoutProgress",
            for_=p["hang_for"],
            severity="warning",
            cause="busy",
            expr=f"""max by (instance, model, pid) (rate(vigil_process_cpu_seconds_total[2m])) > {p["busy_cpu_ratio"]}
            and on (instance, model, pid)
            max by (instance, model, pid) (vigil_process_heartbeat_age_seconds) > {p["heartbeat_max_age"]}
            and on (instance, model, pid)
            max by (instance, model, pid) (inference_requests_in_flight) > 0""",
            summary="Inference process busy at full CPU without progress on {{ $labels.model }}",
            description=(
                "Process {{ $labels.pid }} on {{ $labels.instance }} uses "
                "{{ $value | humanize }} CPU cores but its engine has not stepped: a busy loop "
                "(tokenizer, a stuck thread, a CUDA call spin-waiting on a kernel that never "
                "ends). Take its stacks (py-spy dump)."
            ),
        ),
        Alert(
            name="InferenceEngineFrozen",
            for_=p["hang_for"],
            severity="critical",
            cause="hang",
            expr="""max by (instance, model) (rate(vigil_process_cpu_seconds_total[2m])) == 0
            and on (instance, model)
            sum by (instance, model) (vigil_engine_requests_running + vigil_engine_requests_waiting) > 0""",
            summary="{{ $labels.model }}'s engine processes use no CPU with work pending",
            description=(
                "Requests run or wait on {{ $labels.model }} (as the exporter on "
                "{{ $labels.instance }} last read them), yet none of its engine's processes has "
                "used any CPU for 2 minutes: the engine is frozen (stopped, deadlocked, asleep on "
                "a lock), not busy. A serving engine uses CPU while it works, even when the GPU "
                "does the compute."
            ),
        ),
        Alert(
            name="InferenceProcessInDriverWait",
            for_=p["disk_sleep_for"],
            severity="warning",
            cause="hang",
            expr='max by (instance, model, pid) (vigil_process_state{state="disk_sleep"}) == 1',
            summary="Inference process stuck in uninterruptible wait on {{ $labels.model }}",
            description=(
                "Process {{ $labels.pid }} on {{ $labels.instance }} has been in uninterruptible "
                f"wait (state D) for over {p['disk_sleep_for']}: usually inside the GPU driver "
                "or on a hung file system. It cannot be killed until the call returns."
            ),
        ),
        Alert(
            name="InferenceProbeFailing",
            for_=p["probe_for"],
            severity="critical",
            cause="hang",
            expr="""max by (instance, target) (vigil_probe_success{check="canary"}) == 0
            and on (instance, target)
            max by (instance, target) (vigil_probe_success{check="health"}) == 1
            and on (instance, target)
            (
            max by (instance, target) (vigil_probe_success{check="ready"}) == 1
            or
            max by (instance, target) (vigil_probe_http_status{check="ready"}) == 404
            )""",
            summary="Canary completions fail on {{ $labels.target }} while it says it is ready",
            description=(
                "The exporter on {{ $labels.instance }} gets no completion from "
                "{{ $labels.target }} although its /health and /ready answer 200 (or it has no "
                "/ready, as vLLM, SGLang and TGI): it looks alive and does not serve (or its "
                "queue is so full that the canary times out)."
            ),
        ),
        Alert(
            name="InferenceTargetDown",
            for_=p["probe_for"],
            severity="critical",
            cause="down",
            expr='max by (instance, target) (vigil_probe_success{check="health"}) == 0',
            summary="Inference server {{ $labels.target }} does not answer /health",
            description=(
                "The exporter on {{ $labels.instance }} gets no 200 from "
                "{{ $labels.target }}/health (refused, timed out, or 503 while stalled or its "
                "engine died)."
            ),
        ),
        Alert(
            name="InferenceProbeAbsent",
            for_="5m",
            severity="warning",
            cause="down",
            expr=f'absent(vigil_probe_success{{check="health",job="{p["exporter_job"]}"}})',
            summary="No probe results from the exporter",
            description=(
                "Prometheus has no vigil_probe_success series: the exporter runs without "
                "--target, or it is not scraped."
            ),
        ),
        Alert(
            name="InferenceNoLiveProcess",
            for_=p["probe_for"],
            severity="critical",
            cause="down",
            expr=_no_live_own_process(p),
            summary="No live inference process on {{ $labels.instance }}",
            description=(
                "The exporter {{ $labels.instance }} watches our inference process (it probes "
                "a target of engine vigil, or the process was in its state directory within "
                f"the last {p['own_process_window']}) and none is alive there: the server "
                "is not running, or the exporter does not share its state directory."
            ),
        ),
        Alert(
            name="InferenceProcessDied",
            for_="0s",
            severity="warning",
            cause="crash",
            expr="max by (instance, model, pid) (vigil_process_alive) == 0",
            summary="Inference process {{ $labels.pid }} of {{ $labels.model }} died",
            description=(
                "Process {{ $labels.pid }} on {{ $labels.instance }} disappeared without a "
                "clean exit (crash, kill, OOM killer or the watchdog's exit 75)."
            ),
        ),
        Alert(
            name="InferenceCrashLoop",
            for_="0s",
            severity="critical",
            cause="crash",
            expr=f"sum by (instance, model) (increase(vigil_process_unclean_exits_total[{p['crash_loop_window']}])) >= {p['crash_loop_exits']}",
            summary="Inference server of {{ $labels.model }} is crash-looping",
            description=(
                "{{ $value | humanize }} unclean exits of {{ $labels.model }} on "
                f"{{{{ $labels.instance }}}} in {p['crash_loop_window']}."
            ),
        ),
        Alert(
            name="InferenceModelLoadSlow",
            for_="0s",
            severity="warning",
            cause="load",
            expr=f"""(time() - max by (instance, model, pid) (inference_model_load_started_timestamp_seconds)) > {p["load_max_seconds"]}
            and on (instance, model, pid)
            max by (instance, model, pid) (inference_model_load_state{{state="loading"}}) == 1""",
            summary="Model load of {{ $labels.model }} takes too long",
            description=(
                "Process {{ $labels.pid }} on {{ $labels.instance }} has been loading for "
                "{{ $value | humanizeDuration }}."
            ),
        ),
        Alert(
            name="InferenceModelLoadFailed",
            for_="0s",
            severity="critical",
            cause="load",
            expr='max by (instance, model, pid) (inference_model_load_state{state="failed"}) == 1',
            summary="Model load of {{ $labels.model }} failed",
            description=(
                "Process {{ $labels.pid }} on {{ $labels.instance }} could not load its model; "
                "/ready gives the error."
            ),
        ),
    ]
    vram = [
        Alert(
            name="GpuMemoryNearlyFull",
            for_=p["vram_full_for"],
            severity="warning",
            cause="vram",
            expr=f"""max by (instance, gpu, uuid, gpu_name) (vigil_gpu_memory_used_bytes)
            / max by (instance, gpu, uuid, gpu_name) (vigil_gpu_memory_total_bytes) > {p["vram_full_ratio"]}""",
            summary="GPU {{ $labels.gpu }} memory nearly full on {{ $labels.instance }}",
            description=(
                "GPU {{ $labels.gpu }} ({{ $labels.gpu_name }}, {{ $labels.uuid }}) has "
                "{{ $value | humanizePercentage }} of its memory in use."
            ),
        ),
        Alert(
            name="GpuMemoryFullWithinAnHour",
            for_="10m",
            severity="warning",
            cause="vram",
            # One series per GPU on each side (max by the GPU's labels): a replaced exporter pod
            # leaves its series (another pod label) in the window beside the new pod's, and a
            # one-to-one match of them errs ("many-to-one matching must be explicit"). The
            # subquery joins the old and the new pod's samples into one history to extrapolate.
            expr=f"""predict_linear(max by (instance, gpu, uuid, gpu_name) (vigil_gpu_memory_used_bytes)[{p["vram_predict_window"]}:{p["evaluation_interval"]}], 3600)
            > on (instance, gpu, uuid, gpu_name)
            max by (instance, gpu, uuid, gpu_name) (vigil_gpu_memory_total_bytes)
            and on (instance, gpu, uuid, gpu_name)
            max by (instance, gpu, uuid, gpu_name) (vigil_gpu_memory_used_bytes)
            / max by (instance, gpu, uuid, gpu_name) (vigil_gpu_memory_total_bytes) > 0.5""",
            summary=(
                "GPU {{ $labels.gpu }} memory will overflow within the hour on "
                "{{ $labels.instance }}"
            ),
            description=(
                "At the trend of the last " + p["vram_predict_window"] + ", GPU {{ $labels.gpu }} "
                "({{ $labels.gpu_name }}) reaches {{ $value | humanize1024 }}B in an hour, more "
                "than it has."
            ),
        ),
        Alert(
            name="InferenceOutOfMemory",
            for_="0s",
            severity="warning",
            cause="oom",
            expr=f"sum by (instance, model, stage) (increase(inference_out_of_memory_errors_total[{p['oom_window']}])) > 0",
            summary="Out-of-memory errors in {{ $labels.model }} ({{ $labels.stage }})",
            description=(
                "{{ $value | humanize }} out-of-memory error(s) during {{ $labels.stage }} on "
                f"{{{{ $labels.instance }}}} in {p['oom_window']}; batches were split or "
                "requests answered 503 out_of_memory."
            ),
        ),
        Alert(
            name="InferenceAdmissionRefusalsRising",
            for_="0s",
            severity="warning",
            cause="vram",
            expr=f"sum by (instance, model, reason) (increase(inference_admission_refusals_total[{p['refusals_window']}])) > {p['refusals_max']}",
            summary="Requests refused for lack of GPU memory on {{ $labels.model }}",
            description=(
                "{{ $value | humanize }} requests refused ({{ $labels.reason }}) on "
                f"{{{{ $labels.instance }}}} in {p['refusals_window']}: their KV cache would "
                "not fit."
            ),
        ),
    ]
    vram.append(
        Alert(
            name="InferenceKvCacheFull",
            for_=p["kv_full_for"],
            severity="warning",
            cause="kv_cache",
            expr=f"""vigil:engine_kv_cache_usage_ratio > {p["kv_full_ratio"]}
            and on (engine, instance, model)
            vigil:engine_requests_waiting > 0""",
            summary="KV cache of {{ $labels.model }} full while requests wait",
            description=(
                "{{ $value | humanizePercentage }} of the KV-cache pool of {{ $labels.model }} "
                "({{ $labels.engine }}) on {{ $labels.instance }} is in use and requests queue "
                "behind it: the engine preempts or refuses work. Add capacity, shorten "
                "contexts (--max-model-len) or lower the batch."
            ),
        )
    )
    serving = [
        Alert(
            name="InferenceQueueBacklog",
            for_=p["backlog_for"],
            severity="warning",
            cause="backlog",
            expr=f"vigil:engine_requests_waiting > {p['queue_depth_max']}",
            summary="Queue backlog on {{ $labels.model }}",
            description=(
                "{{ $value }} requests wait in the queue of {{ $labels.model }} "
                "({{ $labels.engine }}) on {{ $labels.instance }}."
            ),
        ),
        Alert(
            name="InferenceQueueWaitLong",
            for_=p["backlog_for"],
            severity="warning",
            cause="backlog",
            expr=f"""(time() - max by (instance, model, pid) (inference_queue_oldest_enqueue_timestamp_seconds)) > {p["queue_wait_max"]}
            and on (instance, model, pid)
            max by (instance, model, pid) (inference_queue_oldest_enqueue_timestamp_seconds) > 0""",
            summary="Requests wait long in the queue of {{ $labels.model }}",
            description=(
                "The oldest queued request of process {{ $labels.pid }} on "
                "{{ $labels.instance }} has waited {{ $value | humanizeDuration }}."
            ),
        ),
        Alert(
            name="InferenceTimeToFirstTokenHigh",
            for_=p["latency_for"],
            severity="warning",
            cause="latency",
            expr=f'vigil:engine_time_to_first_token_seconds{{quantile="0.95"}} > {p["ttft_p95_max"]}',
            summary="Time to first token over its objective on {{ $labels.model }}",
            description=(
                "p95 time to first token on {{ $labels.instance }} is "
                "{{ $value | humanizeDuration }} "
                f"(objective {p['ttft_p95_max']} s)."
            ),
        ),
        Alert(
            name="InferenceLatencyHigh",
            for_=p["latency_for"],
            severity="warning",
            cause="latency",
            expr=f'vigil:engine_request_duration_seconds{{quantile="0.95"}} > {p["latency_p95_max"]}',
            summary="Request duration over its objective on {{ $labels.model }}",
            description=(
                "p95 request duration on {{ $labels.instance }} is "
                "{{ $value | humanizeDuration }} "
                f"(objective {p['latency_p95_max']} s)."
            ),
        ),
        Alert(
            name="InferenceErrorRateHigh",
            for_=p["error_for"],
            severity="warning",
            cause="errors",
            expr=_error_ratio(p["error_ratio_warning"]),
            summary="Many requests fail on {{ $labels.model }}",
            description=(
                "{{ $value | humanizePercentage }} of the requests to {{ $labels.model }} "
                "({{ $labels.engine }}) on {{ $labels.instance }} failed in the engine."
            ),
        ),
        Alert(
            name="InferenceErrorRateCritical",
            for_=p["error_for"],
            severity="critical",
            cause="errors",
            expr=_error_ratio(p["error_ratio_critical"]),
            summary="Most requests fail on {{ $labels.model }}",
            description=(
                "{{ $value | humanizePercentage }} of the requests to {{ $labels.model }} "
                "({{ $labels.engine }}) on {{ $labels.instance }} failed in the engine."
            ),
        ),
        Alert(
            name="InferenceEmptyOutputs",
            for_="0s",
            severity="warning",
            cause="empty",
            expr=f"sum by (instance, model, reason) (increase(inference_empty_outputs_total[10m])) > {p['empty_outputs_max']}",
            summary="Completions come back empty on {{ $labels.model }}",
            description=(
                "{{ $value | humanize }} successful completions without text "
                "({{ $labels.reason }}) on {{ $labels.instance }} in 10 minutes."
            ),
        ),
        Alert(
            name="InferenceCanaryEmpty",
            for_="5m",
            severity="warning",
            cause="empty",
            expr="max by (instance, target) (vigil_probe_canary_empty) == 1",
            summary="The canary completion of {{ $labels.target }} comes back empty",
            description=(
                "The exporter on {{ $labels.instance }} gets completions without text from "
                "{{ $labels.target }}."
            ),
        ),
    ]
    gpus = [
        Alert(
            name="GpuXidError",
            for_="0s",
            severity="critical",
            cause="gpu",
            expr=f"""(
            sum by (instance, gpu, uuid, gpu_name, xid) (increase(vigil_gpu_xid_errors_total{{xid=~"{p["xid_critical_codes"]}"}}[10m])) > 0
            )
            or
            (
            max by (instance, gpu, uuid, gpu_name, xid) (vigil_gpu_xid_errors_total{{xid=~"{p["xid_critical_codes"]}"}})
            unless max by (instance, gpu, uuid, gpu_name, xid) (vigil_gpu_xid_errors_total offset 10m)
            )""",
            summary="XID {{ $labels.xid }} on GPU {{ $labels.gpu }} of {{ $labels.instance }}",
            description=(
                "The driver reported XID {{ $labels.xid }} on GPU {{ $labels.gpu }} "
                "({{ $labels.gpu_name }}, {{ $labels.uuid }}); this code needs a person (reset, "
                "drain, or replacement)."
            ),
        ),
        Alert(
            name="GpuThermalThrottling",
            for_=p["throttle_for"],
            severity="warning",
            cause="throttle",
            expr='max by (instance, gpu, uuid, gpu_name) (vigil_gpu_clock_event_reason{reason=~"hw_thermal_slowdown|sw_thermal_slowdown"}) == 1',
            summary="GPU {{ $labels.gpu }} of {{ $labels.instance }} slows down for heat",
            description=(
                "GPU {{ $labels.gpu }} ({{ $labels.gpu_name }}) holds its clocks down for "
                "temperature."
            ),
        ),
        Alert(
            name="GpuPowerBrake",
            for_=p["throttle_for"],
            severity="warning",
            cause="throttle",
            expr='max by (instance, gpu, uuid, gpu_name) (vigil_gpu_clock_event_reason{reason=~"hw_slowdown|hw_power_brake_slowdown"}) == 1',
            summary="GPU {{ $labels.gpu }} of {{ $labels.instance }} under hardware slowdown",
            description=(
                "GPU {{ $labels.gpu }} ({{ $labels.gpu_name }}) is slowed by hardware (power "
                "brake or an external signal): check the power supply and cooling."
            ),
        ),
        Alert(
            name="GpuPowerCapped",
            for_="15m",
            severity="info",
            cause="throttle",
            expr='max by (instance, gpu, uuid, gpu_name) (vigil_gpu_clock_event_reason{reason="sw_power_cap"}) == 1',
            summary="GPU {{ $labels.gpu }} of {{ $labels.instance }} runs at its power limit",
            description=(
                "GPU {{ $labels.gpu }} ({{ $labels.gpu_name }}) is held at its power limit; "
                "normal under full load, worth knowing when throughput drops."
            ),
        ),
        Alert(
            name="GpuEccUncorrectable",
            for_="0s",
            severity="critical",
            cause="gpu",
            expr='sum by (instance, gpu, uuid, gpu_name) (increase(vigil_gpu_ecc_errors_total{type="uncorrected"}[10m])) > 0',
            summary="Uncorrectable ECC errors on GPU {{ $labels.gpu }} of {{ $labels.instance }}",
            description=(
                "{{ $value | humanize }} uncorrectable ECC error(s) on GPU {{ $labels.gpu }} "
                "({{ $labels.uuid }}) in 10 minutes."
            ),
        ),
        Alert(
            name="GpuRowRemapFailure",
            for_="0s",
            severity="critical",
            cause="gpu",
            expr="max by (instance, gpu, uuid, gpu_name) (vigil_gpu_remapped_rows_failure) == 1",
            summary="Row remapping failed on GPU {{ $labels.gpu }} of {{ $labels.instance }}",
            description=(
                "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) could not remap a failing memory "
                "row: it needs service."
            ),
        ),
        Alert(
            name="GpuRowRemapPending",
            for_="0s",
            severity="warning",
            cause="gpu",
            expr="max by (instance, gpu, uuid, gpu_name) (vigil_gpu_remapped_rows_pending) == 1",
            summary=(
                "GPU {{ $labels.gpu }} of {{ $labels.instance }} needs a reset for a row remap"
            ),
            description=(
                "A memory row remapping of GPU {{ $labels.gpu }} ({{ $labels.uuid }}) waits for "
                "a GPU reset."
            ),
        ),
        Alert(
            name="GpuLost",
            for_=p["gpu_lost_for"],
            severity="critical",
            cause="gpu_lost",
            expr="max by (instance, gpu, uuid, gpu_name) (vigil_gpu_up) == 0",
            summary="GPU {{ $labels.gpu }} of {{ $labels.instance }} is lost or unreadable",
            description=(
                "The exporter cannot read GPU {{ $labels.gpu }} ({{ $labels.gpu_name }}, "
                "{{ $labels.uuid }}): fallen off the bus, or its readings are stale."
            ),
        ),
        Alert(
            name="GpuReadingsStale",
            for_="0s",
            severity="warning",
            cause="gpu_lost",
            expr=f"(time() - max by (instance, gpu, uuid, gpu_name) (vigil_gpu_last_read_timestamp_seconds)) > {p['gpu_stale_seconds']}",
            summary="GPU {{ $labels.gpu }} readings of {{ $labels.instance }} are stale",
            description=(
                "The last successful read of GPU {{ $labels.gpu }} is "
                "{{ $value | humanizeDuration }} old: a driver call may be wedged."
            ),
        ),
        Alert(
            name="NvmlDown",
            for_="5m",
            severity="critical",
            cause="gpu_lost",
            expr="max by (instance) (vigil_nvml_up) == 0 and max by (instance) (max_over_time(vigil_nvml_up[6h])) == 1",
            summary="NVML stopped answering on {{ $labels.instance }}",
            description=(
                "The exporter on {{ $labels.instance }} read GPUs before and NVML fails now "
                "(driver unloaded or wedged)."
            ),
        ),
        Alert(
            name="GpuUtilizationImbalance",
            for_=p["imbalance_for"],
            severity="warning",
            cause="imbalance",
            expr=f"""(
            max by (instance, model) (vigil_gpu_utilization_ratio * on (instance, gpu) group_left (model) (max by (instance, gpu, model) (vigil_gpu_process_memory_used_bytes{{model!=""}}) > bool 0))
            - min by (instance, model) (vigil_gpu_utilization_ratio * on (instance, gpu) group_left (model) (max by (instance, gpu, model) (vigil_gpu_process_memory_used_bytes{{model!=""}}) > bool 0))
            ) > {p["imbalance_ratio"]}
            and on (instance, model)
            count by (instance, model) (vigil_gpu_process_memory_used_bytes{{model!=""}}) > 1""",
            summary="GPUs of {{ $labels.model }} on {{ $labels.instance }} are unevenly used",
            description=(
                "Utilization differs by {{ $value | humanizePercentage }} between the GPUs "
                "serving {{ $labels.model }}: one replica may be stuck, or the load balancer "
                "starves it."
            ),
        ),
    ]
    meta = [
        Alert(
            name="VigilExporterDown",
            for_=p["exporter_down_for"],
            severity="critical",
            cause="exporter",
            expr=f'up{{job="{p["exporter_job"]}"}} == 0 or absent(up{{job="{p["exporter_job"]}"}})',
            summary="The vigil exporter cannot be scraped",
            description=(
                "Prometheus cannot scrape the exporter {{ $labels.instance }} (or no exporter "
                "job exists): GPU, process and probe metrics are blind."
            ),
        ),
        Alert(
            # Every series the hang alerts read (HANG_SERIES) comes from the fast jobs only
            # (the normal jobs drop them): a fast scrape that fails (its timeout is 1.5 s, the
            # normal job's 10 s) blinds InferenceEngineStalled, InferenceEngineStoppedGenerating
            # and the vocabulary's progress series behind InferenceEngineNoProgress at once,
            # while the normal job looks fine. Critical, as VigilExporterDown: no hang of that
            # target can page. Cause exporter: sent with the node's other exporter alerts and
            # held back by a node alert. Where the normal job fails too, the target is down
            # (VigilExporterDown, InferenceTargetDown): that is the news.
            name="VigilHangScrapeFailing",
            for_=p["hang_scrape_failing_for"],
            severity="critical",
            cause="exporter",
            expr="""up{job=~".+-hang"} == 0
            unless on (instance, job)
            label_replace(up == 0, "job", "$1-hang", "job", "(.+)")""",
            summary="The fast hang scrape of {{ $labels.instance }} fails",
            description=(
                "Prometheus cannot scrape the hang series of {{ $labels.instance }} (job "
                "{{ $labels.job }}, every 2 s with a 1.5 s timeout) while its normal job "
                "scrapes: the hang alerts of that target (InferenceEngineStalled, "
                "InferenceEngineStoppedGenerating, InferenceEngineNoProgress) cannot fire."
            ),
        ),
        Alert(
            name="VigilExporterCollectorFailing",
            for_="5m",
            severity="warning",
            cause="exporter",
            expr="max by (instance, collector) (vigil_exporter_collector_success) == 0",
            summary="Collector {{ $labels.collector }} of the exporter fails",
            description=(
                "The {{ $labels.collector }} collector of {{ $labels.instance }} fails; its "
                "metrics are left out. The exporter's log says why."
            ),
        ),
        Alert(
            name="Watchdog",
            for_="0s",
            severity="info",
            cause="watchdog",
            expr="vector(1)",
            summary="Alerting pipeline heartbeat",
            description=(
                "Always firing: proves that rules are evaluated and notifications are "
                "delivered. Route it to a dead man's switch; its absence is the alert."
            ),
        ),
    ]
    alerts_by_file = {"hangs": hangs, "vram": vram, "serving": serving, "gpus": gpus, "meta": meta}
    files = {
        stem: [
            {"name": f"vigil-{stem}", "rules": [alert.rule(p["runbook_base"]) for alert in alerts]}
        ]
        for stem, alerts in alerts_by_file.items()
    }
    # Its own interval: "[ interval: <duration> | default = global.evaluation_interval ]" per
    # rule group (prometheus.io/docs/prometheus/latest/configuration/recording_rules/
    # #rule_group); the slower hang alerts stay in vigil-hangs as the backstop.
    files["hangs"].insert(
        0,
        {
            "name": FAST_HANG_GROUP,
            "interval": p["hang_evaluation_interval"],
            "rules": [alert.rule(p["runbook_base"]) for alert in hangs_fast],
        },
    )
    # The recording rules that map every engine to one vocabulary, which the alerts above read.
    files["engines"] = engines.recording_groups()
    files["fleet"] = [
        {"name": "vigil-fleet", "rules": fleet_recording_rules(p)},
        {
            "name": "vigil-fleet-alerts",
            "rules": [alert.rule(p["runbook_base"]) for alert in fleet_alerts(p)],
        },
    ]
    for stem, body in files.items():
        # Every group with its interval: a rule group without one is evaluated at the loading
        # Prometheus' global evaluation_interval ("[ interval: <duration> | default =
        # global.evaluation_interval ]", prometheus.io/docs/prometheus/latest/configuration/
        # recording_rules/#rule_group), and the rules' windows, for durations and the node
        # route's group_wait (alerts/alertmanager.yml) were written for ours.
        files[stem] = [
            {"name": group["name"], "interval": p["evaluation_interval"], **group} for group in body
        ]  # a group's own interval (the fast group's) stays
        for group in files[stem]:
            for rule in group["rules"]:
                rule["expr"] = with_place(rule["expr"])
    return files


def _no_live_own_process(p: dict[str, str]) -> str:
    """Per exporter: our own inference process is expected there and none of it is alive.

    Expected: the exporter probes a target whose engine is vigil (vigil_engine_metrics_up
    {engine="vigil"}, published from its first probe round on when --target names the engine,
    and from the first read of the target's /metrics when it recognises it; kept while the
    exporter runs, with 0 while /metrics fails), or it shows one of ours dead
    (vigil_process_alive 0 comes only from the state directory), or it published one of ours
    within own_process_window (inference_build_info: a gauge of our process, from the state
    directory, gone once the process is). Not expected where the exporter watches other engines
    only (vLLM, SGLang, TGI): on Kubernetes it reaches them through a Service and has no process
    view of them, and in compose it may have none either (no permission, nothing found behind
    the port); InferenceTargetDown reports such an engine down.
    Alive: vigil_process_alive 1, except the processes of a target known to be another engine
    (vigil_engine_process_info, where the exporter sees them from their port): a live vLLM
    beside our dead process hides nothing. Our own process behind a local target has engine
    vigil there, and one not recognised yet has engine "": both count as ours.
    vigil_engine_metrics_up is read without a job matcher: it is one of HANG_SERIES, scraped
    (and stored) under the exporter's fast job only; the rest under exporter_job."""
    job = f'job="{p["exporter_job"]}"'
    return f"""(
    group by (instance) (vigil_engine_metrics_up{{engine="vigil"}})
    or
    group by (instance) (vigil_process_alive{{{job}}} == 0)
    or
    group by (instance) (max_over_time(inference_build_info{{{job}}}[{p["own_process_window"]}]))
    )
    unless on (instance)
    (
    vigil_process_alive{{{job}}} == 1
    unless on (instance, pid)
    vigil_engine_process_info{{{job},engine!~"|vigil"}}
    )"""


# An engine the vocabulary has already, read by Prometheus from its own metrics: the same
# host:port (the exporter's target as ``address``, Prometheus' ``instance``), or, on Kubernetes,
# the same engine and model on the same node: there the exporter reaches the engine through a
# node-local Service (kubernetes/overlays/vllm) while Prometheus scrapes the pod's own address,
# so the addresses differ. Only series with a node take the second way: outside Kubernetes two
# hosts without a node label are not one place.
_SEEN_DIRECTLY = """unless on (engine, address, cluster)
    label_replace(vigil:engine_progress:rate1m, "address", "$1", "instance", "(.*)")
    unless on (engine, model, cluster, node)
    vigil:engine_progress:rate1m{node!=""}"""


# The exporter's view of engines Prometheus does not read from their own metrics (a frozen engine
# whose scrapes fail, or one without a scrape job): its vigil_engine_* series, keyed by the
# target's host:port as ``address``, left out where the vocabulary has that engine already.
def _exporter_only(series: str) -> str:
    return f"""label_replace(
    sum by (instance, target, engine, model) ({series}),
    "address", "$1", "target", "https?://([^/]+).*")
    {_SEEN_DIRECTLY}"""


def _engines_hung(p: dict[str, str]) -> str:
    """The engines with requests running or waiting (for engine_pending_window without a break)
    and no forward pass finishing: from the vocabulary, or from the exporter's view of an engine
    Prometheus cannot read itself. InferenceEngineNoProgress fires on it after engine_hang_for;
    vigil:node_engines_hung counts it per node."""
    return f"""(
    min_over_time((vigil:engine_requests_running + vigil:engine_requests_waiting)[{p["engine_pending_window"]}:{p["evaluation_interval"]}]) > 0
    and on (engine, instance, model)
    vigil:engine_progress:rate1m == 0
    )
    or
    (
    label_replace(
    min_over_time((sum by (instance, target, engine, model) (vigil_engine_requests_running) + sum by (instance, target, engine, model) (vigil_engine_requests_waiting))[{p["engine_pending_window"]}:{p["evaluation_interval"]}]) > 0
    and on (instance, target, engine, model)
    sum by (instance, target, engine, model) (increase(vigil_engine_progress_total[{p["engine_progress_window"]}])) == 0,
    "address", "$1", "target", "https?://([^/]+).*")
    {_SEEN_DIRECTLY}
    )"""


def _changes(profile: engines.Profile, window: str, offset: str = "") -> str:
    """The changes of each of the engine's progress series within ``window`` (ending ``offset``
    ago), one series per signal (``vigil_signal``: or keeps only one of equal label sets), its
    model label as ``model``."""
    signals = "\nor\n".join(
        f'label_replace(changes({name}[{window}]{offset}), "vigil_signal", "{name}", "", "")'
        for name in profile.stopped_progress
    )
    return engines._as_model(f"(\n{signals}\n)", profile.model_label)


def _engine_stopped(profile: engines.Profile, p: dict[str, str]) -> str:
    """One engine read from its own series: requests running throughout engine_stopped_window
    and now (a scrape that fails marks the series stale, so a dead or unreachable engine is no
    "silence"), none of its progress series changed in the window, and its busiest one changed
    at least engine_stopped_moves times in the engine_stopped_before before it. That last part
    is looked for over the last engine_stopped_hold (a subquery at the fast group's interval):
    as the silence goes on, the minute before the window slides into it, and the alert would
    end after some 40 s of a hang that lasts. The value: the fewest requests running within the
    window."""
    window = profile.stopped_window or p["engine_stopped_window"]
    before = p["engine_stopped_before"]
    running = profile.stopped_running

    def per_model(expr: str) -> str:
        return engines._as_model(expr, profile.model_label)

    silent = f"max by (instance, model) ({_changes(profile, window)}) == 0"
    # Our own process, seen through the exporter, has its watchdog (published as
    # inference_watchdog_stall_timeout_seconds): its stall threshold follows the step under way,
    # up to --stall-timeout for a step it cannot predict, so a silence of engine_stopped_window
    # may be a legitimate long step, and a real hang pages as InferenceEngineStalled already.
    watchdog = (
        "\n    unless on (instance, model)\n    "
        "group by (instance, model) (inference_watchdog_stall_timeout_seconds)"
        if profile is engines.VIGIL
        else ""
    )
    return f"""label_replace(
    sum by (instance, model) ({per_model(f"min_over_time({running}[{window}])")}) > 0
    and on (instance, model)
    sum by (instance, model) ({per_model(running)}) > 0
    and on (instance, model)
    {silent}
    and on (instance, model)
    max_over_time((
    {silent}
    and on (instance, model)
    max by (instance, model) ({_changes(profile, before, f" offset {window}")}) >= {p["engine_stopped_moves"]}
    )[{p["engine_stopped_hold"]}:{p["hang_evaluation_interval"]}]){watchdog},
    "engine", "{profile.engine}", "", "")"""


def _scraped_directly(selector: str = "") -> str:
    """The foreign engines Prometheus scrapes itself (their running gauge), with ``engine`` and
    ``model``: raw series, as the fast group reads no recording rule."""
    return "\nor\n".join(
        f"label_replace(group by (instance, model) "
        f"({engines._as_model(profile.stopped_running + selector, profile.model_label)}), "
        f'"engine", "{profile.engine}", "", "")'
        for profile in engines.PROFILES
        if profile.engine != "vigil"
    )


def _exporter_stopped(p: dict[str, str]) -> str:
    """The exporter's view of an engine (vigil_engine_*, read from its /metrics once per probe
    round): the same condition over engine_stopped_exporter_window, with every read of it
    successful (vigil_engine_metrics_up 1 throughout and now: while /metrics cannot be read the
    exporter keeps the last requests and a flat progress, which says nothing either way; a
    frozen engine is InferenceEngineNoProgress's). Left out where Prometheus reads the engine
    itself (the branches above, by address or, on Kubernetes, by engine, model and node), and
    our own process where the same exporter publishes its state directory."""
    window, before = p["engine_stopped_exporter_window"], p["engine_stopped_before"]
    key = "instance, target, engine, model"
    return f"""label_replace(
    sum by ({key}) (min_over_time(vigil_engine_requests_running[{window}])) > 0
    and on ({key})
    sum by ({key}) (vigil_engine_requests_running) > 0
    and on ({key})
    sum by ({key}) (changes(vigil_engine_progress_total[{window}])) == 0
    and on ({key})
    max_over_time((
    sum by ({key}) (changes(vigil_engine_progress_total[{window}])) == 0
    and on ({key})
    sum by ({key}) (changes(vigil_engine_progress_total[{before}] offset {window})) >= {p["engine_stopped_exporter_moves"]}
    )[{p["engine_stopped_hold"]}:{p["hang_evaluation_interval"]}])
    and on (instance, target, engine)
    min by (instance, target, engine) (min_over_time(vigil_engine_metrics_up[{window}])) == 1
    and on (instance, target, engine)
    min by (instance, target, engine) (vigil_engine_metrics_up) == 1,
    "address", "$1", "target", "https?://([^/]+).*")
    unless on (engine, address, cluster)
    label_replace(
    {_scraped_directly()},
    "address", "$1", "instance", "(.*)")
    unless on (engine, model, cluster, node)
    (
    {_scraped_directly('{node!=""}')}
    )
    unless on (instance, engine)
    label_replace(group by (instance) ({engines.VIGIL.stopped_running}), "engine", "vigil", "", "")"""


def _engines_stopped(p: dict[str, str]) -> str:
    """InferenceEngineStoppedGenerating: every engine profile from its own series, and the
    exporter's view of the engines Prometheus does not read itself."""
    branches = [_engine_stopped(profile, p) for profile in engines.PROFILES]
    branches.append(_exporter_stopped(p))
    return "\nor\n".join(f"(\n{branch}\n)" for branch in branches)


# The GPU readings that mean a hard fault now, each as a per-GPU filter (vigil_gpu_* series
# carry gpu, uuid and gpu_name, docs/metrics.md). The same notions as the per-GPU alerts, each
# with its window in the expression (NodeGpusFaulty has no ``for`` of its own): lost for
# gpu_lost_for (GpuLost), row remap failure or pending (GpuRowRemapFailure, GpuRowRemapPending),
# an uncorrected ECC error or a critical XID within 10 minutes (GpuEccUncorrectable,
# GpuXidError). Not a slowdown (heat, power brake, power cap): a throttling GPU still computes,
# slower, and two of them are no reason to drain the node and hold back all its alerts;
# GpuThermalThrottling and GpuPowerBrake report them per GPU.
def _gpu_faults(p: dict[str, str]) -> list[str]:
    xid = f'vigil_gpu_xid_errors_total{{xid=~"{p["xid_critical_codes"]}"}}'
    return [
        f"max_over_time(vigil_gpu_up[{p['gpu_lost_for']}]) == 0",
        "vigil_gpu_remapped_rows_failure == 1",
        "vigil_gpu_remapped_rows_pending == 1",
        'increase(vigil_gpu_ecc_errors_total{type="uncorrected"}[10m]) > 0',
        f"increase({xid}[10m]) > 0",
        # A counter first seen with its XID already counted (as GpuXidError's second branch).
        f"({xid} unless on (instance, uuid, xid) ({xid} offset 10m))",
    ]


def fleet_recording_rules(p: dict[str, str]) -> list[dict]:
    """The fleet in one view: per node (by cluster and node), its GPUs, the faulty ones (hard
    faults only: lost, row remap, uncorrected ECC, critical XID; not slowdowns), the least free
    GPU memory, its engines and the hung ones. The fleet dashboard reads these names;
    keep them, their labels and their meaning. The per-GPU figures count each GPU once by its
    uuid (an exporter pod replaced mid-scrape shows the same GPU twice for a moment)."""
    gpus = "group by (cluster, node, uuid) (vigil_gpu_up)"
    faults = "\nor\n".join(_gpu_faults(p))
    # Our own engine and every profiled one: the vocabulary (alerts/engines.py) with engine,
    # instance and model; plus the engines only the exporter sees (a frozen one).
    engines_seen = (
        "group by (engine, instance, model) (vigil:engine_requests_running "
        "or vigil:engine_requests_waiting or vigil:engine_progress:rate1m)\nor\n"
        "group by (engine, instance, model) ("
        + _exporter_only("vigil_engine_requests_running")
        + ")"
    )
    rules = [
        ("vigil:node_gpus", f"count by (cluster, node) ({gpus})"),
        (
            "vigil:node_gpus_unhealthy",
            f"count by (cluster, node) (group by (cluster, node, uuid) (\n{faults}\n))\n"
            "or\n0 * vigil:node_gpus",
        ),
        (
            "vigil:node_gpu_memory_headroom_ratio",
            "min by (cluster, node) (\n"
            "max by (cluster, node, uuid) (vigil_gpu_memory_free_bytes)\n"
            "/ max by (cluster, node, uuid) (vigil_gpu_memory_total_bytes > 0)\n)",
        ),
        (
            "vigil:node_engines",
            f"count by (cluster, node) (\n{engines_seen}\n)\nor\n0 * vigil:node_gpus",
        ),
        (
            "vigil:node_engines_hung",
            f"count by (cluster, node) (\n{_engines_hung(p)}\n)\nor\n0 * vigil:node_engines",
        ),
    ]
    return [{"record": name, "expr": _dedent(expr)} for name, expr in rules]


def fleet_alerts(p: dict[str, str]) -> list[Alert]:
    """The node as the unit of paging: each fires once per (cluster, node), and Alertmanager
    (alertmanager.yml) groups the GPU and node alerts by cluster and node and holds back every
    other alert of that node while one of these fires. NodeGpusFaulty counts hard faults only
    (``_gpu_faults``), and has no ``for`` by default (node_faulty_for): it must reach
    Alertmanager within the node route's group_wait after the first per-GPU alert, or that one
    is sent on its own before the node alert can hold it back."""
    job = f'job="{p["exporter_job"]}"'
    window = p["node_vanished_window"]
    return [
        Alert(
            name="NodeGpusFaulty",
            for_=p["node_faulty_for"],
            severity="critical",
            cause="node",
            expr=f"vigil:node_gpus_unhealthy >= {p['node_unhealthy_gpus']}",
            summary="{{ $value }} GPUs of node {{ $labels.node }} are faulty",
            description=(
                "{{ $value }} GPUs of node {{ $labels.node }} (cluster {{ $labels.cluster }}) "
                "are lost, failed a row remap or wait for one, or had an uncorrected ECC error "
                "or a critical XID in 10 minutes: the node is the problem, not one GPU or one "
                "model. Its per-GPU and per-engine alerts are held back while this fires. Drain "
                "the node."
            ),
        ),
        Alert(
            name="NodeGpusVanished",
            for_=p["node_vanished_for"],
            severity="critical",
            cause="node",
            # A node that dies records no vigil_gpu_up == 0: its exporter's GPU series end (a
            # failed scrape marks them stale, prometheus.io/docs/prometheus/latest/querying/
            # basics/#staleness). Its exporter pod, a DaemonSet's, is not evicted (DaemonSet pods
            # tolerate the node.kubernetes.io/unreachable and not-ready NoExecute taints with no
            # tolerationSeconds, kubernetes.io/docs/concepts/workloads/controllers/daemonset/
            # #taints-and-tolerations): its target stays, up == 0, until the Node object is
            # deleted, which deletes its pods (kubernetes.io/docs/concepts/architecture/nodes/),
            # and then up ends too, so VigilExporterDown stops. Present within the window and
            # gone now is the signal, for either.
            expr=f"""(
            group by (cluster, node) (max_over_time(up{{{job}}}[{window}]))
            unless
            group by (cluster, node) (up{{{job}}})
            )
            or
            (
            group by (cluster, node) (max_over_time(vigil_gpu_up[{window}]))
            unless
            group by (cluster, node) (vigil_gpu_up)
            )""",
            summary="Node {{ $labels.node }} and its GPUs are gone from monitoring",
            description=(
                "Node {{ $labels.node }} (cluster {{ $labels.cluster }}) had an exporter or "
                f"GPUs within the last {window} and has none now: the node died or was "
                "removed, or its exporter is down or cannot read them. Nothing on it is "
                "watched."
            ),
        ),
    ]


def _error_ratio(threshold: str) -> str:
    return f"""vigil:engine_request_errors:rate5m / vigil:engine_requests:rate5m > {threshold}"""


def defaults() -> dict[str, str]:
    """Every parameter at its default."""
    return {name: param.default for name, param in PARAMETERS.items()}


def render(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """File name -> YAML text of every rule file."""
    values = defaults()
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    values.update(overrides or {})
    header = (
        "# Generated by `python -m alerts.rules` from alerts/rules.py; edit that file (or\n"
        "# pass --set NAME=VALUE) and regenerate. Thresholds: see alerts/README.md.\n"
    )
    return {
        f"{stem}.rules.yml": header
        + yaml.safe_dump({"groups": body}, sort_keys=False, width=100, allow_unicode=True)
        for stem, body in groups(values).items()
    }


def alert_names() -> list[str]:
    return [
        rule["alert"]
        for body in groups(defaults()).values()
        for group in body
        for rule in group["rules"]
        if "alert" in rule
    ]


def _table_cell(text: str) -> str:
    """A | inside a Markdown table cell ends the cell, even within backticks: escape it."""
    return text.replace("|", r"\|")


def parameters_table() -> str:
    """The Markdown table of parameters in alerts/README.md."""
    rows = [PARAMETERS_TABLE_HEADER, "| --- | --- | --- |"]
    rows += [
        f"| `{name}` | `{_table_cell(str(param.default))}` | {param.doc} |"
        for name, param in PARAMETERS.items()
    ]
    return "\n".join(rows) + "\n"


def with_parameters_table(readme: str) -> str:
    """``readme`` (the text of alerts/README.md) with its parameters table, from the header row
    to the first line that is not a table row, replaced by the current ``parameters_table()``."""
    start = readme.find("\n" + PARAMETERS_TABLE_HEADER + "\n") + 1
    if start == 0:
        raise ValueError(f"{README} has no parameters table (no line {PARAMETERS_TABLE_HEADER!r})")
    end = start
    while readme.startswith("|", end):
        end = readme.find("\n", end) + 1 or len(readme)
    return readme[:start] + parameters_table() + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alerts.rules", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter other than its default (repeatable)",
    )
    parser.add_argument("--out", default=str(ALERTS_DIR), help="directory to write into")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = value
    try:
        write(Path(args.out), overrides)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


def write(out: Path, overrides: dict[str, str] | None = None) -> Path:
    """Render the rule files with ``overrides`` into ``out`` (made if missing); returns ``out``.
    Tests and benchmarks use it for rules at their own cadence or thresholds."""
    files = render(overrides)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return out


if __name__ == "__main__":
    sys.exit(main())
