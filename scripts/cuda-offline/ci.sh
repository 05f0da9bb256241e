#!/usr/bin/env bash
# The offline CUDA compile (issue 27), as CI runs it: no GPU, no CUDA install.
# 1. setup.sh installs NVRTC, ptxas and cuobjdump (PyPI wheels, CUDA 13.0) once;
# 2. tools/cuda-offline builds every CUDA kernel variant the plans launch for an
#    H200 (sm_90), as cubecl-cuda would, and writes each one's CUDA source;
# 3. compile.py compiles them with NVRTC and ptxas, prints the report (also in
#    target/cuda-offline-report/report.{md,csv,json}) and fails on a compile
#    error or on a spill not reviewed in allowed-spills.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/cuda-offline/setup.sh >/dev/null
cargo run --release -q -p lightning-attention-cuda-offline -- --out target/cuda-offline-src
mkdir -p target/cuda-offline-report
status=0
python3 scripts/cuda-offline/compile.py target/cuda-offline-src --out target/cuda-offline-report \
    --allowed-spills scripts/cuda-offline/allowed-spills.json >target/cuda-offline-report/report.md || status=$?
tail -n 1 target/cuda-offline-report/report.md
exit "$status"
