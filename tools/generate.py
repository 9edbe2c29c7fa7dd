"""Every generated file of the repository, written or checked by one command.

    scripts/generate                    # python -m tools.generate: writes every generated file
    scripts/generate --check            # writes nothing; lists each stale file with a diff, exits 1

The generated files: the alert rules (``alerts/*.rules.yml``, alerts/rules.py), the parameters
table in alerts/README.md (the rest of that file is written by hand), the dashboards
(``dashboards/*.json``, dashboards/generate.py), the metrics reference (docs/metrics.md,
tools/metrics_reference.py), the Prometheus Operator's resources (kubernetes/prometheus-operator/,
tools/operator_resources.py), the configuration of a plain Prometheus and Alertmanager in a cluster
without the Operator (kubernetes/without-operator/, tools/plain_kubernetes.py) and the tests'
golden files (tools/golden.py).
tests/test_generated_files.py runs the check, so the tests fail while a committed file is stale.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

from alerts import rules
from dashboards import generate as dashboards
from tools import golden, metrics_reference, operator_resources, plain_kubernetes

REPO = Path(__file__).resolve().parents[1]
# Folders whose files of this pattern are all generated: one that no generator writes is stale.
GENERATED_ONLY = (
    "alerts/*.rules.yml",
    "dashboards/*.json",
    "kubernetes/prometheus-operator/*",
    "kubernetes/without-operator/*",
)
DIFF_LINES = 40  # of each stale file's diff shown by --check


@dataclass(frozen=True)
class Stale:
    path: str  # relative to the repository
    expected: str | None  # None: no generator writes it any more
    actual: str | None  # None: missing

    def diff(self, max_lines: int = DIFF_LINES) -> str:
        """A unified diff from the committed file to the generated one, cut at max_lines."""
        lines = list(
            difflib.unified_diff(
                (self.actual or "").splitlines(keepends=True),
                (self.expected or "").splitlines(keepends=True),
                fromfile=f"{self.path} (committed)",
                tofile=f"{self.path} (generated)",
            )
        )
        shown = "".join(
            line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
            for line in lines[:max_lines]
        )
        if len(lines) > max_lines:
            shown += f"... ({len(lines) - max_lines} more diff lines)\n"
        return shown


def expected_files(repo: Path = REPO) -> dict[str, str]:
    """Repository-relative path -> the text each generator writes there. The alerts README is
    read from ``repo``: only its parameters table is generated."""
    files = {f"alerts/{name}": text for name, text in rules.render().items()}
    readme = repo / "alerts" / "README.md"
    files["alerts/README.md"] = rules.with_parameters_table(_read(readme) or "")
    files.update({f"dashboards/{name}": text for name, text in dashboards.render().items()})
    files["docs/metrics.md"] = metrics_reference.render()
    files.update(golden.render())
    files.update(operator_resources.render())
    files.update(plain_kubernetes.render())
    return files


def stale_files(repo: Path = REPO) -> list[Stale]:
    """The generated files under ``repo`` that differ from what their generator writes, are
    missing, or are no generator's output any more (in GENERATED_ONLY)."""
    expected = expected_files(repo)
    stale = []
    for path, text in expected.items():
        actual = _read(repo / path)
        if actual != text:
            stale.append(Stale(path, text, actual))
    for pattern in GENERATED_ONLY:
        for path in sorted(repo.glob(pattern)):
            relative = path.relative_to(repo).as_posix()
            if relative not in expected:
                stale.append(Stale(relative, None, _read(path)))
    return stale


def write(repo: Path = REPO) -> list[Stale]:
    """Bring every generated file under ``repo`` up to date (files left over in GENERATED_ONLY
    are removed); the files it changed."""
    changed = stale_files(repo)
    for item in changed:
        path = repo / item.path
        if item.expected is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(item.expected.encode())
    return changed


def _read(path: Path) -> str | None:
    """The file's text as it is on disk (no newline translation); None when it is missing."""
    try:
        return path.read_bytes().decode()
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None, repo: Path = REPO) -> int:
    parser = argparse.ArgumentParser(prog="scripts/generate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; list stale files with a diff and exit 1 if any",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(repo)
        for item in stale:
            what = (
                "missing"
                if item.actual is None
                else "no generator writes it"
                if item.expected is None
                else "stale"
            )
            print(f"{item.path}: {what}\n{item.diff()}")
        if stale:
            print(f"{len(stale)} generated file(s) out of date: run scripts/generate")
            return 1
        print("every generated file is current")
        return 0
    changed = write(repo)
    for item in changed:
        print(f"{'removed' if item.expected is None else 'wrote'} {item.path}")
    if not changed:
        print("every generated file is current")
    return 0


if __name__ == "__main__":
    from loguru import logger

    # The golden GPU exposition loses a GPU and sees an XID on purpose: no ERROR lines for that.
    logger.disable("exporter")
    sys.exit(main())
