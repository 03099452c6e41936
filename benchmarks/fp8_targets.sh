#!/usr/bin/env bash
# Issue 17's fp8 targets beside bf16 on one warm machine (after gpu_session.sh's set-up):
# time to first token at 2,048 and 8,192 tokens, and offline throughput (512 requests), for
# bf16 and for fp8 weights with an fp8 KV cache; one load each. ~4-5 min on an H100.
#   bash benchmarks/fp8_targets.sh   (OUT: where the JSON goes)
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
HEARTH=(python -c "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))")  # (timeout runs no function)
for q in ${FP8_TARGET_QUANTS:-bf16 fp8}; do
  kv=""; tag=$q; [ "$q" = fp8 ] && kv="--kv-cache-dtype fp8" && tag=fp8-fp8kv
  timeout ${FP8_TARGET_TIMEOUT:-200} "${HEARTH[@]}" bench --shape llama-8b --suite prefill,throughput --prefill-lens 2048,8192 \
    --max-model-len 8448 --quant $q $kv --json "$OUT/fp8-targets-8b-$tag.json" 2>&1 | grep -E "^prefill|^throughput|rror" \
    || echo "fp8_targets: the $q run failed or timed out (exit $?)"
done
