"""The list of checks, in the order they run, and the session they share.

A check that raises is itself reported as failed with the exception, never as a traceback; one
that needs a package a light install lacks (torch, transformers: the serve extra) is skipped and
says so. A check selected with ``--check`` brings the checks it needs along (the memory check
needs the weights and the config, for instance).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..config import Config
from . import environment, gpu, gpu_facts, host, model
from .report import Verdict, failed, first_line, skipped


@dataclass
class Session:
    config: Config
    kernel_timeout: float = 30.0
    offline: bool = False  # the start-up checks: never ask the model hub
    gpus: gpu_facts.GpuFacts = field(default_factory=gpu_facts.GpuFacts)
    model: model.ModelFacts = field(default_factory=model.ModelFacts)
    wedged: set[str] = field(default_factory=set)  # GPUs whose kernel never finished

    def device(self) -> str:
        """The device the server would use: cpu or cuda:N."""
        requested = self.config.device
        if requested == "cpu":
            return "cpu"
        if requested == "auto":
            torch_facts = self.gpus.torch
            return "cuda:0" if torch_facts.available and torch_facts.gpus else "cpu"
        return "cuda:0" if requested == "cuda" else requested

    def note_kernel(self, verdict: Verdict) -> Verdict:
        self.wedged.update(verdict.values.get("wedged", ()))
        return verdict

    def device_memory(self) -> model.DeviceMemory | None:
        device = self.device()
        if device == "cpu":
            available, source = host.available_ram()
            return model.DeviceMemory("cpu", available, source)
        torch_facts = self.gpus.torch
        index = int(device.split(":")[1])
        if not torch_facts.available or index >= len(torch_facts.gpus) or device in self.wedged:
            return None
        # Only the chosen GPU is asked through torch (a CUDA context on each GPU would hold
        # memory there); the others' free memory comes from NVML, matched by UUID.
        nvml_free = {g.uuid: g.memory_free for g in self.gpus.driver.gpus}
        others = {
            f"cuda:{g.index}": nvml_free[g.uuid]
            for g in torch_facts.gpus
            if g.index != index and nvml_free.get(g.uuid) is not None
        }
        return model.DeviceMemory(
            device, gpu_facts.free_device_memory(index)[0], "torch.cuda.mem_get_info", others
        )


def _cuda_driver(session: Session) -> Verdict:
    device, driver = session.config.device, session.gpus.driver
    try:
        torch_facts = session.gpus.torch
    except ModuleNotFoundError as exc:  # a light install: still say what the driver offers
        return gpu.driver_verdict_without_torch(device, driver, _top_level(exc))
    return gpu.cuda_build_verdict(device, driver, torch_facts)


def _gpu_kernel(session: Session) -> Verdict:
    device, torch_facts = session.config.device, session.gpus.torch
    results = gpu_facts.run_kernels(gpu.kernel_indices(device, torch_facts), session.kernel_timeout)
    return session.note_kernel(
        gpu.kernel_verdict(device, torch_facts, results, session.kernel_timeout)
    )


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Session], Verdict]
    startup: bool = False  # the server runs it before it loads the model
    requires: tuple[str, ...] = ()


CHECKS: tuple[Check, ...] = (
    Check("python", lambda s: environment.python_verdict()),
    Check("packages", lambda s: environment.packages_verdict()),
    Check("pip-check", lambda s: environment.pip_check_verdict()),
    Check("pynvml", lambda s: environment.pynvml_verdict()),
    Check("cuda-driver", _cuda_driver, startup=True),
    Check(
        "gpu-visibility",
        lambda s: gpu.visibility_verdict(
            s.config.device, s.gpus.driver, s.gpus.torch, gpu_facts.cuda_visible_devices()
        ),
        startup=True,
    ),
    Check(
        "compute-capability",
        lambda s: gpu.capability_verdict(s.device(), s.gpus.torch),
        startup=True,
    ),
    Check("gpu-kernel", _gpu_kernel),
    Check(
        "model-source", lambda s: model.source_verdict(s.config, s.model, s.offline), startup=True
    ),
    Check(
        "remote-code",
        lambda s: model.remote_code_verdict(s.config, s.model),
        startup=True,
        requires=("model-source",),
    ),
    Check(
        "model-config",
        lambda s: model.config_verdict(s.config, s.model),
        startup=True,
        requires=("model-source",),
    ),
    Check(
        "tokenizer",
        lambda s: model.tokenizer_verdict(s.config, s.model),
        requires=("model-source",),
    ),
    Check(
        "model-weights",
        lambda s: model.weights_verdict(s.model),
        startup=True,
        requires=("model-source",),
    ),
    Check(
        "memory",
        lambda s: model.memory_verdict(
            s.config,
            s.model,
            s.device_memory,
            host.available_ram() if s.device() != "cpu" else None,
        ),
        startup=True,
        requires=("model-config", "model-weights"),
    ),
    Check("port", lambda s: host.port_verdict(s.config.host, s.config.port)),
    Check("state-dir", lambda s: host.state_dir_verdict(s.config.state_dir)),
    Check("otlp", lambda s: host.otlp_verdict(dict(os.environ))),
)
NAMES = tuple(check.name for check in CHECKS)
_BY_NAME = {check.name: check for check in CHECKS}


def selection(names: Iterable[str]) -> list[Check]:
    """The named checks and those they need, in the standard order."""
    wanted: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(_BY_NAME[name].requires)
    return [check for check in CHECKS if check.name in wanted]


def run_checks(
    session: Session, checks: Iterable[Check], on_verdict: Callable[[Verdict], None] | None = None
) -> list[Verdict]:
    verdicts = []
    for check in checks:
        started = time.perf_counter()
        try:
            verdict = check.run(session)
        except ModuleNotFoundError as exc:
            verdict = _not_installed(check.name, exc)
        except Exception as exc:  # noqa: BLE001 - a broken check is a finding, not a crash
            verdict = _raised(check.name, exc)
        verdict.values.setdefault("seconds", round(time.perf_counter() - started, 3))
        verdicts.append(verdict)
        if on_verdict is not None:
            on_verdict(verdict)
    return verdicts


def _top_level(exc: ModuleNotFoundError) -> str:
    return (exc.name or "").split(".")[0]


def _not_installed(name: str, exc: ModuleNotFoundError) -> Verdict:
    missing = _top_level(exc)
    if missing not in environment.SERVE_MODULES:  # not a light install: a broken one
        return _raised(name, exc)
    return skipped(
        name,
        f"needs {missing}, which is not installed: "
        f"{environment.SERVE_INSTALL} adds what the server runs on",
        missing=missing,
    )


def _raised(name: str, exc: Exception) -> Verdict:
    return failed(
        name,
        f"the check itself raised {type(exc).__name__}: {first_line(exc)}",
        "run with the same options again; if it persists, report it with the output of --json",
        raised=True,
    )


def startup_checks() -> list[Check]:
    return [check for check in CHECKS if check.startup]
