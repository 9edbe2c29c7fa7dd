"""GPU metrics through the fake fleet (the hardware seam): a golden exposition, unsupported
fields absent, a GPU lost mid-run, a wedged call kept off the scrape, NVML missing, and a
failing collector that leaves the rest served."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.collectors.gpu import GpuCollector
from exporter.gpu.poller import GpuPoller
from exporter.registry import GuardedCollectors
from vigil.gpu.fake import FakeFleet
from vigil.gpu.nvml import NvmlBackend

DATA = Path(__file__).parent / "data"
NOW = 1_700_000_000.0


def _exposition(*collectors) -> str:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _names(text: str, gpu: str) -> set[str]:
    return {name for (name, labels) in _samples(text) if ("gpu", gpu) in labels}


def _fleet_poller(spec=None, **kwargs) -> tuple[FakeFleet, GpuPoller]:
    fleet = FakeFleet(spec or json.loads((DATA / "fake_fleet.json").read_text()))
    return fleet, GpuPoller(fleet, clock=lambda: NOW, **kwargs)


def test_golden_exposition_of_the_fake_fleet():
    """Three polls (GPU 2 is lost after its second read), one XID event, a known process:
    tools/golden.py, which scripts/generate writes into the golden file (checked here too, for
    the light install's run)."""
    from tools.golden import GOLDEN_GPU, REPO, gpu_exposition

    assert gpu_exposition() == (REPO / GOLDEN_GPU).read_text(), (
        "to accept a deliberate change: scripts/generate"
    )


def test_unsupported_fields_are_absent_not_zero():
    _, poller = _fleet_poller()
    poller.poll_once()
    text = _exposition(GpuCollector(poller, dict, clock=lambda: NOW))
    full, partial = _names(text, "0"), _names(text, "1")
    absent = {
        "vigil_gpu_ecc_errors_total",
        "vigil_gpu_remapped_rows",
        "vigil_gpu_remapped_rows_pending",
        "vigil_gpu_remapped_rows_failure",
        "vigil_gpu_energy_joules_total",
        "vigil_gpu_memory_reserved_bytes",
        "vigil_gpu_pcie_replays_total",
        "vigil_gpu_mig_enabled",
    }
    assert absent <= full
    assert not absent & partial
    assert {
        "vigil_gpu_up",
        "vigil_gpu_memory_used_bytes",
        "vigil_gpu_temperature_celsius",
        "vigil_gpu_clock_event_reason",
    } <= partial


def test_a_lost_gpu_drops_only_its_own_series_and_its_up_goes_to_zero():
    _, poller = _fleet_poller()
    poller.poll_once()
    poller.poll_once()
    before = _samples(_exposition(GpuCollector(poller, dict, clock=lambda: NOW)))
    poller.poll_once()  # GPU 2 falls off the bus on its third read
    text = _exposition(GpuCollector(poller, dict, clock=lambda: NOW))
    after = _samples(text)
    up = {
        dict(labels)["gpu"]: value
        for (name, labels), value in after.items()
        if name == "vigil_gpu_up"
    }
    assert up == {"0": 1.0, "1": 1.0, "2": 0.0}
    assert _names(text, "2") == {"vigil_gpu_up", "vigil_gpu_last_read_timestamp_seconds"}
    assert {k for k in before if ("gpu", "0") in k[1]} == {k for k in after if ("gpu", "0") in k[1]}
    # the lost GPU keeps its identity in its labels, so an alert can name it
    lost = [
        labels
        for (name, labels), _ in after.items()
        if name == "vigil_gpu_up" and ("gpu", "2") in labels
    ][0]
    assert ("uuid", "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee") in lost


def test_a_wedged_gpu_call_never_holds_the_scrape():
    spec = {
        "gpus": [
            {"uuid": "GPU-ok", "name": "ok", "memory_used_bytes": 1},
            {"uuid": "GPU-wedged", "name": "wedged", "memory_used_bytes": 2, "hang_after_reads": 1},
        ]
    }
    now = [NOW]
    fleet = FakeFleet(spec)
    poller = GpuPoller(fleet, interval=0.01, max_age=5.0, clock=lambda: now[0])
    # The poller's second round blocks inside GPU 1's read, for ever.
    wedged = threading.Event()
    original_read = fleet.read

    def read(index):
        if index == 1 and fleet._reads[1] >= 1:
            wedged.set()
        return original_read(index)

    fleet.read = read
    poller.start()
    try:
        assert wedged.wait(10), "the fake never wedged"
        collector = GpuCollector(poller, dict, clock=lambda: now[0])
        result: list[str] = []
        scrape = threading.Thread(target=lambda: result.append(_exposition(collector)))
        scrape.start()
        scrape.join(10)
        assert result, "the scrape waited on the wedged GPU call"
        assert (
            _samples(result[0])[
                ("vigil_gpu_up", (("gpu", "1"), ("gpu_name", "wedged"), ("uuid", "GPU-wedged")))
            ]
            == 1.0
        )
        now[0] += 6.0  # past --gpu-max-age: the readings are stale, their values left out
        stale = _exposition(collector)
        up = {
            dict(labels)["gpu"]: value
            for (name, labels), value in _samples(stale).items()
            if name == "vigil_gpu_up"
        }
        assert up == {"0": 0.0, "1": 0.0}  # the whole round is stuck: both readings age
        assert "vigil_gpu_memory_used_bytes" not in {n for (n, _) in _samples(stale)}
    finally:
        poller.stop()


def test_nvml_missing_reports_nvml_down_and_no_gpus():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine (the gpu tests cover it)")
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound and friends
        print(f"NVML unavailable, as expected here: {exc}")
    poller = GpuPoller(NvmlBackend(), reinit_interval=0.0, clock=lambda: NOW)
    poller.poll_once()
    poller.poll_once()  # and it tries again
    samples = _samples(_exposition(GpuCollector(poller, dict, clock=lambda: NOW)))
    assert samples[("vigil_nvml_up", ())] == 0.0
    assert not [name for (name, _) in samples if name.startswith("vigil_gpu_")]
    assert "NVML" in poller.snapshot().error


def test_a_backend_that_comes_up_later_is_picked_up():
    fleet, poller = _fleet_poller(
        {"gpus": [{"uuid": "GPU-late", "name": "late"}], "fail_init": True}, reinit_interval=0.0
    )
    poller.poll_once()
    assert not poller.snapshot().backend_up
    fleet.fail_init = False
    poller.poll_once()
    snapshot = poller.snapshot()
    assert snapshot.backend_up and snapshot.gpus[0].reading.uuid == "GPU-late"


def test_a_failing_collector_leaves_the_others_served():
    class Broken:
        def collect(self):
            raise RuntimeError("boom")
            yield  # pragma: no cover

    _, poller = _fleet_poller()
    poller.poll_once()
    text = _exposition(
        GuardedCollectors(
            [("broken", Broken()), ("gpu", GpuCollector(poller, dict, clock=lambda: NOW))]
        )
    )
    samples = _samples(text)
    assert samples[("vigil_exporter_collector_success", (("collector", "broken"),))] == 0.0
    assert samples[("vigil_exporter_collector_success", (("collector", "gpu"),))] == 1.0
    assert ("vigil_exporter_collector_duration_seconds", (("collector", "broken"),)) in samples
    assert any(name == "vigil_gpu_up" for (name, _) in samples)


def test_fake_fleet_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field"):
        FakeFleet({"gpus": [{"uuid": "x", "temprature_celsius": 3}]})
