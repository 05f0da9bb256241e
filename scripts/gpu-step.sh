#!/usr/bin/env bash
# Issue 17's runs on the GPU machine, from the repository root, over the
# bundle made by scripts/gpu-bundle.sh (carry ["gpu-bundle"]): the bench's
# whole-decode-step rows (`--only step`, or ONLY=verify, or both) for the
# LAYERS, HEADS and BATCHES given (lists, as the bench's --step-* options;
# defaults 70 / 8 / 1,16,64,256), on BENCH_RUNTIMES (default cuda), once per
# value of ROWS (the decode's rows in flight per unit; default: the library's
# own choice), each in a fresh process with its own log under
# $OUT/rows-<value>/. REPS (default 5) passes on.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
for rows in ${ROWS:-default}; do
    dir="$out/rows-$rows"
    mkdir -p "$dir"
    rows_arg=""
    if [ "$rows" != default ]; then rows_arg="--decode-rows-in-flight $rows"; fi
    OUT="$dir" BENCH_RUNTIMES="${BENCH_RUNTIMES:-cuda}" \
        BENCH_ARGS="--only ${ONLY:-step} --reps ${REPS:-5} --step-layers ${LAYERS:-70} --step-heads ${HEADS:-8} --step-batches ${BATCHES:-1,16,64,256} $rows_arg" \
        timeout "${STEP_TIMEOUT:-500}" bash gpu-bundle/gpu-run.sh bench
    echo "== rows in flight $rows: exit $?"
    grep -E "copy|step|verify" "$dir/bench.log" | head -60
done
