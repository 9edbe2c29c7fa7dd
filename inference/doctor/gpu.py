"""GPU verdicts: the driver against the PyTorch build, which GPUs each of them sees, each GPU's
architecture against the architectures torch was compiled for, and a real kernel's result.

The seam: the facts come from ``vigil.gpu`` (the driver, through NVML or a fake fleet) and from
torch, gathered in ``gpu_facts``; the verdicts here are pure functions of them, so that the rules
are tested on any machine and the facts on a GPU machine (or on a fake fleet).
"""

from __future__ import annotations

import re

from .environment import SERVE_INSTALL
from .gpu_facts import DriverFacts, NvmlGpu, TorchFacts, parse_cuda_version
from .report import Verdict, failed, ok, skipped, warning

# Wheel indexes PyTorch publishes CUDA builds under (download.pytorch.org/whl/<tag>), oldest
# first; the fix names the newest one the driver supports.
TORCH_CUDA_TAGS = ((11, 8), (12, 1), (12, 4), (12, 6), (12, 8), (12, 9), (13, 0))


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
        if torch_facts.gpus:  # no NVML (a container without the utility libraries), CUDA works
            return warning(
                name,
                f"torch {torch_facts.version} (CUDA {torch_facts.cuda_build}) "
                f"sees {len(torch_facts.gpus)} GPU(s) but NVML is unavailable "
                f"({driver.error}): the driver's CUDA version cannot be compared",
                "give the process NVML (NVIDIA_DRIVER_CAPABILITIES=compute,utility "
                "in containers); the exporter needs it too",
                torch_cuda=torch_facts.cuda_build,
            )
        if device == "auto":
            build_text = (
                "a CPU build of torch"
                if build is None
                else f"torch built for CUDA {torch_facts.cuda_build}"
            )
            return skipped(
                name,
                f"no NVIDIA driver ({driver.error}) and {build_text} "
                f"{torch_facts.version}: the server runs on the CPU",
            )
        return failed(
            name,
            f"--device {device} but no usable NVIDIA driver ({driver.error})",
            "install or load the NVIDIA driver (nvidia-smi must work), or run with --device cpu",
            torch_cuda=torch_facts.cuda_build,
        )
    values = dict(
        driver_version=driver.driver_version,
        driver_cuda=_dotted(driver.cuda_version),
        torch=torch_facts.version,
        torch_cuda=torch_facts.cuda_build,
        gpus=len(driver.gpus),
    )
    if build is None:
        return failed(
            name,
            f"torch {torch_facts.version} is a CPU build, but the driver "
            f"{driver.driver_version} runs {len(driver.gpus)} GPU(s): the server "
            "would not use them",
            _install_hint(driver.cuda_version) + " (or pass --device cpu to serve "
            "on the CPU on purpose)",
            **values,
        )
    summary = (
        f"torch {torch_facts.version} built for CUDA {torch_facts.cuda_build}; driver "
        f"{driver.driver_version} supports CUDA up to {_dotted(driver.cuda_version)}"
    )
    if driver.cuda_version is None:
        return warning(
            name, summary, "the driver did not report its CUDA version; check nvidia-smi", **values
        )
    if build[0] > driver.cuda_version[0]:
        return failed(
            name,
            summary + ": the driver is too old for this build",
            _install_hint(driver.cuda_version) + ", or upgrade the NVIDIA driver to one "
            f"that supports CUDA {torch_facts.cuda_build}",
            **values,
        )
    if build > driver.cuda_version:
        return warning(
            name,
            summary + ": runs through CUDA minor-version compatibility, but "
            "kernels compiled just in time (PTX) and some newer features fail",
            _install_hint(driver.cuda_version) + ", or upgrade the NVIDIA driver",
            **values,
        )
    if torch_facts.init_warning and not torch_facts.available:
        return failed(
            name,
            summary + f", but CUDA would not initialise: {torch_facts.init_warning}",
            "read torch's message above; nvidia-smi must list the GPUs",
            **values,
        )
    return ok(name, summary, **values)


