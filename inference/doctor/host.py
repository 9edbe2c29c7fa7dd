"""Checks of the host around the server: its port, its state directory, the OTLP endpoint its
traces go to, and the memory a process may use here (RAM, within the cgroup's limit: the limit a
container or a Slurm job sets)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from vigil.listen import bind_tcp
from vigil.netproc import listener_of

from .report import Verdict, failed, human_bytes, ok, skipped, warning

MIB = 1024 * 1024
LOW_DISK_BYTES = 256 * MIB


def port_verdict(host: str, port: int) -> Verdict:
    name = "port"
    try:
        bind_tcp(host, port).close()  # bound the way the server binds it
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            holder = listener_of(port, host)  # its whole command line
            who = f" by {holder}" if holder else ""
            return failed(
                name,
                f"{host}:{port} is in use{who}",
                "stop what holds it, or choose another port with --port",
                host=host,
                port=port,
                holder=holder,
            )
        if exc.errno == errno.EACCES:  # a port below 1024 without the privilege
            fix = "use a port from 1024 up with --port"
        else:
            fix = "use an address of this machine with --host (127.0.0.1 or 0.0.0.0)"
        return failed(
            name, f"cannot listen on {host}:{port}: {exc.strerror}", fix, host=host, port=port
        )
    return ok(name, f"{host}:{port} is free", host=host, port=port)


def state_dir_verdict(path: str) -> Verdict:
    name = "state-dir"
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-") as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return failed(
            name,
            f"{path} is not writable: {exc.strerror or exc}",
            "give a writable directory with --state-dir (the exporter must read the "
            "same one), or fix its owner and permissions",
            path=path,
        )
    free = shutil.disk_usage(directory).free
    if free < LOW_DISK_BYTES:
        return warning(
            name,
            f"{path} is writable but its filesystem has {human_bytes(free)} "
            "free: the metrics files may not fit",
            "free disk space or move --state-dir",
            path=path,
            free_bytes=free,
        )
    return ok(name, f"{path} is writable ({human_bytes(free)} free)", path=path, free_bytes=free)


def otlp_verdict(environ: dict[str, str] | None = None, timeout: float = 5.0) -> Verdict:
    """POST an empty export request: a receiver answers 2xx to it."""
    import requests

    from ..telemetry.otlp import otlp_endpoint

    name = "otlp"
    environ = dict(os.environ if environ is None else environ)
    endpoint = otlp_endpoint(environ)
    if endpoint is None:
        return skipped(
            name,
            "no OTLP endpoint configured (OTEL_EXPORTER_OTLP_ENDPOINT): traces "
            "stay in the process, log lines still carry trace ids",
        )
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol != "http/protobuf":
        return warning(
            name,
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}, but the server exports "
            "OTLP over HTTP (http/protobuf) only",
            "point the endpoint at the receiver's HTTP port (4318) and unset the protocol",
            endpoint=endpoint,
        )
    url = endpoint
    if not environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        url = endpoint.rstrip("/") + "/v1/traces"
    # The same headers and certificate as the exporter would use (authenticated receivers).
    headers = _otlp_headers(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        or environ.get("OTEL_EXPORTER_OTLP_HEADERS")
        or ""
    )
    headers["Content-Type"] = "application/x-protobuf"
    verify = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
        or environ.get("OTEL_EXPORTER_OTLP_CERTIFICATE")
        or True
    )
    try:
        answer = requests.post(url, data=b"", timeout=timeout, headers=headers, verify=verify)
    except requests.RequestException as exc:
        return warning(
            name,
            f"{url} does not answer ({type(exc).__name__}): traces will be dropped",
            "start the trace receiver (Tempo, an OpenTelemetry Collector) "
            "or fix OTEL_EXPORTER_OTLP_ENDPOINT",
            url=url,
        )
    if not 200 <= answer.status_code < 300:
        return warning(
            name,
            f"{url} answered HTTP {answer.status_code} to an empty export: traces will be refused",
            "check that the URL is the receiver's OTLP/HTTP traces path",
            url=url,
            status=answer.status_code,
        )
    return ok(
        name,
        f"{url} accepts OTLP/HTTP (HTTP {answer.status_code})",
        url=url,
        status=answer.status_code,
    )


def _otlp_headers(text: str) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS: comma-separated key=value pairs, URL-encoded."""
    from urllib.parse import unquote

    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {unquote(k).strip(): unquote(v).strip() for k, v in pairs}


# ---- memory -----------------------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    return values


def cgroup_room(
    proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")
) -> tuple[int, str] | None:
    """Bytes the cgroups of this process may still allocate (the least room along the path up
    to the root: a Slurm job's limit sits on a parent of the step's cgroup), and that limit's
    file; None when no limit applies. cgroup v2 (memory.max) or v1 (memory.limit_in_bytes),
    hybrid layouts too; inside a container the cgroup's directory is often the mount's root."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    rooms: list[tuple[int, str]] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            mounts, limit_name, usage_name = (
                (root, root / "unified"),
                "memory.max",
                "memory.current",
            )
        elif "memory" in controllers.split(","):
            mounts, limit_name, usage_name = (
                (root / "memory",),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        else:
            continue
        relative = Path(path.lstrip("/"))
        for mount in mounts:
            levels = [mount / relative, *(mount / p for p in relative.parents)]
            if not levels[0].is_dir():
                levels = [mount]  # a container: its own cgroup is the mount's root
            for level in levels:
                room = _room_in(level, limit_name, usage_name)
                if room is not None:
                    rooms.append(room)
    return min(rooms) if rooms else None


def _room_in(base: Path, limit_name: str, usage_name: str) -> tuple[int, str] | None:
    try:
        limit_text = (base / limit_name).read_text().strip()
        usage = int((base / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 1 << 60:
        return None
    # Inactive file pages are reclaimed before the limit bites (the kubelet's "working set").
    stat = _stat(base / "memory.stat")
    usage -= stat.get("inactive_file", stat.get("total_inactive_file", 0))
    return max(0, int(limit_text) - max(0, usage)), str(base / limit_name)


def _stat(path: Path) -> dict[str, int]:
    try:
        pairs = (line.split() for line in path.read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
    except OSError:
        return {}


def available_ram() -> tuple[int, str]:
    """Bytes of RAM a new allocation may take here, and where the figure comes from."""
    available = _meminfo().get("MemAvailable", 0)
    source = "MemAvailable"
    room = cgroup_room()
    if room is not None and room[0] < available:
        available, source = room[0], f"the cgroup limit ({room[1]})"
    return available, source
