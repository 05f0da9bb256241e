#!/usr/bin/env bash
# On the GPU machine, over a bundle from scripts/gpu-bundle.sh: Nsight Compute's
# reading of the tensor-core prefill kernels (diag_cmma, kv_parallel_cmma) at
# the bench's first bf16 prefill shape, (1,64,4096,128), BLOCK/CBLOCK CONFIG
# (default 128/64): throughput against the chip's ceilings, occupancy, warp
# stall reasons, memory and shared-memory traffic (bank conflicts). Clocks are
# left alone (--clock-control none, as METHOD.md says). Reports go under $OUT
# (ncu-*.txt); with no kernel matched, the kernel names seen are listed.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
for deb in gpu-bundle/debs/*.deb; do dpkg -x "$deb" /; done
ldconfig
# Only the reports go under $OUT: the device tool brings back a limited number of files.
bench=(gpu-bundle/bin/bench --runtimes cuda --out /tmp/profile-bench --only prefill
    --configs "${CONFIG:-128/64}" --reps 2)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $ncu"
"$ncu" --clock-control none --set full -k "regex:${KERNELS:-cmma}" -c "${COUNT:-2}" \
    "${bench[@]}" >"$out/ncu-full.txt" 2>/tmp/ncu-stderr.txt
echo "== ncu exit $?"
if ! grep -q "Section: " "$out/ncu-full.txt"; then
    tail -20 "$out/ncu-full.txt"
    "$ncu" --clock-control none --section LaunchStats -c 12 "${bench[@]}" 2>&1 |
        grep -E "^  [A-Za-z_].*\(" | head -20
fi
grep -E "^  [A-Za-z_].*\(|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Warp Cycles Per Issued|Bank Conflicts|Stall|L1/TEX Hit|L2 Hit|Executed Ipc" "$out/ncu-full.txt" | head -80
