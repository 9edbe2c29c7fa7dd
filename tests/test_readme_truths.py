"""What the README tells a newcomer holds for the code: the stack's ports and their options, the
compose quick start's steps, the CPU-torch switch of the scripts, the notifier's variables. A
README that drifts from the code misleads exactly the person it is for."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from vigil import stack as vigil_stack

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_port_of_the_stack_is_in_the_readme_with_its_option_and_default():
    rows = {
        name: int(port)
        for port, name in re.findall(r"^\|[^|\n]*\| (\d+) \| `--(\w+)-port` \|", README, re.M)
    }
    assert rows == vigil_stack.DEFAULT_PORTS


def test_the_compose_quick_start_has_the_env_step_and_the_cpu_override():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "cp compose/.env.example compose/.env" in quick_start
    assert "-f compose/docker-compose.cpu.yml" in quick_start
    assert (REPO / "compose" / ".env.example").is_file()
    assert (REPO / "compose" / "docker-compose.cpu.yml").is_file()


def test_the_cpu_torch_index_the_readme_gives_reaches_pip(tmp_path):
    """TORCH_INDEX_URL, as the README says, becomes pip's --index-url for torch (and without it
    pip keeps its own index): run ensure_venv with a python that records what it is asked."""
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/stack" in README
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    fake = venv / "bin" / "python"
    # A venv's python that has no torch (import fails) and notes every pip call.
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exit 1; fi\necho "$*" >> {calls}\n')
    fake.chmod(0o755)

    def pip_calls(**env: str) -> list[str]:
        calls.unlink(missing_ok=True)
        for stamp in venv.glob(".installed-*"):  # installed once: the next call would skip it
            stamp.unlink()
        subprocess.run(
            ["bash", "-c", "source scripts/lib/venv.sh && ensure_venv"],
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", "VIGIL_VENV": str(venv), **env},
            check=True,
            capture_output=True,
        )
        return calls.read_text().splitlines()

    torch = [
        call for call in pip_calls(TORCH_INDEX_URL="https://example.test/cpu") if "torch==" in call
    ]
    assert torch == ["-m pip install --quiet --index-url https://example.test/cpu torch==2.13.0"]
    torch = [call for call in pip_calls() if "torch==" in call]
    assert torch == ["-m pip install --quiet torch==2.13.0"]


def test_the_notifier_variables_the_readme_names_are_the_notifiers():
    from notifier.config import ENV_PREFIX, OPTIONS

    known = {ENV_PREFIX + option.name.upper() for option in OPTIONS}
    named = set(re.findall(r"VIGIL_NOTIFIER_[A-Z_]+[A-Z]", README))
    assert named and named <= known, named - known


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_kubernetes_section_names_what_exists_and_the_measured_figures():
    """Every path, overlay and image the Kubernetes section names exists; the chart version is the
    one the values file was checked against; the series figures are docs/cardinality.md's."""
    section = _section("Kubernetes")
    paths = set(
        re.findall(r"\b((?:kubernetes|compose|docs|alerts|dashboards)/[\w./-]*\w)", section)
    )
    assert "kubernetes/overlays/inference" in paths
    assert paths, "no path found"
    for path in paths:
        assert (REPO / path).exists(), f"README's Kubernetes section names {path}: missing"
    for overlay in re.findall(r"overlays/(\w+)", section):
        assert (REPO / "kubernetes" / "overlays" / overlay / "kustomization.yaml").is_file()
    for dockerfile in re.findall(r"-f (compose/\S+\.Dockerfile)", section):
        assert (REPO / dockerfile).is_file()
    values = (REPO / "kubernetes" / "kube-prometheus-stack" / "values.yaml").read_text()
    (chart,) = re.findall(r"--version (\S+)", section)
    assert f"chart\n# {chart}" in values or f"chart {chart}" in values, chart
    table = (REPO / "docs" / "cardinality.md").read_text()
    measured, budget = re.search(
        r"^\| total per node \| ([\d,]+) \| ([\d,]+) \|", table, re.M
    ).groups()
    assert f"{measured} series, budget {budget}" in section
