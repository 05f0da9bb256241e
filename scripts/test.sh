#!/usr/bin/env bash
# The test suite: every kernel against the f64 reference on the best device this
# build selects (wgpu by default: a GPU, or lavapipe on the CPU when there is none).
# Extra arguments go to cargo test, e.g. `scripts/test.sh --features cuda,test-bf16`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-vulkan.sh
cargo test --release --workspace "$@"
