#!/usr/bin/env bash
# Nsight Compute on one decode launch of the step bench (issue 17), on the GPU
# machine from the repository root (carry ["gpu-bundle"]): HEADS, BATCH
# (default 8 and 64) and ROWS (rows in flight, default 16). The report
# (speed of light, occupancy, launch statistics, memory) lands in $OUT/ncu-*.txt.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
tag="h${HEADS:-8}-b${BATCH:-64}-rows${ROWS:-16}"
timeout "${NCU_TIMEOUT:-240}" ncu --clock-control none --kernel-name regex:decode --launch-skip 20 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section WarpStateStats \
    gpu-bundle/bin/bench --runtimes cuda --only step --step-layers 4 --step-heads "${HEADS:-8}" \
    --step-batches "${BATCH:-64}" --decode-rows-in-flight "${ROWS:-16}" --reps 3 --out "$out/ncu-bench" >"$out/ncu-$tag.txt" 2>&1
echo "== ncu $tag: exit $?"
grep -E "Registers|Achieved Occupancy|Theoretical Occupancy|DRAM Throughput|Memory Throughput|Duration|Block Limit|Waves|Grid Size|Block Size|Stall|==ERR|==WARN" "$out/ncu-$tag.txt" | head -40
