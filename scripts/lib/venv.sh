# Sourced by scripts/*: the virtual environments the scripts run in.
#   .venv        the project with everything: `pip install -e .[serve,test]` (torch pinned first)
#   .venv-light  the light install, as `pip install llm-vigil` gives it (the exporter, the
#                doctor's host checks, the generators; no torch), plus the test tools
# Each is re-installed only when pyproject.toml changes (a stamp in it records the file's hash).
# VIGIL_VENV and VIGIL_LIGHT_VENV put them elsewhere; PYTHON picks the interpreter.
VENV="${VIGIL_VENV:-.venv}"
LIGHT_VENV="${VIGIL_LIGHT_VENV:-.venv-light}"

_python() {
  local python="${PYTHON:-}"
  if [ -z "$python" ]; then
    for candidate in python3.11 python3; do
      if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
    done
  fi
  echo "$python"
}

# _stamp DIR: the file that says DIR was installed from this very pyproject.toml.
_stamp() {
  echo "$1/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
}

# _create_venv DIR: a venv in DIR unless there is one.
_create_venv() {
  [ -x "$1/bin/python" ] && return 0
  local python
  python="$(_python)"
  echo "creating $1 with $($python --version 2>&1)" >&2
  "$python" -m venv "$1"
}

ensure_venv() {
  local stamp
  stamp="$(_stamp "$VENV")"
  if [ ! -f "$stamp" ]; then
    # Measured from a fresh clone (scripts/stack until the inference process answered /ready,
    # demo model built included): 44 s and 60 s on two busy CPUs, the wheels in a local
    # --find-links directory. Downloading torch takes what the network takes.
    echo "first run: installing llm-vigil with the serve extra (torch" \
      "${TORCH_VERSION:-2.13.0}${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}, transformers," \
      "uvicorn, OpenTelemetry...) into $VENV: about a minute with the wheels at hand, several" \
      "minutes where pip downloads torch; later runs skip this until pyproject.toml changes" >&2
  fi
  _create_venv "$VENV"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # The CPU build of torch 2.13.0 lies on these machines' disk. Elsewhere PyPI's Linux build
    # is the CUDA one (several GB): TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes
    # the CPU build instead. On a GPU machine, install the CUDA torch you need first.
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION:-2.13.0}"
    fi
    "$VENV/bin/python" -m pip install --quiet -e ".[serve,test]"
    rm -f "$VENV"/.installed-* && touch "$stamp"
  fi
}

# The light install, not editable (the wheel pip builds, as users get it), made afresh whenever
# pyproject.toml changes, so that nothing an earlier version pulled in lingers. The tests run
# from the repository root and import the working tree's packages; what this venv decides is
# which third-party packages exist: the light dependencies and the test tools, never torch.
ensure_light_venv() {
  local stamp
  stamp="$(_stamp "$LIGHT_VENV")"
  if [ ! -f "$stamp" ]; then
    # Each step checked: callers may run this where `set -e` does not apply (in an `if`).
    rm -rf -- "${LIGHT_VENV:?}" \
      && _create_venv "$LIGHT_VENV" \
      && "$LIGHT_VENV/bin/python" -m pip install --quiet --upgrade pip \
      && "$LIGHT_VENV/bin/python" -m pip install --quiet ".[test]" \
      && touch "$stamp" || return 1
  fi
  local heavy
  for heavy in torch transformers opentelemetry; do
    if "$LIGHT_VENV/bin/python" -c "import $heavy" >/dev/null 2>&1; then
      echo "error: $heavy is importable in $LIGHT_VENV, the light install (which of its" \
        "requirements pulls it in? $LIGHT_VENV/bin/pip show $heavy)" >&2
      return 1
    fi
  done
}

# promtool and prometheus (Debian package prometheus), alertmanager and amtool (Debian package
# prometheus-alertmanager): the tests run the real programs, and so does scripts/stack;
# installed where apt-get can (as root). ensure_promtool [WHAT-IS-LOST]: the note said when they
# cannot be installed (default: their tests are skipped). Never fails: a failed apt-get (no
# network, say) is a note too.
ensure_promtool() {
  local lost="${1:-their tests will be skipped}" missing=()
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 \
    || missing+=(prometheus)
  command -v amtool >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1 \
    || missing+=(prometheus-alertmanager)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} with apt-get (Debian's packages: Prometheus and" \
      "Alertmanager for the alerts, about 30 MB to download)" >&2
    if apt-get update -qq && _install_without_starting "${missing[@]}"; then
      _disable_packaged_services "${missing[@]}"
    else
      echo "note: apt-get could not install ${missing[*]}; $lost" >&2
    fi
  else
    echo "note: ${missing[*]} missing and not installable here (apt-get as root installs" \
      "them); $lost" >&2
  fi
}

