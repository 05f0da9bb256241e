#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over a bundle made by
# scripts/gpu-bundle.sh: `tests` runs the property suite on CUDA and on
# wgpu/Vulkan (f32, f16, bf16 on both); `bench` runs the benchmark on both;
# `all` does both; `burn` runs the Burn tests on CUDA from gpu-bundle-burn/. RUNTIMES="wgpu" (say) limits the tests to one runtime;
# BENCH_ARGS (say "--configs 256/32,256/64") is passed to the bench, and
# BENCH_RUNTIMES (default "cuda,wgpu") picks its runtimes; TEST_FILTER (say
# "precision") runs only the tests whose names contain it.
# Logs and results go under $OUT.
set -uo pipefail
what="${1:-all}"
# The bundle this script sits in: gpu-bundle/ (WGSL) or gpu-bundle-spirv/.
bundle="$(basename "$(dirname "$0")")"
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
if [ "$what" = burn ]; then
    LIGHTNING_ATTENTION_RUNTIME=cuda gpu-bundle-burn/bin/burn-tests >"$out/tests-burn-cuda.log" 2>&1
    echo "== burn tests on cuda: exit $?"
    grep -E "^test |^test result|panicked" "$out/tests-burn-cuda.log" | head -30
    exit 0
fi
# The binaries travel gzipped (see gpu-bundle.sh).
for z in "$bundle"/bin/*.gz; do [ -e "$z" ] && gunzip -f "$z"; done
for deb in "$bundle"/debs/*.deb; do dpkg -x "$deb" /; done
ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$icd" ]; then export VK_DRIVER_FILES="$icd"; fi
export XDG_RUNTIME_DIR=/tmp
ls /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>/dev/null
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } | tee "$out/device.txt"

if [ "$what" = tests ] || [ "$what" = all ]; then
    for rt in ${RUNTIMES:-cuda wgpu}; do
        LIGHTNING_ATTENTION_RUNTIME=$rt \
            "$bundle/bin/kernels-tests" ${TEST_FILTER:-} >"$out/tests-$rt.log" 2>&1
        echo "== $rt tests: exit $?"
        grep -E "^test result|FAILED|panicked" "$out/tests-$rt.log" | head -20
    done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    # shellcheck disable=SC2086 # BENCH_ARGS holds several arguments
    "$bundle/bin/bench" --runtimes "${BENCH_RUNTIMES:-cuda,wgpu}" --out "$out/bench" ${BENCH_ARGS:-} 2>"$out/bench.log"
fi
