#!/bin/busybox sh
# shellcheck shell=dash disable=SC2153,SC2016
# /init of the test guest (runs as PID 1 inside QEMU, busybox only).
#
# Owns the in-guest half of the VM tests; the host half is tests/vm/run-*.sh. Settings come from
# /vmtest.conf, which the host writes into the initramfs:
#   VMTEST_MODE=attach   test 1: serve a volume inside the guest from a pool on /dev/vda and use
#                        it through the kernel NBD driver (/dev/nbd0, ext4, fstrim, re-attach)
#   VMTEST_MODE=drive    test 2: /dev/vda is a host NBD export given by QEMU; O_DIRECT pattern
#                        write/verify and a discard
#   SERVER_KIND=thinnbd|nbdkit, SERVER_BIN, PORT, VOLUME, POOL_DATA_SIZE, POOL_BLOCK_SIZE, VOLUME_SIZE
#   DRIVE_DISCARD_OFF, DRIVE_DISCARD_LEN, DRIVE_PATTERN_MIB
#   TLS=yes              test 1 over TLS: the server requires TLS and client certificates
#                        (/tls/server), nbd-client presents /tls/client's
# Results go to the serial console as VMTEST lines (see tests/vm/lib.sh); the guest always powers
# off at the end, so a hang can only come from the kernel or a stuck tool (the host has a timeout).

/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mkdir -p /proc /sys /dev /tmp /mnt /pool /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
# Keep kernel messages off the console so they cannot split our result lines; dmesg has them.
echo 1 >/proc/sys/kernel/printk

. /vmtest.conf

say() { echo "VMTEST: $*"; }
value() { echo "VMTEST-VALUE: $1=$2"; }
finish() {
    sync
    poweroff -f
    sleep 5
}
fail() {
    echo "VMTEST-RESULT: FAIL $*"
    echo "--- dmesg (tail) ---"
    dmesg | tail -n 40
    if [ -f /tmp/server.log ]; then
        echo "--- server log (tail) ---"
        tail -n 40 /tmp/server.log
    fi
    finish
}
run() {
    say "+ $*"
    "$@" || fail "command failed (status $?): $*"
}

# Poll COUNT times, 0.2 s apart, until the shell condition holds.
wait_for() {
    n=$1
    shift
    while [ "$n" -gt 0 ]; do
        # shellcheck disable=SC2294 # the condition is one shell string on purpose
        eval "$@" && return 0
        usleep 200000
        n=$((n - 1))
    done
    return 1
}

while read -r mod args; do
    [ -n "$mod" ] || continue
    # shellcheck disable=SC2086
    # Some dependencies are CPU-specific (crc32c-intel without SSE4.2 under TCG): warn only;
    # the checks below catch a module that really matters.
    insmod "$mod" $args || say "warning: insmod $mod failed"
done </modules.list
grep -qw ext4 /proc/filesystems || fail "no ext4 in the guest kernel"

ip link set lo up || fail "cannot bring up lo"
ip addr add 127.0.0.1/8 dev lo 2>/dev/null

wait_for 50 '[ -b /dev/vda ]' || fail "no /dev/vda"

# ---------------------------------------------------------------- server control (test 1)

SERVER_PID=""

server_prepare() {
    case $SERVER_KIND in
    thinnbd)
        run "$SERVER_BIN" pool create /pool/p --data-size "$POOL_DATA_SIZE" --block-size "$POOL_BLOCK_SIZE"
        run "$SERVER_BIN" volume create --pool /pool/p "$VOLUME" --size "$VOLUME_SIZE"
        ;;
    nbdkit)
        # The file plugin on a sparse file stands in for a pool: it persists across server
        # restarts and punches holes on trim, so the allocated size plays "mapped".
        run truncate -s "$VOLUME_SIZE" /pool/vol.img
        ;;
    *) fail "unknown SERVER_KIND $SERVER_KIND" ;;
    esac
}

