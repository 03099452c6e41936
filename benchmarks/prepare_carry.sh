#!/usr/bin/env bash
# Build .carry/ for a device call (git-ignored; pass carry=[".carry"] to the device tool):
#   .carry/tok  the SmolLM2 tokenizer files (the GPU box has no GGUF reader)
#   .carry/whl  wheels the GPU box's image lacks, for its Python 3.12 / manylinux x86_64, at
#               this venv's versions: platformdirs; the server's fastapi, starlette,
#               uvicorn, pydantic (+ core, annotated-types, typing-inspection), fastapi's
#               annotated-doc and opentelemetry-api; llguidance; jsonschema (+ its
#               specifications, referencing, rpds-py, attrs) for the structured-output tests.
#               (anyio, click, h11, httpx, prometheus-client, psutil are already there.)
# Then on the device: OUT=$OUT bash benchmarks/gpu_session.sh <what>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
src="${HOME}/.cache/hearth/models/default-SmolLM2-135M-Instruct"
[ -d "$src" ] || "$PY" -c "from engine.api import check_model; check_model('default')" >/dev/null
mkdir -p .carry/tok .carry/whl
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json config.json generation_config.json; do
  [ -f "$src/$f" ] && cp "$src/$f" .carry/tok/
done
pkgs=()
for name in platformdirs fastapi annotated-doc opentelemetry-api starlette uvicorn pydantic pydantic-core annotated-types typing-inspection llguidance jsonschema jsonschema-specifications referencing rpds-py attrs; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
  pkgs+=("$name==$version")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 \
  -d .carry/whl "${pkgs[@]}"
du -sh .carry
