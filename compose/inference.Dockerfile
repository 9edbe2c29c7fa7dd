# syntax=docker/dockerfile:1
# The inference process's image: `pip install .[serve]` (torch, transformers, OpenTelemetry, ...).
# Built by compose with the repository root as context (the root .dockerignore sends only what
# pip needs):  docker compose -f compose/docker-compose.yml build inference
#
# TORCH_INDEX_URL empty (the default): torch comes from PyPI, whose Linux x86_64 wheels are the
# CUDA build, for the GPU variant. compose/docker-compose.cpu.yml sets it to PyTorch's CPU index,
# which gives a much smaller image for machines without a GPU.
#
# The base is pinned by tag and by the digest of its multi-architecture index; change both
# together (docker buildx imagetools inspect python:3.11.14-slim-bookworm shows the digest).

# --- builder: a venv with the project and its dependencies, built here and copied below ------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv

# torch first, on its own layer: by far the largest dependency, and the one that changes least.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        /opt/venv/bin/pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    else \
        /opt/venv/bin/pip install "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY inference ./inference
COPY exporter ./exporter
COPY vigil ./vigil
COPY alerts ./alerts
COPY dashboards ./dashboards
COPY notifier ./notifier
# Not editable: the venv holds its own copy, and /src stays behind in this stage.
RUN /opt/venv/bin/pip install ".[serve]"

# --- the image: the base and the venv, nothing of the build --------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIGIL_INFERENCE_STATE_DIR=/var/lib/vigil/state \
    XDG_CACHE_HOME=/var/lib/vigil/cache \
    HF_HOME=/var/lib/vigil/cache/huggingface

COPY --from=builder /opt/venv /opt/venv

# An unprivileged user. The state directory (shared with the exporter) and the model cache are
# named volumes mounted over these directories: Docker initialises an empty named volume from
# the image, so they start out owned by this user. The demo model is built under
# $XDG_CACHE_HOME/llm-vigil; hub checkpoints land in $HF_HOME.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/vigil --no-create-home vigil \
    && mkdir -p /var/lib/vigil/state /var/lib/vigil/cache \
    && chown -R vigil:vigil /var/lib/vigil
USER vigil
WORKDIR /var/lib/vigil

# Health: compose's healthcheck GETs /health where compose makes it listen.
CMD ["vigil-inference", "--help"]
