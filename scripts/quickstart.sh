#!/usr/bin/env bash
# The main job: prefill and decode on the best device present, checked against
# the reference and timed. CUDA when an NVIDIA driver is present, else wgpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    exec cargo run --release --features cuda --example quickstart -- "$@"
fi
source scripts/ensure-vulkan.sh
# The Vulkan loader prints an error on every start without it.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
exec cargo run --release --example quickstart -- "$@"
