"""``python -m inference doctor [server options] [--json] [--check NAME ...]``.

Takes the server's own model, device, port and state-dir options (flags and VIGIL_INFERENCE_*
variables alike), so that the doctor examines exactly what the server would start with. Prints a
line per check as it finishes (or one JSON document with --json); exits 1 when a check failed,
0 otherwise, 2 on bad options. ``--fake-gpu-fleet FILE`` reads the driver's GPUs from a fake
fleet (the exporter's format) instead of NVML: for tests and demos on machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vigil.gpu.fake import FakeFleet

from ..config import ConfigError, build_parser, load_config
from .checks import CHECKS, NAMES, Session, run_checks, selection
from .gpu_facts import GpuFacts
from .report import Status, render_json, render_tally, render_verdict

USAGE = "python -m inference doctor"


def _doctor_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=USAGE,
        add_help=False,
        description="Check the environment the server would start in: packages, driver and "
        "GPUs, the model's files and memory, the port, the state directory and the OTLP "
        "endpoint. Takes every server option as well (see python -m inference --help).",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--check",
        action="append",
        choices=NAMES,
        metavar="NAME",
        help=f"run only this check (repeatable; checks it needs run too): {', '.join(NAMES)}",
    )
    parser.add_argument(
        "--kernel-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long the GPU kernel check waits for each GPU (default 30)",
    )
    parser.add_argument(
        "--fake-gpu-fleet",
        metavar="FILE",
        help="for tests and demos: take the driver's GPUs from this fake fleet "
        "(JSON, as the exporter's --fake-gpu-fleet) instead of NVML; torch "
        "still reports this machine",
    )
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The doctor; ``argv`` defaults to the command line (the vigil-doctor script)."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `... | head` closed the pipe: stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit would fail again
        return 141  # 128 + SIGPIPE, what a shell reports for such a tool


def _main(argv: Sequence[str] | None) -> int:
    parser = _doctor_parser()
    own, server_argv = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if own.help:
        parser.print_help()
        server_help = build_parser().format_help()
        print(
            "\nserver "
            + server_help[server_help.index("options:") :].replace(
                "  -h, --help            show this help message and exit\n", ""
            ),
            end="",
        )
        return 0
    if own.kernel_timeout <= 0:
        print(f"{USAGE}: error: --kernel-timeout must be positive", file=sys.stderr)
        return 2
    try:
        config = load_config(server_argv)
    except ConfigError as exc:
        print(f"{USAGE}: error: {exc}", file=sys.stderr)
        return 2
    fleet = None
    if own.fake_gpu_fleet:
        try:
            fleet = FakeFleet.from_file(own.fake_gpu_fleet)
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # not a fleet's JSON
            print(f"{USAGE}: error: --fake-gpu-fleet {own.fake_gpu_fleet}: {exc}", file=sys.stderr)
            return 2
    session = Session(config, kernel_timeout=own.kernel_timeout, gpus=GpuFacts(backend=fleet))
    checks = selection(own.check) if own.check else list(CHECKS)
    if own.json:
        verdicts = run_checks(session, checks)
        print(render_json(verdicts))
    else:
        gpus_from = f", GPUs from the fake fleet {own.fake_gpu_fleet}" if fleet is not None else ""
        print(
            f"{USAGE}: model {config.model!r}, device {config.device}, "
            f"{config.host}:{config.port}, state dir {config.state_dir}{gpus_from}",
            flush=True,
        )
        width = max(len(check.name) for check in checks)
        verdicts = run_checks(
            session, checks, on_verdict=lambda v: print(render_verdict(v, width), flush=True)
        )
        print(render_tally(verdicts))
    return 1 if any(v.status is Status.FAILED for v in verdicts) else 0
