"""A fake GPU fleet behind the backend interface, for machines without a GPU (tests, demos, the
benchmark). It is the only fake in the project, at the hardware seam.

A fleet is JSON: ``{"driver_version", "cuda_version", "nvml_version", "gpus": [GPU, ...]}``
where a GPU gives ``uuid``, ``name`` and any ``GpuReading`` field in base units, plus:

- ``"missing": [field, ...]``: fields the GPU does not support (read as None);
- ``"lost_after_reads": N``: reads after the N-th raise GpuLost (a GPU falling off the bus);
- ``"hang_after_reads": N``: reads after the N-th block until the backend is closed (a wedged
  driver call);
- ``"xids": [code, ...]``: XID events delivered once, on the first waits;
- ``"processes": [{"pid": P, "used_memory_bytes": B}, ...]``.

Counters move as on a real GPU: each read adds ``power_watts`` joules to ``energy_joules``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from .backend import BackendUnavailable, GpuLost, GpuProcess, GpuReading, SystemInfo, XidEvent

_READING_FIELDS = {f.name for f in fields(GpuReading)} - {"index", "uuid", "name", "processes"}
_CONTROL_KEYS = {
    "missing",
    "lost_after_reads",
    "hang_after_reads",
    "xids",
    "processes",
    "uuid",
    "name",
}


class FakeFleet:
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        gpus = spec.get("gpus", [])
        for position, gpu in enumerate(gpus):
            unknown = set(gpu) - _READING_FIELDS - _CONTROL_KEYS
            if unknown:
                raise ValueError(f"fake GPU {position}: unknown field(s) {sorted(unknown)}")
            missing = set(gpu.get("missing", ())) - _READING_FIELDS - {"processes"}
            if missing:
                raise ValueError(f"fake GPU {position}: unknown missing field(s) {sorted(missing)}")
        self._gpus = gpus
        self._reads = [0] * len(gpus)
        self._energy = [float(g.get("energy_joules", 0.0)) for g in gpus]
        self._xids = [
            XidEvent(i, int(code)) for i, g in enumerate(gpus) for code in g.get("xids", ())
        ]
        self._closed = threading.Event()
        self.fail_init = bool(spec.get("fail_init", False))

    @classmethod
    def from_file(cls, path: str | Path) -> FakeFleet:
        return cls(json.loads(Path(path).read_text()))

    def init(self) -> None:
        if self.fail_init:
            raise BackendUnavailable("fake fleet set to fail its initialisation")

    def close(self) -> None:
        self._closed.set()

    def system_info(self) -> SystemInfo:
        return SystemInfo(
            driver_version=str(self.spec.get("driver_version", "")),
            cuda_version=str(self.spec.get("cuda_version", "")),
            nvml_version=str(self.spec.get("nvml_version", "")),
        )

    def device_count(self) -> int:
        return len(self._gpus)

    def read(self, index: int) -> GpuReading:
        gpu = self._gpus[index]
        self._reads[index] += 1
        reads = self._reads[index]
        if "lost_after_reads" in gpu and reads > gpu["lost_after_reads"]:
            raise GpuLost(f"fake GPU {index} fell off the bus")
        if "hang_after_reads" in gpu and reads > gpu["hang_after_reads"]:
            self._closed.wait()
            raise GpuLost(f"fake GPU {index}: the backend was closed during a wedged read")
        missing = set(gpu.get("missing", ()))
        values = {k: v for k, v in gpu.items() if k in _READING_FIELDS and k not in missing}
        if "energy_joules" in values:
            self._energy[index] += float(gpu.get("power_watts", 0.0))
            values["energy_joules"] = self._energy[index]
        if "processes" not in missing:
            values["processes"] = tuple(
                GpuProcess(int(p["pid"]), p.get("used_memory_bytes"))
                for p in gpu.get("processes", ())
            )
        return GpuReading(
            index=index,
            uuid=gpu.get("uuid", f"GPU-fake-{index}"),
            name=gpu.get("name", "Fake GPU"),
            **values,
        )

    def wait_xid(self, timeout_s: float) -> list[XidEvent]:
        if self._xids:
            events, self._xids = self._xids, []
            return events
        self._closed.wait(timeout_s)
        return []
