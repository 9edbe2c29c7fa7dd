"""The inference process's one typed configuration.

Every option is declared once, in ``OPTIONS``: its flag, its environment variable, its type,
its default and its help. The command line, the environment, ``--help`` and the README's
option table all come from that list. Bad values and unknown ``VIGIL_INFERENCE_*`` variables are
rejected at start-up with a message that names them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

ENV_PREFIX = "VIGIL_INFERENCE_"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the option."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port from 0 to 65535")
    return value


def _device(text: str) -> str:
    text = text.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ValueError("must be auto, cpu, cuda or cuda:N")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_positive_int(text: str) -> int | None:
    return _positive_int(text) if text else None


def _optional_int(text: str) -> int | None:
    return int(text) if text else None


@dataclass(frozen=True)
class Option:
    """One configuration option: how it is spelled on the command line and in the environment."""

    name: str  # attribute name on Config
    type: Callable[[str], Any]
    help: str
    metavar: str | None = None
    choices: Sequence[str] | None = None
    flag_only: bool = False  # a boolean switch: ``--flag`` sets it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _default_state_dir() -> str:
    return str(Path(tempfile.gettempdir()) / "vigil-state")


def _default_demo_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "llm-vigil")


OPTIONS: tuple[Option, ...] = (
    Option("model", str,
           "Model to serve: 'demo' (a tiny model built locally on first use), a local directory, "
           "or a hub id (needs the hub to be reachable).", metavar="MODEL"),
    Option("served_model_name", _optional_str,
           "Model id the API answers to and reports; defaults to the model's name.", metavar="NAME"),
    Option("device", _device,
           "Where the model runs: auto (the first CUDA GPU if there is one, else the CPU), cpu, "
           "cuda or cuda:N.", metavar="DEVICE"),
    Option("dtype", str,
           "Weights' dtype; auto means float16/bfloat16 on CUDA as the "
           "checkpoint says, float32 on the CPU.",
           choices=("auto", "float32", "float16", "bfloat16")),
    Option("trust_remote_code", _bool,
           "Allow the checkpoint's own Python code (GLM checkpoints need it).", flag_only=True),
    Option("max_model_len", _optional_positive_int,
           "Context length in tokens (prompt plus output); defaults to the model's own.",
           metavar="TOKENS"),
    Option("demo_dir", str,
           "Where the demo model is built and cached (default: $XDG_CACHE_HOME/llm-vigil, "
           "else ~/.cache/llm-vigil).", metavar="DIR"),
    Option("host", str,
           "Address the API listens on.", metavar="HOST"),
    Option("port", _port,
           "Port the API listens on.", metavar="PORT"),
    Option("state_dir", str,
           "Shared directory for the metrics files and the process identity that the companion "
           "exporter reads (default: <system temp>/vigil-state).", metavar="DIR"),
    Option("api_key", _optional_str,
           "When set, /v1/* requires 'Authorization: Bearer <key>'.", metavar="KEY"),
    Option("max_batch_size", _positive_int,
           "Most requests decoded together in one batch.", metavar="N"),
    Option("max_queue", _positive_int,
           "Most requests waiting for a batch slot; beyond it requests get 429 with Retry-After.",
           metavar="N"),
    Option("request_timeout", _positive_float,
           "Deadline of a request in seconds, queue time included; past it the request ends "
           "with 504.", metavar="SECONDS"),
    Option("max_tokens_limit", _positive_int,
           "Largest max_tokens a request may ask for.", metavar="TOKENS"),
    Option("max_body_bytes", _positive_int,
           "Largest request body in bytes; a larger one gets 413.", metavar="BYTES"),
    Option("seed", _optional_int,
           "Seed for sampling, for reproducible runs (default: random).", metavar="INT"),
    Option("log_level", str,
           "Lowest log level written.",
           choices=("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")),
    Option("log_prompts", _bool,
           "Also log prompts and outputs in the per-request log line (they may hold private "
           "data).", flag_only=True),
    Option("stall_timeout", _positive_float,
           "Seconds the engine may go without a prefill or decode step while work is pending "
           "before the watchdog declares it stalled.", metavar="SECONDS"),
    Option("load_timeout", _positive_float,
           "Seconds the model load may take before the watchdog declares it stalled (stage "
           "load).", metavar="SECONDS"),
    Option("on_stall", str,
           "What the watchdog does after its stall report: exit (with status 75, so that the "
           "supervisor restarts the process) or report (keep running, answer 503 until the "
           "engine moves again).", choices=("exit", "report")),
    Option("enable_fault_injection", _bool,
           "Enable POST /debug/fault, which arms hangs, slow steps, out-of-memory errors, empty "
           "outputs and crashes in the engine (for tests and demos; never in production).",
           flag_only=True),
)


@dataclass(frozen=True)
class Config:
    model: str = "demo"
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_model_len: int | None = None
    demo_dir: str = field(default_factory=_default_demo_dir)
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: str = field(default_factory=_default_state_dir)
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    request_timeout: float = 120.0
    max_tokens_limit: int = 4096
    max_body_bytes: int = 8 * 1024 * 1024
    seed: int | None = None
    log_level: str = "INFO"
    log_prompts: bool = False
    stall_timeout: float = 30.0
    load_timeout: float = 900.0
    on_stall: str = "exit"
    enable_fault_injection: bool = False

    @property
    def model_name(self) -> str:
        """The id the API serves the model under."""
        if self.served_model_name:
            return self.served_model_name
        if self.model == "demo":
            return "demo"
        return Path(self.model.rstrip("/")).name or self.model


def _check_options_match_config() -> None:
    names = [f.name for f in fields(Config)]
    assert names == [o.name for o in OPTIONS], "OPTIONS and Config must list the same options"


_check_options_match_config()


def build_parser(prog: str = "python -m inference") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Instrumented OpenAI-compatible inference server. Every option can also be "
        f"set by an environment variable: {ENV_PREFIX}<OPTION> (for example {ENV_PREFIX}PORT).",
    )
    for option in OPTIONS:
        help_text = f"{option.help} [env {option.env}]"
        if option.flag_only:
            parser.add_argument(option.flag, dest=option.name, action="store_const", const="true",
                                default=None, help=help_text)
        else:
            parser.add_argument(option.flag, dest=option.name, default=None, metavar=option.metavar,
                                choices=option.choices, help=help_text)
    return parser


def _convert(option: Option, raw: str, source: str) -> Any:
    if option.choices is not None and raw not in option.choices:
        raise ConfigError(f"{source}: {raw!r} is not one of {', '.join(option.choices)}")
    try:
        return option.type(raw)
    except ValueError as exc:
        reason = str(exc) if "must" in str(exc) else f"expected {option.type.__name__.lstrip('_')}"
        raise ConfigError(f"{source}: {raw!r} is not valid ({reason})") from None


def load_config(argv: Sequence[str] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from the command line over the environment over the defaults.

    Raises ConfigError naming the flag or variable that is wrong; argparse itself exits with
    status 2 on an unknown flag, as command-line tools do.
    """
    environ = os.environ if environ is None else environ
    known_env = {o.env for o in OPTIONS}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known_env)
    if unknown:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(unknown)}; known ones are "
            f"{', '.join(sorted(known_env))}")
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for option in OPTIONS:
        cli_value = getattr(args, option.name)
        if cli_value is not None:
            values[option.name] = _convert(option, cli_value, option.flag)
        elif option.env in environ:
            values[option.name] = _convert(option, environ[option.env], option.env)
    return Config(**values)
