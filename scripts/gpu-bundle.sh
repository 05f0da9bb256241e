#!/usr/bin/env bash
# Builds, here, everything a run on the GPU machine needs, into gpu-bundle/
# (git-ignored, well under the device tool's 64 MiB): the property-test binary,
# and the benchmark, with the `cuda` and `wgpu` features
# (profile `gpu`: fat LTO, stripped), the Vulkan loader package for wgpu, and
# scripts/gpu-run.sh. Then: device run with carry=["gpu-bundle"] and the
# command `bash gpu-bundle/gpu-run.sh tests` (or `bench`, or `all`).
# `bash scripts/gpu-bundle.sh tests` rebuilds only the test binary of an
# existing bundle (after a change to the tests alone). `bash
# scripts/gpu-bundle.sh burn` builds the Burn tests for CUDA through Burn's
# Fusion backend (features cuda, fusion) into gpu-bundle-burn/ instead (carry
# that, and run `bash gpu-bundle-burn/gpu-run.sh burn`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/cuda-llvm.sh
# cudarc's CUDA 13.0 bindings, as on the H100's driver; libcuda and NVRTC load at run time.
export CUDARC_CUDA_VERSION=13000
bundle=gpu-bundle
features=cuda
if [ "${1:-}" = spirv ]; then
    # wgpu through cubecl's SPIR-V compiler (cooperative matrices on Vulkan)
    # instead of WGSL, into gpu-bundle-spirv/ (carry that and run
    # `bash gpu-bundle-spirv/gpu-run.sh ...`: the same commands).
    bundle=gpu-bundle-spirv
    features=cuda,wgpu-spirv
    shift
fi
if [ "${1:-}" = burn ]; then
    rm -rf gpu-bundle-burn && mkdir -p gpu-bundle-burn/bin
    exe="$(cargo test --no-run -p lightning-attention-burn-examples --test burn --profile gpu --features cuda,fusion --message-format=json-render-diagnostics |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])')"
    cp "$exe" gpu-bundle-burn/bin/burn-tests
    strip gpu-bundle-burn/bin/burn-tests
    cp scripts/gpu-run.sh gpu-bundle-burn/
    du -sh gpu-bundle-burn
    exit 0
fi
only_tests=false
if [ "${1:-}" = tests ] && { [ -x "$bundle/bin/bench" ] || [ -e "$bundle/bin/bench.gz" ]; }; then only_tests=true; fi
if ! $only_tests; then rm -rf "$bundle"; fi
mkdir -p "$bundle/bin" "$bundle/debs"

executables() {
    cargo "$@" --profile gpu --features "$features" --message-format=json-render-diagnostics |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])'
}
cp "$(executables test --no-run --test kernels)" "$bundle/bin/kernels-tests"
strip "$bundle/bin/kernels-tests"
cp scripts/gpu-run.sh "$bundle/"
if $only_tests; then
    gzip -f -6 "$bundle/bin/kernels-tests"
    du -sh "$bundle" "$bundle"/bin/*
    exit 0
fi
cp "$(executables build --bench lightning)" "$bundle/bin/bench"
strip "$bundle/bin/bench"
cp "$(executables build --example quickstart)" "$bundle/bin/quickstart"
strip "$bundle/bin/quickstart"

# The Vulkan loader and the GL dispatch libraries the NVIDIA ICD links against
# (the driver brings the ICD itself), as the device README says.
lists=/tmp/gpu-bundle-apt-lists
mkdir -p "$lists/partial"
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
apt-get "${apt_opts[@]}" update -qq
(cd "$bundle/debs" && apt-get "${apt_opts[@]}" download libvulkan1 libglvnd0 libegl1 libgl1 libglx0 libopengl0 libgles2 >/dev/null 2>&1)
cp scripts/gpu-run.sh "$bundle/"
# Gzipped: three stripped binaries of about 30 MB each would pass the device
# tool's 64 MiB; gpu-run.sh and gpu-issue18.sh unpack them there.
gzip -f -6 "$bundle"/bin/*
du -sh "$bundle" "$bundle"/bin/*
