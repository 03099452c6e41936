#!/usr/bin/env bash
# One device call: the engine test suite on CUDA, then the first decode baseline.
# Run from the repo root on the lent GPU:  bash benchmarks/gpu_session.sh
# Needs .carry/tok (SmolLM2 tokenizer files: the GPU box has no GGUF reader).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 HEARTH_TEST_DEVICE=cuda HEARTH_TEST_TOKENIZER_DIR=.carry/tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/models/test_parity.py tests/models/test_fallback.py tests/engine/test_engine_batching.py \
  tests/engine/test_sampler.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
python benchmarks/decode_baseline.py --shapes llama-1b,llama-8b --json "$OUT/decode_baseline.json" 2>&1 | tail -8
