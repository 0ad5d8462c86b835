#!/usr/bin/env bash
# Install the Debian packages the VM tests need, if any is missing (root or sudo, apt).
# For tests/run-all.sh and CI: `tests/vm/install-packages.sh` before `cargo test`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

need=$(vm_missing_packages)
command -v nbdinfo >/dev/null || need="$need libnbd-bin"
command -v thin_check >/dev/null || need="$need thin-provisioning-tools"
command -v nbdkit >/dev/null || need="$need nbdkit"
command -v debugfs >/dev/null || need="$need e2fsprogs"
# shellcheck disable=SC2086,SC2116 # squeeze the list to single spaces
need=$(echo $need)
[ -n "$need" ] || exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
vm_log "installing: $need"
$sudo apt-get update
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y $need