server_start() {
    case $SERVER_KIND in
    thinnbd)
        set --
        [ "${TLS:-no}" = yes ] && set -- --tls require --tls-certificates /tls/server --tls-verify-peer
        "$SERVER_BIN" serve --pool /pool/p --listen "127.0.0.1:$PORT" "$@" >>/tmp/server.log 2>&1 &
        ;;
    nbdkit)
        "$SERVER_BIN" -f -v -i 127.0.0.1 -p "$PORT" file /pool/vol.img >>/tmp/server.log 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    # Listening when /proc/net/tcp has 127.0.0.1:PORT in state 0A (busybox nc has no -z).
    hexport=$(printf '%04X' "$PORT")
    wait_for 150 "grep -q '0100007F:$hexport 00000000:0000 0A' /proc/net/tcp || ! kill -0 $SERVER_PID" \
        || fail "server did not listen on 127.0.0.1:$PORT"
    kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited at start"
    say "server started (pid $SERVER_PID)"
}

server_stop() {
    run kill -TERM "$SERVER_PID"
    wait "$SERVER_PID"
    st=$?
    [ "$st" -eq 0 ] || fail "server exited with status $st after SIGTERM"
    say "server stopped cleanly"
    SERVER_PID=""
}

# Sets MAPPED to the bytes of the volume that take space in the pool; server must be stopped.
# (Not a function to call in $(...): fail must run in this shell to reach the console.)
server_mapped() {
    case $SERVER_KIND in
    thinnbd)
        "$SERVER_BIN" pool status /pool/p >/tmp/status.txt 2>&1 || {
            cat /tmp/status.txt
            fail "pool status failed"
        }
        sed 's/^/VMTEST: status: /' /tmp/status.txt
        MAPPED=$(parse_mapped "$VOLUME" </tmp/status.txt)
        ;;
    nbdkit)
        MAPPED=$(($(stat -c %b /pool/vol.img) * $(stat -c %B /pool/vol.img)))
        ;;
    esac
    [ -n "$MAPPED" ] || fail "could not read the mapped size of $VOLUME"
}

# Same rules as vm_parse_mapped in tests/vm/lib.sh (keep the two in step).
parse_mapped() {
    awk -v vol="$1" '
    function unit(u) {
        u = toupper(u); if (u == "BYTES") return 1; sub(/I?B$/, "", u)
        if (u == "K") return 1024; if (u == "M") return 1048576
        if (u == "G") return 1073741824; if (u == "T") return 1099511627776
        return 1
    }
    BEGIN { v = vol; gsub(/\./, "[.]", v); named = "(^|[^a-z0-9_.-])" tolower(v) "([^a-z0-9_.-]|$)" }
    {
        line = tolower($0)
        if (line !~ named) next
        if (match(line, /mapped[^0-9]*[0-9][0-9.]*[ ]*(bytes|[kmgt]i?b|[kmgt]|b)?/)) {
            # A unit glued to more letters ("192 blocks") is not a size: print nothing.
            if (substr(line, RSTART + RLENGTH, 1) ~ /[a-z]/) exit
            s = substr(line, RSTART, RLENGTH)
            sub(/^mapped[^0-9]*/, "", s)
            n = s; sub(/[ a-z]*$/, "", n)
            u = s; sub(/^[0-9.]*[ ]*/, "", u)
            printf "%.0f\n", n * unit(u)
            exit
        }
    }'
}

# The documented example (examples/nbd-client-attach.sh) does the attach, mkfs, mount, fstrim,
# unmount and detach, so the steps a user copies are the steps tested here.
example() {
    if [ "${TLS:-no}" = yes ]; then
        set -- "$@" --cacertfile /tls/client/ca-cert.pem --certfile /tls/client/client-cert.pem \
            --keyfile /tls/client/client-key.pem --tls-hostname localhost
    fi
    run sh /nbd-client-attach.sh "$@" --port "$PORT" --export "$VOLUME" --mount /mnt \
        --mount-opts noinit_itable
}

attach() {
    example up "$@"
    [ "$(cat /sys/block/nbd0/size)" -gt 0 ] || fail "nbd0 has no size after attach"
    if [ "${TLS:-no}" = yes ]; then
        # The server names each session's TLS version and verified peer.
        grep "client connected" /tmp/server.log | tail -n 1 | grep -q "TLSv1.2 x509:CN=alice" \
            || fail "the attach is not TLS 1.2 with alice's certificate"
    fi
}

detach() {
    example down
    wait_for 50 '[ "$(cat /sys/block/nbd0/size)" -eq 0 ]' || fail "nbd0 still has a size after detach"
}

# ---------------------------------------------------------------- test 1: kernel NBD attach

