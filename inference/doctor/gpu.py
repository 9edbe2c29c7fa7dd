"""GPU checks: the driver (through NVML) against the PyTorch build, which GPUs each of them sees,
each GPU's architecture against the architectures torch was compiled for, and a real kernel.

The facts are gathered once (``DriverFacts``, ``TorchFacts``); the verdicts are pure functions of
them, so that the rules are tested on any machine and the facts on a GPU machine.
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

from .report import Verdict, failed, ok, skipped, warning

# Wheel indexes PyTorch publishes CUDA builds under (download.pytorch.org/whl/<tag>), oldest
# first; the fix names the newest one the driver supports.
TORCH_CUDA_TAGS = ((11, 8), (12, 1), (12, 4), (12, 6), (12, 8), (12, 9), (13, 0))


@dataclass(frozen=True)
class NvmlGpu:
    index: int
    name: str
    uuid: str
    capability: tuple[int, int] | None
    memory_total: int | None
    memory_free: int | None


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
    memory_total: int


@dataclass(frozen=True)
class TorchFacts:
    version: str
    cuda_build: str | None  # torch.version.cuda; None for a CPU build
    available: bool
    init_warning: str | None  # what torch said when CUDA would not initialise
    arch_list: tuple[str, ...] = ()
    gpus: tuple[TorchGpu, ...] = ()


def read_driver() -> DriverFacts:
    try:
        import pynvml
    except ImportError as exc:
        return DriverFacts(error=f"nvidia-ml-py is not installed ({exc})")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return DriverFacts(error=f"NVML: {exc}")
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(NvmlGpu(index, _text(pynvml.nvmlDeviceGetName(handle)),
                                _text(pynvml.nvmlDeviceGetUUID(handle)),
                                _optional(lambda h=handle: tuple(
                                    pynvml.nvmlDeviceGetCudaComputeCapability(h))),
                                *_memory(pynvml, handle)))
        return DriverFacts(None, _text(version), (cuda // 1000, cuda % 1000 // 10), tuple(gpus))
    except pynvml.NVMLError as exc:
        return DriverFacts(error=f"NVML: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(read):
    try:
        return read()
    except Exception:  # noqa: BLE001 - an unsupported field is only missing
        return None


def _memory(pynvml, handle) -> tuple[int | None, int | None]:
    info = _optional(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
    return (info.total, info.free) if info is not None else (None, None)


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
            gpus.append(TorchGpu(index, props.name, (props.major, props.minor),
                                 f"GPU-{uuid}" if uuid is not None else None,
                                 props.total_memory))
    return TorchFacts(torch.__version__, torch.version.cuda, available,
                      " ".join(said) or None, arch_list, tuple(gpus))


# ---- rules ------------------------------------------------------------------------------------

def parse_cuda_version(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match[1]), int(match[2])) if match else None


def torch_wheel_for(driver_cuda: tuple[int, int]) -> str | None:
    """The newest PyTorch CUDA wheel index a driver supporting ``driver_cuda`` can run."""
    fitting = [tag for tag in TORCH_CUDA_TAGS if tag <= driver_cuda]
    if not fitting:
        return None
    major, minor = fitting[-1]
    return f"https://download.pytorch.org/whl/cu{major}{minor}"


def cuda_build_verdict(device: str, driver: DriverFacts, torch_facts: TorchFacts) -> Verdict:
    name = "cuda-driver"
    if device == "cpu":
        return skipped(name, "--device cpu: CUDA is not used")
    build = parse_cuda_version(torch_facts.cuda_build)
    if not driver.available:
        if device == "auto" and build is None:
            return skipped(name, f"no NVIDIA driver ({driver.error}) and a CPU build of torch "
                           f"{torch_facts.version}: the server runs on the CPU")
        return failed(name, f"--device {device} but no usable NVIDIA driver ({driver.error})",
                      "install or load the NVIDIA driver (nvidia-smi must work), or run with "
                      "--device cpu", torch_cuda=torch_facts.cuda_build)
    values = dict(driver_version=driver.driver_version, driver_cuda=_dotted(driver.cuda_version),
                  torch=torch_facts.version, torch_cuda=torch_facts.cuda_build,
                  gpus=len(driver.gpus))
    if build is None:
        return failed(name, f"torch {torch_facts.version} is a CPU build, but the driver "
                      f"{driver.driver_version} runs {len(driver.gpus)} GPU(s): the server "
                      "would not use them",
                      _install_hint(driver.cuda_version) + " (or pass --device cpu to serve "
                      "on the CPU on purpose)", **values)
    summary = (f"torch {torch_facts.version} built for CUDA {torch_facts.cuda_build}; driver "
               f"{driver.driver_version} supports CUDA up to {_dotted(driver.cuda_version)}")
    if driver.cuda_version is None:
        return warning(name, summary, "the driver did not report its CUDA version; "
                       "check nvidia-smi", **values)
    if build[0] > driver.cuda_version[0]:
        return failed(name, summary + ": the driver is too old for this build",
                      _install_hint(driver.cuda_version) + ", or upgrade the NVIDIA driver to one "
                      f"that supports CUDA {torch_facts.cuda_build}", **values)
    if build > driver.cuda_version:
        return warning(name, summary + ": runs through CUDA minor-version compatibility, but "
                       "kernels compiled just in time (PTX) and some newer features fail",
                       _install_hint(driver.cuda_version) + ", or upgrade the NVIDIA driver",
                       **values)
    if torch_facts.init_warning and not torch_facts.available:
        return failed(name, summary + f", but CUDA would not initialise: "
                      f"{torch_facts.init_warning}", "read torch's message above; "
                      "nvidia-smi must list the GPUs", **values)
    return ok(name, summary, **values)


def _install_hint(driver_cuda: tuple[int, int] | None) -> str:
    index = torch_wheel_for(driver_cuda) if driver_cuda else None
    if index is None:
        return "install a torch build that the driver supports"
    return f"install a torch build the driver supports: pip install torch --index-url {index}"


def _dotted(version: tuple[int, int] | None) -> str | None:
    return f"{version[0]}.{version[1]}" if version else None


def visible_devices(variable: str | None, gpus: tuple[NvmlGpu, ...]) -> list[NvmlGpu] | None:
    """The GPUs CUDA exposes under CUDA_VISIBLE_DEVICES, as CUDA reads it: indices or UUID
    prefixes, up to the first entry that names no GPU; None when the variable is unset."""
    if variable is None:
        return None
    chosen: list[NvmlGpu] = []
    for entry in (e.strip() for e in variable.split(",")):
        if entry.isdigit():
            match = next((g for g in gpus if g.index == int(entry)), None)
        elif entry.startswith(("GPU-", "MIG-")):
            match = next((g for g in gpus if g.uuid.startswith(entry)), None)
        else:
            match = None
        if match is None or match in chosen:
            break
        chosen.append(match)
    return chosen


def visibility_verdict(device: str, driver: DriverFacts, torch_facts: TorchFacts,
                       cuda_visible: str | None) -> Verdict:
    name = "gpu-visibility"
    if device == "cpu":
        return skipped(name, "--device cpu: no GPU is used")
    if not driver.available and not torch_facts.available:
        return skipped(name, "no NVIDIA driver and no CUDA in torch: nothing to compare")
    expected = visible_devices(cuda_visible, driver.gpus)
    nvml_names = ", ".join(f"{g.index}: {g.name}" for g in driver.gpus) or "none"
    values = dict(nvml=len(driver.gpus), torch=len(torch_facts.gpus),
                  cuda_visible_devices=cuda_visible,
                  expected=None if expected is None else len(expected))
    summary = (f"NVML sees {len(driver.gpus)} GPU(s) ({nvml_names}); torch sees "
               f"{len(torch_facts.gpus)}; CUDA_VISIBLE_DEVICES="
               f"{'(unset)' if cuda_visible is None else repr(cuda_visible)}")
    wanted = len(driver.gpus) if expected is None else len(expected)
    if expected is not None and cuda_visible and cuda_visible.strip() not in ("", "-1") \
            and len(expected) < len([e for e in cuda_visible.split(",") if e.strip()]):
        return failed(name, summary + f": only the first {len(expected)} entr"
                      f"{'y' if len(expected) == 1 else 'ies'} name a GPU (CUDA ignores every "
                      "entry after one that names no GPU)",
                      "list GPU indices or UUIDs that nvidia-smi -L shows", **values)
    if len(torch_facts.gpus) != wanted:
        hint = ("set CUDA_VISIBLE_DEVICES to the GPUs meant for this server"
                if wanted == 0 else torch_facts.init_warning
                or "a torch build that cannot use these GPUs, or a container without them")
        return failed(name, summary + f": torch should see {wanted}", hint, **values)
    if device.startswith("cuda:") and int(device[5:]) >= len(torch_facts.gpus):
        return failed(name, summary + f": --device {device} is not among them",
                      f"use cuda:0 to cuda:{len(torch_facts.gpus) - 1}, or change "
                      "CUDA_VISIBLE_DEVICES", **values)
    if not torch_facts.gpus:
        if device == "auto":
            return warning(name, summary + ": the server will run on the CPU",
                           "unset CUDA_VISIBLE_DEVICES, or pass --device cpu to say so", **values)
        return failed(name, summary + f": --device {device} needs one",
                      "unset or fix CUDA_VISIBLE_DEVICES", **values)
    return ok(name, summary, **values)


def _arch(text: str) -> tuple[str, int, int, str] | None:
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", text)
    return (match[1], int(match[2]), int(match[3]), match[4]) if match else None


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether torch's compiled code runs on a GPU of this compute capability: machine code for
    the same major version and a lower or equal minor one, arch-specific code ('a') for exactly
    this one, family code ('f') for the same major, or PTX for an older one (compiled at load)."""
    major, minor = capability
    for entry in arch_list:
        parsed = _arch(entry)
        if parsed is None:
            continue
        kind, a_major, a_minor, suffix = parsed
        if kind == "compute" and (a_major, a_minor) <= capability:
            return True
        if kind == "sm" and a_major == major and (
                (suffix == "" and a_minor <= minor) or (suffix == "a" and a_minor == minor)
                or (suffix == "f" and a_minor <= minor)):
            return True
    return False


