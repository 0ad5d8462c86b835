#!/bin/sh
# Attach a thinnbd volume as a local block device with the Linux kernel's NBD driver, put a
# filesystem on it, and give freed space back to the pool with fstrim. Run as root.
#
#   nbd-client-attach.sh up   [--mkfs] [options]   load nbd, attach, (mkfs.ext4,) mount
#   nbd-client-attach.sh trim [options]            fstrim: return deleted files' blocks to the pool
#   nbd-client-attach.sh down [options]            unmount and detach
#
# Options (defaults match `thinnbd serve` with no arguments):
#   --host 127.0.0.1  --port 10809  --export default  --device /dev/nbd0  --mount /mnt/thin
#   --mount-opts OPTS extra mount options, e.g. "discard" to trim on every delete
#   --mkfs            make a new ext4 on the volume first (DESTROYS what is on it)
#   --cacertfile FILE connect over TLS, trusting the CA certificate in FILE (for a server started
#                     with `--tls require`); nbd-client 3.24 speaks TLS 1.2
#   --certfile FILE --keyfile FILE   the client certificate and its key (a server with
#                     `--tls-verify-peer` asks for one)
#   --tls-hostname NAME  the name the server certificate must carry (default: --host)
#
# The server must already run, e.g. `thinnbd serve` (pool ./thinnbd-pool, volume `default`).
# Plain POSIX sh (busybox is enough): the VM tests run this very script in their guest.
set -eu

usage() {
    sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
}

cmd=${1:-}
[ $# -gt 0 ] && shift
host=127.0.0.1 port=10809 export_name=default dev=/dev/nbd0 mnt=/mnt/thin opts="" mkfs=no
cacert="" cert="" key="" tls_host=""
while [ $# -gt 0 ]; do
    case $1 in
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --export) export_name=$2; shift 2 ;;
    --device) dev=$2; shift 2 ;;
    --mount) mnt=$2; shift 2 ;;
    --mount-opts) opts=$2; shift 2 ;;
    --mkfs) mkfs=yes; shift ;;
    --cacertfile) cacert=$2; shift 2 ;;
    --certfile) cert=$2; shift 2 ;;
    --keyfile) key=$2; shift 2 ;;
    --tls-hostname) tls_host=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; usage ;;
    esac
done
nbd=$(basename "$dev")
# nbd-client's TLS options, as positional parameters (POSIX sh has no arrays): with
# -cacertfile it refuses a server whose certificate the CA did not sign for the host name.
set --
if [ -n "$cacert" ]; then
    set -- -cacertfile "$cacert" -tlshostname "${tls_host:-$host}"
    [ -z "$cert" ] || set -- "$@" -certfile "$cert"
    [ -z "$key" ] || set -- "$@" -keyfile "$key"
elif [ -n "$cert$key$tls_host" ]; then
    echo "--certfile, --keyfile and --tls-hostname need --cacertfile" >&2
    exit 2
fi

is_mounted() { grep -qs " $mnt " /proc/mounts; }

case $cmd in
up)
    # max_part lets the kernel show partitions (nbd0p1...) if the volume has a partition table.
    [ -d /sys/module/nbd ] || modprobe nbd max_part=15
    if [ "$(cat "/sys/block/$nbd/size")" != 0 ]; then
        echo "$dev is already attached; pick another --device or run '$0 down' first" >&2
        exit 1
    fi
    # nbd-client 3.x: HOST PORT DEVICE, the port numeric; -N names the export (the volume).
    # -b 4096 matches the filesystem block size. Add "-C 4" for four connections when the server
    # allows several (NBD_FLAG_CAN_MULTI_CONN).
    nbd-client "$host" "$port" "$dev" -N "$export_name" -b 4096 "$@"
    echo "attached $host:$port/$export_name as $dev ($(($(cat "/sys/block/$nbd/size") / 2048)) MiB)"
    if [ "$mkfs" = yes ]; then
        # mkfs discards the whole device first, which costs nothing on a thin volume.
        mkfs.ext4 -q -F "$dev"
    fi
    mkdir -p "$mnt"
    # Without "discard" in the options, deleted blocks go back to the pool on the next
    # `nbd-client-attach.sh trim` (or the distribution's fstrim.timer): cheaper than a discard
    # per delete.
    mount -t ext4 ${opts:+-o "$opts"} "$dev" "$mnt"
    df -h "$mnt"
    ;;
trim)
    # Deleted files keep their blocks in the pool until the filesystem discards them.
    fstrim -v "$mnt"
    ;;
down)
    if is_mounted; then
        umount "$mnt"
    fi
    nbd-client -d "$dev"
    echo "detached $dev"
    ;;
*) usage ;;
esac
