#!/usr/bin/env bash
# Issues 18 and 19 on the GPU machine, in one command over a bundle made by
# `bash scripts/gpu-bundle.sh` (carry gpu-bundle): the kernel suite on CUDA
# (the out-of-memory check against a reported capacity, the finite check, the
# errors in the caller's layout, sequence parallelism through CUDA), the finite
# check's cost beside the prefill and decode it follows (bench group
# `finite`), and the quickstart's table on CUDA. RUNTIMES="cuda wgpu" also runs
# the suite on wgpu/Vulkan. Logs go under $OUT.
set -uo pipefail
bundle=gpu-bundle
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
# The binaries travel gzipped (three of about 30 MB would pass the 64 MiB limit).
for z in "$bundle"/bin/*.gz; do [ -e "$z" ] && gunzip -f "$z"; done
for deb in "$bundle"/debs/*.deb; do dpkg -x "$deb" /; done
ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$icd" ]; then export VK_DRIVER_FILES="$icd"; fi
export XDG_RUNTIME_DIR=/tmp
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } | tee "$out/device.txt"
for rt in ${RUNTIMES:-cuda}; do
    start=$(date +%s)
    LIGHTNING_ATTENTION_RUNTIME=$rt timeout 270 "$bundle/bin/kernels-tests" ${TEST_FILTER:-} >"$out/tests-$rt.log" 2>&1
    echo "== $rt tests: exit $? in $(( $(date +%s) - start )) s"
    grep -E "^test result|FAILED|panicked" "$out/tests-$rt.log" | head -20
done
if [ -x "$bundle/bin/quickstart" ]; then
    LIGHTNING_ATTENTION_RUNTIME=cuda timeout 90 "$bundle/bin/quickstart" >"$out/quickstart-cuda.log" 2>&1
    echo "== quickstart on cuda: exit $?"
    cat "$out/quickstart-cuda.log"
fi
timeout 180 "$bundle/bin/bench" --runtimes cuda --only finite --out "$out/bench-finite" ${BENCH_ARGS:-} 2>"$out/bench-finite.log"
echo "== bench finite: exit $?"
ls "$out/bench-finite"
