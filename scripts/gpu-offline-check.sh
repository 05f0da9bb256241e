#!/usr/bin/env bash
# Issues 27 and 28 on the GPU machine, over a bundle from scripts/gpu-bundle.sh.
# `ptx`: the PTX the CUDA runtime really loads at the bench's shapes
# (CUBECL_CUDA_DUMP_PTX), to compare here with the offline compile
# (`compile.py --ptx-dir $OUT/ptx --compare target/cuda-offline-report/report.json`);
# `tests`: the CUDA suite (the changed plans and kernels, the fused routine,
# the real fragment product and its positions; TEST_FILTER, say `fragment`,
# runs the tests whose names contain it); `fused`: the bench's bf16
# and f16 prefill with the fused routine beside the default, and its 64-wide
# value tile; `fused-bf16`: the same for bf16 alone, without accuracy;
# `ncu`: Nsight Compute on one launch of the tensor-core walk; `ring`: the
# fused bf16 rows with one set of tiles and with the ring (variant 24), by
# the fixed rule; `tuned`: bf16 and f16 fused with the autotuner's choice;
# `fla`: FLA's chunk_simple_gla on the six prefill shapes
# (`../shared/anchors/bench_triton.py` copied into .fla/, the fla-core wheel
# in .whl/: carry both). Default: `ptx tests`.
# Logs under $OUT. Device tool: carry ["gpu-bundle", ".fla", ".whl"], command
# `bash scripts/gpu-offline-check.sh [ptx] [tests] [fused] [fla]`.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
bundle=gpu-bundle
for z in "$bundle"/bin/*.gz; do [ -e "$z" ] && gunzip -f "$z"; done
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } | tee "$out/device.txt"
whats=("$@")
[ ${#whats[@]} -eq 0 ] && whats=(ptx tests)
for what in "${whats[@]}"; do
    case "$what" in
    ptx)
        # Every kernel the bench's prefill, training and decode rows load, bf16 first.
        mkdir -p "$out/ptx"
        CUBECL_CUDA_DUMP_PTX="$out/ptx" timeout "${BENCH_SECONDS:-280}" "$bundle/bin/bench" --runtimes cuda \
            --only prefill,decode,training --dtypes bf16,f16,f32 --configs 64/64,128/64 --reps 3 \
            --out "$out/bench-ptx" >"$out/bench-ptx.log" 2>&1
        echo "== ptx bench: exit $? ($(ls "$out/ptx" | wc -l) PTX files dumped)"
        ;;
    ptx-bf16)
        # One dtype and config, so that the dump's file names (the last 180
        # characters of each kernel's id, which collide across variants of a
        # kernel) end up holding variants the offline build also has.
        mkdir -p "$out/ptx-bf16"
        CUBECL_CUDA_DUMP_PTX="$out/ptx-bf16" timeout "${BENCH_SECONDS:-200}" "$bundle/bin/bench" --runtimes cuda \
            --only prefill --dtypes bf16 --configs 64/64 --reps 2 --out "$out/bench-ptx-bf16" >"$out/bench-ptx-bf16.log" 2>&1
        echo "== ptx-bf16 bench: exit $? ($(ls "$out/ptx-bf16" | wc -l) PTX files dumped)"
        ;;
    tests)
        PROPTEST_CASES=${PROPTEST_CASES:-6} LIGHTNING_ATTENTION_RUNTIME=cuda timeout "${TEST_SECONDS:-280}" \
            "$bundle/bin/kernels-tests" ${TEST_FILTER:-} >"$out/tests-cuda.log" 2>&1
        echo "== cuda tests: exit $?"
        grep -E "^test result|FAILED|panicked|fragment" "$out/tests-cuda.log" | head -20
        ;;
    fused)
        timeout "${BENCH_SECONDS:-280}" "$bundle/bin/bench" --runtimes cuda --only prefill --dtypes bf16,f16 \
            --configs 64/64 --routines auto,fused --accuracy --out "$out/bench-fused" >"$out/bench-fused.log" 2>&1
        echo "== fused bench: exit $?"
        grep -E "^\|" "$out/bench-fused.log" | head -40
        timeout "${BENCH_SECONDS:-200}" "$bundle/bin/bench" --runtimes cuda --only prefill --dtypes bf16 \
            --configs 64/64 --routines fused --fused-choice rule --fused-value-tile 64 --out "$out/bench-fused64" >"$out/bench-fused64.log" 2>&1
        echo "== fused bench, value tile 64: exit $?"
        grep -E "^\|" "$out/bench-fused64.log" | head -20
        ;;
    fused-bf16)
        # The bf16 rows alone, default beside fused, then the 64-wide tile:
        # a short lease's measurement of one variant.
        timeout "${BENCH_SECONDS:-240}" "$bundle/bin/bench" --runtimes cuda --only prefill --dtypes bf16 \
            --configs 64/64 --routines auto,fused --out "$out/bench-fused-bf16" >"$out/bench-fused-bf16.log" 2>&1
        echo "== fused bench, bf16: exit $?"
        grep -E "^\|" "$out/bench-fused-bf16.log" | head -20
        timeout "${BENCH_SECONDS:-150}" "$bundle/bin/bench" --runtimes cuda --only prefill --dtypes bf16 \
            --configs 64/64 --routines fused --fused-choice rule --fused-value-tile 64 --out "$out/bench-fused64" >"$out/bench-fused64.log" 2>&1
        echo "== fused bench, value tile 64: exit $?"
        grep -E "^\|" "$out/bench-fused64.log" | head -20
        ;;
    ncu)
        # Nsight Compute on one warm launch of the tensor-core walk (64-wide
        # value tile) at the third prefill shape, (4,64,8192,128) bf16: with
        # --reps 3 each shape launches the walk 10 times (1 check, 3 warm-up,
        # 3 timed, 3 staged), so skipping 22 lands on shape three's third.
        # NCU_SKIP and NCU_TILE move it. Clocks left alone (METHOD.md).
        timeout "${NCU_SECONDS:-300}" ncu --clock-control none --kernel-name regex:fused_fragments \
            --launch-skip "${NCU_SKIP:-22}" --launch-count 1 --set full --import-source no \
            -f -o "$out/fused-walk" "$bundle/bin/bench" --runtimes cuda --only prefill --dtypes bf16 \
            --configs 64/64 --routines fused --fused-choice rule --fused-value-tile "${NCU_TILE:-64}" --reps 3 \
            --out "$out/bench-ncu" >"$out/ncu.log" 2>&1
        echo "== ncu: exit $?"
        ncu -i "$out/fused-walk.ncu-rep" --page details >"$out/ncu-details.txt" 2>&1
        ncu -i "$out/fused-walk.ncu-rep" --page raw --csv >"$out/ncu-raw.csv" 2>&1
        ncu -i "$out/fused-walk.ncu-rep" --page source --csv --print-source sass >"$out/ncu-sass.csv" 2>&1
        grep -E "Grid Size|Block Size|Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Issue Slots Busy|Compute \(SM\) Throughput|Memory Throughput" "$out/ncu-details.txt" | head -20
        ;;
    fused-one)
        # The bf16 rows, default beside fused (its default tile), once.
        timeout "${BENCH_SECONDS:-240}" "$bundle/bin/bench" --runtimes cuda --only prefill --dtypes bf16 \
            --configs 64/64 --routines auto,fused --out "$out/bench-fused-one" >"$out/bench-fused-one.log" 2>&1
        echo "== fused bench, bf16: exit $?"
        grep -E "^\|" "$out/bench-fused-one.log" | head -20
        ;;
    ring)
        # bf16 fused, one set of tiles (default) then the ring (variant 24).
        for stages in 1 2; do
            timeout "${BENCH_SECONDS:-120}" "$bundle/bin/bench" --runtimes cuda --only prefill --dtypes bf16 \
                --configs 64/64 --routines fused --fused-choice rule --fused-stages "$stages" --accuracy --out "$out/bench-ring$stages" \
                >"$out/bench-ring$stages.log" 2>&1
            echo "== fused bench, bf16, stages $stages: exit $?"
            grep -E "^\| cuda" "$out/bench-ring$stages.log" | head -8
        done
        ;;
    tuned)
        # bf16 and f16 fused with the autotuner's choice (FusedChoice::Tuned:
        # each shape's first call times every variant that applies; the
        # row's op names the one kept), and the default routine beside it.
        # cubecl's autotune log (every variant's median) into $out: a
        # cubecl.toml in the working directory, this copy's only.
        printf '[autotune.logger]\nlevel = "full"\nfile = "%s"\n' "$out/autotune.log" >cubecl.toml
        timeout "${BENCH_SECONDS:-240}" "$bundle/bin/bench" --runtimes cuda --only prefill --dtypes bf16,f16 \
            --configs 64/64 --routines auto,fused --accuracy --out "$out/bench-tuned" >"$out/bench-tuned.log" 2>&1
        echo "== tuned fused bench: exit $?"
        grep -E "^\| cuda" "$out/bench-tuned.log" | head -30
        rm -f cubecl.toml
        grep -E "^Autotune|^Fastest" "$out/autotune.log" | cut -c1-150 | head -90
        ;;
    fla)
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$out/pip.log" 2>&1
        PYTHONPATH=/tmp/site timeout "${FLA_SECONDS:-500}" python3 .fla/bench_triton.py --parts prefill --no-la2 \
            --shapes "${FLA_SHAPES:-0,1,2,3,4,5}" --out "$out/fla.json" >"$out/fla.log" 2>&1
        echo "== fla: exit $?"
        tail -n 20 "$out/fla.log"
        ;;
    esac
done
