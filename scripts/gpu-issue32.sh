#!/usr/bin/env bash
# Issue 32's run on the GPU machine (the fused routines checked and measured
# beside FLA in one lease), over a bundle from scripts/gpu-bundle.sh. Parts,
# each under its own time limit (seconds in the variable named), logs under $OUT:
#   suite    the whole CUDA kernel suite, the fused routine drawn in every
#            property test (PROPTEST_CASES, default 8; SUITE_SECONDS 280),
#            then the PTX the runtime loads for the bf16 prefill rows
#            (CUBECL_CUDA_DUMP_PTX; PTX_SECONDS 120), to hold beside the
#            offline report here (PTX_SECONDS=0: none).
#   prefill  bf16 and f16 at the six shapes, the chunk-recurrent routine (the
#            default before the fused walk) beside the fused routine
#            with the autotuner's choice (its log: every variant's median) and
#            accuracy, then f32 Precision::Split the same way (PREFILL_SECONDS 300;
#            PREFILL_DTYPES, default bf16,f16,f32).
#   train    forward+backward, bf16 and f32 split (TRAIN_DTYPES), the
#            chunk-recurrent routine beside the fused one (TRAIN_ROUTINES; TRAIN_SECONDS 240;
#            TRAIN_CONFIGS, default 64/64; TRAIN_ARGS more bench flags, e.g.
#            --fused-choice rule or --fused-separate-key-value).
#   SHAPES   (any part of ours) which of the bench's six shapes run, e.g. 0,1.
#   mixed    the mixed serving step, bf16, chunk-recurrent beside fused (MIXED_SECONDS 90).
#   packed   training on a packed batch (8 documents of 100-8000 tokens, h = 64,
#            d = 128), forward+backward, bf16, chunk-recurrent beside fused, then FLA's
#            chunk_simple_gla with cu_seqlens on the same batch
#            (scripts/fla_packed.py; PACKED_SECONDS 150; carry .whl).
#   cache    decode and the 70-layer step with an f32 and a bf16 state cache
#            (CACHE_SECONDS 150).
#   ncu      Nsight Compute on one warm launch of the fused walk, the second
#            shape (1,64,16384,128) bf16, by the rule at the variant the tuner
#            kept there on the H100: chunk 32 (NCU_CONFIG 64/32), 32-wide
#            value tile (NCU_TILE), the ring (NCU_SECONDS 200).
#   wgpu     Vulkan on the same card: the portable twin beside the default
#            routines, bf16 and f32 prefill (WGPU_SECONDS 240).
#   fla      FLA 0.6.0 chunk_simple_gla: the six shapes' forward, f32 and
#            forward+backward, and its varlen call on the mixed step
#            (FLA_SECONDS 480; carry .fla and .whl).
# Device tool: carry ["gpu-bundle", ".fla", ".whl"], command
# `bash scripts/gpu-issue32.sh suite prefill` (say).
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
bundle=gpu-bundle
bench="$bundle/bin/bench"
for z in "$bundle"/bin/*.gz; do [ -e "$z" ] && gunzip -f "$z"; done
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; } | tee -a "$out/device.txt"
autotune_log() { printf '[autotune.logger]\nlevel = "full"\nfile = "%s"\n' "$1" >cubecl.toml; }
rows() { grep -E "^\| (cuda|wgpu)" "$1" | cut -c1-170 | head -"${2:-40}"; }

for part in "$@"; do
    start=$(date +%s)
    case "$part" in
    suite)
        PROPTEST_CASES=${PROPTEST_CASES:-8} LIGHTNING_ATTENTION_RUNTIME=cuda timeout "${SUITE_SECONDS:-280}" \
            "$bundle/bin/kernels-tests" ${TEST_FILTER:-} >"$out/suite-cuda.log" 2>&1
        echo "== cuda suite: exit $?"
        grep -E "^test result|FAILED|panicked|^failures" "$out/suite-cuda.log" | head -20
        [ "${PTX_SECONDS:-120}" = 0 ] && continue
        mkdir -p "$out/ptx"
        CUBECL_CUDA_DUMP_PTX="$out/ptx" timeout "${PTX_SECONDS:-120}" "$bench" --runtimes cuda --only prefill \
            --dtypes bf16 --configs 64/64 --routines fused --fused-choice rule --reps 2 --out "$out/bench-ptx" \
            >"$out/bench-ptx.log" 2>&1
        echo "== ptx dump: exit $? ($(ls "$out/ptx" | wc -l) files)"
        ;;
    prefill)
        autotune_log "$out/autotune-prefill.log"
        timeout "${PREFILL_SECONDS:-300}" "$bench" --runtimes cuda --only prefill --dtypes "${PREFILL_DTYPES:-bf16,f16,f32}" \
            --precisions split --configs 64/64 --routines chunk,fused --accuracy ${SHAPES:+--shapes "$SHAPES"} --out "$out/bench-prefill" \
            >"$out/bench-prefill.log" 2>&1
        echo "== prefill: exit $?"
        rm -f cubecl.toml
        rows "$out/bench-prefill.log" 40
        grep -E "^Fastest" "$out/autotune-prefill.log" | cut -c1-160 | head -30
        ;;
    train)
        timeout "${TRAIN_SECONDS:-240}" "$bench" --runtimes cuda --only training --dtypes "${TRAIN_DTYPES:-bf16,f32}" \
            --precisions split --configs "${TRAIN_CONFIGS:-64/64}" --routines "${TRAIN_ROUTINES:-chunk,fused}" ${SHAPES:+--shapes "$SHAPES"} \
            ${TRAIN_ARGS:-} --out "$out/bench-train" >"$out/bench-train.log" 2>&1
        echo "== training: exit $?"
        rows "$out/bench-train.log" 20
        ;;
    mixed)
        timeout "${MIXED_SECONDS:-90}" "$bench" --runtimes cuda --only mixed --dtypes bf16 --configs 64/64 \
            --routines chunk,fused --out "$out/bench-mixed" >"$out/bench-mixed.log" 2>&1
        echo "== mixed: exit $?"
        rows "$out/bench-mixed.log" 10
        ;;
    packed)
        timeout "${PACKED_SECONDS:-150}" "$bench" --runtimes cuda --only packed --dtypes bf16 --configs 64/64 \
            --routines chunk,fused --out "$out/bench-packed" >"$out/bench-packed.log" 2>&1
        echo "== packed: exit $?"
        rows "$out/bench-packed.log" 10
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$out/pip.log" 2>&1
        PYTHONPATH=/tmp/site timeout 120 python3 scripts/fla_packed.py --out "$out/fla-packed.json" \
            >"$out/fla-packed.log" 2>&1
        echo "== fla packed: exit $?"
        tail -n 3 "$out/fla-packed.log"
        ;;
    cache)
        # Decode and the 70-layer step with the state cache in f32 and in
        # bf16 (issue 30): tokens/s and state bytes per second.
        timeout "${CACHE_SECONDS:-150}" "$bench" --runtimes cuda --only decode,step --dtypes bf16 \
            --cache-dtypes f32,bf16 --out "$out/bench-cache" >"$out/bench-cache.log" 2>&1
        echo "== cache: exit $?"
        rows "$out/bench-cache.log" 40
        ;;
    ncu)
        # --reps 3: each shape launches the walk 10 times (1 check, 3 warm-up,
        # 3 timed, 3 staged); skipping 12 lands on shape two's third launch.
        timeout "${NCU_SECONDS:-200}" ncu --clock-control none --kernel-name regex:fused_fragments \
            --launch-skip "${NCU_SKIP:-12}" --launch-count 1 --set full --import-source no \
            -f -o "$out/fused-walk" "$bench" --runtimes cuda --only prefill --dtypes bf16 \
            --configs "${NCU_CONFIG:-64/32}" --routines fused --fused-choice rule \
            --fused-value-tile "${NCU_TILE:-32}" --reps 3 --out "$out/bench-ncu" >"$out/ncu.log" 2>&1
        echo "== ncu: exit $?"
        ncu -i "$out/fused-walk.ncu-rep" --page details >"$out/ncu-details.txt" 2>&1
        ncu -i "$out/fused-walk.ncu-rep" --page raw --csv >"$out/ncu-raw.csv" 2>&1
        grep -E "Grid Size|Block Size|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput" \
            "$out/ncu-details.txt" | head -20
        ;;
    wgpu)
        for deb in "$bundle"/debs/*.deb; do dpkg -x "$deb" /; done
        ldconfig
        icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
        if [ -f "$icd" ]; then export VK_DRIVER_FILES="$icd"; fi
        export XDG_RUNTIME_DIR=/tmp
        timeout "${WGPU_SECONDS:-240}" "$bench" --runtimes wgpu --only prefill --dtypes bf16,f32 \
            --configs 64/64 --routines auto,fused --out "$out/bench-wgpu" >"$out/bench-wgpu.log" 2>&1
        echo "== wgpu: exit $?"
        rows "$out/bench-wgpu.log" 30
        ;;
    fla)
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$out/pip.log" 2>&1
        PYTHONPATH=/tmp/site timeout "${FLA_SECONDS:-480}" python3 .fla/bench_triton.py --parts prefill,mixed --no-la2 \
            --shapes "${FLA_SHAPES:-0,1,2,3,4,5}" --out "$out/fla.json" >"$out/fla.log" 2>&1
        echo "== fla: exit $?"
        grep -E "^prefill|^mixed" "$out/fla.log" | cut -c1-260
        ;;
    *) echo "unknown part $part" ;;
    esac
    echo "-- $part took $(($(date +%s) - start)) s"
done
