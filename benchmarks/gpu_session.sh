#!/usr/bin/env bash
# One device call: the engine test suite on CUDA, then the first decode baseline.
# Prepare here (both folders are git-ignored via .git/info/exclude and travel with `carry`):
#   .carry/tok  the SmolLM2 tokenizer files (copy them from the converted default model in
#               ~/.cache/hearth/models/default-SmolLM2-135M-Instruct): the GPU box has no GGUF reader
#   .carry/whl  platformdirs and psutil wheels for Python 3.12 (pip download --no-deps ...)
# Then, on the device, from the repo root:  HEARTH_COMMIT=<sha> bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 HEARTH_TEST_DEVICE=cuda HEARTH_TEST_TOKENIZER_DIR=.carry/tok
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/models/test_parity.py tests/models/test_fallback.py tests/engine/test_engine_batching.py \
  tests/engine/test_sampler.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
python benchmarks/decode_baseline.py --shapes llama-1b,llama-8b --json "$OUT/decode_baseline.json" 2>&1 | tail -8
