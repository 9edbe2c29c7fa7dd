# Sourced by scripts/*: make .venv with the project and its test tools installed.
# Re-installs only when pyproject.toml changes (a stamp in .venv records its hash).
ensure_venv() {
  local python="${PYTHON:-}"
  if [ -z "$python" ]; then
    for candidate in python3.11 python3; do
      if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
    done
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($python --version 2>&1)" >&2
    "$python" -m venv .venv
  fi
  local stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # The CPU build of torch 2.13.0 lies on these machines' disk; an unpinned torch would
    # download a multi-GB CUDA build. On a GPU machine, install the CUDA torch you need first.
    if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
      .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
    fi
    .venv/bin/python -m pip install --quiet -e ".[test]"
    rm -f .venv/.installed-* && touch "$stamp"
  fi
}

# promtool and prometheus (Debian package prometheus), alertmanager and amtool (Debian package
# prometheus-alertmanager): the tests run the real programs; installed where apt-get can.
ensure_promtool() {
  local missing=()
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 \
    || missing+=(prometheus)
  command -v amtool >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1 \
    || missing+=(prometheus-alertmanager)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  else
    echo "note: ${missing[*]} missing and not installable here; their tests will be skipped" >&2
  fi
}

# Grafana's LogQL grammar (npm @grafana/lezer-logql) checks the dashboards' LogQL; installed
# into .cache/npm where node and npm are available.
ensure_logql_parser() {
  [ -d .cache/npm/node_modules/@grafana/lezer-logql ] && return 0
  if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
    mkdir -p .cache/npm
    npm install --silent --no-save --no-audit --no-fund --prefix .cache/npm \
      @grafana/lezer-logql@0.4.2 >/dev/null 2>&1 \
      || echo "note: npm could not install @grafana/lezer-logql; LogQL checks will be skipped" >&2
  else
    echo "note: node/npm missing; the dashboards' LogQL checks will be skipped" >&2
  fi
}
