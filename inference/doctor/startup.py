"""The checks the server runs before it loads the model: those whose failure would stop it
(model files, memory, the CUDA build against the driver and the GPUs), each logged with its
verdict, so that a failed start says what to fix instead of ending in a traceback."""

from __future__ import annotations

from loguru import logger

from ..config import Config
from .checks import Session, run_checks, startup_checks
from .gpu_facts import GpuFacts
from .report import Status, Verdict

# With --device auto the server falls back to the CPU when torch cannot use the GPUs: these
# failures are logged, but they do not stop it.
_FALLBACK_CHECKS = {"cuda-driver", "gpu-visibility"}


class StartupCheckFailed(RuntimeError):
    def __init__(self, verdict: Verdict):
        self.verdict = verdict
        super().__init__(
            f"start-up check {verdict.check} failed: {verdict.summary}; fix: {verdict.fix}"
        )


# Reading the GPUs at start-up may take long on a node whose GPUs are not in persistence mode.
GPU_DEADLINE_S = 180.0


def blocks_start(verdict: Verdict, config: Config) -> bool:
    """Only a verdict the check reached; a check that itself broke never stops the server."""
    if verdict.status is not Status.FAILED or verdict.values.get("raised"):
        return False
    return not (config.device == "auto" and verdict.check in _FALLBACK_CHECKS)


def _log(verdict: Verdict, config: Config) -> None:
    fields = dict(check=verdict.check, verdict=verdict.status.value, model=config.model_name)
    text = f"start-up check {verdict.check}: {verdict.status.value}: {verdict.summary}"
    if verdict.fix:
        text += f" (fix: {verdict.fix})"
        fields["fix"] = verdict.fix
    if blocks_start(verdict, config):
        logger.error("{}", text, **fields)
    elif verdict.status in (Status.FAILED, Status.WARNING):
        logger.warning("{}", text, **fields)
    else:
        logger.info("{}", text, **fields)


def run_startup_checks(config: Config) -> list[Verdict]:
    """Run and log the start-up checks; raise StartupCheckFailed at the first one that stops the
    start (after logging all of them)."""
    session = Session(config, offline=True, gpus=GpuFacts(deadline=GPU_DEADLINE_S))
    verdicts = run_checks(session, startup_checks(), on_verdict=lambda v: _log(v, config))
    for verdict in verdicts:
        if blocks_start(verdict, config):
            raise StartupCheckFailed(verdict)
    return verdicts
