#!/usr/bin/env bash
# Sourced by the other scripts: makes sure a Vulkan loader and at least one
# Vulkan driver are present, installing Mesa's software driver (lavapipe) with
# apt where none is. On a machine with a GPU driver this does nothing.
# grep reads all of ldconfig's output (no -q): an early exit would kill
# ldconfig with SIGPIPE, and under the callers' pipefail the check would fail.
has_loader() { ldconfig -p 2>/dev/null | grep 'libvulkan.so.1' >/dev/null; }
# Any driver manifest in either folder (ls of both fails when one folder is missing).
has_driver() {
    local f
    for f in /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json; do
        [ -e "$f" ] && return 0
    done
    return 1
}
if ! has_loader || ! has_driver; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "No Vulkan driver found: installing lavapipe (mesa-vulkan-drivers)." >&2
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    else
        echo "No Vulkan driver found and no apt-get: install Mesa's lavapipe (or a GPU driver) by hand." >&2
    fi
fi
