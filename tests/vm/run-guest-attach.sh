#!/usr/bin/env bash
# Test 1 (guest-local): the NBD server runs inside a QEMU guest on 127.0.0.1 with its pool on a
# virtio disk; the guest kernel's NBD driver attaches the volume, makes ext4, writes files with
# known sha256, deletes one, runs fstrim, detaches, re-attaches and verifies; the server is
# stopped with SIGTERM each time. Afterwards the host checks the pool metadata with thin_check and
# that `thinnbd pool status` shows the trimmed (lower) mapped size (thinnbd only).
#
# Usage: run-guest-attach.sh --server-bin PATH [--server-kind auto|thinnbd|nbdkit]
#          [--workdir DIR] [--console FILE] [--timeout SECONDS] [--accel auto|kvm|tcg]
#          [--host-bin THINNBD] [--extra-bin PATH]... [--tls-dir DIR]
#   --server-bin   the server to run in the guest: a thinnbd binary, or nbdkit (then the guest
#                  serves a sparse file with nbdkit's file plugin and the thin-pool checks are
#                  skipped)
#   --host-bin     thinnbd binary for `pool status` on the host (default: --server-bin)
#   --extra-bin    another program to put in the guest's /bin (repeatable)
#   --tls-dir      run it all over TLS (thinnbd only): DIR/server is the server's
#                  --tls-certificates (it also gets --tls-verify-peer), DIR/client holds
#                  ca-cert.pem, client-cert.pem and client-key.pem for nbd-client
# Exit status: 0 pass, 1 fail (console log path printed), 77 a needed package is missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

server_bin="" server_kind=auto workdir="" console="" tmo=${VM_TIMEOUT:-300} extra=() host_bin="" tls_dir=""
while [ $# -gt 0 ]; do
    case $1 in
    --server-bin) server_bin=$2; shift 2 ;;
    --server-kind) server_kind=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --console) console=$2; shift 2 ;;
    --timeout) tmo=$2; shift 2 ;;
    --accel) export VM_ACCEL=$2; shift 2 ;;
    --extra-bin) extra+=(--extra-bin "$2"); shift 2 ;;
    --host-bin) host_bin=$2; shift 2 ;;
    --tls-dir) tls_dir=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) vm_die "unknown argument $1" ;;
    esac
done
[ -n "$server_bin" ] || vm_die "--server-bin PATH is required"
server_bin=$(command -v "$server_bin" || echo "$server_bin")
if [ "$server_kind" = auto ]; then
    case $(basename "$server_bin") in
    nbdkit*) server_kind=nbdkit ;;
    *) server_kind=thinnbd ;;
    esac
fi
host_bin=${host_bin:-$server_bin}
if [ -n "$tls_dir" ]; then
    [ "$server_kind" = thinnbd ] || vm_die "--tls-dir needs the thinnbd server"
    for f in server/ca-cert.pem server/server-cert.pem server/server-key.pem \
        client/ca-cert.pem client/client-cert.pem client/client-key.pem; do
        [ -r "$tls_dir/$f" ] || vm_die "--tls-dir: no $tls_dir/$f"
    done
    extra+=(--tls-dir "$tls_dir")
fi

missing=$(vm_missing_packages)
[ -x "$server_bin" ] || [ "$server_kind" != nbdkit ] || missing="$missing nbdkit"
# shellcheck disable=SC2086,SC2116 # squeeze the list to single spaces
missing=$(echo $missing)
if [ -n "$missing" ]; then
    echo "[vm] missing packages: $missing" >&2
    exit 77
fi
if [ "$server_kind" = thinnbd ] && ! command -v thin_check >/dev/null; then
    echo "[vm] missing packages: thin-provisioning-tools" >&2
    exit 77
fi

[ -n "$workdir" ] || workdir=$(mktemp -d "${TMPDIR:-/tmp}/vm-attach.XXXXXX")
mkdir -p "$workdir"
console=${console:-$workdir/console.log}
volume=vol

cat >"$workdir/vmtest.conf" <<EOF
VMTEST_MODE=attach
SERVER_KIND=$server_kind
SERVER_BIN=/bin/$(basename "$server_bin")
PORT=10809
VOLUME=$volume
POOL_DATA_SIZE=512M
POOL_BLOCK_SIZE=64K
VOLUME_SIZE=1G
TLS=$([ -n "$tls_dir" ] && echo yes || echo no)
EOF
"$VM_DIR/build-initramfs.sh" --out "$workdir/initramfs.cpio.gz" --conf "$workdir/vmtest.conf" \
    --server-bin "$server_bin" --server-kind "$server_kind" "${extra[@]}"

rm -f "$workdir/pool.img"
truncate -s 2G "$workdir/pool.img"
accel=$(vm_pick_accel)
set +e
vm_boot "$accel" "$(vm_kernel)" "$workdir/initramfs.cpio.gz" "$console" "$tmo" \
    -drive "file=$workdir/pool.img,format=raw,if=virtio,discard=unmap,cache=unsafe"
st=$?
set -e
[ $st -eq 124 ] && vm_log "guest timed out after ${tmo}s"
vm_results "$console" >&2
vm_check_pass "$console" || exit 1

before=$(vm_value "$console" mapped_before_trim)
after=$(vm_value "$console" mapped_after_trim)
final=$(vm_value "$console" mapped_final)
vm_log "guest: mapped before trim $before, after $after, at the end $final"

if [ "$server_kind" != thinnbd ]; then
    vm_log "server is $server_kind: thin_check and pool status skipped (thin pool only)"
    vm_log "PASS (console log: $console)"
    exit 0
fi

# The pool lives in the guest's ext4 on pool.img; copy it out without mounting (no loop device).
rm -rf "$workdir/pool"
debugfs -R "rdump /p $workdir" "$workdir/pool.img" >/dev/null 2>"$workdir/debugfs.log" \
    || { cat "$workdir/debugfs.log" >&2; vm_die "cannot copy the pool out of pool.img"; }
mv "$workdir/p" "$workdir/pool"
meta=""
for f in "$workdir"/pool/metadata "$workdir"/pool/*meta*; do
    [ -f "$f" ] && { meta=$f; break; }
done
[ -n "$meta" ] || vm_die "no metadata file in the pool: $(ls "$workdir/pool")"
vm_log "thin_check $meta"
thin_check "$meta" >&2 || { vm_log "thin_check failed (console log: $console)"; exit 1; }

"$host_bin" pool status "$workdir/pool" >"$workdir/status.txt" 2>&1 \
    || { cat "$workdir/status.txt" >&2; vm_die "pool status failed on the host"; }
sed 's/^/[vm] status: /' "$workdir/status.txt" >&2
host_mapped=$(vm_parse_mapped "$volume" <"$workdir/status.txt")
[ -n "$host_mapped" ] || vm_die "cannot read the mapped size of $volume from pool status"
if [ "$host_mapped" -ne "$final" ]; then
    vm_log "host sees $host_mapped mapped bytes, the guest saw $final at its end"
    exit 1
fi
if [ "$host_mapped" -ge "$before" ]; then
    vm_log "TRIM did not lower the mapped size: $before before, $host_mapped after"
    exit 1
fi
vm_log "PASS (console log: $console)"
