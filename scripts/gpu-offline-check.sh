#!/usr/bin/env bash
# Issue 27 on the GPU machine, over a bundle from scripts/gpu-bundle.sh: the
# PTX the CUDA runtime really loads at the bench's shapes
# (CUBECL_CUDA_DUMP_PTX), to compare here with the offline compile
# (`compile.py --ptx-dir $OUT/ptx --compare target/cuda-offline-report/report.json`),
# then the CUDA suite on the changed plans and kernels. Logs under $OUT.
# Device tool: carry ["gpu-bundle"], command
# `bash scripts/gpu-offline-check.sh`.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out/ptx"
bundle=gpu-bundle
for z in "$bundle"/bin/*.gz; do [ -e "$z" ] && gunzip -f "$z"; done
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } | tee "$out/device.txt"
# Every kernel the bench's prefill, training and decode rows load, bf16 first.
CUBECL_CUDA_DUMP_PTX="$out/ptx" timeout "${BENCH_SECONDS:-300}" "$bundle/bin/bench" --runtimes cuda \
    --only prefill,decode,training --dtypes bf16,f16,f32 --configs 64/64,128/64 --reps 3 \
    --out "$out/bench" >"$out/bench.log" 2>&1
echo "== bench: exit $? ($(ls "$out/ptx" | wc -l) PTX files dumped)"
PROPTEST_CASES=6 LIGHTNING_ATTENTION_RUNTIME=cuda timeout "${TEST_SECONDS:-240}" \
    "$bundle/bin/kernels-tests" >"$out/tests-cuda.log" 2>&1
echo "== cuda tests: exit $?"
grep -E "^test result|FAILED|panicked" "$out/tests-cuda.log" | head -20
