"""Golden files of the tests, produced here so that ``scripts/generate`` writes exactly what
tests/test_generated_files.py compares.

``tests/data/golden_gpu.prom``: the exporter's GPU exposition of the fake fleet
(``tests/data/fake_fleet.json``) after three polls (GPU 2 is lost after its second read), one XID
event and one known inference process, at a fixed clock.
"""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors.gpu import GpuCollector
from exporter.gpu.poller import GpuPoller
from vigil.gpu.fake import FakeFleet

REPO = Path(__file__).resolve().parents[1]
FAKE_FLEET = REPO / "tests" / "data" / "fake_fleet.json"
GOLDEN_GPU = "tests/data/golden_gpu.prom"
NOW = 1_700_000_000.0  # the fixed clock of the readings
PROCESS_MODELS = {4242: "glm-4-9b"}  # pid -> model of the inference processes on the GPUs


def gpu_exposition() -> str:
    """The exposition of tests/data/golden_gpu.prom."""
    poller = GpuPoller(FakeFleet(json.loads(FAKE_FLEET.read_text())), clock=lambda: NOW)
    for _ in range(3):
        poller.poll_once()
    if not poller.xid_once(0):
        raise RuntimeError(f"the fake fleet of {FAKE_FLEET} reported no XID events")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector(poller, lambda: PROCESS_MODELS, clock=lambda: NOW))
    return generate_latest(registry).decode()


def render() -> dict[str, str]:
    """Repository-relative path -> text of every golden file."""
    return {GOLDEN_GPU: gpu_exposition()}
