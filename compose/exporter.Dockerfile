# syntax=docker/dockerfile:1
# The companion exporter's image: the light install (`pip install .`: prometheus-client,
# nvidia-ml-py, requests, loguru, ...; no torch, transformers or OpenTelemetry) with py-spy
# (the [dumps] extra) for its hang reports of foreign engines. Compose's notifier service
# (Alertmanager's webhook receiver, `vigil-notifier`, part of the light install) runs from it too.
# Built by compose with the repository root as context (the root .dockerignore sends only what
# pip needs):  docker compose -f compose/docker-compose.yml build exporter
#
# The base is pinned by tag and by the digest of its multi-architecture index; change both
# together (docker buildx imagetools inspect python:3.11.14-slim-bookworm shows the digest).

# --- builder: a venv with the project and its dependencies, built here and copied below ------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY inference ./inference
COPY exporter ./exporter
COPY vigil ./vigil
COPY alerts ./alerts
COPY dashboards ./dashboards
COPY notifier ./notifier
# Not editable: the venv holds its own copy, and /src stays behind in this stage.
RUN /opt/venv/bin/pip install ".[dumps]"

# --- the image: the base and the venv, nothing of the build --------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIGIL_EXPORTER_STATE_DIR=/var/lib/vigil/state

COPY --from=builder /opt/venv /opt/venv

# Unprivileged, and the same uid as the inference image's user, so that the state directory
# (a volume both mount) is theirs alike: the exporter removes the files of dead processes.
# Root is not needed: with `pid: host` it reads /proc/<pid>/stat and /proc/<pid>/status of the
# inference processes (world-readable), and NVML's readings, process list and XID events work
# for any user who can open /dev/nvidia*, which the NVIDIA runtime provides.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/vigil --no-create-home vigil \
    && mkdir -p /var/lib/vigil/state \
    && chown -R vigil:vigil /var/lib/vigil
USER vigil
WORKDIR /var/lib/vigil

# Health: compose's healthchecks GET /metrics (exporter) or /health (notifier) where compose
# makes them listen.
CMD ["vigil-exporter"]
