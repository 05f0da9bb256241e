#!/usr/bin/env bash
# On the GPU machine, over a bundle from scripts/gpu-bundle.sh: an A/B of one
# environment variable in one command, the sides alternating, so that both see
# the same machine in the same state. VAR names the variable, VALUES its values
# ("-" leaves it unset), ROUNDS (default 2) how many times each runs;
# BENCH_ARGS and BENCH_RUNTIMES (default cuda) go to the bench as in
# gpu-run.sh. Each run's rows go to $OUT/ab-<value>-<round>.csv (the device
# tool brings back only a few files) and its prefill rows to stdout.
set -uo pipefail
out="${OUT:-/tmp/lightning-out}"
mkdir -p "$out"
for round in $(seq "${ROUNDS:-2}"); do
    for value in ${VALUES:?}; do
        echo "== ${VAR:?}=$value, round $round"
        if [ "$value" = - ]; then
            env -u "$VAR" BENCH_RUNTIMES="${BENCH_RUNTIMES:-cuda}" bash gpu-bundle/gpu-run.sh bench
        else
            env "$VAR=$value" BENCH_RUNTIMES="${BENCH_RUNTIMES:-cuda}" bash gpu-bundle/gpu-run.sh bench
        fi | grep -E "prefill|fwd\+bwd|decode"
        mv "$out/bench/bench.csv" "$out/ab-$value-$round.csv"
        rm -rf "$out/bench" "$out/bench.log"
    done
done
