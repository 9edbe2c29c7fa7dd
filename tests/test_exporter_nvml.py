"""The real NVML path, on a machine with an NVIDIA GPU (marked gpu; skipped elsewhere)."""

from __future__ import annotations

import re

import pytest
import requests
from conftest import start_exporter, start_server
from prometheus_client.parser import text_string_to_metric_families

from exporter.gpu.poller import GpuPoller
from vigil.gpu.nvml import NvmlBackend

pytestmark = pytest.mark.gpu


def test_nvml_backend_reads_every_gpu():
    backend = NvmlBackend()
    backend.init()
    info = backend.system_info()
    assert info.driver_version and re.fullmatch(r"\d+\.\d+", info.cuda_version), info
    count = backend.device_count()
    assert count >= 1
    for index in range(count):
        r = backend.read(index)
        print(f"GPU {index}: {r}")
        assert r.uuid.startswith(("GPU-", "MIG-")) and r.name
        assert r.memory_total_bytes and r.memory_total_bytes > 2**30
        assert r.memory_used_bytes is not None and r.memory_free_bytes is not None
        assert r.memory_used_bytes + r.memory_free_bytes <= r.memory_total_bytes
        if r.temperature_celsius is not None:
            assert 0 < r.temperature_celsius < 120
        if r.power_watts is not None and r.power_limit_watts is not None:
            assert 0 < r.power_watts <= r.power_limit_watts * 1.5
        if r.sm_clock_hertz is not None:
            assert 1e8 < r.sm_clock_hertz < 5e9
    # XID events: supported or cleanly unavailable, never an exception of another kind
    poller = GpuPoller(backend)
    poller.poll_once()
    poller.xid_once(0.1)
    assert poller.snapshot().backend_up


def test_exporter_ties_gpu_memory_to_the_inference_process(tmp_path, demo_dir):
    import torch

    server = start_server(tmp_path, demo_dir, "--device", "cuda")
    exporter = start_exporter(tmp_path, server.state_dir, "--gpu-interval", "0.5")
    try:
        requests.post(
            server.url("/v1/completions"),
            timeout=120,
            json={"model": "demo", "prompt": "hello", "max_tokens": 8},
        ).raise_for_status()

        def tied() -> bool:
            return (
                f'pid="{server.process.pid}"' in exporter.metrics_text()
                and "vigil_gpu_process_memory_used_bytes{" in exporter.metrics_text()
            )

        exporter.wait_for(tied, 30, "the inference process's GPU memory")
        samples = [
            s for f in text_string_to_metric_families(exporter.metrics_text()) for s in f.samples
        ]
        up = [s for s in samples if s.name == "vigil_gpu_up"]
        assert up and all(s.value == 1 for s in up), up
        used = [
            s
            for s in samples
            if s.name == "vigil_gpu_process_memory_used_bytes" and s.labels["model"] == "demo"
        ]
        print("process memory:", used)
        assert used and used[0].value > 0
        total = {
            s.labels["gpu"]: s.value for s in samples if s.name == "vigil_gpu_memory_total_bytes"
        }
        _free, torch_total = torch.cuda.mem_get_info(0)
        print(f"NVML total {total.get('0')}, torch total {torch_total}")
        assert total["0"] == pytest.approx(torch_total, rel=0.02)
    finally:
        exporter.stop()
        server.stop()