def driver_verdict_without_torch(device: str, driver: DriverFacts, missing: str) -> Verdict:
    """cuda-driver on a light install (no torch): what the driver offers, and which torch fits
    it; the build cannot be compared until the serve extra is installed."""
    name = "cuda-driver"
    if device == "cpu":
        return skipped(name, "--device cpu: CUDA is not used")
    if not driver.available:
        if device == "auto":
            return skipped(
                name,
                f"no NVIDIA driver ({driver.error}) and {missing} is not "
                f"installed ({SERVE_INSTALL} to serve, on the CPU here)",
            )
        return failed(
            name,
            f"--device {device} but no usable NVIDIA driver ({driver.error})",
            "install or load the NVIDIA driver (nvidia-smi must work), or run with --device cpu",
            missing=missing,
        )
    gpus = ", ".join(f"{g.index}: {g.name}" for g in driver.gpus) or "none"
    return skipped(
        name,
        f"driver {driver.driver_version} supports CUDA up to "
        f"{_dotted(driver.cuda_version)} with {len(driver.gpus)} GPU(s) ({gpus}), but "
        f"{missing} is not installed, so there is no CUDA build to compare: "
        f"{_install_hint(driver.cuda_version)}, then {SERVE_INSTALL}",
        driver_version=driver.driver_version,
        driver_cuda=_dotted(driver.cuda_version),
        gpus=len(driver.gpus),
        missing=missing,
    )


def _install_hint(driver_cuda: tuple[int, int] | None) -> str:
    index = torch_wheel_for(driver_cuda) if driver_cuda else None
    if index is None:
        return "install a torch build that the driver supports"
    return f"install a torch build the driver supports: pip install torch --index-url {index}"


def _dotted(version: tuple[int, int] | None) -> str | None:
    return f"{version[0]}.{version[1]}" if version else None


def _leading_int(text: str) -> int:
    """What strtoul reads at the start of ``text`` (CUDA reads "1gpu" as 1); -1 for nothing."""
    digits = len(text) - len(text.lstrip("+-0123456789"))
    try:
        return int(text[:digits]) if digits else -1
    except ValueError:
        return -1


def visible_devices(variable: str | None, gpus: tuple[NvmlGpu, ...]) -> list[NvmlGpu] | None:
    """The GPUs CUDA exposes under CUDA_VISIBLE_DEVICES, read as CUDA (and torch) read it:
    indices or GPU UUID prefixes up to the first entry that names none, and no GPU at all when
    one is named twice. None when unset, or when it names MIG instances (NVML lists the parent
    GPUs, not the instances, so they cannot be matched here)."""
    if variable is None or variable.strip().startswith("MIG-"):
        return None
    chosen: list[NvmlGpu] = []
    for entry in (e.strip() for e in variable.split(",")):
        if entry.startswith("GPU-"):
            matches = [g for g in gpus if g.uuid.startswith(entry)]
            match = matches[0] if len(matches) == 1 else None
        else:
            index = _leading_int(entry)
            match = next((g for g in gpus if g.index == index), None) if index >= 0 else None
        if match is None:
            break
        if match in chosen:
            return []
        chosen.append(match)
    return chosen


def _chosen_index(device: str) -> int | None:
    """The torch index the server would use; None for auto (the first, if any)."""
    if device.startswith("cuda:"):
        return int(device[5:])
    return 0 if device == "cuda" else None


