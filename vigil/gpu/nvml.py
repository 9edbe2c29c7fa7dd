"""The NVML backend (``nvidia-ml-py``, imported as ``pynvml``).

Every field is read on its own: a field the GPU or driver does not support (NOT_SUPPORTED,
NO_PERMISSION, a function missing from an old driver) is left ``None``. A GPU that is lost
(GPU_IS_LOST, UNKNOWN on its handle) raises ``GpuLost``; its handle is fetched again on the next
read, so a GPU that comes back is seen again. MIG: the parent GPU is read; fields MIG makes
unsupported (utilization) are absent.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from . import units
from .backend import BackendUnavailable, GpuLost, GpuProcess, GpuReading, SystemInfo, XidEvent

# Errors that mean this GPU is gone or unusable (its series go, its up goes to 0) ...
_LOST_ERRORS = ("NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_GPU_NOT_FOUND", "NVML_ERROR_RESET_REQUIRED")
# ... and errors of the whole library (the backend is re-initialised).
_LIBRARY_ERRORS = (
    "NVML_ERROR_UNINITIALIZED",
    "NVML_ERROR_DRIVER_NOT_LOADED",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
    "NVML_ERROR_LIBRARY_NOT_FOUND",
)
# How long close() waits for an XID wait in progress (waits last a second; a wedged one longer).
_CLOSE_WAIT_S = 5.0


class NvmlBackend:
    def __init__(self) -> None:
        self._nvml: Any = None  # pynvml while initialised, else None
        self._bindings: Any = None  # pynvml once imported: recognises errors of calls in flight
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._wait_lock = threading.Lock()  # held by an XID wait: close() frees its event set
        self._events: Any = None  # the XID event set, created on first wait
        self._event_handles: dict[int, int] = {}  # handle address -> index

    # ---- lifecycle ----------------------------------------------------------------------------
    def init(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise BackendUnavailable(f"nvidia-ml-py is not installed ({exc})") from None
        with self._lock:
            if self._nvml is not None:  # a re-initialisation: start from a clean library
                self._free_events()
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()
                self._nvml = None
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                raise BackendUnavailable(f"NVML failed to initialise: {exc}") from None
            self._nvml = self._bindings = pynvml
            self._handles = {}

    def close(self) -> None:
        """Shut NVML down (init() starts it again). Not during an XID wait, whose event set it
        frees; a wait that stays wedged leaves NVML as it is."""
        if not self._wait_lock.acquire(timeout=_CLOSE_WAIT_S):
            return
        try:
            with self._lock:
                if self._nvml is None:
                    return
                self._free_events()
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlShutdown()
                self._nvml, self._handles = None, {}
        finally:
            self._wait_lock.release()

    def _code_in(self, exc: Exception, names: tuple[str, ...]) -> bool:
        nvml = self._bindings
        codes = {getattr(nvml, name, None) for name in names} - {None}
        return getattr(exc, "value", None) in codes

    def _free_events(self) -> None:
        if self._events is not None:
            with contextlib.suppress(Exception):  # freeing is best effort
                self._nvml.nvmlEventSetFree(self._events)
            self._events, self._event_handles = None, {}

    def system_info(self) -> SystemInfo:
        nvml = self._require()
        return SystemInfo(
            driver_version=self._optional(lambda: units.text(nvml.nvmlSystemGetDriverVersion()))
            or "",
            cuda_version=self._optional(
                lambda: units.cuda_version_string(nvml.nvmlSystemGetCudaDriverVersion_v2())
            )
            or "",
            nvml_version=self._optional(lambda: units.text(nvml.nvmlSystemGetNVMLVersion())) or "",
        )

    def device_count(self) -> int:
        nvml = self._require()
        try:
            return int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            raise BackendUnavailable(f"nvmlDeviceGetCount failed: {exc}") from None

    def _require(self) -> Any:
        if self._nvml is None:
            raise BackendUnavailable("NVML is not initialised")
        return self._nvml

    def _handle(self, index: int) -> Any:
        nvml = self._require()
        handle = self._handles.get(index)
        if handle is None:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:
                raise GpuLost(f"GPU {index}: no handle ({exc})") from None
            self._handles[index] = handle
        return handle

    def _optional(self, call: Callable[[], Any]) -> Any:
        """The value, or None where unsupported; a lost GPU propagates as GpuLost."""
        nvml = self._bindings
        try:
            return call()
        except nvml.NVMLError as exc:
            if self._code_in(exc, _LOST_ERRORS):
                raise GpuLost(str(exc)) from None
            if self._code_in(exc, _LIBRARY_ERRORS):
                raise BackendUnavailable(str(exc)) from None
            return None  # NOT_SUPPORTED, NO_PERMISSION, UNKNOWN on one field: leave it out
        except Exception:  # noqa: BLE001 - a function the bindings or the driver lack
            # (AttributeError, NotImplementedError, pynvml's NVMLLibraryMismatchError)
            return None

    # ---- one GPU --------------------------------------------------------------------------------
    def read(self, index: int) -> GpuReading:
        nvml = self._require()
        handle = self._handle(index)
        try:
            return self._read(nvml, handle, index)
        except GpuLost:
            self._handles.pop(index, None)
            raise

    def _read(self, nvml: Any, handle: Any, index: int) -> GpuReading:
        opt = self._optional
        uuid = opt(lambda: units.text(nvml.nvmlDeviceGetUUID(handle)))
        if uuid is None:
            raise GpuLost(f"GPU {index}: no UUID")
        name = opt(lambda: units.text(nvml.nvmlDeviceGetName(handle))) or ""
        fields: dict[str, Any] = {}
        rates = opt(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        if rates is not None:
            fields["utilization_gpu"] = units.percent_to_ratio(rates.gpu)
            fields["utilization_memory"] = units.percent_to_ratio(rates.memory)
        memory = opt(lambda: nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2))
        if memory is not None:
            fields["memory_reserved_bytes"] = int(memory.reserved)
        else:  # drivers before v2: total, free and used only
            memory = opt(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if memory is not None:
            fields.update(
                memory_total_bytes=int(memory.total),
                memory_used_bytes=int(memory.used),
                memory_free_bytes=int(memory.free),
            )
        temp = opt(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        fields["temperature_celsius"] = float(temp) if temp is not None else None
        power = opt(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        fields["power_watts"] = units.milliwatts_to_watts(power) if power is not None else None
        limit = opt(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        fields["power_limit_watts"] = (
            units.milliwatts_to_watts(limit) if limit is not None else None
        )
        energy = opt(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        fields["energy_joules"] = (
            units.millijoules_to_joules(energy) if energy is not None else None
        )
        for key, clock in (
            ("sm_clock_hertz", nvml.NVML_CLOCK_SM),
            ("memory_clock_hertz", nvml.NVML_CLOCK_MEM),
        ):
            mhz = opt(lambda clock=clock: nvml.nvmlDeviceGetClockInfo(handle, clock))
            fields[key] = units.megahertz_to_hertz(mhz) if mhz is not None else None
        reasons = opt(lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
        if reasons is None:
            reasons = opt(lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        fields["clock_event_reasons"] = int(reasons) if reasons is not None else None
        ecc_on = opt(lambda: nvml.nvmlDeviceGetCurrentEccMode(handle))
        if ecc_on:
            for key, kind in (
                ("ecc_corrected", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                ("ecc_uncorrected", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            ):
                fields[key] = opt(
                    lambda kind=kind: int(
                        nvml.nvmlDeviceGetTotalEccErrors(handle, kind, nvml.NVML_VOLATILE_ECC)
                    )
                )
        fields["pcie_replays"] = opt(lambda: int(nvml.nvmlDeviceGetPcieReplayCounter(handle)))
        remapped = opt(lambda: nvml.nvmlDeviceGetRemappedRows(handle))
        if remapped is not None:
            corr, unc, pending, failure = remapped
            fields.update(
                remapped_rows_correctable=int(corr),
                remapped_rows_uncorrectable=int(unc),
                remapped_rows_pending=bool(pending),
                remapped_rows_failure=bool(failure),
            )
        mig = opt(lambda: nvml.nvmlDeviceGetMigMode(handle))
        fields["mig_enabled"] = bool(mig[0]) if mig is not None else None
        procs = opt(lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        if procs is not None:
            fields["processes"] = tuple(
                GpuProcess(int(p.pid), _used_memory(p.usedGpuMemory)) for p in procs
            )
        return GpuReading(index=index, uuid=uuid, name=name, **fields)

    # ---- XID events --------------------------------------------------------------------------
    def wait_xid(self, timeout_s: float) -> list[XidEvent]:
        with self._wait_lock:
            nvml = self._require()
            if self._events is None:
                self._register_events(nvml)
            try:
                data = nvml.nvmlEventSetWait_v2(self._events, int(timeout_s * 1000))
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) == nvml.NVML_ERROR_TIMEOUT:
                    return []
                self._free_events()  # build the set again next time (after a re-init, say)
                raise BackendUnavailable(f"waiting for XID events failed: {exc}") from None
        if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
            return []
        index = self._event_handles.get(_address(data.device))
        if index is None:
            index = self._optional(lambda: int(nvml.nvmlDeviceGetIndex(data.device)))
        return [XidEvent(index=index if index is not None else -1, xid=int(data.eventData))]

    def _register_events(self, nvml: Any) -> None:
        try:
            events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            raise BackendUnavailable(f"no NVML event set: {exc}") from None
        registered = {}
        try:
            count = self.device_count()
        except BackendUnavailable:
            nvml.nvmlEventSetFree(events)
            raise
        for index in range(count):
            try:
                handle = self._handle(index)
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
                registered[_address(handle)] = index
            except (GpuLost, nvml.NVMLError):
                continue  # unsupported on this GPU (some MIG and older boards): skip it
        if not registered:
            nvml.nvmlEventSetFree(events)
            raise BackendUnavailable("no GPU supports XID events")
        self._events, self._event_handles = events, registered


def _used_memory(value: Any) -> int | None:
    # NVML reports NVML_VALUE_NOT_AVAILABLE (all ones) where it cannot tell, e.g. under MIG.
    if value is None or int(value) >= (1 << 64) - 1:
        return None
    return int(value)


def _address(handle: Any) -> int:
    import ctypes

    return ctypes.cast(handle, ctypes.c_void_p).value or 0
