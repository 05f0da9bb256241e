#!/usr/bin/env bash
# On the GPU machine, over a bundle from scripts/gpu-bundle.sh: the compiler's
# resource report (registers, spills, stack) and instruction counts of the
# tensor-core kernels, compiled as the library compiles them. The quick bench
# runs once with cubecl's compilation log on; the CUDA source of each kernel's
# last compilation (the d = 128 shape) is compiled again with nvcc -Xptxas -v,
# and its SASS is counted. CONFIG (default 128/64) picks BLOCK/CBLOCK.
# Sources, cubins and SASS go under $OUT.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
CUBECL_DEBUG_LOG="$out/cubecl.log" BENCH_RUNTIMES=cuda \
    BENCH_ARGS="--quick --only prefill --configs ${CONFIG:-128/64} --reps 3" \
    bash gpu-bundle/gpu-run.sh bench >/dev/null
for kernel in diag_cmma kv_parallel_cmma; do
    awk -v k="::$kernel::" '
        /^name: / { want = index($0, k) > 0 }
        want && /^```cpp$/ { grab = 1; src = ""; next }
        grab && /^```$/ { grab = 0; last = src; next }
        grab { src = src $0 "\n" }
        END { printf "%s", last }' "$out/cubecl.log" |
        # NVRTC has no system headers; nvcc has, and they declare these.
        sed '/^typedef .*int[0-9]*_t;$/d' >"$out/$kernel.cu"
    sed -i '1i #include <cstdint>\n#include <cstddef>' "$out/$kernel.cu"
    echo "== $kernel"
    nvcc -arch=sm_90 -cubin -O3 -Xptxas -v -o "$out/$kernel.cubin" "$out/$kernel.cu" 2>&1 |
        grep -E "registers|spill|error"
    cuobjdump -sass "$out/$kernel.cubin" >"$out/$kernel.sass"
    count() { grep -cE "$1" "$out/$kernel.sass"; }
    echo "local memory (LDL/STL) $(count 'LDL|STL'), HMMA $(count HMMA), global loads $(count LDG) (2-byte $(count 'LDG.E.U16')), MUFU.EX2 $(count MUFU.EX2), barriers $(count BAR)"
done