test_attach() {
    run mkfs.ext4 -q -F /dev/vda
    run mount -t ext4 /dev/vda /pool
    server_prepare
    server_start

    attach --mkfs
    value nbd0_bytes $(($(cat /sys/block/nbd0/size) * 512))
    # Random content, so a stale or misplaced block cannot pass the checksum by luck.
    run dd if=/dev/urandom of=/mnt/keep1 bs=1M count=4 status=none
    run dd if=/dev/urandom of=/mnt/delete-me bs=1M count=24 status=none
    run dd if=/dev/urandom of=/mnt/keep2 bs=64k count=3 status=none
    run mkdir -p /mnt/dir
    run dd if=/dev/urandom of=/mnt/dir/keep3 bs=1M count=8 status=none
    echo "thinnbd vm attach test" >/mnt/dir/small.txt
    (cd /mnt && sha256sum keep1 keep2 dir/keep3 dir/small.txt) >/tmp/sums || fail "sha256sum"
    run sync
    run rm /mnt/delete-me
    run sync
    detach

    # Measure what the pool holds before trimming (the delete alone frees nothing below ext4).
    server_stop
    server_mapped
    before=$MAPPED
    value mapped_before_trim "$before"
    server_start

    attach
    example trim
    detach
    server_stop
    server_mapped
    after=$MAPPED
    value mapped_after_trim "$after"
    # 24 MiB were deleted; allow for blocks ext4 shares with other data.
    [ $((before - after)) -ge $((12 * 1048576)) ] \
        || fail "trim did not lower mapped size enough: before=$before after=$after"

    # Re-attach through a fresh server and check every kept byte.
    server_start
    attach
    (cd /mnt && sha256sum -c /tmp/sums) || fail "checksums differ after re-attach"
    [ ! -e /mnt/delete-me ] || fail "deleted file came back"
    detach
    server_stop
    # The host compares its own `pool status` of the copied-out pool with this.
    server_mapped
    value mapped_final "$MAPPED"

    run umount /pool
    run sync
}

# ---------------------------------------------------------------- test 2: QEMU NBD drive

test_drive() {
    mib=$DRIVE_PATTERN_MIB
    dev_bytes=$(($(cat /sys/block/vda/size) * 512))
    value vda_bytes "$dev_bytes"
    run dd if=/dev/urandom of=/tmp/pattern bs=1M count="$mib" status=none
    want=$(sha256sum </tmp/pattern | cut -d' ' -f1)
    # Three copies: at 0, in the middle (discarded later) and after it.
    for at in 0 $((DRIVE_DISCARD_OFF / 1048576)) $(((DRIVE_DISCARD_OFF + DRIVE_DISCARD_LEN) / 1048576)); do
        run dd if=/tmp/pattern of=/dev/vda bs=1M seek="$at" oflag=direct conv=fsync status=none
    done
    for at in 0 $((DRIVE_DISCARD_OFF / 1048576)) $(((DRIVE_DISCARD_OFF + DRIVE_DISCARD_LEN) / 1048576)); do
        got=$(dd if=/dev/vda bs=1M skip="$at" count="$mib" iflag=direct status=none | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "pattern at ${at} MiB reads back wrong before discard"
    done
    run blkdiscard -o "$DRIVE_DISCARD_OFF" -l "$DRIVE_DISCARD_LEN" /dev/vda
    run sync
    for at in 0 $(((DRIVE_DISCARD_OFF + DRIVE_DISCARD_LEN) / 1048576)); do
        got=$(dd if=/dev/vda bs=1M skip="$at" count="$mib" iflag=direct status=none | sha256sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "pattern at ${at} MiB changed by a discard elsewhere"
    done
    zeros=$(dd if=/dev/zero bs=1M count=$((DRIVE_DISCARD_LEN / 1048576)) status=none | sha256sum | cut -d' ' -f1)
    got=$(dd if=/dev/vda bs=1M skip=$((DRIVE_DISCARD_OFF / 1048576)) count=$((DRIVE_DISCARD_LEN / 1048576)) \
        iflag=direct status=none | sha256sum | cut -d' ' -f1)
    [ "$got" = "$zeros" ] || fail "discarded range does not read back as zeros"
}

say "guest up, mode $VMTEST_MODE, TLS ${TLS:-no}, kernel $(uname -r)"
case $VMTEST_MODE in
attach) test_attach ;;
drive) test_drive ;;
*) fail "unknown VMTEST_MODE $VMTEST_MODE" ;;
esac
echo "VMTEST-RESULT: PASS"
finish