def capability_verdict(device: str, torch_facts: TorchFacts) -> Verdict:
    name = "compute-capability"
    if device == "cpu" or not torch_facts.gpus:
        return skipped(name, "no GPU in use")
    built = " ".join(torch_facts.arch_list) or "(none)"
    unsupported = [g for g in torch_facts.gpus
                   if not arch_supported(g.capability, torch_facts.arch_list)]
    gpus = ", ".join(f"cuda:{g.index} {g.name} sm_{g.capability[0]}{g.capability[1]}"
                     for g in torch_facts.gpus)
    values = dict(arch_list=list(torch_facts.arch_list),
                  gpus={f"cuda:{g.index}": f"{g.capability[0]}.{g.capability[1]}"
                        for g in torch_facts.gpus})
    if unsupported:
        names = ", ".join(f"cuda:{g.index} (sm_{g.capability[0]}{g.capability[1]})"
                          for g in unsupported)
        return failed(name, f"torch {torch_facts.version} has no code for {names}; it was built "
                      f"for {built}",
                      "install a torch build that includes this architecture (a newer CUDA "
                      "build for new GPUs, an older one for old GPUs)", **values)
    return ok(name, f"{gpus}; torch built for {built}", **values)


def kernel_verdict(device: str, torch_facts: TorchFacts, timeout: float) -> Verdict:
    """Multiply two matrices on every GPU the server may use and compare with the CPU."""
    name = "gpu-kernel"
    if device == "cpu" or not torch_facts.gpus:
        return skipped(name, "no GPU in use")
    indices = ([int(device[5:])] if device.startswith("cuda:")
               else [g.index for g in torch_facts.gpus])
    results: dict[int, Any] = {}
    threads = {i: threading.Thread(target=_run_kernel, args=(i, results), daemon=True,
                                   name=f"doctor-kernel-{i}") for i in indices}
    started = time.monotonic()
    for thread in threads.values():
        thread.start()
    for thread in threads.values():
        thread.join(max(0.0, timeout - (time.monotonic() - started)))
    problems, timings = [], {}
    for index in indices:
        result = results.get(index)
        if result is None:
            problems.append(f"cuda:{index} did not finish within {timeout:g} s (a wedged GPU "
                            "or driver: look for XID errors in dmesg)")
        elif isinstance(result, str):
            problems.append(f"cuda:{index}: {result}")
        else:
            timings[f"cuda:{index}"] = round(result * 1000, 1)
    if problems:
        return failed(name, "; ".join(problems), "check nvidia-smi and the kernel log (dmesg) "
                      "for this GPU; a reset or reboot may be needed", milliseconds=timings)
    shown = ", ".join(f"{k} {v} ms" for k, v in timings.items())
    return ok(name, f"a 512x512 matmul matches the CPU on every GPU ({shown})",
              milliseconds=timings)


def _run_kernel(index: int, results: dict[int, Any]) -> None:
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
        error = float((on_gpu - expected).abs().max())
        if not torch.allclose(on_gpu, expected, rtol=1e-3, atol=1e-2):
            results[index] = f"wrong result (largest error {error:.3g})"
        else:
            results[index] = elapsed
    except Exception as exc:  # noqa: BLE001 - the error is the verdict
        results[index] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"


def free_device_memory(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.mem_get_info(index)


def cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@dataclass
class GpuFacts:
    """Both sides, read on first use."""

    _driver: DriverFacts | None = None
    _torch: TorchFacts | None = None

    @property
    def driver(self) -> DriverFacts:
        if self._driver is None:
            self._driver = read_driver()
        return self._driver

    @property
    def torch(self) -> TorchFacts:
        if self._torch is None:
            self._torch = read_torch()
        return self._torch