def visibility_verdict(
    device: str, driver: DriverFacts, torch_facts: TorchFacts, cuda_visible: str | None
) -> Verdict:
    """Fails only when the GPU the server would use is not there; other disagreements (a GPU
    torch cannot open, an entry of CUDA_VISIBLE_DEVICES that names none) are warnings."""
    name = "gpu-visibility"
    if device == "cpu":
        return skipped(name, "--device cpu: no GPU is used")
    if not driver.available and not torch_facts.available:
        return skipped(name, "no NVIDIA driver and no CUDA in torch: nothing to compare")
    shown = "(unset)" if cuda_visible is None else repr(cuda_visible)
    torch_names = ", ".join(f"cuda:{g.index} {g.name}" for g in torch_facts.gpus) or "none"
    values = dict(
        nvml=len(driver.gpus) if driver.available else None,
        torch=len(torch_facts.gpus),
        cuda_visible_devices=cuda_visible,
    )
    if not driver.available:
        summary = (
            f"torch sees {len(torch_facts.gpus)} GPU(s) ({torch_names}); NVML is "
            f"unavailable ({driver.error}); CUDA_VISIBLE_DEVICES={shown}"
        )
        return _chosen_device_verdict(name, device, torch_facts, summary, None, values)
    expected = visible_devices(cuda_visible, driver.gpus)
    values["expected"] = None if expected is None else len(expected)
    nvml_names = ", ".join(f"{g.index}: {g.name}" for g in driver.gpus) or "none"
    summary = (
        f"NVML sees {len(driver.gpus)} GPU(s) ({nvml_names}); torch sees "
        f"{len(torch_facts.gpus)}; CUDA_VISIBLE_DEVICES={shown}"
    )
    problem = None
    if expected is not None and cuda_visible and cuda_visible.strip() not in ("", "-1"):
        entries = [e for e in cuda_visible.split(",") if e.strip()]
        if expected == [] and len(entries) > 1:
            problem = "it names a GPU twice, which hides every GPU from CUDA"
        elif len(expected) < len(entries):
            problem = (
                f"only the first {len(expected)} entr"
                f"{'y names' if len(expected) == 1 else 'ies name'} a GPU (CUDA ignores "
                "every entry after one that names no GPU)"
            )
    wanted = len(driver.gpus) if expected is None else len(expected)
    if problem is None and expected is not None and len(torch_facts.gpus) != wanted:
        problem = f"torch sees {len(torch_facts.gpus)} where {wanted} are named"
    elif (
        problem is None
        and expected is None
        and cuda_visible is None
        and len(torch_facts.gpus) < wanted
    ):
        why = torch_facts.init_warning or (
            "it is a CPU build (see cuda-driver)"
            if torch_facts.cuda_build is None
            else "a GPU it cannot open (permissions, a mode)"
        )
        problem = f"torch sees {len(torch_facts.gpus)} of {wanted}: {why}"
    return _chosen_device_verdict(name, device, torch_facts, summary, problem, values)


def _chosen_device_verdict(
    name: str, device: str, torch_facts: TorchFacts, summary: str, problem: str | None, values: dict
) -> Verdict:
    index = _chosen_index(device)
    count = len(torch_facts.gpus)
    if count == 0:
        reason = f": {problem}" if problem else ""
        cpu_build = torch_facts.cuda_build is None
        if device == "auto":
            return warning(
                name,
                f"{summary}{reason}; the server will run on the CPU",
                (
                    "install a CUDA build of torch (see cuda-driver)"
                    if cpu_build
                    else "fix CUDA_VISIBLE_DEVICES"
                )
                + ", or pass --device cpu to say so",
                **values,
            )
        return failed(
            name,
            f"{summary}{reason}; --device {device} needs a GPU",
            "install a CUDA build of torch (see cuda-driver)"
            if cpu_build
            else "list GPU indices or UUIDs that nvidia-smi -L shows in "
            "CUDA_VISIBLE_DEVICES (or unset it)",
            **values,
        )
    if index is not None and index >= count:
        return failed(
            name,
            f"{summary}: --device {device} is not among them",
            f"use cuda:0 to cuda:{count - 1}, or change CUDA_VISIBLE_DEVICES",
            **values,
        )
    if problem:
        return warning(
            name,
            f"{summary}: {problem}",
            "list the GPUs meant for this server in "
            "CUDA_VISIBLE_DEVICES, as nvidia-smi -L names them",
            **values,
        )
    return ok(name, summary, **values)


def _arch(text: str) -> tuple[str, int, int, str] | None:
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", text)
    return (match[1], int(match[2]), int(match[3]), match[4]) if match else None


