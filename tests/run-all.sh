#!/usr/bin/env bash
# The whole test suite, with set-up: installs the external tools the tests drive when missing
# (Debian packages), then builds and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v thin_check >/dev/null || need+=(thin-provisioning-tools)
command -v python3 >/dev/null || need+=(python3)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdsh >/dev/null || need+=(python3-libnbd)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v fio >/dev/null || need+=(fio)
command -v openssl >/dev/null || need+=(openssl)
# The openssl crate (TLS) builds against the system's OpenSSL, found by pkg-config.
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need[@]}"
fi

# The VM attach tests' packages (qemu-system-x86, linux-image-amd64, busybox-static, nbd-client, ...).
bash tests/vm/install-packages.sh
# Debian's qemu-system-x86 may replace a newer qemu-utils (backports) by removing it: put the
# matching one back.
if ! command -v qemu-io >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y qemu-utils
fi

# Style first: a formatting slip or a lint fails the run before the long tests.
cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features -- -D warnings

# --workspace: the thinnbd package and the nbdkit plugin package (nbdkit-plugin/).
cargo build --release --workspace
cargo test --release --workspace -- --test-threads=2

# The loom model of the active-set / teardown protocol (the `loom` feature swaps the engine's
# sync primitives for loom's).
cargo test --release --features loom --test engine_loom -- --test-threads=1
