"""What the exporter costs to install and to run, by install: the light install (`pip install .`,
what the exporter's image gets), the full one (`pip install '.[serve]'`, the inference image),
and, for comparison, the single distribution of a commit before the split (default 3aca24b,
whose only install required torch, so installing the exporter installed torch).

For each, in an empty venv in a temporary directory: pip install from the source tree (not
editable; torch pinned first where the install needs it: TORCH_VERSION, default 2.13.0), then

- the size of what pip installed: the venv's site-packages (du) minus that of the empty venv
  (the venv's own pip and setuptools, shown with them too), and the five largest distributions;
- `import exporter.app` (the exporter's code): -X importtime's sum and the wall time, each over
  that of `python -c pass`;
- the exporter process (`python -m exporter --gpu-backend none`, an empty state directory, a
  free loopback port) started under -X importtime: what it imported by its first /metrics
  (the sum, and which of torch, transformers, OpenTelemetry and the inference package), and the
  time from its start to that first answer;
- the exporter started again, without -X importtime: its resident memory (VmRSS, VmHWM) after
  it served one /metrics.

Timings are medians of --repeat rounds that take the installs in turn, so that the machine's
drift falls on all alike; bytecode is compiled by pip at install.

    python bench/install_footprint.py [--before REV | --no-before] [--no-full] [--repeat N]

Installs what pip's configuration allows (the package index, local wheels): install times
depend on that and are shown, not compared. The repository is not touched (the old commit is
taken with git archive); the interpreter that runs this makes the venvs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")
BEFORE = "3aca24b"  # the last commit before the light/[serve] split: one install, with torch
HEAVY = ("torch", "transformers", "opentelemetry", "inference")
IMPORT = "import exporter.app"

# Run inside the measured venv: every installed distribution with the bytes of its files.
_DIST_SIZES = """
import importlib.metadata as md, json, os
sizes = {}
for dist in md.distributions():
    total = 0
    for f in dist.files or []:
        try:
            total += os.path.getsize(dist.locate_file(f))
        except OSError:
            pass
    sizes[dist.metadata["Name"]] = total
