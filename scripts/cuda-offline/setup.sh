#!/usr/bin/env bash
# Installs NVRTC, ptxas and cuobjdump from PyPI wheels into a venv, so CUDA
# kernels can be compiled and read on a machine with no GPU and no system CUDA
# (issue 27; facts in ../shared/TOOLCHAIN.md, "CUDA kernels compiled on the CPU").
#
# Usage: bash scripts/cuda-offline/setup.sh   (venv: $CUDA_OFFLINE_VENV, default
# <repo>/.cuda-offline-venv). Idempotent: a stamp file holding the pin list makes
# a second run a no-op; change a pin and it reinstalls.
#
# Package names (checked with `pip index versions`, 2026-12): the CUDA 13 wheels
# are the PLAIN names at version 13.x (nvidia-cuda-nvrtc==13.0.88 ...). The
# `-cu13`-suffixed names on PyPI are 0.0.1 placeholders: do not use them. (The
# older CUDA 12 wheels were the `-cu12` names.) CUDA 13 wheels install under
# site-packages/nvidia/cu13/{bin,lib,include}.
#
# Pins: CUDA 13.0 = what driver 580 (580.159.04 on the lent H100/H200) JIT-compiles
# PTX with; newer ptxas moves register counts (13.5 gave 168/173 where the H200
# read 173/172). Each package pinned to its newest 13.0.x patch. cuobjdump and
# nvdisasm have no 13.0 wheel (lowest is 13.2.51); they only disassemble the
# 13.0 ptxas's cubin, which 13.2+ reads.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${CUDA_OFFLINE_VENV:-$repo/.cuda-offline-venv}"
python="${PYTHON:-python3}"

pins=(
  nvidia-cuda-nvrtc==13.0.88    # libnvrtc.so.13 + libnvrtc-builtins.so.13.0
  nvidia-cuda-nvcc==13.0.88     # ptxas (nvcc itself is not used: see README)
  nvidia-cuda-runtime==13.0.96  # headers: cuda_fp16.h, cuda_bf16.h, mma.h
  nvidia-cuda-cccl==13.0.85     # include/cccl: cuda/barrier, cuda/pipeline
  nvidia-cuda-crt==13.0.88      # include/crt: headers mma.h etc. pull in
  nvidia-cuda-cuobjdump==13.2.51 # no 13.0 wheel exists; lowest 13.x
  nvidia-cuda-nvdisasm==13.2.51  # cuobjdump -sass execs nvdisasm ("Could not find
                                 # executable file 'nvdisasm'" without it); also 13.2+ only
)
stamp="$venv/.cuda-offline-pins"
want="$(printf '%s\n' "${pins[@]%%#*}" | tr -d ' ')"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "cuda-offline: already installed in $venv (pins unchanged)"
else
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  # --no-deps: these wheels have no dependencies we need, and it keeps the pins
  # exact (nvidia-cuda-nvcc would otherwise drag in newer crt/nvvm wheels).
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps $want
  printf '%s\n' "$want" > "$stamp"
fi

# Print where things are: compile.py finds them the same way.
"$venv/bin/python" - <<'PY'
import glob, os, sysconfig
root = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13")
print("cuda-offline: CUDA root ", root)
for pat in ("lib/libnvrtc.so.13", "lib/libnvrtc-builtins.so*", "bin/ptxas", "bin/cuobjdump", "bin/nvdisasm", "include/mma.h", "include/cccl/cuda/barrier"):
    hits = glob.glob(os.path.join(root, pat))
    print("  %-28s %s" % (pat, hits[0] if hits else "MISSING"))
PY
echo "cuda-offline: run  $venv/bin/python $here/compile.py <dir-of-.cu> --out <report-dir>"
