"""Metrics after real traffic: present, with the right counts, and as documented."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import requests
from conftest import chat_body
from prometheus_client.parser import text_string_to_metric_families

from inference.telemetry.catalog import METRICS

CUDA_ONLY = {
    "inference_torch_cuda_memory_allocated_bytes",
    "inference_torch_cuda_memory_reserved_bytes",
    "inference_torch_cuda_memory_peak_allocated_bytes",
}


def test_metrics_count_real_traffic(server_factory):
    server = server_factory()
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=60)
    usage = []
    for i in range(3):
        usage.append(
            client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=5 + i
            ).usage
        )
    for chunk in client.completions.create(
        model="demo",
        prompt="streamed",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage.append(chunk.usage)
    assert (
        requests.post(
            server.url("/v1/chat/completions"), json=chat_body(max_tokens=0), timeout=30
        ).status_code
        == 400
    )
    assert (
        requests.post(
            server.url("/v1/chat/completions"),
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            timeout=30,
        ).status_code
        == 404
    )

    s = server.sample
    # A stream is recorded as its body closes, a moment after the client read [DONE].
    server.wait_for(lambda: s("inference_requests_total") == 6, what="all six recorded")
    assert (
        s(
            "inference_requests_total",
            endpoint="chat",
            status="200",
            finish_reason="length",
            error_type="",
        )
        == 3
    )
    assert s("inference_requests_total", endpoint="completions", status="200") == 1
    assert s("inference_requests_total", status="400", error_type="invalid_request_error") == 1
    assert s("inference_requests_total", status="404", error_type="model_not_found") == 1
    assert s("inference_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert s("inference_generation_tokens_total") == sum(u.completion_tokens for u in usage) == 22
    assert s("gen_ai_server_request_duration_seconds_count") == 6  # errors too
    assert s("gen_ai_server_request_duration_seconds_count", error_type="model_not_found") == 1
    assert s("gen_ai_server_time_to_first_token_seconds_count", operation="chat") == 3
    assert s("gen_ai_server_time_to_first_token_seconds_count", operation="text_completion") == 1
    assert s("gen_ai_server_time_per_output_token_seconds_count") == 4
    assert s("inference_queue_wait_seconds_count") == 4
    assert s("inference_prefill_duration_seconds_count") == 4
    assert s("inference_engine_steps_total", stage="prefill") == 4
    assert s("inference_engine_steps_total", stage="decode") == 22 - 4
    assert not _has(server, "inference_empty_outputs_total")  # the demo model always writes
    # Nothing left pending.
    assert s("inference_queue_depth") == 0
    assert s("inference_requests_running") == 0
    assert s("inference_requests_in_flight") == 0
    assert s("inference_queue_oldest_enqueue_timestamp_seconds") == 0
    # The heartbeat moved with the last step; the model is described.
    assert time.time() - s("inference_progress_heartbeat_timestamp_seconds") < 60
    assert (
        s(
            "inference_model_info",
            model="demo",
            architecture="LlamaForCausalLM",
            dtype="float32",
            device="cpu",
        )
        == 1
    )
    assert s("inference_model_load_state", state="loaded") == 1
    assert s("inference_model_load_state", state="loading") == 0
    assert 0 < s("inference_model_load_duration_seconds") < 600
    assert s("inference_build_info") == 1


def _has(server, name: str) -> bool:
    try:
        server.sample(name)
        return True
    except KeyError:
        return False


def test_every_exposed_metric_is_documented_and_vice_versa(server):
    requests.post(server.url("/v1/chat/completions"), json=chat_body(max_tokens=2), timeout=30)
    exposed = {family.name for family in text_string_to_metric_families(server.metrics_text())}
    # The parser reports counters without their _total suffix.
    documented = {spec.name for spec in METRICS}
    assert exposed - documented == set()
    # Empty outputs only appear once one happened; CUDA gauges only on CUDA; injected faults
    # only with fault injection.
    assert documented - exposed <= CUDA_ONLY | {
        "inference_empty_outputs",
        "inference_faults_injected",
    }


def test_exposition_passes_promtool_when_available(server):
    promtool = shutil.which("promtool")
    if promtool is None:
        import pytest

        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=server.metrics_text(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_files_live_in_the_state_dir(server):
    files = sorted(p.name for p in (Path(server.state_dir) / "metrics").iterdir())
    assert any(name.startswith("counter_") for name in files)
    assert any(name.startswith("histogram_") for name in files)
    assert any(name.startswith("gauge_liveall_") for name in files)
    identity = list((Path(server.state_dir) / "processes").glob("*.json"))
    assert len(identity) == 1
    import json

    record = json.loads(identity[0].read_text())
    assert record["pid"] == server.process.pid
    assert record["model"] == "demo" and record["state"] == "loaded"
    assert sys.platform != "linux" or record["proc_start_ticks"] > 0
