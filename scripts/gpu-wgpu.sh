#!/usr/bin/env bash
# Issue 16's runs on the GPU machine, from the repository root, over a bundle
# made by scripts/gpu-bundle.sh (BUNDLE=gpu-bundle, the default: wgpu through
# WGSL; BUNDLE=gpu-bundle-spirv: through SPIR-V; carry the one named).
#   PART=tests  the property suite on RUNTIMES (default wgpu), PROPTEST_CASES
#               cases each (default 24), REPEAT times in fresh processes
#               (default 1: SPIR-V's cooperative matrices gave wrong numbers
#               in one of two runs on an H100), at most TEST_TIMEOUT s each.
#   PART=bench  the bench on CUDA and wgpu in one process: both copy
#               bandwidths, prefill in DTYPES (default f32,bf16,f16) at the
#               six shapes, decode at batch 1, 16, 128 and 512 (ONLY, REPS
#               and BENCH_EXTRA pass on).
# Everything lands under $OUT.
set -uo pipefail
bundle="${BUNDLE:-gpu-bundle}"
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
case "${PART:-bench}" in
tests)
    for i in $(seq 1 "${REPEAT:-1}"); do
        OUT="$out/run$i" PROPTEST_CASES="${PROPTEST_CASES:-24}" RUNTIMES="${RUNTIMES:-wgpu}" \
            timeout "${TEST_TIMEOUT:-280}" bash "$bundle/gpu-run.sh" tests
        echo "== run $i exit $?"
    done
    ;;
bench)
    BENCH_RUNTIMES="${BENCH_RUNTIMES:-cuda,wgpu}" \
        BENCH_ARGS="--only ${ONLY:-prefill,decode} --dtypes ${DTYPES:-f32,bf16,f16} --reps ${REPS:-5} ${BENCH_EXTRA:-}" \
        bash "$bundle/gpu-run.sh" bench
    grep -E "^==|copy|prefill|decode" "$out/bench.log" | head -120
    ;;
esac
