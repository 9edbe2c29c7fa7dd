"""Checks of the Python environment: the interpreter and the versions of what the server runs on,
against this project's own requirements; pip's view of conflicts; and the deprecated ``pynvml``
package, whose old releases ship a ``pynvml`` module that replaces nvidia-ml-py's."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

from vigil import extras

from .report import Verdict, failed, ok, skipped, warning

DISTRIBUTION = "llm-vigil"
SHOWN = ("torch", "transformers", "tokenizers", "safetensors", "nvidia-ml-py")
# Conflicts among these stop the server or its GPU code; others are reported as warnings.
CRITICAL = {
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "accelerate",
    "nvidia-ml-py",
    "numpy",
}
MINIMUM_PYTHON = (3, 11)
# A check needing one of the serve extra's modules is skipped on a light install, not failed.
SERVE_INSTALL, SERVE_MODULES = extras.SERVE_INSTALL, extras.SERVE_MODULES


def python_verdict() -> Verdict:
    version = ".".join(map(str, sys.version_info[:3]))
    values = dict(version=version, executable=sys.executable)
    if sys.version_info < MINIMUM_PYTHON:
        return failed(
            "python",
            f"Python {version} ({sys.executable}) is older than "
            f"{'.'.join(map(str, MINIMUM_PYTHON))}",
            "use Python 3.11 or newer",
            **values,
        )
    return ok("python", f"Python {version} ({sys.executable})", **values)


def _requirements() -> list:
    from packaging.requirements import Requirement

    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    parsed = [Requirement(text) for text in requires]
    # The server's requirements: the base ones and the serve extra's.
    return [r for r in parsed if r.marker is None or r.marker.evaluate({"extra": "serve"})]


def packages_verdict() -> Verdict:
    name = "packages"
    requirements = {canonicalize_name(r.name): r for r in _requirements()}
    versions: dict[str, str | None] = {}
    problems = []
    for package in dict.fromkeys([*SHOWN, *requirements]):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
        requirement = requirements.get(package)
        if versions[package] is None:
            if package in SHOWN or requirement is not None:
                problems.append(f"{package} is not installed")
        elif requirement is not None and not requirement.specifier.contains(
            versions[package], prereleases=True
        ):
            problems.append(
                f"{package} {versions[package]} does not satisfy {requirement.specifier}"
            )
    shown = ", ".join(f"{p} {versions[p] or 'missing'}" for p in SHOWN)
    if problems:
        return failed(
            name,
            f"{shown}: {'; '.join(problems)}",
            f"{SERVE_INSTALL} (pip install -e '.[serve]' in a clone) in this environment",
            versions=versions,
        )
    suffix = "" if requirements else f" ({DISTRIBUTION} is not installed: requirements unchecked)"
    return ok(name, shown + suffix, versions=versions)


def pip_check_verdict(timeout: float = 120.0) -> Verdict:
    name = "pip-check"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pip", "check"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return warning(
            name, f"pip check did not finish within {timeout:g} s", "run pip check by hand"
        )
    output = (run.stdout + run.stderr).strip()
    if "No module named pip" in output:
        return skipped(name, f"pip is not installed in {sys.prefix}")
    if run.returncode == 0:
        return ok(name, "pip check: no broken requirements")
    conflicts = [line for line in run.stdout.splitlines() if line.strip()]
    involved = {
        canonicalize_name(word)
        for line in conflicts
        for word in re.findall(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    }
    critical = sorted(involved & CRITICAL)
    summary = f"pip check found {len(conflicts)} conflict(s): {'; '.join(conflicts[:3])}"
    fix = (
        "install versions that agree (pip install -U the packages named), in a fresh venv if "
        "need be"
    )
    if critical:
        return failed(
            name, summary + f" (involving {', '.join(critical)})", fix, conflicts=conflicts
        )
    return warning(name, summary, fix, conflicts=conflicts)


def _owner_of(path: Path, candidates: list[str]) -> str | None:
    """The distribution that installed this very file, by its RECORD: the recorded path is this
    file and the recorded hash is its content (two packages writing the same file disagree)."""
    target = path.resolve()
    digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=")
    for candidate in candidates:
        try:
            distribution = metadata.distribution(candidate)
        except metadata.PackageNotFoundError:
            continue
        for record in distribution.files or []:
            if record.hash is None or record.hash.mode != "sha256":
                continue
            if (
                record.hash.value == digest.decode()
                and Path(distribution.locate_file(record)).resolve() == target
            ):
                return candidate
    return None


def pynvml_verdict() -> Verdict:
    name = "pynvml"
    versions = {}
    for package in ("nvidia-ml-py", "pynvml"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    spec = importlib.util.find_spec("pynvml")
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    values = dict(versions=versions, module=str(origin) if origin else None)
    if origin is None:
        return failed(
            name,
            "no pynvml module: the NVML bindings are missing",
            "pip install nvidia-ml-py",
            **values,
        )
    owner = _owner_of(origin, ["nvidia-ml-py", "pynvml"]) if origin.is_file() else None
    if versions["pynvml"] is None:
        if versions["nvidia-ml-py"] is None:
            return warning(
                name,
                f"pynvml at {origin} belongs to no installed package",
                "pip install nvidia-ml-py",
                **values,
            )
        return ok(
            name,
            f"nvidia-ml-py {versions['nvidia-ml-py']} provides pynvml ({origin}); "
            "the deprecated pynvml package is absent",
            **values,
        )
    if owner == "pynvml":
        return failed(
            name,
            f"the deprecated pynvml package {versions['pynvml']} installed its "
            f"own pynvml module ({origin}), shadowing nvidia-ml-py "
            f"{versions['nvidia-ml-py'] or '(not installed)'}",
            "pip uninstall -y pynvml && pip install --force-reinstall nvidia-ml-py",
            owner=owner,
            **values,
        )
    if owner is None:
        return failed(
            name,
            f"pynvml ({origin}) matches neither nvidia-ml-py's nor the deprecated "
            f"pynvml {versions['pynvml']}'s record: the two packages overwrote each "
            "other's module",
            "pip uninstall -y pynvml && pip install --force-reinstall nvidia-ml-py",
            **values,
        )
    return warning(
        name,
        f"the deprecated pynvml package {versions['pynvml']} is installed "
        f"(its module is not the one imported: {origin} is nvidia-ml-py's)",
        "pip uninstall -y pynvml (nvidia-ml-py is the maintained binding)",
        owner=owner,
        **values,
    )
