"""The Docker Compose stack (compose/), checked without a Docker daemon.

- Both compose files validate against the Compose specification's JSON schema
  (check-jsonschema's vendored copy), and a Compose v2 CLI, where one is installed, renders
  them: GPU reservations by default, none with the CPU override, the Grafana password required.
- Every host path a service mounts or builds from exists; the image builds copy every package.
- Each process has its own image (compose/exporter.Dockerfile: the light install, no torch;
  compose/inference.Dockerfile: the [serve] extra), each Dockerfile read by a small instruction
  parser: the base pinned by version tag and digest, a builder stage whose venv alone reaches
  the final stage, an unprivileged user, a health check where compose runs it, and a
  .dockerignore that keeps the virtual environments, .git and caches out of the context.
- Prometheus and Alertmanager are checked by promtool and amtool in the layout the containers
  see (their mounts copied into a scratch tree), with every rules file and template reachable.
- Images are pinned; configuration mounts are read-only; every listening address is loopback,
  and the loopback targets of alerts/prometheus.yml are where the services listen.
- The notifier (Alertmanager's webhook receiver) runs from the exporter's image, listens where
  alerts/alertmanager.yml posts (/alerts and /watchdog on 127.0.0.1:5001), takes its optional
  relays (DingTalk, Feishu/Lark) from variables it knows, never from the command line, and
  Prometheus resends alerts after the delay the stack without Docker uses (vigil.stack's
  RESEND_DELAY: seconds after it first finds Alertmanager instead of a minute, and alerts that
  stay valid across a short restart of Prometheus).
- Grafana's data sources have their fixed uids, and the Loki derived field extracts the trace id
  from a real log line of the inference process and links to Tempo.
- Alloy labels streams with service and level only: never trace_id or request_id.
- The vLLM and SGLang overrides (compose/docker-compose.vllm.yml, .sglang.yml), merged with the
  base file by the Compose specification's merge rules (implemented below and checked on the
  specification's own examples; the CLI renders them too where it is installed), are valid
  Compose documents in which our inference service is not started, the engine runs from a
  pinned image with the GPU reserved, the HF cache, a health check on /health and loopback
  listeners, the exporter targets the engine, and Prometheus loads a configuration that
  promtool accepts, with the engine's scrape job (the one vigil.stack writes for --engine).
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
BASE = COMPOSE_DIR / "docker-compose.yml"
CPU = COMPOSE_DIR / "docker-compose.cpu.yml"
# Engines watched instead of our inference process: override file, service, port, model variable.
ENGINE_OVERRIDES = {
    "vllm": (COMPOSE_DIR / "docker-compose.vllm.yml", 8000, "VLLM_MODEL"),
    "sglang": (COMPOSE_DIR / "docker-compose.sglang.yml", 30000, "SGLANG_MODEL"),
}
COMPOSE_FILES = [BASE, CPU, *(path for path, _, _ in ENGINE_OVERRIDES.values())]
# The default model of the engine overrides: the architecture of AutoGLM-Phone-9B.
ENGINE_DEFAULT_MODEL = "zai-org/GLM-4.1V-9B-Thinking"
ALERTS = REPO / "alerts"
ALLOY_CONFIG = COMPOSE_DIR / "alloy" / "config.alloy"
DATASOURCES_DIR = COMPOSE_DIR / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS_DIR = COMPOSE_DIR / "grafana" / "provisioning" / "dashboards"

# Host paths outside the repository that a service may mount (they exist on a Docker host).
SYSTEM_PATHS = {"/var/run/docker.sock"}
FIXED_UIDS = {"prometheus": "vigil-prometheus", "loki": "vigil-loki", "tempo": "vigil-tempo"}


# --- reading the compose files -------------------------------------------------------------


@dataclass(frozen=True)
class Tagged:
    """A value carrying one of Compose's merge tags (!reset, !override)."""

    tag: str
    value: Any


class _ComposeLoader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(node.tag, value)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _construct_tagged)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_ComposeLoader)  # noqa: S506


def untag(value: Any) -> Any:
    if isinstance(value, Tagged):
        return untag(value.value)
    if isinstance(value, dict):
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return load_compose(BASE)


def services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return doc.get("services") or {}


def long_running(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that stay up (a one-shot has restart "no")."""
    return {n: s for n, s in services(doc).items() if str(s.get("restart", "no")) != "no"}


def command_list(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def flag_values(command: list[str], flag: str) -> list[str]:
    """Values of ``flag`` given as ``flag=value`` or ``flag value``."""
    values = []
    for i, arg in enumerate(command):
        if arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1 :])
        elif arg == flag and i + 1 < len(command):
            values.append(command[i + 1])
    return values


@dataclass(frozen=True)
class Mount:
    kind: str  # "bind" or "volume"
    source: str  # a host path (bind) or a volume name
    target: str
    read_only: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    result = []
    for entry in untag(service.get("volumes") or []):
        if isinstance(entry, str):
            parts = entry.split(":")
            source, target = parts[0], parts[1]
            options = parts[2].split(",") if len(parts) > 2 else []
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            result.append(Mount(kind, source, target, "ro" in options))
        else:
            result.append(
                Mount(
                    entry["type"],
                    entry.get("source", ""),
                    entry["target"],
                    bool(entry.get("read_only")),
                )
            )
    return result


def host_path(source: str) -> Path:
    return (
        Path(os.path.normpath(COMPOSE_DIR / source)) if not source.startswith("/") else Path(source)
    )


def binds(service: dict[str, Any]) -> list[tuple[Path, str]]:
    return [(host_path(m.source), m.target) for m in mounts(service) if m.kind == "bind"]


def to_host(service: dict[str, Any], container_path: str) -> Path:
    """The host path behind ``container_path`` (through the service's bind mounts)."""
    for source, target in binds(service):
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target.rstrip("/")) + 1 :]
    raise AssertionError(f"{container_path} is not under any bind mount of the service")


def container_view(service: dict[str, Any], root: Path) -> None:
    """Copy the service's bind mounts into ``root`` at their container paths."""
    for source, target in binds(service):
        if str(source) in SYSTEM_PATHS:
            continue
        destination = root / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination)
        else:
            shutil.copy2(source, destination)


def config_file_of(service: dict[str, Any]) -> Path:
    """The host file behind the service's -config.file / --config.file flag."""
    command = command_list(service)
    values = flag_values(command, "--config.file") + flag_values(command, "-config.file")
    assert len(values) == 1, f"expected one config file flag in {command}"
    return to_host(service, values[0])


# --- (a) the Compose specification ---------------------------------------------------------


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


CHECK_JSONSCHEMA = _tool("check-jsonschema")
needs_check_jsonschema = pytest.mark.skipif(
    CHECK_JSONSCHEMA is None,
    reason="check-jsonschema is not installed (pip install check-jsonschema; it is in the "
    "test extra)",
)


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _schema_input(path: Path, tmp_path: Path) -> Path:
    """The file as the schema should see it. check-jsonschema's YAML parser rejects Compose's
    merge tags (!reset, !override), which the CLI applies before validating; a file that uses
    them is validated with each tagged value in place of the tag (the CLI test below checks
    what the tags do)."""
    text = path.read_text(encoding="utf-8")
    if "!reset" not in text and "!override" not in text:
        return path
    plain = tmp_path / (path.stem + ".untagged.json")
    plain.write_text(json.dumps(untag(load_compose(path)), indent=1), encoding="utf-8")
    return plain


@needs_check_jsonschema
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path, tmp_path: Path):
    result = _validate(_schema_input(path, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_check_jsonschema
def test_the_schema_check_rejects_a_broken_file(tmp_path: Path):
    """The validator is not vacuous: a misspelt key and a wrong type are refused."""
    doc = untag(load_compose(BASE))
    doc["services"]["inference"]["restrat"] = "always"
    doc["services"]["prometheus"]["healthcheck"]["retries"] = "many"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc), encoding="utf-8")
    result = _validate(broken)
    assert result.returncode != 0
    assert "restrat" in result.stdout + result.stderr


