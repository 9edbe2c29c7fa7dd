"""GPU metrics from the poller's latest snapshot (never from NVML on the scrape path)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from vigil.gpu.backend import GpuReading
from vigil.gpu.units import reasons_from_mask

from ..catalog import CLOCK_EVENT_REASONS, family
from ..gpu.poller import GpuPoller

# Reading field -> metric, for the plain one-value-per-GPU gauges and counters.
_SIMPLE = (
    ("utilization_gpu", "vigil_gpu_utilization_ratio"),
    ("utilization_memory", "vigil_gpu_memory_utilization_ratio"),
    ("memory_total_bytes", "vigil_gpu_memory_total_bytes"),
    ("memory_used_bytes", "vigil_gpu_memory_used_bytes"),
    ("memory_free_bytes", "vigil_gpu_memory_free_bytes"),
    ("memory_reserved_bytes", "vigil_gpu_memory_reserved_bytes"),
    ("temperature_celsius", "vigil_gpu_temperature_celsius"),
    ("power_watts", "vigil_gpu_power_watts"),
    ("power_limit_watts", "vigil_gpu_power_limit_watts"),
    ("energy_joules", "vigil_gpu_energy_joules"),
    ("pcie_replays", "vigil_gpu_pcie_replays"),
    ("remapped_rows_pending", "vigil_gpu_remapped_rows_pending"),
    ("remapped_rows_failure", "vigil_gpu_remapped_rows_failure"),
    ("mig_enabled", "vigil_gpu_mig_enabled"),
)


class GpuCollector:
    def __init__(
        self,
        poller: GpuPoller,
        pid_models: Callable[[], dict[int, str]],
        clock: Callable[[], float] = time.time,
    ):
        self.poller = poller
        self.pid_models = pid_models  # host pid -> model, for the inference processes
        self.clock = clock

    def collect(self) -> Iterator:
        snap = self.poller.snapshot()
        nvml_up = family("vigil_nvml_up")
        nvml_up.add_metric([], 1.0 if snap.backend_up else 0.0)
        yield nvml_up
        if snap.system is not None:
            info = family("vigil_gpu_driver_info")
            info.add_metric(
                [],
                {
                    "driver_version": snap.system.driver_version,
                    "cuda_version": snap.system.cuda_version,
                    "nvml_version": snap.system.nvml_version,
                },
            )
            yield info
        now = self.clock()
        fams = {name: family(name) for _, name in _SIMPLE}
        for name in (
            "vigil_gpu_up",
            "vigil_gpu_last_read_timestamp_seconds",
            "vigil_gpu_clock_hertz",
            "vigil_gpu_clock_event_reason",
            "vigil_gpu_ecc_errors",
            "vigil_gpu_remapped_rows",
            "vigil_gpu_xid_errors",
            "vigil_gpu_process_memory_used_bytes",
        ):
            fams[name] = family(name)
        pid_models = self.pid_models() if snap.gpus else {}
        for state in snap.gpus:
            uuid, name = state.identity
            labels = [str(state.index), uuid, name]
            fresh = (
                state.reading is not None
                and not state.lost
                and now - state.last_ok <= self.poller.max_age
            )
            fams["vigil_gpu_up"].add_metric(labels, 1.0 if fresh else 0.0)
            if state.last_ok:
                fams["vigil_gpu_last_read_timestamp_seconds"].add_metric(labels, state.last_ok)
            if fresh:
                self._reading(fams, labels, state.reading, pid_models)
        identities = {state.index: state.identity for state in snap.gpus}
        for (index, xid), count in sorted(snap.xid_counts.items()):
            uuid, name = identities.get(index, ("", ""))  # the poller names it on its next read
            fams["vigil_gpu_xid_errors"].add_metric([str(index), uuid, name, str(xid)], count)
        yield from fams.values()

    @staticmethod
    def _reading(fams: dict, labels: list[str], r: GpuReading, pid_models: dict[int, str]) -> None:
        for field_name, metric in _SIMPLE:
            value = getattr(r, field_name)
            if value is not None:
                fams[metric].add_metric(labels, float(value))
        for clock, value in (("sm", r.sm_clock_hertz), ("memory", r.memory_clock_hertz)):
            if value is not None:
                fams["vigil_gpu_clock_hertz"].add_metric(labels + [clock], value)
        if r.clock_event_reasons is not None:
            for reason, active in reasons_from_mask(
                r.clock_event_reasons, CLOCK_EVENT_REASONS
            ).items():
                fams["vigil_gpu_clock_event_reason"].add_metric(labels + [reason], active)
        for kind, value in (("corrected", r.ecc_corrected), ("uncorrected", r.ecc_uncorrected)):
            if value is not None:
                fams["vigil_gpu_ecc_errors"].add_metric(labels + [kind], value)
        for cause, value in (
            ("correctable", r.remapped_rows_correctable),
            ("uncorrectable", r.remapped_rows_uncorrectable),
        ):
            if value is not None:
                fams["vigil_gpu_remapped_rows"].add_metric(labels + [cause], value)
        for process in r.processes or ():
            if process.used_memory_bytes is not None:
                fams["vigil_gpu_process_memory_used_bytes"].add_metric(
                    labels + [str(process.pid), pid_models.get(process.pid, "")],
                    process.used_memory_bytes,
                )
