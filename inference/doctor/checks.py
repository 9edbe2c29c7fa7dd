"""The list of checks, in the order they run, and the session they share.

A check that raises is itself reported as failed with the exception, never as a traceback; a
check selected with ``--check`` brings the checks it needs along (the memory check needs the
weights and the config, for instance).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..config import Config
from . import environment, gpu, host, model
from .report import Verdict, failed, first_line


@dataclass
class Session:
    config: Config
    kernel_timeout: float = 30.0
    offline: bool = False  # the start-up checks: never ask the model hub
    gpus: gpu.GpuFacts = field(default_factory=gpu.GpuFacts)
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
        others = {f"cuda:{g.index}": nvml_free[g.uuid] for g in torch_facts.gpus
                  if g.index != index and nvml_free.get(g.uuid) is not None}
        return model.DeviceMemory(device, gpu.free_device_memory(index)[0],
                                  "torch.cuda.mem_get_info", others)


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
    Check("cuda-driver", lambda s: gpu.cuda_build_verdict(s.config.device, s.gpus.driver,
                                                          s.gpus.torch), startup=True),
    Check("gpu-visibility", lambda s: gpu.visibility_verdict(
        s.config.device, s.gpus.driver, s.gpus.torch, gpu.cuda_visible_devices()), startup=True),
    Check("compute-capability", lambda s: gpu.capability_verdict(s.device(), s.gpus.torch),
          startup=True),
    Check("gpu-kernel", lambda s: s.note_kernel(gpu.kernel_verdict(s.config.device, s.gpus.torch,
                                                                   s.kernel_timeout))),
    Check("model-source", lambda s: model.source_verdict(s.config, s.model, s.offline),
          startup=True),
    Check("remote-code", lambda s: model.remote_code_verdict(s.config, s.model), startup=True,
          requires=("model-source",)),
    Check("model-config", lambda s: model.config_verdict(s.config, s.model), startup=True,
          requires=("model-source",)),
    Check("tokenizer", lambda s: model.tokenizer_verdict(s.config, s.model),
          requires=("model-source",)),
    Check("model-weights", lambda s: model.weights_verdict(s.model), startup=True,
          requires=("model-source",)),
    Check("memory", lambda s: model.memory_verdict(
        s.config, s.model, s.device_memory,
        host.available_ram() if s.device() != "cpu" else None),
          startup=True, requires=("model-config", "model-weights")),
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


def run_checks(session: Session, checks: Iterable[Check],
               on_verdict: Callable[[Verdict], None] | None = None) -> list[Verdict]:
    verdicts = []
    for check in checks:
        started = time.perf_counter()
        try:
            verdict = check.run(session)
        except Exception as exc:  # noqa: BLE001 - a broken check is a finding, not a crash
            verdict = failed(check.name, f"the check itself raised {type(exc).__name__}: "
                             f"{first_line(exc)}",
                             "run with the same options again; if it persists, report it with "
                             "the output of --json", raised=True)
        verdict.values.setdefault("seconds", round(time.perf_counter() - started, 3))
        verdicts.append(verdict)
        if on_verdict is not None:
            on_verdict(verdict)
    return verdicts


def startup_checks() -> list[Check]:
    return [check for check in CHECKS if check.startup]
