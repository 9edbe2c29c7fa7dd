"""A check's verdict and how a list of them is printed: one line per check for people, JSON for
machines."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    OK = "ok"
    WARNING = "warning"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Verdict:
    """What one check found: ``summary`` carries the measured values; ``fix`` says what to do
    when the status is not ok; ``values`` holds the same figures for machines."""

    check: str
    status: Status
    summary: str
    fix: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data


def ok(check: str, summary: str, **values: Any) -> Verdict:
    return Verdict(check, Status.OK, summary, None, values)


def warning(check: str, summary: str, fix: str, **values: Any) -> Verdict:
    return Verdict(check, Status.WARNING, summary, fix, values)


def failed(check: str, summary: str, fix: str, **values: Any) -> Verdict:
    return Verdict(check, Status.FAILED, summary, fix, values)


def skipped(check: str, summary: str, **values: Any) -> Verdict:
    return Verdict(check, Status.SKIPPED, summary, None, values)


def counts(verdicts: Iterable[Verdict]) -> dict[str, int]:
    tally = {status.value: 0 for status in Status}
    for verdict in verdicts:
        tally[verdict.status.value] += 1
    return tally


def render_verdict(verdict: Verdict, width: int = 0) -> str:
    """``status  check  summary``, and a ``fix:`` line under it when there is one."""
    line = f"{verdict.status.value:<8} {verdict.check:<{width}}  {verdict.summary}"
    if verdict.fix:
        line += f"\n{'':<8} {'':<{width}}  fix: {verdict.fix}"
    return line


def render_tally(verdicts: Iterable[Verdict]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts(verdicts).items())


def render_text(verdicts: list[Verdict]) -> str:
    width = max((len(v.check) for v in verdicts), default=0)
    return "\n".join([*(render_verdict(v, width) for v in verdicts), render_tally(verdicts)])


def render_json(verdicts: list[Verdict]) -> str:
    tally = counts(verdicts)
    return json.dumps(
        {
            "ok": tally[Status.FAILED.value] == 0,
            "counts": tally,
            "checks": [v.to_dict() for v in verdicts],
        },
        indent=2,
        default=str,
    )


def first_line(exc: BaseException) -> str:
    """An exception's first line of message, for a one-line summary."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def human_bytes(value: int | float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def human_count(value: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return str(value)
