"""The hardware seam: what a GPU backend answers, in base units, and how it fails.

Collectors never call NVML: they read ``GpuReading``s that a backend produced. A field the GPU
does not support is ``None`` (the metric is then absent, never zero). A lost GPU raises
``GpuLost`` from ``read``; a backend that cannot start raises ``BackendUnavailable``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class BackendUnavailable(Exception):
    """The backend cannot be used now (no driver, no library, init failed); retry later."""


class GpuLost(Exception):
    """The GPU fell off the bus or stopped answering."""


@dataclass(frozen=True)
class GpuProcess:
    pid: int  # as the backend reports it: the host's pid
    used_memory_bytes: int | None


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    utilization_gpu: float | None = None  # ratios 0..1
    utilization_memory: float | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    sm_clock_hertz: float | None = None
    memory_clock_hertz: float | None = None
    clock_event_reasons: int | None = None  # NVML's bitmask
    ecc_corrected: int | None = None
    ecc_uncorrected: int | None = None
    pcie_replays: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    mig_enabled: bool | None = None
    processes: tuple[GpuProcess, ...] | None = None


@dataclass(frozen=True)
class SystemInfo:
    driver_version: str = ""
    cuda_version: str = ""
    nvml_version: str = ""


@dataclass(frozen=True)
class XidEvent:
    index: int
    xid: int


class GpuBackend(Protocol):
    """What the poller and the XID watcher need from a source of GPU readings."""

    def init(self) -> None:
        """Start (or restart) the backend; raises BackendUnavailable."""

    def system_info(self) -> SystemInfo: ...

    def device_count(self) -> int:
        """GPUs present; raises BackendUnavailable when the backend stopped answering."""

    def read(self, index: int) -> GpuReading:
        """All fields of one GPU; raises GpuLost."""

    def wait_xid(self, timeout_s: float) -> list[XidEvent]:
        """XID events that arrive within timeout_s (blocks at most that long); raises
        BackendUnavailable when events are unsupported."""

    def close(self) -> None:
        """Release what init() took (NVML is shut down) and end blocked waits and wedged reads
        (the fake fleet's); the poller calls it when it stops, the doctor once it has read."""