def _compose_cli() -> list[str] | None:
    """A Docker Compose v2 CLI: the docker plugin or a docker-compose on PATH that is v2 (2.24+,
    for `!reset`). None when there is none."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append([shutil.which("docker-compose")])
    for cli in candidates:
        try:
            version = subprocess.run(
                cli + ["version", "--short"], capture_output=True, text=True, timeout=30
            )
        except OSError:
            continue
        match = re.match(r"v?(\d+)\.(\d+)", version.stdout.strip())
        if version.returncode == 0 and match and (int(match[1]), int(match[2])) >= (2, 24):
            return cli
    return None


COMPOSE_CLI = _compose_cli()
needs_compose_cli = pytest.mark.skipif(
    COMPOSE_CLI is None, reason="no Docker Compose v2.24+ CLI (the docker compose plugin)"
)


def _render(tmp_path: Path, files: list[Path], password: str | None) -> subprocess.CompletedProcess:
    empty_env_file = tmp_path / "empty.env"  # so that a developer's compose/.env is not read
    empty_env_file.write_text("", encoding="utf-8")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("COMPOSE_")
        and k
        not in ("GRAFANA_ADMIN_PASSWORD", "VIGIL_MODEL", "VLLM_MODEL", "SGLANG_MODEL", "HF_TOKEN")
    }
    if password is not None:
        env["GRAFANA_ADMIN_PASSWORD"] = password
    args = list(COMPOSE_CLI)
    for f in files:
        args += ["-f", str(f)]
    args += ["--env-file", str(empty_env_file), "config", "--format", "json"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def _rendered(tmp_path: Path, files: list[Path]) -> dict[str, Any]:
    result = _render(tmp_path, files, password="test-password")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


@needs_compose_cli
def test_compose_reserves_the_gpu_by_default_and_the_cpu_override_removes_it(tmp_path: Path):
    gpu = _rendered(tmp_path, [BASE])
    for name in ("inference", "exporter"):
        devices = _gpu_devices(gpu["services"][name])
        assert devices, f"{name} reserves no GPU"
        assert all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert [d.get("count") for d in _gpu_devices(gpu["services"]["inference"])] == [1]
    assert (
        gpu["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "test-password"
    )
    assert gpu["services"]["inference"]["command"][1:3] == ["--model", "demo"]

    cpu = _rendered(tmp_path, [BASE, CPU])
    for name in ("inference", "exporter"):
        assert not _gpu_devices(cpu["services"][name]), f"{name} still reserves a GPU"
    assert cpu["services"]["inference"]["image"] != gpu["services"]["inference"]["image"], (
        "the CPU build would overwrite the GPU image's tag"
    )
    # The exporter's image has no torch: one build serves both.
    assert cpu["services"]["exporter"]["image"] == gpu["services"]["exporter"]["image"]
    # Everything but the GPU is the same stack.
    assert set(cpu["services"]) == set(gpu["services"])
    assert cpu["services"]["inference"]["command"] == gpu["services"]["inference"]["command"]


@needs_compose_cli
def test_compose_refuses_to_start_without_a_grafana_password(tmp_path: Path):
    result = _render(tmp_path, [BASE], password=None)
    assert not result.stdout.strip()
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


# --- (b) host paths ------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_mounted_or_built_host_path_exists(path: Path):
    doc = load_compose(path)
    missing = []
    for name, service in services(doc).items():
        for mount in mounts(service):
            if mount.kind != "bind":
                continue
            source = host_path(mount.source)
            if str(source) in SYSTEM_PATHS:
                continue
            assert REPO in source.parents or source == REPO, (
                f"{name} mounts {source}, outside the repository"
            )
            if not source.exists():
                missing.append(f"{name}: {mount.source} ({source})")
        build = untag(service.get("build"))
        if isinstance(build, dict) and "context" in build:
            context = host_path(build["context"])
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            for p in (context, dockerfile):
                if not p.exists():
                    missing.append(f"{name}: build {p}")
    assert not missing, "missing host paths:\n" + "\n".join(missing)


# --- (c) promtool and amtool on what the containers see ------------------------------------

PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")


def _check_config_sees_every_rule_file(config_path: Path, where: str) -> None:
    """The Prometheus configuration, as the container sees it, reaches every alerts/*.rules.yml
    and promtool accepts it with all of them."""
    rule_files = yaml.safe_load(config_path.read_text(encoding="utf-8"))["rule_files"]
    expected = {p.name for p in ALERTS.glob("*.rules.yml")}
    assert expected, "alerts/ holds no rules file"
    assert _globbed(config_path.parent, rule_files) == expected, (
        f"the container does not see every alerts/*.rules.yml{where}"
    )
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(config_path)], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(expected)} rule files found" in output, output


def _globbed(config_dir: Path, patterns: list[str]) -> set[str]:
    names = set()
    for pattern in patterns:
        names |= {Path(p).name for p in glob.glob(str(config_dir / pattern))}
    return names


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)
def test_promtool_accepts_the_prometheus_config_compose_mounts(base, tmp_path: Path):
    prometheus = base["services"]["prometheus"]
    (config,) = flag_values(command_list(prometheus), "--config.file")
    container_view(prometheus, tmp_path)
    config_path = tmp_path / config.lstrip("/")
    assert config_path.is_file(), f"{config} is not mounted"
    assert config_file_of(prometheus).samefile(ALERTS / "prometheus.yml"), (
        "Prometheus must load alerts/prometheus.yml itself (one copy for both stacks)"
    )

    _check_config_sees_every_rule_file(config_path, "")


@pytest.mark.skipif(
    AMTOOL is None, reason="amtool is not installed (Debian package prometheus-alertmanager)"
)
def test_amtool_accepts_the_alertmanager_config_compose_mounts(base, tmp_path: Path):
    alertmanager = base["services"]["alertmanager"]
    (config,) = flag_values(command_list(alertmanager), "--config.file")
    container_view(alertmanager, tmp_path)
    config_path = tmp_path / config.lstrip("/")
    assert config_path.is_file(), f"{config} is not mounted"
    assert config_file_of(alertmanager).samefile(ALERTS / "alertmanager.yml")

    templates = yaml.safe_load(config_path.read_text(encoding="utf-8")).get("templates") or []
    expected = {p.name for p in (ALERTS / "templates").glob("*.tmpl")}
    assert _globbed(config_path.parent, templates) == expected, (
        "the container does not see every alerts/templates/*.tmpl"
    )

    result = subprocess.run(
        [AMTOOL, "check-config", str(config_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- (d) pinned images ---------------------------------------------------------------------

_VERSION_TAG = re.compile(r"^v?\d+\.\d+\.\d+([.-][0-9A-Za-z.-]+)?$")


def _split_image(image: str) -> tuple[str, str | None]:
    image = image.split("@", 1)[0]
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag ("registry:5000/name" has a colon but no tag)
        return image, None
    return name, tag


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_image_is_pinned(path: Path):
    for name, service in services(load_compose(path)).items():
        image = service.get("image")
        if image is None:  # an override's service keeps the base file's image
            overrides_base = path != BASE and name in services(load_compose(BASE))
            assert service.get("build") or overrides_base, f"{name} has neither image nor build"
            continue
        _, tag = _split_image(str(image))
        assert tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image} is not pinned"
        assert "${" not in str(image), f"{name}: {image} depends on the environment"
        if not service.get("build"):  # pulled: an exact release, not a moving major/minor tag
            assert _VERSION_TAG.match(tag), f"{name}: {image} is not an exact version"


# --- (d2) the images: one per process ------------------------------------------------------

DOCKERFILES = {
    "exporter": COMPOSE_DIR / "exporter.Dockerfile",
    "inference": COMPOSE_DIR / "inference.Dockerfile",
}
# What the inference process needs on top of the light install (pyproject's [serve] extra);
# none of it may be a dependency of the light install the exporter's image gets.
SERVE_ONLY = {
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "starlette",
    "uvicorn",
    "pydantic",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
}
CONSOLE_SCRIPTS = {
    "vigil-inference",
    "vigil-exporter",
    "vigil-doctor",
    "vigil-stack",
    "vigil-notifier",
}
# Services that run from another's image (and build it the same way): the notifier is part of
# the light install, which the exporter's image holds.
SHARED_IMAGES = {"notifier": "exporter"}
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Instruction:
    line: int  # where it starts (1-based)
    keyword: str  # upper case
    args: str  # the rest, continuation lines joined

    def words(self) -> list[str]:
        return self.args.split()


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions as the Dockerfile frontend reads them: comments and parser directives
    dropped, lines ending in a backslash joined to the next (comment lines in between
    skipped). No heredocs: the Dockerfiles here have none, and a test below says so."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and (stripped.startswith("#") or not stripped):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def stages_of(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in parse_dockerfile(path.read_text(encoding="utf-8")):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.words() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages or instruction.keyword == "ARG", (
                f"{path.name}:{instruction.line}: {instruction.keyword} before FROM"
            )
            if stages:
                stages[-1].instructions.append(instruction)
    return stages


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.of("ENV"):
        for word in shlex.split(instruction.args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def _copies(stage: Stage) -> list[tuple[str | None, list[str], str]]:
    """(--from stage or None, sources, destination) of each COPY/ADD of a stage."""
    found = []
    for instruction in stage.of("COPY") + stage.of("ADD"):
        words = instruction.words()
        origin = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        paths = [w for w in words if not w.startswith("--")]
        found.append((origin, paths[:-1], paths[-1]))
    return found


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every `pip install` a stage runs (the words after `install`)."""
    found = []
    for instruction in stage.of("RUN"):
        for command in re.split(r"&&|;|\|\|", instruction.args):
            words = shlex.split(command)
            for i, word in enumerate(words[:-1]):
                if word.endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
    return found


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_names(requirements: list[str]) -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_each_process_builds_its_own_image(base):
    built = {name: s for name, s in services(base).items() if s.get("build")}
    assert set(built) == set(DOCKERFILES) | set(SHARED_IMAGES), f"services built: {sorted(built)}"
    for name, owner in SHARED_IMAGES.items():
        # The same build and tag: whichever `up` builds first, the other finds the image.
        assert built.pop(name)["build"] == built[owner]["build"]
        assert services(base)[name]["image"] == built[owner]["image"]
    for name, service in built.items():
        build = service["build"]
        dockerfile = host_path(build["context"]) / build["dockerfile"]
        assert dockerfile == DOCKERFILES[name], f"{name} builds {dockerfile}"
        assert host_path(build["context"]) == REPO
    assert built["inference"]["image"] != built["exporter"]["image"]
    assert not (COMPOSE_DIR / "Dockerfile").exists(), "compose/Dockerfile is no longer built"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_base_image_is_pinned_by_version_and_digest(name: str):
    stages = stages_of(DOCKERFILES[name])
    names = {s.name for s in stages if s.name}
    bases = {s.base for s in stages if s.base not in names}
    assert len(bases) == 1, (
        f"{name}: one base for every stage (the venv built in one runs in the other): {bases}"
    )
    (image,) = bases
    _, tag = _split_image(image)
    assert tag and _VERSION_TAG.match(tag.split("-", 1)[0]), (
        f"{name}: FROM {image} is not pinned to an exact version tag"
    )
    assert _DIGEST.search(image), f"{name}: FROM {image} has no sha256 digest"
    assert "$" not in image, f"{name}: FROM {image} depends on a build argument"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_venv_is_built_in_a_builder_stage_and_copied_alone(name: str):
    stages = stages_of(DOCKERFILES[name])
    assert len(stages) >= 2, f"{name}: not a multi-stage build"
    *builders, final = stages
    builder_names = {s.name for s in builders}
    (venv,) = {
        d
        for s in builders
        for i in s.of("RUN")
        for d in re.findall(r"python3? -m venv (\S+)", i.args)
    }
    assert any(_pip_installs(s) for s in builders), f"{name}: the builder installs nothing"
    for stage in builders:
        env = _env(stage)
        for args in _pip_installs(stage):
            assert env.get("PIP_NO_CACHE_DIR") == "1" or "--no-cache-dir" in args, (
                f"{name}: pip install {' '.join(args)} keeps its cache"
            )
    # The final stage: the venv from a builder, nothing built or installed, no build context.
    copies = _copies(final)
    assert len(copies) == 1 and copies[0][0] in builder_names and copies[0][1:] == ([venv], venv), (
        f"{name}: the final stage must copy the builder's venv and nothing else: {copies}"
    )
    for instruction in final.of("RUN"):
        assert not re.search(
            r"\bpip3? install|apt-get install|apk add|\bgcc\b|build-essential"
            r"|\bmake\b",
            instruction.args,
        ), f"{name}:{instruction.line}: the final stage builds or installs: {instruction.args}"
    assert _env(final)["PATH"].startswith(f"{venv}/bin:"), (
        f"{name}: the venv's bin is not first on PATH"
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_runs_as_an_unprivileged_user(name: str, base):
    final = stages_of(DOCKERFILES[name])[-1]
    users = final.of("USER")
    assert users, f"{name}: no USER: the image runs as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"{name}: runs as {user}"
    # The user is made in the image, with the uid both images share (the state volume).
    uids = {
        m
        for i in final.of("RUN")
        for m in re.findall(rf"useradd\b[^&;]*--uid (\d+)[^&;]*\b{re.escape(user)}\b", i.args)
    }
    assert uids == {"10001"}, f"{name}: user {user} not made with uid 10001: {uids}"
    assert str(base["services"][name].get("user", user)) not in ("root", "0", "0:0")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_has_a_health_check_where_it_runs(name: str, base):
    final = stages_of(DOCKERFILES[name])[-1]
    healthchecks = [i for i in final.of("HEALTHCHECK") if i.args.upper() != "NONE"]
    if healthchecks:
        return
    service = base["services"][name]
    test = (service.get("healthcheck") or {}).get("test")
    assert test, f"{name}: neither the Dockerfile nor compose has a health check"
    urls = re.findall(r"https?://([^/'\"\s]+)", " ".join(test))
    assert urls and set(urls) <= set(http_endpoints(service)), (
        f"{name}: the health check asks {urls}, the service listens on {http_endpoints(service)}"
    )


def test_the_exporter_image_gets_the_light_install(pyproject):
    """`pip install .` without extras in the exporter's image: no torch, transformers or
    OpenTelemetry (the light install); the inference image adds [serve]."""
    light = _requirement_names(pyproject["project"]["dependencies"])
    serve = _requirement_names(pyproject["project"]["optional-dependencies"]["serve"])
    assert not light & SERVE_ONLY, f"the light install requires {sorted(light & SERVE_ONLY)}"
    assert serve >= SERVE_ONLY, f"[serve] lacks {sorted(SERVE_ONLY - serve)}"
    assert "test" in pyproject["project"]["optional-dependencies"]

    def targets(name: str) -> list[str]:
        installs = [a for s in stages_of(DOCKERFILES[name]) for a in _pip_installs(s)]
        return [w for args in installs for w in args if not w.startswith("-")]

    exporter = targets("exporter")
    assert exporter in (["."], [".[dumps]"]), f"the exporter image installs {exporter}"
    dumps = _requirement_names(pyproject["project"]["optional-dependencies"]["dumps"])
    assert not dumps & SERVE_ONLY, f"the [dumps] extra requires {sorted(dumps & SERVE_ONLY)}"
    inference = targets("inference")
    assert ".[serve]" in inference, f"the inference image installs {inference}"


def test_console_scripts_start_each_process(pyproject, base):
    scripts = pyproject["project"]["scripts"]
    assert set(scripts) == CONSOLE_SCRIPTS
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        source = REPO / (module.replace(".", "/") + ".py")
        assert source.is_file(), f"{name}: no {source}"
        assert re.search(rf"^def {function}\(", source.read_text(encoding="utf-8"), re.MULTILINE), (
            f"{name}: {module} defines no {function}()"
        )
    # compose starts the processes with them (the images put the venv's bin on PATH).
    for service in DOCKERFILES:
        assert command_list(base["services"][service])[0] in scripts


@pytest.mark.parametrize("name", sorted(CONSOLE_SCRIPTS))
def test_console_scripts_take_no_arguments(name: str, pyproject):
    """A console script calls its function with no arguments: each must read sys.argv itself."""
    import ast

    module, _, function = pyproject["project"]["scripts"][name].partition(":")
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
    positional = node.args.posonlyargs + node.args.args
    required = positional[: len(positional) - len(node.args.defaults)] + [
        a for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True) if d is None
    ]
    assert not required, f"{name}: {function}() requires {[a.arg for a in required]}"


def _dockerignore_of(dockerfile: Path, context: Path) -> Path:
    """BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile, else the context's."""
    beside = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return beside if beside.exists() else context / ".dockerignore"


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as moby's patternmatcher compiles it (** any directories)."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(f"^{out}$")


def dockerignored(ignore_file: Path, path: str) -> bool:
    """Whether the build context leaves out ``path`` (relative to the context): moby's rule
    (the last pattern matching the path or its leading directories wins), applied to the path
    and to each of its parent directories, as the context walk does."""
    patterns = []
    for line in ignore_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        cleaned = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        patterns.append((negated, cleaned, _ignore_regex(cleaned)))

    def excluded(candidate: str) -> bool:
        parts = candidate.split("/")
        result = False
        for negated, cleaned, regex in patterns:
            depth = len(cleaned.split("/"))
            if regex.match(candidate) or (
                depth < len(parts) and regex.match("/".join(parts[:depth]))
            ):
                result = not negated
        return result

    parts = path.strip("/").split("/")
    return any(excluded("/".join(parts[:n])) for n in range(1, len(parts) + 1))


def test_the_ignore_rules_behave_as_docker_reads_them(tmp_path: Path):
    """The matcher above is not vacuous."""
    ignore = tmp_path / ".dockerignore"
    ignore.write_text("*\n!src/\n**/__pycache__\n!keep.txt\n", encoding="utf-8")
    assert dockerignored(ignore, ".venv/bin/python")
    assert dockerignored(ignore, "other.txt")
    assert not dockerignored(ignore, "src/a/b.py")
    assert dockerignored(ignore, "src/a/__pycache__/b.pyc")
    assert not dockerignored(ignore, "keep.txt")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_build_copies_every_package_and_leaves_the_rest_out(name: str, base, pyproject):
    """Every COPY source exists in the build context and passes the .dockerignore; every
    package that pyproject.toml installs is copied (else `pip install .` leaves it out); the
    virtual environments, .git, caches and build outputs never reach the context."""
    build = base["services"][name]["build"]
    context = host_path(build["context"])
    dockerfile = context / build["dockerfile"]
    ignore_file = _dockerignore_of(dockerfile, context)
    assert ignore_file.is_file(), (
        f"{name}: no .dockerignore: the whole tree (.venv, .git) would be sent"
    )
    assert "<<" not in dockerfile.read_text(encoding="utf-8"), "heredocs: parser needs them"
    copied = []
    for stage in stages_of(dockerfile):
        for origin, sources, _ in _copies(stage):
            if origin is not None:
                continue
            for source in sources:
                assert (context / source).exists(), f"COPY {source}: not in the build context"
                assert not dockerignored(
                    ignore_file,
                    source.rstrip("/") + "/x.py" if (context / source).is_dir() else source,
                ), f"COPY {source}: excluded by {ignore_file.name}"
                copied.append(source.rstrip("/"))
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"package {package} is not copied into the {name} image"
    readme = pyproject["project"].get("readme")
    if readme:
        assert readme in copied, f"{readme} (the project's readme) is not copied"
    for kept_out in (
        ".venv/bin/python",
        ".venv-light/bin/python",
        ".git/HEAD",
        ".cache/npm/x",
        ".pytest_cache/v/x",
        "inference/__pycache__/x.pyc",
        "exporter/gpu/__pycache__/x.pyc",
        "build/lib/x.py",
        "llm_vigil.egg-info/PKG-INFO",
        "compose/.env",
        "tests/conftest.py",
        "tools/metrics_reference.py",
    ):
        assert dockerignored(ignore_file, kept_out), f"{kept_out} is sent to the build"


