#!/bin/sh
# Back up a volume of a running thinnbd server to an image file, consistently, while clients
# keep writing to it: take a read-only snapshot, copy the snapshot with nbdcopy, delete the
# snapshot.
#
#   nbdcopy-snapshot-backup.sh POOL VOLUME OUT.img [--host 127.0.0.1] [--port 10809]
#
#   POOL     the pool directory the server runs on (e.g. ./thinnbd-pool)
#   VOLUME   the volume to back up
#   OUT.img  the raw image to write (sparse where the volume was never written)
#
# The defaults match `thinnbd serve` with no arguments; THINNBD_HOST and THINNBD_PORT set them
# too. `thinnbd` and `nbdcopy` (Debian: libnbd-bin) must be on PATH. The snapshot costs no space
# at first; blocks the clients overwrite during the copy are kept twice until it is deleted.
# Restore with `nbdcopy OUT.img nbd://HOST:PORT/VOLUME` (or qemu-img convert -n).
set -eu

usage() {
    sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
}

host=${THINNBD_HOST:-127.0.0.1}
port=${THINNBD_PORT:-10809}
pool="" volume="" out=""
while [ $# -gt 0 ]; do
    case $1 in
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *)
        if [ -z "$pool" ]; then pool=$1
        elif [ -z "$volume" ]; then volume=$1
        elif [ -z "$out" ]; then out=$1
        else usage
        fi
        shift ;;
    esac
done
[ -n "$out" ] || usage
if [ -e "$out" ]; then
    echo "$out exists; not overwriting it" >&2
    exit 1
fi

# Without a server the snapshot would be taken offline and there would be nothing to copy from.
if [ ! -S "$pool/control.sock" ]; then
    echo "no thinnbd server is serving $pool (no $pool/control.sock)" >&2
    exit 1
fi

snap="$volume.backup-$(date +%Y%m%d-%H%M%S)-$$"
thinnbd snapshot --pool "$pool" "$volume" "$snap" --read-only
# From here on, delete the snapshot however the copy ends. The server lets go of the
# snapshot a moment after nbdcopy disconnects; until then the delete is refused as in use.
copied=no
cleanup() {
    # A half-written image is no backup.
    [ "$copied" = yes ] || rm -f "$out"
    tries=0
    until thinnbd volume delete --pool "$pool" "$snap" >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ $tries -ge 30 ]; then
            echo "could not delete snapshot $snap; delete it with:" >&2
            echo "  thinnbd volume delete --pool $pool $snap" >&2
            return 1
        fi
        sleep 1
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

nbdcopy "nbd://$host:$port/$snap" "$out"
copied=yes
echo "backed up $volume (snapshot $snap) to $out"
