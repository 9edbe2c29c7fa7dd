"""The inference process's one typed configuration.

Every option is declared once, in ``OPTIONS``: its flag, its environment variable, its type,
its default and its help. The command line, the environment, ``--help`` and the README's
option table all come from that list. Bad values and unknown ``VIGIL_INFERENCE_*`` variables are
rejected at start-up with a message that names them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vigil.options import (
    ConfigError,
    Option,
    OptionSet,
    boolean,
    optional_int,
    optional_positive_int,
    optional_str,
    port,
    positive_float,
    positive_int,
)
from vigil.paths import default_demo_dir, default_state_dir

ENV_PREFIX = "VIGIL_INFERENCE_"
__all__ = ["Config", "ConfigError", "OPTIONS", "load_config", "build_parser"]


def _device(text: str) -> str:
    text = text.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ValueError("must be auto, cpu, cuda or cuda:N")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("must be a whole number, 0 or more") from None
    if value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        str,
        "Model to serve: 'demo' (a tiny model built locally on first use), 'demo-vl' (a tiny "
        "GLM-4.1V vision-language model, likewise), a local directory, or a hub id (needs the "
        "hub to be reachable).",
        metavar="MODEL",
    ),
    Option(
        "served_model_name",
        optional_str,
        "Model id the API answers to and reports; defaults to the model's name.",
        metavar="NAME",
    ),
    Option(
        "device",
        _device,
        "Where the model runs: auto (the first CUDA GPU if there is one, else the CPU), cpu, "
        "cuda or cuda:N.",
        metavar="DEVICE",
    ),
    Option(
        "dtype",
        str,
        "Weights' dtype; auto means float16/bfloat16 on CUDA as the "
        "checkpoint says, float32 on the CPU.",
        choices=("auto", "float32", "float16", "bfloat16"),
    ),
    Option(
        "trust_remote_code",
        boolean,
        "Allow the checkpoint's own Python code (GLM checkpoints need it).",
        flag_only=True,
    ),
    Option(
        "max_model_len",
        optional_positive_int,
        "Context length in tokens (prompt plus output); defaults to the model's own.",
        metavar="TOKENS",
    ),
    Option(
        "demo_dir",
        str,
        "Where the demo model is built and cached (default: $XDG_CACHE_HOME/llm-vigil, "
        "else ~/.cache/llm-vigil).",
        metavar="DIR",
    ),
    Option("host", str, "Address the API listens on.", metavar="HOST"),
    Option("port", port, "Port the API listens on.", metavar="PORT"),
    Option(
        "state_dir",
        str,
        "Shared directory for the metrics files and the process identity that the companion "
        "exporter reads (default: <system temp>/vigil-state).",
        metavar="DIR",
    ),
    Option(
        "api_key",
        optional_str,
        "When set, /v1/* requires 'Authorization: Bearer <key>'.",
        metavar="KEY",
    ),
    Option(
        "header_timeout",
        positive_float,
        "Seconds a client has to send a complete request head (request line and headers), "
        "counted from the moment its connection opens, or from the first byte of its next "
        "request on a kept-alive connection; past it the connection is closed (with 408 if the "
        "request had begun), so that slow or silent connections cannot pile up.",
        metavar="SECONDS",
    ),
    Option(
        "body_timeout",
        positive_float,
        "Seconds a request body may go without a byte arriving, counted from the end of its "
        "head; past it the connection is closed with 408, so that clients that send a head "
        "and then stall cannot hold connections (and at --max-connections lock others out).",
        metavar="SECONDS",
    ),
    Option(
        "max_connections",
        optional_positive_int,
        "Most client connections open at once. At the limit a new connection takes the place "
        "of one without a request in progress: one that sent nothing (idle), else one still "
        "sending its head, else one whose body has not moved for a second (the longest "
        "waiting first); when every connection has a request in progress it gets 503 and is "
        "closed. Default: 1000, or fewer where the file-descriptor limit (ulimit -n, raised to "
        "its hard limit as needed) leaves less room; a value the limit cannot hold stops the "
        "start-up.",
        metavar="N",
    ),
    Option(
        "max_batch_size", positive_int, "Most requests decoded together in one batch.", metavar="N"
    ),
    Option(
        "max_queue",
        positive_int,
        "Most requests waiting for a batch slot; beyond it requests get 429 with Retry-After.",
        metavar="N",
    ),
    Option(
        "request_timeout",
        positive_float,
        "Deadline of a request in seconds, queue time included; past it the request ends with 504.",
        metavar="SECONDS",
    ),
    Option(
        "max_tokens_limit",
        positive_int,
        "Largest max_tokens a request may ask for.",
        metavar="TOKENS",
    ),
    Option(
        "max_body_bytes",
        positive_int,
        "Largest request body in bytes; a larger one gets 413.",
        metavar="BYTES",
    ),
    Option(
        "max_messages_per_request",
        positive_int,
        "Most messages in one chat request, and most content parts in all its messages; more "
        "get 400 before they are validated (each message costs at least a token, and "
        "validating hundreds of thousands of them takes the CPU for seconds).",
        metavar="N",
    ),
    Option(
        "max_image_pixels",
        optional_positive_int,
        "Vision-language models: pixels of an image after the processor's resize (its "
        "max_pixels, as in vLLM's and SGLang's --mm-processor-kwargs); a larger image is "
        "scaled down to fit. Defaults to the model's own processor setting.",
        metavar="PIXELS",
    ),
    Option(
        "max_images_per_request",
        positive_int,
        "Most images in one request; more get 400.",
        metavar="N",
    ),
    Option(
        "max_image_header_pixels",
        positive_int,
        "An image whose header declares more pixels than this is refused before it is decoded "
        "(a decompression bomb); keep it well above --max-image-pixels.",
        metavar="PIXELS",
    ),
    Option(
        "max_request_image_pixels",
        positive_int,
        "Pixels that all the images of one request may declare together; a request over it "
        "is refused before its images are decoded (decoding takes memory and time).",
        metavar="PIXELS",
    ),
    Option(
        "max_image_bytes",
        positive_int,
        "Largest encoded image (a data: URL's payload or a download) in bytes.",
        metavar="BYTES",
    ),
    Option(
        "image_fetch_timeout",
        positive_float,
        "Seconds an http(s) image URL may take to download, whole; past it the request gets 400.",
        metavar="SECONDS",
    ),
    Option(
        "seed",
        optional_int,
        "Seed for sampling, for reproducible runs (default: random).",
        metavar="INT",
    ),
    Option(
        "log_level",
        str,
        "Lowest log level written.",
        choices=("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"),
    ),
    Option(
        "log_prompts",
        boolean,
        "Also log prompts and outputs in the per-request log line (they may hold private data).",
        flag_only=True,
    ),
    Option(
        "stall_timeout",
        positive_float,
        "Upper bound, in seconds, on how long the engine may go without a prefill or decode "
        "step while work is pending before the watchdog declares it stalled; the threshold "
        "while the running step has no prediction (the first steps after the load). Below "
        "it, the threshold follows the step: max(--stall-floor, --stall-factor x its "
        "predicted duration).",
        metavar="SECONDS",
    ),
    Option(
        "stall_floor",
        positive_float,
        "Seconds a step may always take: a step shorter than this never counts as a stall, "
        "whatever its prediction (at most --stall-timeout); also the threshold for pending "
        "work that the engine does not take (stage schedule).",
        metavar="SECONDS",
    ),
    Option(
        "stall_factor",
        positive_float,
        "A step is stalled past this many times its predicted duration (learned per device "
        "from the last steps of its stage and size: prefill by tokens, decode by batch size, "
        "the vision tower by patches), above --stall-floor and below --stall-timeout. The "
        "default 10 is above the worst ratio of actual to predicted step time measured on a "
        "loaded CPU (demo model, two cores, 2 CPU hogs and other test runs: ratio at most 3.0 "
        "for steps predicted at 0.6 s or more; up to 14 for shorter ones, delayed 4 s at most, "
        "which the floor absorbs), with margin: bench/step_time_ratios.py.",
        metavar="FACTOR",
    ),
    Option(
        "load_timeout",
        positive_float,
        "Seconds the model load may take before the watchdog declares it stalled (stage load).",
        metavar="SECONDS",
    ),
    Option(
        "warmup_tokens",
        _non_negative_int,
        "Tokens the engine generates right after the model load, before the process reports "
        "ready (part of the load, under --load-timeout; not a client request): a few short "
        "greedy generations of a tiny text prompt, so that kernels are compiled and the step "
        "costs learned, and a hang in the first client request is judged against a predicted "
        "step rather than --stall-timeout. 11 or more give decode (batch size 1) and prefill "
        "predictions; 0 turns the warm-up off.",
        metavar="N",
    ),
    Option(
        "on_stall",
        str,
        "What the watchdog does after its stall report: exit (with status 75, so that the "
        "supervisor restarts the process) or report (keep running, answer 503 until the "
        "engine moves again).",
        choices=("exit", "report"),
    ),
    Option(
        "enable_fault_injection",
        boolean,
        "Enable POST /debug/fault, which arms hangs, slow steps, out-of-memory errors, empty "
        "outputs and crashes in the engine (for tests and demos; never in production).",
        flag_only=True,
    ),
)


@dataclass(frozen=True)
class Config:
    model: str = "demo"
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_model_len: int | None = None
    demo_dir: str = field(default_factory=default_demo_dir)
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: str = field(default_factory=default_state_dir)
    api_key: str | None = None
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int | None = None  # None: as many as the descriptor limit allows, <= 1000
    max_batch_size: int = 8
    max_queue: int = 64
    request_timeout: float = 120.0
    max_tokens_limit: int = 4096
    max_body_bytes: int = 32 * 1024 * 1024  # room for a few base64 screenshots
    max_messages_per_request: int = 4096
    max_image_pixels: int | None = None
    max_images_per_request: int = 10
    max_image_header_pixels: int = 50_000_000  # Pillow warns of a bomb at 89 M
    max_request_image_pixels: int = 100_000_000
    max_image_bytes: int = 20 * 1024 * 1024
    image_fetch_timeout: float = 10.0
    seed: int | None = None
    log_level: str = "INFO"
    log_prompts: bool = False
    stall_timeout: float = 30.0
    stall_floor: float = 5.0
    stall_factor: float = 10.0
    load_timeout: float = 900.0
    warmup_tokens: int = 24
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


_OPTION_SET = OptionSet(
    ENV_PREFIX,
    OPTIONS,
    Config,
    prog="python -m inference",
    description="Instrumented OpenAI-compatible inference server. "
    "`python -m inference doctor [OPTIONS]` checks the environment it "
    "would start in.",
)
OPTIONS = _OPTION_SET.options


def build_parser():
    return _OPTION_SET.build_parser()


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the configuration from the command line over the environment over the defaults.

    Raises ConfigError naming the flag or variable that is wrong; argparse itself exits with
    status 2 on an unknown flag, as command-line tools do.
    """
    return _OPTION_SET.load(argv, environ)
