"""The exporter's one typed configuration: flags over ``VIGIL_EXPORTER_*`` variables over
defaults. ``--target`` may repeat; its variable takes a comma-separated list."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vigil.engines import parse_target
from vigil.options import (
    ConfigError,
    Option,
    OptionSet,
    boolean,
    optional_str,
    port,
    positive_float,
    positive_int,
)
from vigil.paths import default_state_dir

ENV_PREFIX = "VIGIL_EXPORTER_"
__all__ = ["ExporterConfig", "ConfigError", "OPTIONS", "load_config"]


def _target(text: str) -> str:
    return str(parse_target(text))


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be zero or a positive number of seconds")
    return value


def _executable(text: str) -> str:
    if not text.strip():
        raise ValueError("must name an executable (a name looked up on PATH, or a path)")
    return text


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "Address /metrics listens on.", metavar="HOST"),
    Option("port", port, "Port /metrics listens on.", metavar="PORT"),
    Option(
        "state_dir",
        str,
        "The inference processes' state directory (their metrics files and identities).",
        metavar="DIR",
    ),
    Option(
        "target",
        _target,
        "Base URL of an OpenAI-compatible server to probe, optionally after its engine "
        "(vigil, vllm, sglang, tgi: vllm=http://127.0.0.1:8000; else recognised from its "
        "/metrics). Repeat the flag for several; the variable takes a comma-separated list.",
        metavar="[ENGINE=]URL",
        multiple=True,
    ),
    Option(
        "target_api_key",
        optional_str,
        "Bearer token the probe sends to the targets.",
        metavar="KEY",
    ),
    Option(
        "probe_interval",
        positive_float,
        "Seconds between two probes of /health and /ready.",
        metavar="SECONDS",
    ),
    Option(
        "probe_timeout",
        positive_float,
        "Seconds a probe check may take before it counts as failed.",
        metavar="SECONDS",
    ),
    Option(
        "canary_interval",
        _non_negative_float,
        "Seconds between two canary completions (0: no canary).",
        metavar="SECONDS",
    ),
    Option(
        "canary_model",
        optional_str,
        "Model the canary asks for (default: the first one GET /v1/models lists).",
        metavar="NAME",
    ),
    Option(
        "canary_max_tokens",
        positive_int,
        "Tokens the canary completion asks for.",
        metavar="TOKENS",
    ),
    Option(
        "gpu_backend",
        str,
        "Where GPU readings come from: nvml, fake (a fleet described in --fake-gpu-fleet, "
        "for tests and demos) or none.",
        choices=("nvml", "fake", "none"),
    ),
    Option(
        "fake_gpu_fleet",
        optional_str,
        "JSON file describing the fake GPU fleet (with --gpu-backend fake).",
        metavar="FILE",
    ),
    Option(
        "gpu_interval",
        positive_float,
        "Seconds between two reads of the GPUs (in a background thread).",
        metavar="SECONDS",
    ),
    Option(
        "gpu_max_age",
        positive_float,
        "Seconds after which a GPU's readings count as stale: its values are left out and "
        "its vigil_gpu_up is 0.",
        metavar="SECONDS",
    ),
    Option(
        "dead_process_retention",
        positive_float,
        "Seconds a process that died uncleanly is still shown (vigil_process_alive 0) before "
        "its identity file is removed.",
        metavar="SECONDS",
    ),
    Option(
        "hang_dumps",
        boolean,
        "Dump the Python stacks of a local target's engine processes with py-spy when it hangs "
        "(work pending and no progress for --hang-dump-after seconds) and log them in one "
        "'engine hang report' line at ERROR. Needs ptrace permission (in a container: cap_add "
        "SYS_PTRACE and pid: host).",
        flag_only=True,
    ),
    Option(
        "hang_dump_after",
        positive_float,
        "Seconds of work pending (requests running or waiting) and no progress in a target's "
        "/metrics before its engine counts as hung.",
        metavar="SECONDS",
    ),
    Option(
        "hang_dump_interval",
        positive_float,
        "At most one hang report per target in this many seconds (while it stays hung, one "
        "more after each interval).",
        metavar="SECONDS",
    ),
    Option(
        "py_spy",
        _executable,
        "The py-spy executable for the hang reports (default: py-spy on PATH, else beside the "
        "exporter's Python).",
        metavar="PATH",
    ),
    Option(
        "log_level",
        str,
        "Lowest log level written.",
        choices=("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"),
    ),
)


@dataclass(frozen=True)
class ExporterConfig:
    host: str = "127.0.0.1"
    port: int = 9400
    state_dir: str = default_state_dir()
    target: tuple[str, ...] = ()
    target_api_key: str | None = None
    probe_interval: float = 15.0
    probe_timeout: float = 5.0
    canary_interval: float = 60.0
    canary_model: str | None = None
    canary_max_tokens: int = 2
    gpu_backend: str = "nvml"
    fake_gpu_fleet: str | None = None
    gpu_interval: float = 2.0
    gpu_max_age: float = 30.0
    dead_process_retention: float = 600.0
    hang_dumps: bool = False
    hang_dump_after: float = 120.0
    hang_dump_interval: float = 600.0
    py_spy: str = "py-spy"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.gpu_backend == "fake" and not self.fake_gpu_fleet:
            raise ConfigError("--gpu-backend fake needs --fake-gpu-fleet FILE")


_OPTION_SET = OptionSet(
    ENV_PREFIX,
    OPTIONS,
    ExporterConfig,
    prog="python -m exporter",
    description="Companion exporter: GPUs, inference telemetry and probes for Prometheus.",
)
OPTIONS = _OPTION_SET.options


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ExporterConfig:
    return _OPTION_SET.load(argv, environ)
