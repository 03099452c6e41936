#!/usr/bin/env bash
# Before/after benchmark of a change on one GPU, in one device session, side by side
# (issue 13's protocol): each figure is run at the old commit, then at the new one.
# Prepare here: .carry/old = `git archive OLD engine hearth_kernels app resources benchmarks`
# unpacked, plus .carry/whl (see gpu_session.sh). On the device, from the repo root:
#   OLD=<sha> NEW=<sha> bash benchmarks/ab_bench.sh 1b|8b|throughput [round]
set -u
what=${1:?1b, 8b or throughput}; round=${2:-1}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
run() {  # run DIR SHA NAME ARGS...: one `hearth bench` at the tree in DIR
  local dir=$1 sha=$2 name=$3; shift 3
  local t0=$SECONDS
  (cd "$dir" && HEARTH_COMMIT=$sha PYTHONPATH=.:/tmp/site python -c \
    "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))" bench -q "$@" \
    --json "$OUT/$name-$sha-r$round.json" 2>&1 | grep -E "^(decode|prefill|throughput)|rror" | sed "s/^/$sha: /")
  echo "$sha: $name took $((SECONDS - t0)) s"
}
both() { run .carry/old "$OLD" "$@"; run . "$NEW" "$@"; }
case "$what" in
  1b) both bench-1b-decode --shape llama-1b --suite decode --batch 1 --max-model-len 4096 ;;
  8b) both bench-8b-decode-ttft --shape llama-8b --suite decode,prefill --batch 1,64 \
        --prefill-lens 2048 --max-model-len 8448 ;;
  throughput) both bench-8b-throughput --shape llama-8b --suite throughput ;;
esac
