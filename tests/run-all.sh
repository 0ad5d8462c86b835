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
# RADOS pools: librados to build `--features thinnbd/rados`, and for the RADOS tests a
# throwaway single-node cluster (tests/ceph/micro-cluster.sh: mon, OSD, mgr, ceph/rados CLIs).
[ -e /usr/include/rados/librados.h ] || need+=(librados-dev)
command -v ceph-mon >/dev/null || need+=(ceph-mon)
command -v ceph-osd >/dev/null || need+=(ceph-osd)
command -v ceph-mgr >/dev/null || need+=(ceph-mgr)
command -v rados >/dev/null || need+=(ceph-common)
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

# --workspace: the thinnbd package and the nbdkit plugin package (nbdkit-plugin/). One build,
# with RADOS support: the RADOS tests (tests/rados_*.rs) drive this binary against a test
# cluster and fail under CI=true when it lacks the feature.
cargo build --release --workspace --features thinnbd/rados
cargo test --release --workspace --features thinnbd/rados -- --test-threads=2

# The loom model of the active-set / teardown protocol (the `loom` feature swaps the engine's
# sync primitives for loom's).
cargo test --release --features loom --test engine_loom -- --test-threads=1