# --- (e) read-only configuration, loopback only --------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_bind_mount_is_read_only(path: Path):
    for name, service in services(load_compose(path)).items():
        for mount in mounts(service):
            if mount.kind == "bind":
                assert mount.read_only, f"{name}: {mount.source} is mounted read-write"


def _host_of(address: str) -> str:
    address = address.split("://", 1)[-1].split("/", 1)[0]
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def _is_loopback(address: str) -> bool:
    host = _host_of(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _config_addresses(node: Any, path: str = "") -> list[tuple[str, str]]:
    """(key path, address) of every listen address and receiver endpoint in a config."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key).endswith("bind_addr") and isinstance(value, list):
                found += [(where, str(v)) for v in value]
            elif isinstance(value, (dict, list)):
                found += _config_addresses(value, where)
            elif str(key).endswith(("listen_address", "instance_addr", "bind_addr")) or (
                key == "endpoint" and ".receivers." in f".{where}"
            ):
                found.append((where, str(value)))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _config_addresses(item, f"{path}[{i}]")
    return found


def listen_addresses(service: dict[str, Any]) -> list[tuple[str, str]]:
    """Where a service listens, as its command, environment and config file say."""
    command = command_list(service)
    found = [
        (flag, value)
        for flag in ("--host", "--web.listen-address", "--server.http.listen-addr")
        for value in flag_values(command, flag)
    ]
    env = environment(service)
    if "GF_SERVER_HTTP_ADDR" in env:
        found.append(("GF_SERVER_HTTP_ADDR", env["GF_SERVER_HTTP_ADDR"]))
    if flag_values(command, "-config.file"):
        config = yaml.safe_load(config_file_of(service).read_text(encoding="utf-8"))
        server = config.get("server") or {}
        for key in ("http_listen_address", "grpc_listen_address"):
            assert server.get(key), f"{key} unset: the server would listen on every interface"
        assert (config.get("memberlist") or {}).get("bind_addr"), (
            "memberlist.bind_addr unset: gossip would listen on every interface"
        )
        found += _config_addresses(config)
    return found


def http_endpoints(service: dict[str, Any]) -> list[str]:
    """host:port of a service's HTTP server(s), as its command, environment or config says."""
    command = command_list(service)
    found = flag_values(command, "--web.listen-address") + flag_values(
        command, "--server.http.listen-addr"
    )
    for host, port in zip(
        flag_values(command, "--host"), flag_values(command, "--port"), strict=True
    ):
        found.append(f"{host}:{port}")
    env = environment(service)
    if "GF_SERVER_HTTP_ADDR" in env:
        found.append(f"{env['GF_SERVER_HTTP_ADDR']}:{env.get('GF_SERVER_HTTP_PORT', '3000')}")
    if flag_values(command, "-config.file"):
        server = yaml.safe_load(config_file_of(service).read_text("utf-8")).get("server") or {}
        found.append(f"{server['http_listen_address']}:{server['http_listen_port']}")
    return found


def test_every_service_listens_on_loopback_only(base):
    for name, service in services(base).items():
        assert "ports" not in service, f"{name} publishes ports; the stack uses host networking"
        assert service.get("network_mode") in ("host", "none"), (
            f"{name}: network_mode {service.get('network_mode')!r}"
        )
    for name, service in long_running(base).items():
        addresses = listen_addresses(service)
        assert addresses, f"{name}: no explicit listen address (it would listen on all)"
        wide = [f"{where}={address}" for where, address in addresses if not _is_loopback(address)]
        assert not wide, f"{name} listens beyond loopback: {wide}"
    # Alertmanager's HA gossip listens on 0.0.0.0:9094 unless it is given an address (or none).
    gossip = flag_values(command_list(base["services"]["alertmanager"]), "--cluster.listen-address")
    assert gossip and all(g == "" or _is_loopback(g) for g in gossip)


def test_prometheus_targets_are_where_the_services_listen(base):
    """alerts/prometheus.yml, shared with the stack without Docker, names loopback targets: on
    the host network they must be exactly where compose makes the services listen."""
    config = yaml.safe_load((ALERTS / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {
        job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    listen = {name: http_endpoints(s) for name, s in long_running(base).items()}
    assert jobs["vigil-exporter"] == listen["exporter"]
    assert jobs["prometheus"] == listen["prometheus"]
    assert jobs["alertmanager"] == listen["alertmanager"]
    alerting = [
        t
        for am in config["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for t in sc["targets"]
    ]
    assert alerting == listen["alertmanager"]
    # The exporter probes the inference API where it listens.
    assert flag_values(command_list(base["services"]["exporter"]), "--target") == [
        f"http://{a}" for a in listen["inference"]
    ]


def test_alertmanager_posts_to_the_notifier_where_it_listens(base, pyproject):
    """alerts/alertmanager.yml, shared with the stack without Docker, posts to 127.0.0.1:5001:
    on the host network that is the notifier's listener, and its paths are the notifier's."""
    from urllib.parse import urlsplit

    from notifier.server import WEBHOOKS

    notifier = base["services"]["notifier"]
    command = command_list(notifier)
    assert command[0] in pyproject["project"]["scripts"] and command[0] == "vigil-notifier"
    config = yaml.safe_load((ALERTS / "alertmanager.yml").read_text(encoding="utf-8"))
    urls = [h["url"] for r in config["receivers"] for h in r.get("webhook_configs", [])]
    assert {urlsplit(u).path for u in urls} == set(WEBHOOKS), urls
    assert {urlsplit(u).netloc for u in urls} == set(http_endpoints(notifier)) == {"127.0.0.1:5001"}
    alertmanager = base["services"]["alertmanager"]
    assert alertmanager["depends_on"]["notifier"]["condition"] == "service_started"
    # The notifier's health check asks its own /health.
    assert re.findall(r"https?://[^'\"\s]+", " ".join(notifier["healthcheck"]["test"])) == [
        "http://127.0.0.1:5001/health"
    ]


def test_the_notifier_takes_its_relays_from_the_environment(base):
    """DingTalk and Feishu/Lark are optional (empty: printing only), come from compose/.env
    through variables the notifier knows, and their secrets never reach the command line."""
    from notifier.config import OPTIONS, load_config

    notifier = base["services"]["notifier"]
    env = environment(notifier)
    known = {o.env for o in OPTIONS}
    assert set(env) == {
        "VIGIL_NOTIFIER_DINGTALK_WEBHOOK",
        "VIGIL_NOTIFIER_DINGTALK_SECRET",
        "VIGIL_NOTIFIER_FEISHU_WEBHOOK",
        "VIGIL_NOTIFIER_FEISHU_SECRET",
    }
    assert set(env) <= known
    for name, value in env.items():
        assert value == f"${{{name}:-}}", f"{name}: {value} (optional, from compose/.env)"
    assert not any("secret" in arg or "webhook" in arg for arg in command_list(notifier))
    # Unset in compose/.env, compose passes them empty: the notifier starts, printing only.
    config = load_config(command_list(notifier)[1:], {name: "" for name in env})
    assert config.relays == () and (config.host, config.port) == ("127.0.0.1", 5001)


def test_prometheus_resends_to_alertmanager_as_the_stack_does(base):
    """An alert that fires before Prometheus has found Alertmanager is resent after
    --rules.alert.resend-delay (default 1m), which also sets how long Alertmanager keeps each
    alert firing without a resend (4 x the delay): the value vigil.stack passes and reasons
    out (RESEND_DELAY; tests/test_stack.py checks its arithmetic), so that the Watchdog reaches
    the notifier well within its --watchdog-timeout after a start. The engine overrides repeat
    the base's command (test_prometheus_loads_the_engine_config_beside_the_alerts)."""
    from notifier.config import NotifierConfig
    from vigil.stack import RESEND_DELAY

    (delay,) = flag_values(
        command_list(base["services"]["prometheus"]), "--rules.alert.resend-delay"
    )
    assert delay == RESEND_DELAY
    assert NotifierConfig().watchdog_timeout > 2 * int(delay.removesuffix("s"))


def test_the_exporter_shares_the_state_directory_and_the_pid_namespace(base):
    inference, exporter = base["services"]["inference"], base["services"]["exporter"]
    assert exporter.get("pid") == "host"
    (inference_dir,) = flag_values(command_list(inference), "--state-dir")
    (exporter_dir,) = flag_values(command_list(exporter), "--state-dir")
    volume_at = {
        name: {m.target: m.source for m in mounts(s) if m.kind == "volume"}
        for name, s in (("inference", inference), ("exporter", exporter))
    }
    assert inference_dir in volume_at["inference"] and exporter_dir in volume_at["exporter"], (
        "the state directory must be a named volume in both containers"
    )
    assert volume_at["inference"][inference_dir] == volume_at["exporter"][exporter_dir]
    assert environment(inference)["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(
        _tempo_otlp_http_endpoint(base)
    )


def _tempo_otlp_http_endpoint(base) -> str:
    config = yaml.safe_load(config_file_of(base["services"]["tempo"]).read_text("utf-8"))
    return config["distributor"]["receivers"]["otlp"]["protocols"]["http"]["endpoint"]


# --- health checks, start order, restarts --------------------------------------------------


def test_services_have_health_checks_and_start_in_order(base):
    all_services = services(base)
    for name, service in long_running(base).items():
        test = (service.get("healthcheck") or {}).get("test")
        assert test, f"{name} has no healthcheck"
        # Exec form: the distroless images (Loki, Tempo) have no shell for CMD-SHELL.
        assert isinstance(test, list) and test[0] == "CMD", f"{name}: {test}"
        assert service.get("restart") in ("unless-stopped", "always"), name
    assert base["services"]["loki"]["healthcheck"]["test"][1:] == ["/usr/bin/loki", "-health"]
    assert base["services"]["tempo"]["healthcheck"]["test"][1:] == ["/tempo", "-health"]
    for name, service in all_services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            if spec.get("condition") == "service_healthy":
                assert all_services[dependency].get("healthcheck"), (
                    f"{name} waits for {dependency} to be healthy, which has no healthcheck"
                )
    grafana_waits = {
        d
        for d, spec in base["services"]["grafana"]["depends_on"].items()
        if spec["condition"] == "service_healthy"
    }
    assert {"prometheus", "loki", "tempo"} <= grafana_waits
    assert (
        base["services"]["prometheus"]["depends_on"]["alertmanager"]["condition"]
        == "service_healthy"
    )
    assert base["services"]["exporter"]["depends_on"]["inference"]["condition"] == "service_started"


# --- (f) Grafana ---------------------------------------------------------------------------


def _unescape(value: str) -> str:
    """Grafana expands $VAR in provisioning files; $$ is a literal $."""
    return value.replace("$$", "$")


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(DATASOURCES_DIR.glob("*.y*ml")):
        for source in yaml.safe_load(path.read_text(encoding="utf-8")).get("datasources", []):
            found[source["type"]] = source
    return found


def _log_line(trace_id: str) -> str:
    """A log line exactly as the inference process writes it."""
    from vigil.logs import format_record

    record = {
        "time": datetime(2026, 1, 1, tzinfo=UTC),
        "level": SimpleNamespace(name="INFO"),
        "message": "request finished",
        "name": "inference.api",
        "exception": None,
        "extra": {
            "request_id": "chatcmpl-0123",
            "trace_id": trace_id,
            "span_id": "00f067aa0ba902b7" if trace_id else "",
        },
    }
    return format_record(record)


def test_grafana_datasources_have_fixed_uids_and_point_at_the_services(base, datasources):
    assert {t: s.get("uid") for t, s in datasources.items()} == FIXED_UIDS
    grafana = base["services"]["grafana"]
    assert any(
        m.target.startswith("/etc/grafana/provisioning/datasources")
        and host_path(m.source).samefile(DATASOURCES_DIR)
        for m in mounts(grafana)
    ), "the data sources are not mounted into Grafana"
    listen = {name: http_endpoints(s) for name, s in long_running(base).items()}
    for kind in ("prometheus", "loki", "tempo"):
        url = datasources[kind]["url"]
        assert url.split("://", 1)[1].rstrip("/") in listen[kind], (
            f"the {kind} data source ({url}) is not where {kind} listens ({listen[kind]})"
        )


def test_loki_derived_field_links_the_trace_id_to_tempo(datasources):
    fields = datasources["loki"]["jsonData"]["derivedFields"]
    (field,) = [f for f in fields if f["name"] == "trace_id"]
    assert field["datasourceUid"] == FIXED_UIDS["tempo"]
    assert field.get("matcherType", "regex") == "regex"
    assert _unescape(field["url"]) == "${__value.raw}"
    matcher = re.compile(field["matcherRegex"])
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    match = matcher.search(_log_line(trace_id))
    assert match and match.group(1) == trace_id, _log_line(trace_id)
    assert matcher.search(_log_line("")) is None, "a line outside a request must not link"


def test_tempo_links_back_to_the_inference_logs(base, datasources):
    links = datasources["tempo"]["jsonData"]["tracesToLogsV2"]
    assert links["datasourceUid"] == FIXED_UIDS["loki"]
    if links.get("customQuery"):
        query = _unescape(links["query"])
        assert "${__trace.traceId}" in query
        selected = re.findall(r'service="([^"]+)"', query)
        assert selected and set(selected) <= set(services(base)), query


def test_grafana_loads_the_repository_dashboards(base):
    grafana = base["services"]["grafana"]
    (dashboards_mount,) = [m for m in mounts(grafana) if host_path(m.source) == REPO / "dashboards"]
    assert dashboards_mount.read_only
    (providers_file,) = sorted(DASHBOARD_PROVIDERS_DIR.glob("*.y*ml"))
    providers = yaml.safe_load(providers_file.read_text(encoding="utf-8"))["providers"]
    assert [p["options"]["path"] for p in providers] == [dashboards_mount.target]
    # A dashboard that names a data source by uid (not through a ${variable}) names a
    # provisioned one.
    for path in sorted((REPO / "dashboards").glob("*.json")):
        used = {
            uid
            for uid in _datasource_uids(json.loads(path.read_text(encoding="utf-8")))
            if not uid.startswith("$")
        }
        unknown = used - set(FIXED_UIDS.values())
        assert not unknown, f"{path.name} refers to unprovisioned data sources {unknown}"


def _datasource_uids(node: Any) -> set[str]:
    uids = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict) and value.get("uid"):
                uids.add(str(value["uid"]))
            uids |= _datasource_uids(value)
    elif isinstance(node, list):
        for item in node:
            uids |= _datasource_uids(item)
    return uids


# --- (g) Alloy -----------------------------------------------------------------------------


def _alloy_code() -> str:
    text = ALLOY_CONFIG.read_text(encoding="utf-8")
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(
        line.split("//", 1)[0] if not re.search(r'"[^"]*//', line) else line
        for line in text.splitlines()
    )


def test_alloy_never_labels_streams_with_request_identifiers():
    code = _alloy_code()
    for forbidden in ("trace_id", "request_id", "span_id"):
        assert forbidden not in code, f"config.alloy uses {forbidden} (outside comments)"
    assert not re.search(r'action\s*=\s*"labelmap"', code), (
        "labelmap would turn every container label into a stream label"
    )
    relabelled = set(re.findall(r'target_label\s*=\s*"([^"]+)"', code))
    staged = set()
    for block in re.findall(r"stage\.labels\s*\{\s*values\s*=\s*\{([^}]*)\}", code):
        staged |= set(re.findall(r'"?([A-Za-z_][A-Za-z0-9_]*)"?\s*=', block))
    assert relabelled == {"service"}, relabelled
    assert staged == {"level"}, staged
    assert not re.search(r"stage\.static_labels|stage\.label_keep|\blabels\s*=\s*\{[^}]", code), (
        "no other way of adding stream labels"
    )


def test_alloy_reads_this_project_and_parses_every_service_level(base):
    code = _alloy_code()
    assert f'"com.docker.compose.project={base["name"]}"' in code
    assert "__meta_docker_container_label_com_docker_compose_service" in code
    covered = set()
    for selector in re.findall(r'selector\s*=\s*`\{service=~"([^"]+)"\}`', code):
        covered |= set(selector.split("|"))
    assert covered <= set(services(base)), covered - set(services(base))
    assert set(long_running(base)) <= covered, (
        f"no level parsing for {set(long_running(base)) - covered}"
    )
    loki = yaml.safe_load(config_file_of(base["services"]["loki"]).read_text("utf-8"))
    push = re.search(r'url\s*=\s*"(http://[^"]+)/loki/api/v1/push"', code)
    assert (
        push
        and push.group(1)
        == f"http://{loki['server']['http_listen_address']}:{loki['server']['http_listen_port']}"
    )
    alloy = base["services"]["alloy"]
    (socket,) = [m for m in mounts(alloy) if m.source == "/var/run/docker.sock"]
    assert socket.read_only


# --- (h) vLLM and SGLang instead of our inference process -----------------------------------


def _volume_key(entry: Any) -> str:
    if isinstance(entry, str):
        parts = entry.split(":")
        return parts[1] if len(parts) > 1 else parts[0]
    return str(entry["target"])


def _port_key(entry: Any) -> Any:
    if isinstance(entry, (str, int)):
        return str(entry)
    return (entry.get("host_ip"), entry["target"], entry.get("published"), entry.get("protocol"))


# The unique resources of a service, by their unique key (the specification's merge page).
_UNIQUE_KEYS = {
    "volumes": _volume_key,
    "ports": _port_key,
    "secrets": lambda e: e if isinstance(e, str) else e.get("target", e["source"]),
    "configs": lambda e: e if isinstance(e, str) else e.get("target", e["source"]),
}


def merge_compose(base: Any, override: Any, path: tuple[str, ...] = ()) -> Any:
    """Two Compose files merged as the Compose specification says (reference/compose-file/
    merge): a mapping merges key by key; a sequence appends the override's items, except
    `command`, `entrypoint` and `healthcheck.test`, which the override replaces, and the unique
    resources (volumes, ports, secrets, configs), where an item with the same unique key
    replaces the base's; `!reset` removes a key and `!override` replaces its value whole. Enough
    for the files here (no `extends`, `include`, or list-form environment in an override)."""
    if isinstance(override, Tagged):
        assert override.tag == "!override", f"{'.'.join(path)}: {override.tag} is handled above"
        return untag(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Tagged) and value.tag == "!reset":
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge_compose(merged[key], value, (*path, str(key)))
            else:
                merged[key] = untag(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        in_service = len(path) == 3 and path[0] == "services"
        if (in_service and path[-1] in ("command", "entrypoint")) or path[-2:] == (
            "healthcheck",
            "test",
        ):
            return untag(override)
        if in_service and path[-1] in _UNIQUE_KEYS:
            key_of = _UNIQUE_KEYS[path[-1]]
            merged_list = list(base)
            for item in untag(override):
                same = [i for i, old in enumerate(merged_list) if key_of(old) == key_of(item)]
                if same:
                    merged_list[same[0]] = item
                else:
                    merged_list.append(item)
            return merged_list
        return [*base, *untag(override)]
    return untag(override)


def merged_compose(*paths: Path) -> dict[str, Any]:
    doc = load_compose(paths[0])
    for path in paths[1:]:
        doc = merge_compose(doc, load_compose(path))
    return untag(doc)


def started(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services `up` starts with no profile enabled: those that have no profiles."""
    return {name: s for name, s in services(doc).items() if not s.get("profiles")}


def test_the_merge_follows_the_compose_specification():
    """The examples of the specification's merge page, and what the CPU override does."""

    def merge_text(base: str, override: str) -> dict[str, Any]:
        load = lambda text: yaml.load(text, Loader=_ComposeLoader)  # noqa: E731, S506
        return untag(merge_compose(load(base), load(override)))

    assert merge_text(
        "services: {foo: {key1: value1, key2: value2}}",
        "services: {foo: {key2: VALUE, key3: value3}}",
    ) == {"services": {"foo": {"key1": "value1", "key2": "VALUE", "key3": "value3"}}}
    assert merge_text("services: {foo: {DNS: [1.1.1.1]}}", "services: {foo: {DNS: [8.8.8.8]}}") == {
        "services": {"foo": {"DNS": ["1.1.1.1", "8.8.8.8"]}}
    }
    assert merge_text(
        "services: {foo: {command: [echo, foo], healthcheck: {test: [CMD, a], retries: 2}}}",
        "services: {foo: {command: [echo, bar], healthcheck: {test: [CMD, b]}}}",
    ) == {
        "services": {
            "foo": {"command": ["echo", "bar"], "healthcheck": {"test": ["CMD", "b"], "retries": 2}}
        }
    }
    assert merge_text(
        "services: {foo: {volumes: ['./a:/data:ro', 'v:/cache']}}",
        "services: {foo: {volumes: ['./b:/data:ro', './c:/etc/c:ro']}}",
    ) == {"services": {"foo": {"volumes": ["./b:/data:ro", "v:/cache", "./c:/etc/c:ro"]}}}
    assert merge_text(
        "services: {foo: {deploy: {x: 1}, depends_on: {a: {condition: c}}, ports: ['1:1']}}",
        "services: {foo: {deploy: !reset {}, depends_on: !override {b: {condition: d}}}}",
    ) == {"services": {"foo": {"depends_on": {"b": {"condition": "d"}}, "ports": ["1:1"]}}}

    cpu = merged_compose(BASE, CPU)
    for name in ("inference", "exporter"):
        assert "deploy" not in cpu["services"][name]
    assert cpu["services"]["inference"]["build"] == {
        **load_compose(BASE)["services"]["inference"]["build"],
        "args": {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"},
    }
    assert (
        cpu["services"]["exporter"]["command"]
        == load_compose(BASE)["services"]["exporter"]["command"]
    )


@pytest.fixture(scope="module", params=sorted(ENGINE_OVERRIDES))
def engine(request) -> SimpleNamespace:
    """One engine override, merged with the base file."""
    name = request.param
    path, port, variable = ENGINE_OVERRIDES[name]
    doc = merged_compose(BASE, path)
    return SimpleNamespace(
        name=name,
        path=path,
        port=port,
        variable=variable,
        url=f"http://127.0.0.1:{port}",
        doc=doc,
        service=doc["services"][name],
    )


@needs_check_jsonschema
def test_each_engine_override_merges_into_a_valid_compose_document(engine, tmp_path: Path):
    merged = tmp_path / f"{engine.name}.merged.json"
    merged.write_text(json.dumps(engine.doc, indent=1), encoding="utf-8")
    result = _validate(merged)
    assert result.returncode == 0, result.stdout + result.stderr


def test_our_inference_service_is_not_started_with_an_engine(engine, base):
    running = started(engine.doc)
    assert "inference" in services(engine.doc) and "inference" not in running, (
        "the override must leave our inference service out of `up`"
    )
    assert set(running) == (set(services(base)) - {"inference"}) | {engine.name}
    for name, service in running.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in running, (
                f"{name} depends on {dependency}, which `up` does not start: compose would "
                "refuse, or start it"
            )
    assert engine.doc["services"]["exporter"]["depends_on"] == {
        engine.name: {"condition": "service_started"}
    }


def test_the_engine_runs_from_a_pinned_image_on_the_gpu_with_the_hf_cache(engine):
    service = engine.service
    name, tag = _split_image(service["image"])
    assert name == {"vllm": "vllm/vllm-openai", "sglang": "lmsysorg/sglang"}[engine.name]
    assert tag and _VERSION_TAG.match(tag) and "$" not in service["image"], service["image"]
    assert not service.get("build")
    devices = _gpu_devices(service)
    assert [(d["driver"], d.get("count"), d["capabilities"]) for d in devices] == [
        ("nvidia", 1, ["gpu"])
    ]
    (cache,) = [m for m in mounts(service) if m.target == "/root/.cache/huggingface"]
    assert cache.kind == "volume" and cache.source in engine.doc["volumes"]
    assert environment(service)["HF_TOKEN"] == "${HF_TOKEN:-}"
    command = command_list(service)
    model_flag = {"vllm": "--model", "sglang": "--model-path"}[engine.name]
    assert flag_values(command, model_flag) == [f"${{{engine.variable}:-{ENGINE_DEFAULT_MODEL}}}"]
    if engine.name == "sglang":
        # SGLang serves /metrics only with it (docs/engines.md).
        assert "--enable-metrics" in command
        assert command_list({"command": service["entrypoint"]}) == [
            "python3",
            "-m",
            "sglang.launch_server",
        ]


def test_the_engine_listens_on_loopback_and_is_health_checked_on_health(engine):
    service = engine.service
    assert service.get("network_mode") == "host" and "ports" not in service
    assert http_endpoints(service) == [f"127.0.0.1:{engine.port}"]
    for name, other in started(engine.doc).items():
        if str(other.get("restart", "no")) == "no":
            continue
        addresses = listen_addresses(other)
        assert addresses, f"{name}: no explicit listen address (it would listen on all)"
        wide = [f"{where}={a}" for where, a in addresses if not _is_loopback(a)]
        assert not wide, f"{name} listens beyond loopback: {wide}"
        assert "ports" not in other and other.get("network_mode") == "host", name
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", test
    assert re.findall(r"https?://[^'\"\s]+", " ".join(test)) == [f"{engine.url}/health"]
    assert service.get("restart") == "unless-stopped"


def test_the_exporter_probes_the_engine(engine, base):
    from vigil.engines import parse_target

    exporter = engine.doc["services"]["exporter"]
    assert exporter.get("pid") == "host", "the exporter finds the engine's processes by port"
    (target,) = flag_values(command_list(exporter), "--target")
    parsed = parse_target(target)
    assert (parsed.engine, parsed.url) == (engine.name, engine.url)
    assert parsed.url == f"http://{http_endpoints(engine.service)[0]}"
    # Everything else as in the base file, with the engine's hang reports on, which (like finding
    # the engine's processes, another user's) need root with CAP_SYS_PTRACE.
    ours = command_list(base["services"]["exporter"])
    expected = [target if arg == ours[-1] else arg for arg in ours] + ["--hang-dumps"]
    assert command_list(exporter) == expected
    assert ours[-2] == "--target"
    assert exporter.get("user") == "0" and exporter.get("cap_add") == ["SYS_PTRACE"]


def test_prometheus_loads_the_engine_config_beside_the_alerts(engine, base):
    """compose/prometheus/<engine>.yml is alerts/prometheus.yml with the rule files reached from
    its mount and a scrape job for the engine: exactly what vigil.stack writes for --engine."""
    from vigil.stack import prometheus_config, render_prometheus_config

    prometheus = engine.doc["services"]["prometheus"]
    path = config_file_of(prometheus)
    assert path == COMPOSE_DIR / "prometheus" / f"{engine.name}.yml"
    ours = command_list(base["services"]["prometheus"])
    assert [a for a in command_list(prometheus) if not a.startswith("--config.file=")] == [
        a for a in ours if not a.startswith("--config.file=")
    ]
    assert all(m.read_only for m in mounts(prometheus) if m.kind == "bind")
    expected = prometheus_config(engine.name, engine.url, ["../alerts/*.rules.yml"])
    actual = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert actual == expected, (
        f"{path.relative_to(REPO)} differs from alerts/prometheus.yml plus the {engine.name} "
        "job; it should read:\n" + render_prometheus_config(expected, "")
    )
    (job,) = [j for j in actual["scrape_configs"] if j["job_name"] == engine.name]
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == http_endpoints(
        engine.service
    )


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)
def test_promtool_accepts_the_engine_config_as_the_container_sees_it(engine, tmp_path: Path):
    prometheus = engine.doc["services"]["prometheus"]
    (config,) = flag_values(command_list(prometheus), "--config.file")
    container_view(prometheus, tmp_path)
    config_path = tmp_path / config.lstrip("/")
    assert config_path.is_file(), f"{config} is not mounted"
    _check_config_sees_every_rule_file(config_path, " from the engine config")


@needs_compose_cli
def test_compose_renders_the_engine_overrides(engine, tmp_path: Path):
    rendered = _rendered(tmp_path, [BASE, engine.path])
    assert "inference" not in rendered["services"] or rendered["services"]["inference"].get(
        "profiles"
    )
    service = rendered["services"][engine.name]
    assert service["image"] == engine.service["image"]
    assert _gpu_devices(service)
    assert ENGINE_DEFAULT_MODEL in service["command"]
    exporter = rendered["services"]["exporter"]
    assert flag_values(exporter["command"], "--target") == [f"{engine.name}={engine.url}"]
    assert set(exporter["depends_on"]) == {engine.name}
    assert (
        f"--config.file=/etc/vigil/prometheus/{engine.name}.yml"
        in (rendered["services"]["prometheus"]["command"])
    )


# --- the fast path of hang alerts (issue 18) -------------------------------------------------


def _job_of(config: dict[str, Any], name: str) -> dict[str, Any]:
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == name]
    return job


def _names_of(step: dict[str, Any]) -> set[str]:
    """The metric names a keep/drop step on __name__ matches: its regex must be exactly an
    alternation of names (no pattern that would match more than it says)."""
    assert step["source_labels"] == ["__name__"], step
    names = step["regex"].split("|")
    assert all(re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name) for name in names), step
    return set(names)


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for amount, unit in re.findall(r"(\d+)(ms|s|m|h)", text):
        total += int(amount) * units[unit]
    assert re.fullmatch(r"((\d+)(ms|s|m|h))+", text), text
    return total


def _check_fast_pair(config: dict[str, Any], job_name: str, names: set[str], params: bool) -> None:
    """``job_name`` drops exactly ``names``; ``<job_name>-hang`` scrapes the same targets every
    2 s within the interval and stores exactly ``names`` under ``job_name``."""
    job, fast = _job_of(config, job_name), _job_of(config, f"{job_name}-hang")
    (drop,) = job["metric_relabel_configs"]
    assert drop["action"] == "drop" and _names_of(drop) == names
    assert fast["static_configs"] == job["static_configs"]
    assert fast.get("metrics_path") == job.get("metrics_path")
    assert _duration_s(fast["scrape_interval"]) == 2
    assert _duration_s(fast["scrape_timeout"]) < _duration_s(fast["scrape_interval"])
    keep, rename = fast["metric_relabel_configs"]
    assert rename == {"target_label": "job", "replacement": job_name}
    # Kept to the names after the scrape either way: a target that ignores name[] (an older
    # exporter image during a rolling upgrade) must not have every series stored twice.
    assert keep["action"] == "keep" and _names_of(keep) == names
    if params:  # the target filters (name[]) too
        assert set(fast["params"]["name[]"]) == names
    else:  # the whole /metrics
        assert "params" not in fast


def test_the_exporter_hang_job_scrapes_exactly_the_series_the_hang_rules_read():
    """alerts/prometheus.yml: vigil-exporter-hang asks the exporter for HANG_SERIES
    ["vigil-exporter"] every 2 s, vigil-exporter drops them (each stored once). Read from
    alerts.rules at test time: a rule that reads another series fails this until the config
    names it."""
    from alerts.rules import HANG_SERIES

    config = yaml.safe_load((ALERTS / "prometheus.yml").read_text(encoding="utf-8"))
    _check_fast_pair(config, "vigil-exporter", set(HANG_SERIES["vigil-exporter"]), params=True)
    assert _duration_s(config["global"]["scrape_interval"]) == 10, "other jobs keep 10 s"


def test_the_engine_hang_jobs_keep_exactly_the_series_the_hang_rules_read(engine):
    """compose/prometheus/<engine>.yml: <engine>-hang scrapes the engine's whole /metrics every
    2 s (vLLM's and SGLang's /metrics do not filter by name[]) and keeps HANG_SERIES[engine];
    <engine> drops them."""
    from alerts.rules import HANG_SERIES

    config = yaml.safe_load((COMPOSE_DIR / "prometheus" / f"{engine.name}.yml").read_text())
    _check_fast_pair(config, engine.name, set(HANG_SERIES[engine.name]), params=False)


def _relabelled(name: str, job_config: dict[str, Any], honours_params: bool = True) -> str | None:
    """The job a sample of metric ``name`` scraped by a job is stored under after its
    metric_relabel_configs (keep, drop, a fixed job), None when not served (a name[] that does
    not name it: the exporter serves only those) or dropped. ``honours_params=False``: the
    target serves its whole exposition whatever the query (an exporter older than name[])."""
    if honours_params and name not in job_config.get("params", {}).get("name[]", [name]):
        return None
    job = "scraped"
    for step in job_config.get("metric_relabel_configs", []):
        action = step.get("action", "replace")
        if action in ("keep", "drop"):
            matched = re.fullmatch(step["regex"], name) is not None
            if matched != (action == "keep"):
                return None
        elif action == "replace" and step.get("target_label") == "job":
            job = step["replacement"]
        else:
            raise AssertionError(f"step {step} not simulated")
    return job


@pytest.mark.parametrize("honours_params", [True, False], ids=["name-filter", "full-exposition"])
@pytest.mark.parametrize(
    "config_path",
    [
        "alerts/prometheus.yml",
        "compose/prometheus/remote-write.yml",
        *(f"compose/prometheus/{e}.yml" for e in ENGINE_OVERRIDES),
    ],
)
def test_every_series_is_stored_once_under_its_own_job(config_path, honours_params):
    """Replaying the metric relabelings on every series the hang rules read and on others: each
    is stored by exactly one of the two jobs, always under the job's own name; also when the
    target serves its full exposition to the fast job (an exporter that ignores name[], as an
    older image would during a rolling upgrade): the fast job still stores only the hang
    names."""
    from alerts.rules import HANG_SERIES
    from tools.metrics_reference import all_metric_names

    config = yaml.safe_load((REPO / config_path).read_text(encoding="utf-8"))
    for job_name, names in HANG_SERIES.items():
        jobs = [
            j for j in config["scrape_configs"] if j["job_name"] in (job_name, f"{job_name}-hang")
        ]
        if not jobs:
            continue
        others = [f"{name}_other" for name in names] + ["up_like", "vigil_gpu_up", "x" + names[0]]
        # And every series our processes publish (the exporter's whole exposition).
        others += sorted(all_metric_names() - set(names))
        for name in [*names, *others]:
            stored = [(job["job_name"], _relabelled(name, job, honours_params)) for job in jobs]
            kept = [(scraper, as_job) for scraper, as_job in stored if as_job is not None]
            # A job whose sample is not relabelled keeps its own name ("scraped" here).
            kept = [(s, job_name if j == "scraped" else j) for s, j in kept]
            expected = f"{job_name}-hang" if name in names else job_name
            assert kept == [(expected, job_name)], (config_path, name, stored)


def _route_of(config_file: Path, labels: list[str]) -> list[str]:
    """The matchers of the routes an alert with ``labels`` takes (amtool config routes test
    --tree), one string per route, e.g. '{cause="hang",severity="critical"}'."""
    result = subprocess.run(
        ["amtool", "config", "routes", "test", f"--config.file={config_file}", "--tree", *labels],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"[├└]── (\{.*\})", result.stdout)


def _route_with(config: dict[str, Any], matchers: str) -> list[dict[str, Any]]:
    """The first-level routes whose matchers amtool prints as ``matchers``."""
    found = []
    for route in config["route"]["routes"]:
        printed = "{" + ",".join(m.replace(" ", "") for m in route.get("matchers", [])) + "}"
        if printed == matchers:
            found.append(route)
    return found


HANG = ["alertname=InferenceEngineStalled", "cause=hang", "severity=critical", "instance=a:1"]


@pytest.mark.skipif(
    AMTOOL is None, reason="amtool is not installed (Debian package prometheus-alertmanager)"
)
@pytest.mark.parametrize("file_name", ["alertmanager.yml", "alertmanager.examples.yml"])
def test_hang_alerts_are_sent_within_a_second_or_two(file_name):
    """A critical hang alert takes a route of its own: group_wait at most 2s, a group_interval
    that sends a second hang of its group within 10 s, repeat_interval a multiple of it. Other
    alerts keep their routes: a critical node alert its 30 s, the Watchdog the dead man's
    switch, other critical alerts 5 s, a warning of cause hang the warning route."""
    path = ALERTS / file_name
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    routes = _route_of(path, HANG)
    assert routes and set(routes) == {'{cause="hang",severity="critical"}'}, routes
    for route in _route_with(config, routes[0]):
        assert _duration_s(route["group_wait"]) <= 2
        assert _duration_s(route["group_interval"]) <= 10
        assert _duration_s(route["repeat_interval"]) % _duration_s(route["group_interval"]) == 0
    # The others, as before.
    watchdog = _route_of(path, ["alertname=Watchdog", "cause=watchdog", "severity=none"])
    assert watchdog == ['{alertname="Watchdog",cause="watchdog"}']
    assert '{cause="hang",severity="critical"}' not in _route_of(
        path, ["alertname=InferenceTargetDown", "cause=down", "severity=critical"]
    )
    assert '{cause="hang",severity="critical"}' not in _route_of(
        path, ["alertname=InferenceProcessInDriverWait", "cause=hang", "severity=warning"]
    )
    if file_name == "alertmanager.yml":
        node = _route_of(path, ["alertname=NodeGpusFaulty", "cause=node", "severity=critical"])
        assert node == ['{cause=~"node|gpu|gpu_lost|throttle|exporter"}', '{severity="critical"}']
        (parent,) = _route_with(config, node[0])
        assert parent["routes"][0]["group_wait"] == "30s"
        other = _route_of(
            path, ["alertname=InferenceTargetDown", "cause=down", "severity=critical"]
        )
        assert other == ['{severity="critical"}']
        (route,) = _route_with(config, other[0])
        assert route["group_wait"] == "5s"