print(json.dumps(sizes))
"""


@dataclass
class Footprint:
    label: str
    workdir: Path
    install_s: float = 0.0
    site_mib: float = 0.0  # site-packages after the install (du)
    base_mib: float = 0.0  # site-packages of the empty venv (pip, setuptools)
    top: list[tuple[str, float]] = field(default_factory=list)  # (distribution, MiB)
    distributions: int = 0
    import_ms: float = 0.0  # import exporter.app, -X importtime
    import_wall_ms: float = 0.0
    process_import_ms: float = 0.0  # the exporter process, -X importtime, by its first scrape
    process_heavy: list[str] = field(default_factory=list)
    first_scrape_ms: float = 0.0
    rss_mib: float = 0.0
    hwm_mib: float = 0.0
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def installed_mib(self) -> float:
        return self.site_mib - self.base_mib

    @property
    def python(self) -> Path:
        return self.workdir / "venv" / "bin" / "python"

    def sample(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, check=True, text=True, capture_output=True
    )


def du_mib(path: Path) -> float:
    return int(run("du", "-sk", path).stdout.split()[0]) / 1024


def site_packages(venv: Path) -> Path:
    (found,) = venv.glob("lib/python3*/site-packages")
    return found


def parse_importtime(text: str) -> tuple[int, set[str]]:
    """(sum of the top-level cumulative µs, top-level package names) of -X importtime lines."""
    total, packages = 0, set()
    for line in text.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if match:
            packages.add(match.group(3).split(".")[0])
            if not match.group(2):
                total += int(match.group(1))
    return total, packages


def _python_c(r: Footprint, code: str) -> None:
    """-X importtime sum and wall time of ``python -c code`` into r's samples."""
    start = time.perf_counter()
    run(r.python, "-c", code, cwd=r.workdir)
    r.sample(f"wall {code}", time.perf_counter() - start)
    result = run(r.python, "-X", "importtime", "-c", code, cwd=r.workdir)
    r.sample(f"importtime {code}", parse_importtime(result.stderr)[0])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Exporter:
    """The exporter of an install, started on a free port with an empty state directory."""

    def __init__(self, r: Footprint, importtime: bool):
        state = r.workdir / "state"
        state.mkdir(exist_ok=True)
        self.port = _free_port()
        self.stderr_path = r.workdir / "exporter.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_EXPORTER_")}
        flags = ["-X", "importtime"] if importtime else []
        self._out = open(r.workdir / "exporter.log", "wb")  # noqa: SIM115 - closed in stop
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [
                str(r.python),
                *flags,
                "-m",
                "exporter",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--state-dir",
                str(state),
                "--gpu-backend",
                "none",
            ],
            cwd=r.workdir,
            env=env,
            stdout=self._out,
            stderr=self._err,
        )

    def first_scrape(self, timeout: float = 60.0) -> float:
        """Waits for /metrics to answer 200; seconds from the start."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("the exporter exited:\n" + self.stderr_path.read_text()[-2000:])
            try:
                url = f"http://127.0.0.1:{self.port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as answer:
                    answer.read()
                    if answer.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._out.close()
        self._err.close()


def timings(results: list[Footprint], repeat: int) -> None:
    for r in results:
        run(r.python, "-c", IMPORT, cwd=r.workdir)  # warm the page cache
    for _ in range(repeat):
        for r in results:
            _python_c(r, IMPORT)
            _python_c(r, "pass")
            exporter = Exporter(r, importtime=True)
            try:
                r.sample("first scrape", exporter.first_scrape())
            finally:
                exporter.stop()
            total, packages = parse_importtime(exporter.stderr_path.read_text())
            r.sample("process importtime", total)
            r.process_heavy = sorted(p for p in packages if p in HEAVY)
    for r in results:
        r.import_ms = (r.median(f"importtime {IMPORT}") - r.median("importtime pass")) / 1000
        r.import_wall_ms = (r.median(f"wall {IMPORT}") - r.median("wall pass")) * 1000
        r.process_import_ms = (r.median("process importtime") - r.median("importtime pass")) / 1000
        r.first_scrape_ms = r.median("first scrape") * 1000


def memory(r: Footprint) -> None:
    exporter = Exporter(r, importtime=False)
    try:
        exporter.first_scrape()
        time.sleep(0.5)  # let the first scrape's garbage settle
        r.rss_mib = _status_kib(exporter.process.pid, "VmRSS") / 1024
        r.hwm_mib = _status_kib(exporter.process.pid, "VmHWM") / 1024
    finally:
        exporter.stop()


def install(label: str, source: Path, extras: str, torch_first: bool, scratch: Path) -> Footprint:
    """An empty venv, the install into it, and its size."""
    print(f"[{label}] installing {source.name}{extras} ...", file=sys.stderr, flush=True)
    workdir = scratch / label
    workdir.mkdir()
    venv = workdir / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    result = Footprint(label, workdir)
    result.base_mib = du_mib(site_packages(venv))
    start = time.perf_counter()
    if torch_first:  # an unpinned torch would fetch a multi-GB CUDA build
        run(python, "-m", "pip", "install", "--quiet", f"torch=={TORCH_VERSION}")
    run(python, "-m", "pip", "install", "--quiet", f"{source}{extras}")
    result.install_s = time.perf_counter() - start
    result.site_mib = du_mib(site_packages(venv))
    sizes = json.loads(run(python, "-c", _DIST_SIZES, cwd=workdir).stdout)
    own = {"pip", "setuptools"}
    result.distributions = len([n for n in sizes if n.lower() not in own])
    result.top = [
        (name, size / 2**20)
        for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])
        if name.lower() not in own
    ][:5]
    return result


def export_commit(rev: str, destination: Path) -> Path:
    """The tree of ``rev`` (git archive: the repository is not touched)."""
    destination.mkdir()
    archive = destination.with_suffix(".tar")
    with open(archive, "wb") as out:
        subprocess.run(["git", "archive", rev], cwd=REPO, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="data")
    archive.unlink()
    return destination


def report(results: list[Footprint]) -> None:
    light = results[0]
    rows = [
        ("installed by pip (MiB)", "{:.1f}", lambda r: r.installed_mib),
        ("site-packages with the venv's pip, setuptools (MiB)", "{:.1f}", lambda r: r.site_mib),
        ("distributions installed", "{:.0f}", lambda r: r.distributions),
        ("import exporter.app, -X importtime (ms)", "{:.1f}", lambda r: r.import_ms),
        ("import exporter.app, wall (ms)", "{:.1f}", lambda r: r.import_wall_ms),
        ("exporter process imports, -X importtime (ms)", "{:.1f}", lambda r: r.process_import_ms),
        ("exporter start to first /metrics (ms)", "{:.0f}", lambda r: r.first_scrape_ms),
        ("exporter RSS after one scrape (MiB)", "{:.1f}", lambda r: r.rss_mib),
        ("exporter peak RSS, VmHWM (MiB)", "{:.1f}", lambda r: r.hwm_mib),
    ]
    width = max(len(title) for title, _, _ in rows)
    others = results[1:]
    print(
        f"{'':<{width}}  "
        + "  ".join(f"{r.label:>10}" for r in results)
        + "  "
        + "  ".join(f"{'light/' + r.label:>13}" for r in others)
    )
    for title, form, value in rows:
        ratios = [f"{value(light) / value(r):.3f}" if value(r) else "-" for r in others]
        print(
            f"{title:<{width}}  "
            + "  ".join(f"{form.format(value(r)):>10}" for r in results)
            + "  "
            + "  ".join(f"{ratio:>13}" for ratio in ratios)
        )
    print(
        f"{'pip install time (s; network, not compared)':<{width}}  "
        + "  ".join(f"{r.install_s:>10.1f}" for r in results)
    )
    print()
    for r in results:
        print(
            f"{r.label}: the exporter process imported "
            f"{', '.join(r.process_heavy) or 'none'} of {', '.join(HEAVY)}; largest: "
            + ", ".join(f"{name} {mib:.1f}" for name, mib in r.top)
            + " MiB"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--before",
        default=BEFORE,
        metavar="REV",
        help=f"the commit to compare with (default {BEFORE})",
    )
    parser.add_argument("--no-before", action="store_true", help="skip that comparison")
    parser.add_argument("--no-full", action="store_true", help="skip the [serve] install")
    parser.add_argument("--repeat", type=int, default=9, help="rounds of timings")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vigil-footprint-") as tmp:
        scratch = Path(tmp)
        results = [install("light", REPO, "", False, scratch)]
        if not args.no_full:
            results.append(install("full", REPO, "[serve]", True, scratch))
        if not args.no_before:
            tree = export_commit(args.before, scratch / f"tree-{args.before}")
            results.append(install("before", tree, "", True, scratch))
        print("timing ...", file=sys.stderr, flush=True)
        timings(results, args.repeat)
        for r in results:
            memory(r)
    print(
        f"python {sys.version.split()[0]}, torch {TORCH_VERSION}, exporter --gpu-backend "
        f"none, medians of {args.repeat} rounds; before = {args.before}"
    )
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
