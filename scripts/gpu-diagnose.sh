#!/usr/bin/env bash
# On the GPU machine, over a bundle from scripts/gpu-bundle.sh: the CUDA source
# cubecl generates for the prefill kernels (CUBECL_DEBUG_LOG, bench --quick,
# bf16 and f16; kept gzipped as $OUT/cubecl-source.log.gz) and Nsight Compute's
# reading of the kernels matching KERNELS (default the chunk-recurrent state
# pass and tensor-core diag) at (1,64,4096,128), 128/64, bf16 then f16.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
for deb in gpu-bundle/debs/*.deb; do dpkg -x "$deb" /; done
ldconfig
CUBECL_DEBUG_LOG=/tmp/cubecl.log gpu-bundle/bin/bench --runtimes cuda --out /tmp/quick --quick \
    --only prefill --dtypes bf16,f16 --configs 128/64 --reps 1 >/dev/null 2>&1
echo "== source log: $(wc -c </tmp/cubecl.log) bytes"
gzip -c /tmp/cubecl.log >"$out/cubecl-source.log.gz"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
"$ncu" --clock-control none --set full -k "regex:${KERNELS:-chunk_state|diag_cmma}" -c "${COUNT:-4}" \
    gpu-bundle/bin/bench --runtimes cuda --out /tmp/profile-bench --only prefill --dtypes bf16,f16 \
    --configs 128/64 --reps 2 >"$out/ncu-full.txt" 2>/tmp/ncu-stderr.txt
echo "== ncu exit $?"
grep -E "^  [A-Za-z_].*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Warp Cycles Per Issued|Bank Conflicts|L1/TEX Hit|L2 Hit|Executed Ipc|Local" "$out/ncu-full.txt" | head -120
