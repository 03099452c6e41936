#!/usr/bin/env bash
# One device call: GPU tests (kernels, fast path, bench) and `hearth bench` suites.
# Prepare here with `bash benchmarks/prepare_carry.sh` (git-ignored via .git/info/exclude;
# travels with `carry`):
#   .carry/tok  the SmolLM2 tokenizer files (copy them from the converted default model in
#               ~/.cache/hearth/models/default-SmolLM2-135M-Instruct): the GPU box has no GGUF reader
#   .carry/whl  platformdirs and psutil wheels for Python 3.12 (pip download --no-deps ...)
# On the device, from the repo root:
#   HEARTH_COMMIT=<sha> bash benchmarks/gpu_session.sh ceilings|tests|mma|dp4a|dp4a-wide|dp4a-split|quant-bench|fp8-tests|fp8|smollm2-quality|bench1b|bench8b|decode8b|throughput|throughput-nohf|throughput-fp8|profile|decode-profile|gemv|prefill-profile|profile-all|chat-turns|fp32match|serve|all [extra bench args]
# (HEARTH_COMMIT: the copied tree's .git may be stale, and bench rows stamp the commit)
set -u
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CARRY=${CARRY:-.carry}  # .carry_lite beside a GGUF half (prepare_carry.sh gguf)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $CARRY/whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 HEARTH_TEST_DEVICE=cuda HEARTH_TEST_TOKENIZER_DIR=$CARRY/tok
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
hearth() { python -c "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
case "$what" in ceilings|all)
  python benchmarks/ceilings.py --json "$OUT/ceilings.json" 2>&1 | tail -4 ;;
esac
case "$what" in tests|all)
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 900 \
    tests/kernels tests/engine/test_gpu_fast_path.py tests/app/test_bench.py -m gpu \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -30 ;;
esac
case "$what" in bench1b|all)
  hearth bench --shape llama-1b --suite decode --batch 1 --baseline hf --max-model-len 4096 \
    --json "$OUT/bench-1b-decode.json" "$@" 2>&1 | tail -12 ;;
esac
case "$what" in decode8b)
  hearth bench --shape llama-8b --suite decode,prefill --batch 1 --max-model-len 8448 \
    --json "$OUT/bench-8b-decode-prefill-nohf.json" "$@" 2>&1 | tail -10 ;;
esac
case "$what" in bench8b|all)
  hearth bench --shape llama-8b --suite decode,prefill --batch 1,64 --baseline hf --max-model-len 8448 \
    --json "$OUT/bench-8b-decode-prefill.json" "$@" 2>&1 | grep -E "graphs timed|batch-1 matmuls|^suite|^decode|^prefill" ;;
esac
case "$what" in throughput)
  hearth bench --shape llama-8b --suite throughput --baseline hf \
    --json "$OUT/bench-8b-throughput.json" "$@" 2>&1 | tail -12 ;;
esac
case "$what" in throughput-nohf)
  hearth bench --shape llama-8b --suite throughput \
    --json "$OUT/bench-8b-throughput-nohf.json" "$@" 2>&1 | tail -6 ;;
esac
case "$what" in throughput-fp8)
  hearth bench --shape llama-8b --suite throughput --kv-cache-dtype fp8 \
    --json "$OUT/bench-8b-throughput-fp8kv.json" "$@" 2>&1 | tail -6 ;;
esac
case "$what" in gemv|profile-all)
  python benchmarks/profile_gemv.py --sweep --json "$OUT/profile-gemv-8b.json" 2>&1 | grep -v "^  " | tail -8 ;;
esac
case "$what" in prefill-profile|profile-all)
  python benchmarks/profile_kernels.py --prefill-only 8192 --json "$OUT/profile-prefill-8k.json" 2>&1 | tail -26 ;;
esac
case "$what" in profile|profile-all|decode-profile)
  python benchmarks/profile_decode.py --shape llama-8b --json "$OUT/profile-decode-8b.json" 2>&1 | tail -9
  [ "$what" = decode-profile ] || python benchmarks/profile_throughput.py --shape llama-8b --kernel-samples 12 --json "$OUT/profile-throughput-8b.json" 2>&1 | tail -10 ;;
esac
case "$what" in quant-tests)
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 900 \
    tests/kernels/test_quant_gemv.py tests/quant -m gpu 2>&1 | tee "$OUT/gpu_quant_tests.log" | tail -15
  python benchmarks/profile_quant_gemv.py --json "$OUT/profile-quant-gemv-8b.json" 2>&1 | tail -120 ;;
esac
case "$what" in mma)  # the weight-stationary int4 kernel: its tests on the GPU, then its profile
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 900 tests/kernels/test_quant_mma.py \
    2>&1 | tee "$OUT/gpu_mma_tests.log" | tail -6
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 900 tests/kernels/test_quant_gemv.py -m gpu \
    2>&1 | tee -a "$OUT/gpu_mma_tests.log" | tail -4
  python benchmarks/profile_quant_mma.py --json "$OUT/profile-quant-mma-8b.json" "$@" 2>&1 | grep -v "^  " | tail -40 ;;
