#!/usr/bin/env bash
# Screenshots of every page in a real window under Xvfb (see packaging/screenshots.py).
#   bash packaging/screenshots.sh [OUT_DIR] [--model M]
# Needs the .venv from `bash packaging/dev.sh` and, once, the X server and the two xcb
# libraries Qt's xcb plugin needs (installed here with apt-get when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-screenshots}; shift || true
if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-icccm.so.4; then
  apt-get install -y -q xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0
fi
[ -x .venv/bin/python ] || bash packaging/dev.sh test --co -q >/dev/null
QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python packaging/screenshots.py "$out" "$@"
