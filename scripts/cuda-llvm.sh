#!/usr/bin/env bash
# Only for building the `cuda` feature on a machine without general internet
# access (package registries only). cubecl-cuda's build dependency
# tracel-llvm-bundler downloads LLVM 23.1 at build time; this installs the same
# LLVM from PyPI's static packages where the bundler looks, so it skips the
# download. Users with internet do not need it. Needs python3 and pip.
set -euo pipefail
root="${XDG_DATA_HOME:-$HOME/.local/share}/tracel"
dest="$root/tracel-llvm-23.1.0-4"
if [ -f "$dest/.tracel-llvm-installed" ]; then
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" \
    mlc-llvm-static==23.1.1.post0 mlc-llvm-static-extra-targets==23.1.1.post0
mkdir -p "$root/mlc-llvm-23.1.1"
for wheel in "$tmp"/*.whl; do
    python3 -m zipfile -e "$wheel" "$root/mlc-llvm-23.1.1"
done
chmod +x "$root/mlc-llvm-23.1.1/mlc_llvm_static/static/bin/"* 2>/dev/null || true
rm -rf "$dest"
ln -s "$root/mlc-llvm-23.1.1/mlc_llvm_static/static" "$dest"
touch "$dest/.tracel-llvm-installed"
echo "LLVM for the CUDA build installed at $dest"