def arch_supported(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether torch's compiled code runs on a GPU of this compute capability: machine code for
    the same major version and a lower or equal minor one, arch-specific code ('a') for exactly
    this one, family code ('f') for the same major and a lower or equal minor, or PTX (compiled
    at load) for an older one, its 'a' and 'f' variants under the same rules as machine code."""
    major, minor = capability
    for entry in arch_list:
        parsed = _arch(entry)
        if parsed is None:
            continue
        kind, a_major, a_minor, suffix = parsed
        if suffix == "a":
            fits = (a_major, a_minor) == capability
        elif suffix == "f":
            fits = a_major == major and a_minor <= minor
        elif kind == "compute":
            fits = (a_major, a_minor) <= capability
        else:
            fits = a_major == major and a_minor <= minor
        if fits:
            return True
    return False


def capability_verdict(device: str, torch_facts: TorchFacts) -> Verdict:
    """Fails when the GPU the server uses has no code in this torch; other GPUs only warn."""
    name = "compute-capability"
    if device == "cpu" or not torch_facts.gpus:
        return skipped(name, "no GPU in use")
    built = " ".join(torch_facts.arch_list) or "(none)"
    index = _chosen_index(device) or 0
    unsupported = [
        g for g in torch_facts.gpus if not arch_supported(g.capability, torch_facts.arch_list)
    ]
    gpus = ", ".join(
        f"cuda:{g.index} {g.name} sm_{g.capability[0]}{g.capability[1]}" for g in torch_facts.gpus
    )
    values = dict(
        arch_list=list(torch_facts.arch_list),
        gpus={f"cuda:{g.index}": f"{g.capability[0]}.{g.capability[1]}" for g in torch_facts.gpus},
    )
    if not unsupported:
        return ok(name, f"{gpus}; torch built for {built}", **values)
    names = ", ".join(
        f"cuda:{g.index} (sm_{g.capability[0]}{g.capability[1]})" for g in unsupported
    )
    summary = f"torch {torch_facts.version} has no code for {names}; it was built for {built}"
    fix = (
        "install a torch build that includes this architecture (a newer CUDA build for new "
        "GPUs, an older one for old GPUs)"
    )
    if any(g.index == index for g in unsupported):
        return failed(name, summary, fix, **values)
    return warning(
        name,
        summary + f"; the server uses cuda:{index}, which is supported",
        fix + ", or hide those GPUs with CUDA_VISIBLE_DEVICES",
        **values,
    )


def kernel_indices(device: str, torch_facts: TorchFacts) -> list[int]:
    """The torch indices of the GPUs the server may use, to run the kernel on."""
    if device == "cpu":
        return []
    indices = (
        [int(device[5:])] if device.startswith("cuda:") else [g.index for g in torch_facts.gpus]
    )
    return [i for i in indices if i < len(torch_facts.gpus)]


def kernel_verdict(
    device: str, torch_facts: TorchFacts, results: dict[int, float | str], timeout: float
) -> Verdict:
    """Judge the matmul run on each of ``kernel_indices``: its seconds, what went wrong, or
    (absent from ``results``) not finished within ``timeout``."""
    name = "gpu-kernel"
    if device == "cpu" or not torch_facts.gpus:
        return skipped(name, "no GPU in use")
    indices = kernel_indices(device, torch_facts)
    if not indices:
        return skipped(name, f"--device {device} is not among torch's GPUs (see gpu-visibility)")
    problems, timings, wedged = [], {}, []
    for index in indices:
        result = results.get(index)
        if result is None:
            wedged.append(f"cuda:{index}")
            problems.append(
                f"cuda:{index} did not finish within {timeout:g} s (a wedged GPU "
                "or driver: look for XID errors in dmesg)"
            )
        elif isinstance(result, str):
            problems.append(f"cuda:{index}: {result}")
        else:
            timings[f"cuda:{index}"] = round(result * 1000, 1)
    if problems:
        return failed(
            name,
            "; ".join(problems),
            "check nvidia-smi and the kernel log (dmesg) "
            "for this GPU; a reset or reboot may be needed",
            milliseconds=timings,
            wedged=wedged,
        )
    shown = ", ".join(f"{k} {v} ms" for k, v in timings.items())
    return ok(
        name, f"a 512x512 matmul matches the CPU on every GPU ({shown})", milliseconds=timings
    )
