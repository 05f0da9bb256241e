#!/usr/bin/env bash
# The test suite: every kernel against the f64 reference on the best device this
# build selects (wgpu by default: a GPU, or lavapipe on the CPU when there is none).
# The Burn extension's tests are included (feature `burn`), and run a second
# time on Burn's Fusion backend (feature `fusion`). Extra arguments go to both
# cargo test commands, e.g. `scripts/test.sh --features cuda`.
# Ends with one summary line over all test binaries: "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-vulkan.sh
# The Vulkan loader complains on every start without it.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --features lightning-attention/burn "$@" 2>&1 | tee "$log" || status=$?
# The decode tests again with the batched-load routine CUDA picks (16 rows in flight).
TEST_DECODE_ROWS_IN_FLIGHT=16 cargo test --release --test kernels decode "$@" 2>&1 | tee -a "$log" || status=$?
# The Burn tests again with Burn's Fusion backend under `Device::wgpu` (feature `fusion`).
cargo test --release -p lightning-attention-burn-examples --features fusion --test burn "$@" 2>&1 | tee -a "$log" || status=$?
awk '/^test result:/ {
        for (i = 2; i <= NF; i++) {
            if ($i == "passed;") passed += $(i - 1)
            if ($i == "failed;") failed += $(i - 1)
        }
    }
    END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
