#!/bin/sh
# Incremental backups of a volume of a running thinnbd server: a full copy of a read-only
# snapshot once, then, each time, a new snapshot and a copy of only the blocks that changed
# since the last one, found through the `qemu:dirty-bitmap:` metadata context.
#
#   incremental-backup.sh full POOL VOLUME SNAP OUT.img
#   incremental-backup.sh incremental POOL VOLUME PREV PREV.img NEW OUT.img
#                         [--host 127.0.0.1] [--port 10809] [--keep]
#
#   full          snapshot VOLUME as SNAP (read-only) and copy all of it to OUT.img
#   incremental   snapshot VOLUME as NEW, copy PREV.img (the backup of snapshot PREV) to
#                 OUT.img and write into it only the extents of NEW that differ from PREV;
#                 then PREV is deleted (unless --keep): NEW is the reference for the next run
#
# The export of NEW offers `qemu:dirty-bitmap:PREV` (PREV is in NEW's snapshot family): its
# dirty extents are exactly the blocks the two snapshots map differently, found without reading
# what they share. `nbdinfo --map` lists them; a few lines of libnbd Python (run by nbdsh)
# copy them. The bytes read are printed: about what changed, not the volume size.
#
# The defaults match `thinnbd serve` with no arguments; THINNBD_HOST and THINNBD_PORT set them
# too. Needs `thinnbd`, `nbdcopy`, `nbdinfo` and `nbdsh` (Debian: libnbd-bin, python3-libnbd).
set -eu

usage() {
    sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
}

host=${THINNBD_HOST:-127.0.0.1}
port=${THINNBD_PORT:-10809}
keep=no
mode=${1:-}
[ $# -gt 0 ] && shift
args=""
while [ $# -gt 0 ]; do
    case $1 in
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --keep) keep=yes; shift ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) args="$args $1"; shift ;;
    esac
done
# The names are volume names and paths without blanks.
# shellcheck disable=SC2086
set -- $args
uri() { echo "nbd://$host:$port/$1"; }

case $mode in
full) [ $# -eq 4 ] || usage; pool=$1 volume=$2 snap=$3 out=$4 ;;
incremental) [ $# -eq 6 ] || usage; pool=$1 volume=$2 prev=$3 prev_img=$4 snap=$5 out=$6 ;;
*) usage ;;
esac
if [ -e "$out" ]; then
    echo "$out exists; not overwriting it" >&2
    exit 1
fi
if [ ! -S "$pool/control.sock" ]; then
    echo "no thinnbd server is serving $pool (no $pool/control.sock)" >&2
    exit 1
fi

# nbdsh is `python3 -m nbd` with the first python3 on PATH; a pyenv or venv one may lack the
# module that the system python has.
if nbdsh -c pass >/dev/null 2>&1; then
    nbdsh() { command nbdsh "$@"; }
elif /usr/bin/python3 -m nbd -c pass >/dev/null 2>&1; then
    nbdsh() { /usr/bin/python3 -m nbd "$@"; }
else
    echo "nbdsh (python3-libnbd) is not usable" >&2
    exit 1
fi

thinnbd snapshot --pool "$pool" "$volume" "$snap" --read-only
done=no
work=$(mktemp -d)
cleanup() {
    rm -rf "$work"
    # A half-written image is no backup, and its snapshot no reference.
    if [ "$done" != yes ]; then
        rm -f "$out"
        thinnbd volume delete --pool "$pool" "$snap" >/dev/null 2>&1 ||
            echo "delete snapshot $snap with: thinnbd volume delete --pool $pool $snap" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$mode" = full ]; then
    nbdcopy "$(uri "$snap")" "$out"
    done=yes
    echo "full backup of $volume (snapshot $snap) in $out"
    exit 0
fi

cp --sparse=always "$prev_img" "$out"
# "offset length type description" lines; type bit 0 is dirty.
nbdinfo --map="qemu:dirty-bitmap:$prev" "$(uri "$snap")" |
    awk '$3 % 2 == 1 { print $1, $2 }' >"$work/dirty"
read_bytes=$(OUT=$out EXTENTS=$work/dirty nbdsh -u "$(uri "$snap")" -c '
import os
largest = h.get_block_size(nbd.SIZE_MAXIMUM) or (32 << 20)
out = os.open(os.environ["OUT"], os.O_WRONLY)
total = 0
for line in open(os.environ["EXTENTS"]):
    offset, length = map(int, line.split())
    while length > 0:
        n = min(length, largest)
        os.pwrite(out, h.pread(n, offset), offset)
        offset, length, total = offset + n, length - n, total + n
os.fsync(out)
os.close(out)
print(total)
')
done=yes
extents=$(wc -l <"$work/dirty")
echo "incremental backup of $volume (snapshot $snap) in $out:" \
    "read $read_bytes bytes in $extents dirty extents since $prev"
if [ "$keep" = no ]; then
    # The server lets go of PREV a moment after its last client disconnects.
    tries=0
    until thinnbd volume delete --pool "$pool" "$prev" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ $tries -ge 30 ]; then
            echo "could not delete snapshot $prev; delete it with:" >&2
            echo "  thinnbd volume delete --pool $pool $prev" >&2
            exit 1
        fi
        sleep 1
    done
fi