# Debian's packages start their services on installing (prometheus on :9090,
# prometheus-alertmanager on :9093, with Debian's own configuration): they would hold the ports
# the stack and the tests use. Their maintainer scripts start them through invoke-rc.d (no
# systemd) or deb-systemd-invoke (systemd), and both first ask /usr/sbin/policy-rc.d, whose exit
# status 101 means "action forbidden by policy" (init-system-helpers' README.policy-rc.d: "Most
# people using chroot jails just need an one-line script which returns an exit status of 101";
# Docker's Debian images ship one). Where there is none, one is written for the install and
# removed after it, however it ends; one that exists is the administrator's, left as it is.
_POLICY_RC_D=/usr/sbin/policy-rc.d
_SYSTEMD_RUNNING=/run/systemd/system  # exists while systemd is the init (sd_booted(3))

# _install_without_starting PACKAGE...: apt-get install, no service started by it.
_install_without_starting() {
  if [ -e "$_POLICY_RC_D" ] || [ -L "$_POLICY_RC_D" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    return
  fi
  (
    # Removed however apt-get ends; on a signal (Ctrl-C), the subshell then dies of it, so that
    # the script that sourced this stops too rather than carrying on without the packages.
    trap 'rm -f "$_POLICY_RC_D"' EXIT
    local signal
    for signal in INT TERM HUP; do
      # shellcheck disable=SC2064 # expanded now: one trap per signal
      trap "rm -f \"\$_POLICY_RC_D\"; trap - $signal; kill -$signal \$BASHPID" "$signal"
    done
    printf '#!/bin/sh\n# %s\n# %s\nexit 101\n' \
      "Written by llm-vigil's scripts/lib/venv.sh while apt-get installs $*:" \
      "no service of theirs starts. Removed when apt-get ends." >"$_POLICY_RC_D" \
      && chmod 755 "$_POLICY_RC_D" \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >/dev/null
  )
}

# Where systemd runs, the packages also enable their services for the next boot
# (deb-systemd-helper, which policy-rc.d does not stop): disabled (and stopped, should one run
# all the same), said, for the packages installed just now only.
_disable_packaged_services() {
  [ -d "$_SYSTEMD_RUNNING" ] && command -v systemctl >/dev/null 2>&1 || return 0
  local package
  for package in "$@"; do
    if systemctl is-enabled --quiet "$package" 2>/dev/null \
      || systemctl is-active --quiet "$package" 2>/dev/null; then
      systemctl disable --now --quiet "$package" 2>/dev/null \
        && echo "note: disabled $package.service, which installing the package enabled (it" \
          "would hold its port from the next boot on; systemctl enable --now $package brings" \
          "it back)" >&2
    fi
  done
  return 0
}

# The npm packages the tests use, pinned, installed into .cache/npm where node and npm are
# available (the tests that need them skip, saying so, where they are not):
#   @grafana/lezer-logql                    Grafana's LogQL grammar: the dashboards' LogQL
#   @kubernetes-models/prometheus-operator  the Prometheus Operator's Go API types (v0.91.0) as
#   typescript                              TypeScript, and the compiler that checks
#                                           kubernetes/prometheus-operator/ against them
# All in one `npm install`: a later `npm install --no-save` removes what an earlier one put there.
NPM_PACKAGES=(
  @grafana/lezer-logql@0.4.2
  @kubernetes-models/prometheus-operator@6.0.0
  typescript@5.9.3
)

# _npm_stale: true unless every package of NPM_PACKAGES is in .cache/npm at its pinned version.
_npm_stale() {
  local spec name
  for spec in "${NPM_PACKAGES[@]}"; do
    name="${spec%@*}"
    [ "$(node -p 'require(process.argv[1]).version' \
      "$PWD/.cache/npm/node_modules/$name/package.json" 2>/dev/null)" = "${spec##*@}" ] || return 0
  done
  return 1
}

ensure_npm_packages() {
  if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "note: node/npm missing; the dashboards' LogQL checks and the Prometheus Operator" \
      "resources' TypeScript checks will be skipped" >&2
    return 0
  fi
  _npm_stale || return 0
  mkdir -p .cache/npm
  npm install --silent --no-save --no-audit --no-fund --prefix .cache/npm "${NPM_PACKAGES[@]}" \
    >/dev/null 2>&1 \
    || echo "note: npm could not install ${NPM_PACKAGES[*]}; the checks that use them will be" \
      "skipped" >&2
}
