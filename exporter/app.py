"""Assembles the exporter from its configuration and serves /metrics until told to stop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from prometheus_client import CollectorRegistry

from vigil import statedir
from vigil.engines import parse_target
from vigil.gpu.fake import FakeFleet
from vigil.gpu.nvml import NvmlBackend
from vigil.listen import bind_error, host_port
from vigil.serving import wait_for_stop

from .collectors.engines import EngineStateCollector
from .collectors.gpu import GpuCollector
from .collectors.inference import InferenceCollector
from .collectors.probe import ProbeCollector
from .collectors.processes import ProcessCollector
from .config import ConfigError, ExporterConfig
from .engine_processes import EngineProcessWatcher
from .gpu.poller import GpuPoller
from .hang_dumps import HangDumper
from .http import start_server
from .inference_dir import InferenceDirectory
from .probe import TargetProber
from .registry import build_registry

# Said when the port is in use (vigil.listen.bind_error).
PORT_BUSY = "is another exporter using that port?"


@dataclass
class Exporter:
    config: ExporterConfig
    directory: InferenceDirectory
    probers: list[TargetProber]
    poller: GpuPoller | None
    registry: CollectorRegistry
    engines: EngineProcessWatcher
    dumper: HangDumper | None = None
    server: Any = None
    port: int = 0

    def start(self) -> None:
        """Start the background work and serve; ConfigError when the address cannot be had."""
        self.directory.start()
        if self.poller is not None:
            self.poller.start()
        for prober in self.probers:
            prober.start()
        self.engines.start()
        if self.dumper is not None:
            self.dumper.start()
        try:
            self.server = start_server(self.config.host, self.config.port, self.registry)
        except OSError as exc:
            self.stop()
            raise ConfigError(
                bind_error(self.config.host, self.config.port, exc, busy=PORT_BUSY)
            ) from None
        self.port = self.server.server_port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.dumper is not None:
            self.dumper.stop()
        self.engines.stop()
        for prober in self.probers:
            prober.stop()
        if self.poller is not None:
            self.poller.stop()
        self.directory.stop()


def _backend(config: ExporterConfig):
    if config.gpu_backend == "nvml":
        return NvmlBackend()
    if config.gpu_backend == "fake":
        return FakeFleet.from_file(config.fake_gpu_fleet)
    return None


def build_exporter(config: ExporterConfig) -> Exporter:
    state_dir = Path(config.state_dir)
    try:
        statedir.metrics_dir(state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot use the state directory {state_dir} ({exc.strerror or exc}); check --state-dir"
        ) from None
    directory = InferenceDirectory(state_dir, retention=config.dead_process_retention)
    probers = [
        TargetProber(
            target.url,
            engine=target.engine,
            interval=config.probe_interval,
            timeout=config.probe_timeout,
            canary_interval=config.canary_interval,
            canary_model=config.canary_model,
            canary_max_tokens=config.canary_max_tokens,
            api_key=config.target_api_key,
        )
        for target in map(parse_target, config.target)
    ]
    backend = _backend(config)
    poller = (
        GpuPoller(backend, interval=config.gpu_interval, max_age=config.gpu_max_age)
        if backend is not None
        else None
    )

    engines = EngineProcessWatcher(probers)

    def pid_models() -> dict[int, str]:
        """Host pid -> model, for the GPUs' per-process memory: the engines' processes, and
        our own inference processes (which win where both are known)."""
        models = {
            stat.pid: view.model or view.target
            for view in engines.views()
            for stat in view.processes
        }
        models.update(
            {v.stat.pid: v.identity.model for v in directory.views() if v.stat is not None}
        )
        return models

    collectors: list = [
        ("inference", InferenceCollector(directory)),
        ("processes", ProcessCollector(directory, engines)),
    ]
    if poller is not None:
        collectors.append(("gpu", GpuCollector(poller, pid_models)))
    dumper = (
        HangDumper(
            probers,
            engines,
            after=config.hang_dump_after,
            interval=config.hang_dump_interval,
            py_spy=config.py_spy,
        )
        if config.hang_dumps and probers
        else None
    )
    if probers:
        collectors.append(("probe", ProbeCollector(probers)))
        collectors.append(("engines", EngineStateCollector(probers, dumper)))
    return Exporter(config, directory, probers, poller, build_registry(collectors), engines, dumper)


def serve(config: ExporterConfig) -> int:
    exporter = build_exporter(config)
    exporter.start()
    logger.info(
        "listening on http://{}/metrics",
        host_port(config.host, exporter.port),
        state_dir=config.state_dir,
        targets=list(config.target),
        gpu_backend=config.gpu_backend,
    )
    wait_for_stop()
    logger.info("stopping")
    exporter.stop()
    return 0
