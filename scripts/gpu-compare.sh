#!/usr/bin/env bash
# One lease on the GPU machine, from the repository root, over a bundle made by
# scripts/gpu-bundle.sh (carry ["gpu-bundle"], and ".fla" with FLA=1): the CUDA
# property suite (TESTS=1, default; at most TEST_TIMEOUT seconds), the bench on
# CUDA (prefill, fwd+bwd and the mixed step by default, in DTYPES at CONFIGS),
# PRECISIONS (f32 rows: split,rounded,exact; default split) and BENCH_EXTRA
# (say "--accuracy --layer 79/80") pass on to the bench,
# and with FLA=1 flash-linear-attention's chunk_simple_gla on the same card
# through ../shared/anchors/bench_triton.py, copied with its wheel into .fla/
# (`python3 -m pip download --no-deps -d .fla fla-core==0.6.0`): the peer and
# our bench in the same lease, as the issue asks. BUNDLE=gpu-bundle-spirv runs
# that bundle instead. Everything lands under $OUT.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
if [ "${TESTS:-1}" = 1 ]; then
    RUNTIMES=cuda TEST_TIMEOUT="${TEST_TIMEOUT:-300}" timeout "${TEST_TIMEOUT:-300}" bash "${BUNDLE:-gpu-bundle}/gpu-run.sh" tests
    echo "== tests exit $?"
fi
BENCH_RUNTIMES=cuda \
    BENCH_ARGS="--only ${ONLY:-prefill,training,mixed} --dtypes ${DTYPES:-bf16,f16} --configs ${CONFIGS:-128/64} --routines ${ROUTINES:-auto} --precisions ${PRECISIONS:-split} --reps ${REPS:-10} ${BENCH_EXTRA:-}" \
    bash "${BUNDLE:-gpu-bundle}/gpu-run.sh" bench
grep -E "prefill|fwd\+bwd|mixed" "$out/bench.log" | head -80
if [ "${FLA:-0}" = 1 ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .fla/*.whl && export PYTHONPATH=/tmp/site
    # What is left of the device tool's 600 s, less a margin (FLA_TIMEOUT).
    PYTHONUNBUFFERED=1 timeout "${FLA_TIMEOUT:-$((580 - SECONDS))}" python3 .fla/bench_triton.py --parts "${FLA_PARTS:-prefill,mixed}" --no-la2 \
        --out "$out/fla.json" 2>&1 | tee "$out/fla.log" | grep -E "^prefill|^mixed|Error|error" | head -20
fi
