"""The facts the GPU checks judge: what the driver reports through the hardware seam the exporter
uses too (``vigil.gpu``: NVML, or a fake fleet in tests and demos), and what torch reports. Each
side is read once, under a deadline; a kernel is run on each GPU on demand. The verdicts on these
facts are pure functions, in ``gpu.py``.
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

from vigil.gpu.backend import BackendUnavailable, GpuBackend
from vigil.gpu.nvml import NvmlBackend

from .report import first_line


@dataclass(frozen=True)
class NvmlGpu:
    index: int
    name: str
    uuid: str
    memory_free: int | None  # the memory check reports the other GPUs' room from it


@dataclass(frozen=True)
class DriverFacts:
    """What NVML says: ``error`` is set when there is no usable driver."""

    error: str | None = None
    driver_version: str | None = None
    cuda_version: tuple[int, int] | None = None  # the newest CUDA the driver supports
    gpus: tuple[NvmlGpu, ...] = ()

    @property
    def available(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class TorchGpu:
    index: int
    name: str
    capability: tuple[int, int]
    uuid: str | None


@dataclass(frozen=True)
class TorchFacts:
    version: str
    cuda_build: str | None  # torch.version.cuda; None for a CPU build
    available: bool
    init_warning: str | None  # what torch said when CUDA would not initialise
    arch_list: tuple[str, ...] = ()
    gpus: tuple[TorchGpu, ...] = ()


def parse_cuda_version(text: str | None) -> tuple[int, int] | None:
    """'12.4' (NVML's and torch's spelling) as (12, 4); None when there is none."""
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match[1]), int(match[2])) if match else None


def read_driver(backend: GpuBackend) -> DriverFacts:
    """The driver's facts through ``backend``, which is closed afterwards (NVML shut down)."""
    try:
        backend.init()
    except BackendUnavailable as exc:
        return DriverFacts(error=str(exc))
    try:
        info = backend.system_info()
        gpus = tuple(_read_gpu(backend, index) for index in range(backend.device_count()))
    except BackendUnavailable as exc:
        return DriverFacts(error=str(exc))
    finally:
        backend.close()
    return DriverFacts(
        None, info.driver_version or None, parse_cuda_version(info.cuda_version), gpus
    )


def _read_gpu(backend: GpuBackend, index: int) -> NvmlGpu:
    # One GPU this process may not open (NO_PERMISSION under a Slurm device limit, say) or that
    # fell off the bus must not hide the others: each is read on its own.
    try:
        reading = backend.read(index)
    except Exception as exc:  # noqa: BLE001 - GpuLost or any NVML error: this GPU is unreadable
        return NvmlGpu(index, f"(unreadable: {first_line(exc)})", "", None)
    return NvmlGpu(index, reading.name, reading.uuid, reading.memory_free_bytes)


def read_torch() -> TorchFacts:
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    said = [str(w.message) for w in caught if "CUDA" in str(w.message)]
    gpus: list[TorchGpu] = []
    arch_list: tuple[str, ...] = ()
    if available:
        arch_list = tuple(torch.cuda.get_arch_list())
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            uuid = getattr(props, "uuid", None)
            gpus.append(
                TorchGpu(
                    index,
                    props.name,
                    (props.major, props.minor),
                    f"GPU-{uuid}" if uuid is not None else None,
                )
            )
    return TorchFacts(
        torch.__version__,
        torch.version.cuda,
        available,
        " ".join(said) or None,
        arch_list,
        tuple(gpus),
    )


def run_kernels(indices: list[int], timeout: float) -> dict[int, float | str]:
    """A 512x512 matmul on each GPU at once, compared with the CPU: its seconds, or what went
    wrong; a GPU missing from the answer did not finish within ``timeout`` (its thread is left
    behind, as nothing can interrupt a call into the driver)."""
    results: dict[int, float | str] = {}
    threads = [
        threading.Thread(
            target=_run_kernel, args=(i, results), daemon=True, name=f"doctor-kernel-{i}"
        )
        for i in indices
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, timeout - (time.monotonic() - started)))
    return dict(results)


def _run_kernel(index: int, results: dict[int, float | str]) -> None:
    import torch

    try:
        generator = torch.Generator().manual_seed(index)
        a = torch.randn(512, 512, generator=generator, dtype=torch.float64)
        b = torch.randn(512, 512, generator=generator, dtype=torch.float64)
        started = time.perf_counter()
        with torch.cuda.device(index):
            on_gpu = (a.float().cuda(index) @ b.float().cuda(index)).double().cpu()
            torch.cuda.synchronize(index)
        elapsed = time.perf_counter() - started
        expected = a @ b
        # Relative to the whole result: TF32 (NVIDIA_TF32_OVERRIDE, allow_tf32) stays near 1e-3,
        # a GPU that computes wrongly is far above.
        error = float((on_gpu - expected).norm() / expected.norm())
        results[index] = elapsed if error < 1e-2 else f"wrong result (relative error {error:.3g})"
    except Exception as exc:  # noqa: BLE001 - the error is the verdict
        results[index] = f"{type(exc).__name__}: {first_line(exc)}"


def free_device_memory(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.mem_get_info(index)


def cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _within(read, deadline: float, what: str):
    """``read()`` in a daemon thread; TimeoutError when a wedged driver keeps it past the
    deadline (the thread is left behind: nothing can interrupt a call into the driver)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = read()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name=f"doctor-{what}")
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not answer within {deadline:g} s (a wedged driver or GPU?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class GpuFacts:
    """Both sides, read on first use, each within ``deadline`` seconds. The driver's side comes
    from ``backend``: NVML unless another is given (a fake fleet, for tests and demos). Without
    torch (a light install) ``torch`` raises ModuleNotFoundError."""

    deadline: float = 60.0
    backend: GpuBackend | None = None
    _driver: DriverFacts | None = None
    _torch: TorchFacts | None = None

    @property
    def driver(self) -> DriverFacts:
        if self._driver is None:
            backend = self.backend if self.backend is not None else NvmlBackend()
            try:
                self._driver = _within(lambda: read_driver(backend), self.deadline, "NVML")
            except TimeoutError as exc:
                self._driver = DriverFacts(error=str(exc))
        return self._driver

    @property
    def torch(self) -> TorchFacts:
        if self._torch is None:
            try:
                self._torch = _within(read_torch, self.deadline, "torch.cuda")
            except TimeoutError as exc:
                import torch

                self._torch = TorchFacts(torch.__version__, torch.version.cuda, False, str(exc))
        return self._torch
