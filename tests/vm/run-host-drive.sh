#!/usr/bin/env bash
# Test 2 (host server): the host serves a volume on a unix socket and QEMU gives it to the guest
# as a virtio disk through its own NBD client (discard=unmap, cache=none). The guest writes a
# pattern with O_DIRECT, verifies it, discards the middle copy and verifies the rest. Afterwards
# the host sees the discarded range as a hole (`nbdinfo --map`) and the written ranges as data,
# stops the server with SIGTERM, and (thinnbd only) runs thin_check on the pool metadata.
#
# Usage: run-host-drive.sh --server-bin PATH [--server-kind auto|thinnbd|nbdkit]
#          [--workdir DIR] [--console FILE] [--timeout SECONDS] [--accel auto|kvm|tcg]
#          [--extra-bin PATH]...
#   --extra-bin    another program to put in the guest's /bin (repeatable)
#   --server-bin   thinnbd (pool in WORKDIR/pool, `serve --socket`), or nbdkit (memory plugin)
# Exit status: 0 pass, 1 fail (console log path printed), 77 a needed package is missing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

server_bin="" server_kind=auto workdir="" console="" tmo=${VM_TIMEOUT:-300} extra=()
while [ $# -gt 0 ]; do
    case $1 in
    --server-bin) server_bin=$2; shift 2 ;;
    --server-kind) server_kind=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --console) console=$2; shift 2 ;;
    --timeout) tmo=$2; shift 2 ;;
    --accel) export VM_ACCEL=$2; shift 2 ;;
    --extra-bin) extra+=(--extra-bin "$2"); shift 2 ;;
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

missing=$(vm_missing_packages)
[ -x "$server_bin" ] || [ "$server_kind" != nbdkit ] || missing="$missing nbdkit"
command -v nbdinfo >/dev/null || missing="$missing libnbd-bin"
if [ "$server_kind" = thinnbd ] && ! command -v thin_check >/dev/null; then
    missing="$missing thin-provisioning-tools"
fi
# shellcheck disable=SC2086,SC2116 # squeeze the list to single spaces
missing=$(echo $missing)
if [ -n "$missing" ]; then
    echo "[vm] missing packages: $missing" >&2
    exit 77
fi

[ -n "$workdir" ] || workdir=$(mktemp -d "${TMPDIR:-/tmp}/vm-drive.XXXXXX")
mkdir -p "$workdir"
console=${console:-$workdir/console.log}
volume=vol
sock=$workdir/nbd.sock
mib=1048576
discard_off=$((8 * mib)) discard_len=$((4 * mib)) pattern_mib=4

server_pid=""
stop_server() {
    [ -n "$server_pid" ] || return 0
    kill -TERM "$server_pid" 2>/dev/null || true
    local st=0 n=0
    while kill -0 "$server_pid" 2>/dev/null && [ $n -lt 300 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=""
        vm_log "server did not exit within 30 s of SIGTERM"
        return 1
    fi
    wait "$server_pid" || st=$?
    server_pid=""
    [ $st -eq 0 ] || { vm_log "server exited with status $st after SIGTERM"; return 1; }
}
trap 'stop_server >/dev/null 2>&1 || true' EXIT

rm -rf "$sock" "$workdir/pool"
case $server_kind in
thinnbd)
    "$server_bin" pool create "$workdir/pool" --data-size 512M --block-size 64K
    "$server_bin" volume create --pool "$workdir/pool" "$volume" --size 256M
    "$server_bin" serve --pool "$workdir/pool" --socket "$sock" >"$workdir/server.log" 2>&1 &
    ;;
nbdkit)
    "$server_bin" -f -U "$sock" memory 256M >"$workdir/server.log" 2>&1 &
    ;;
*) vm_die "unknown server kind $server_kind" ;;
esac
server_pid=$!
n=0
until [ -S "$sock" ] || [ $n -ge 300 ]; do
    kill -0 "$server_pid" 2>/dev/null || { cat "$workdir/server.log" >&2; vm_die "server exited at start"; }
    sleep 0.1
    n=$((n + 1))
done
[ -S "$sock" ] || vm_die "server made no socket $sock in 30 s"

"$VM_DIR/build-initramfs.sh" --out "$workdir/initramfs.cpio.gz" "${extra[@]}" --conf <(
    cat <<EOF
VMTEST_MODE=drive
DRIVE_DISCARD_OFF=$discard_off
DRIVE_DISCARD_LEN=$discard_len
DRIVE_PATTERN_MIB=$pattern_mib
EOF
)

# The documented example builds the -drive value (nbd over the unix socket, virtio,
# cache=none, discard=unmap, detect-zeroes=unmap), so what users copy is what runs here.
drive=$("$VM_DIR/../../examples/qemu-drive.sh" --print-drive --socket "$sock" --export "$volume")
vm_log "drive: $drive"
accel=$(vm_pick_accel)
set +e
vm_boot "$accel" "$(vm_kernel)" "$workdir/initramfs.cpio.gz" "$console" "$tmo" \
    -drive "$drive"
st=$?
set -e
[ $st -eq 124 ] && vm_log "guest timed out after ${tmo}s"
vm_results "$console" >&2
vm_check_pass "$console" || exit 1

# The map as the server reports it: "offset length type description" per extent.
nbdinfo --map "nbd+unix:///$volume?socket=$sock" >"$workdir/map.txt" \
    || vm_die "nbdinfo --map failed"
sed 's/^/[vm] map: /' "$workdir/map.txt" >&2
# Every byte of [from, to) must be in extents whose type has (hole bit set) == want_hole.
check_range() {
    local from=$1 to=$2 want_hole=$3 what=$4
    awk -v from="$from" -v to="$to" -v want="$want_hole" '
        { off = $1 + 0; len = $2 + 0; type = $3 + 0
          if (off + len <= from || off >= to) next
          hole = type % 2
          if (hole != want) bad = 1
          lo = off < from ? from : off; hi = off + len > to ? to : off + len
          covered += hi - lo }
        END { exit (bad || covered != to - from) ? 1 : 0 }' "$workdir/map.txt" \
        || { vm_log "map: [$from, $to) is not all $what (map in $workdir/map.txt)"; exit 1; }
}
check_range "$discard_off" $((discard_off + discard_len)) 1 "hole after the discard"
check_range 0 $((pattern_mib * mib)) 0 "data (first pattern copy)"
check_range $((discard_off + discard_len)) $((discard_off + discard_len + pattern_mib * mib)) 0 \
    "data (last pattern copy)"

stop_server || exit 1
if [ "$server_kind" = thinnbd ]; then
    meta=""
    for f in "$workdir"/pool/metadata "$workdir"/pool/*meta*; do
        [ -f "$f" ] && { meta=$f; break; }
    done
    [ -n "$meta" ] || vm_die "no metadata file in the pool: $(ls "$workdir/pool")"
    vm_log "thin_check $meta"
    thin_check "$meta" >&2 || { vm_log "thin_check failed"; exit 1; }
fi
vm_log "PASS (console log: $console)"