esac
case "$what" in dp4a)  # the dp4a batch-1 GEMV: its GPU tests, then its profile against the float kernels
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 900 tests/kernels/test_quant_dp4a.py \
    tests/kernels/test_quant_gemv.py -m gpu 2>&1 | tee "$OUT/gpu_dp4a_tests.log" | tail -4
  timeout -s INT 420 python benchmarks/profile_quant_dp4a.py --json "$OUT/profile-quant-dp4a-8b.json" "$@" \
    2>&1 | grep -v "^  " | tail -12 ;;
esac
case "$what" in dp4a-wide|dp4a-split)  # a dp4a sweep (wide: small and all-rows programs; split:
  # K split among programs): compile in 12 processes, then time in one
  sweep=${what#dp4a-}
  for i in $(seq 0 11); do
    python benchmarks/profile_quant_dp4a.py --sweep "$sweep" --warm-only $i/12 "$@" >/dev/null 2>&1 &
  done; wait
  timeout -s INT ${DP4A_TIMEOUT:-300} python benchmarks/profile_quant_dp4a.py --sweep "$sweep" \
    --json "$OUT/profile-quant-dp4a-$sweep-8b.json" "$@" 2>&1 | grep -v "^  [a-z]" | tail -24 ;;
esac
case "$what" in quant-bench)  # bf16, int8 and int4 of the 8B shape in one session
  for q in bf16 int8 int4; do
    hearth bench --shape llama-8b --suite decode,prefill --batch 1,64 --prefill-lens 2048 --max-model-len 4096 \
      --quant $q --json "$OUT/bench-8b-$q.json" "$@" 2>&1 | grep -E "batch-1 matmuls|^suite|^decode|^prefill"
  done ;;
esac
case "$what" in fp8-tests)  # fp8's GPU tests (and the int ones beside them)
  [ -f .gguf_a/part ] && cp .gguf_a/part /tmp/smollm2.part-a  # the first half for smollm2-quality, next call
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 300 tests/kernels/test_fp8_gemm.py \
    tests/kernels/test_gemv.py tests/quant -m gpu 2>&1 | tee "$OUT/gpu_fp8_tests.log" | tail -8 ;;
esac
case "$what" in fp8)  # bf16 vs fp8 on the 8B shape: batch-1 and 64 decode, TTFT at 2,048 and 8,192
  for q in bf16 fp8; do
    hearth bench --shape llama-8b --suite decode,prefill --batch 1,64 --prefill-lens 2048,8192 --max-model-len 8448 \
      --quant $q --json "$OUT/bench-8b-$q.json" "$@" 2>&1 | grep -E "batch-1 matmuls|^suite|^decode|^prefill"
  done ;;
esac
case "$what" in smollm2-quality)  # (.gguf_b carried; .gguf_a came with the call before) perplexity on the GPU
  mkdir -p /tmp/smollm2 && cat /tmp/smollm2.part-a .gguf_b/part > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ "$(sha256sum /tmp/smollm2/*.gguf | cut -c1-64)" = "$(cat .gguf_b/sha256)" ] || { echo "GGUF halves don't match"; exit 1; }
  for q in bf16 fp8 int8; do
    hearth eval --model /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --quant $q --json -q \
      > "$OUT/eval-smollm2-cuda-$q.json" && tail -c 400 "$OUT/eval-smollm2-cuda-$q.json"
  done
  for q in bf16 fp8; do
    hearth bench --shape llama-8b --suite throughput --quant $q --json "$OUT/bench-8b-throughput-$q.json" "$@" \
      2>&1 | tail -3
  done ;;
esac
case "$what" in chat-turns)
  python benchmarks/chat_turns_latency.py --shape llama-8b --json "$OUT/chat-turns-8b.json" 2>&1 | tail -10 ;;
esac
case "$what" in fp32match)
  # greedy tokens of the fast path against transformers in float32 (bf16 near-ties aside)
  hearth bench --shape llama-1b --suite decode --batch 1 --baseline hf --dtype float32 --output-len 32 \
    --repeats 1 --max-model-len 512 --json "$OUT/bench-1b-fp32-match.json" "$@" 2>&1 | tail -4 ;;
esac
case "$what" in serve)  # the server over HTTP beside the engine offline (the wheels of prepare_carry.sh);
  # the SmolLM2 tokenizer gives the 8B shape text, for the JSON-schema row
  hearth bench --shape llama-8b --suite serve --concurrency 1,16,64 --tokenizer $CARRY/tok \
    --json "$OUT/serve-8b.json" "$@" 2>&1 | tail -8
  python benchmarks/serve_overhead.py --requests 1024 --json "$OUT/serve-overhead.json" 2>&1 | tail -1 ;;
esac
