#!/bin/sh
# A stand-in for the thinnbd CLI, for checking the VM harness's thinnbd-only steps (pool and volume
# creation, serve/SIGTERM, pool status parsing, thin_check on the metadata) before the real CLI
# exists. Not a test of thinnbd: the data path is nbdkit's file plugin on DIR/NAME.vol, and the
# metadata is an empty dm-thin pool made by thin_restore. POSIX sh, so it also runs in the guest
# (give run-guest-attach.sh `--extra-bin "$(command -v nbdkit)" --extra-bin "$(command -v thin_restore)"`).
#
#   fake-thinnbd.sh pool create DIR --data-size SIZE [--block-size SIZE]
#   fake-thinnbd.sh volume create --pool DIR NAME --size SIZE
#   fake-thinnbd.sh serve --pool DIR [--listen ADDR:PORT] [--socket PATH]
#   fake-thinnbd.sh pool status DIR
#
# `pool status` prints "volume NAME mapped=BYTES" from the file's allocated blocks and keeps the
# answer in DIR/status.txt; with FAKE_THINNBD_CACHED=1 it prints that file instead (a pool copied
# out of a disk image is no longer sparse).
set -eu

die() {
    echo "fake-thinnbd: $*" >&2
    exit 1
}

case "${1:-} ${2:-}" in
"pool create")
    dir=$3
    shift 3
    size="" bs=64K
    while [ $# -gt 0 ]; do
        case $1 in
        --data-size) size=$2; shift 2 ;;
        --block-size) bs=$2; shift 2 ;;
        *) die "unknown option $1" ;;
        esac
    done
    [ -n "$size" ] || die "--data-size is required"
    mkdir -p "$dir"
    truncate -s "$size" "$dir/data"
    bytes=$(stat -c %s "$dir/data")
    case $bs in
    *K) bsb=$((${bs%K} * 1024)) ;;
    *M) bsb=$((${bs%M} * 1048576)) ;;
    *) bsb=$bs ;;
    esac
    cat >"$dir/pool.xml" <<EOF
<superblock uuid="" time="0" transaction="1" version="2" data_block_size="$((bsb / 512))" nr_data_blocks="$((bytes / bsb))">
</superblock>
EOF
    truncate -s 8M "$dir/metadata"
    thin_restore -q -i "$dir/pool.xml" -o "$dir/metadata" >/dev/null 2>&1 \
        || thin_restore -i "$dir/pool.xml" -o "$dir/metadata" >/dev/null
    ;;
"volume create")
    shift 2
    dir="" name="" size=""
    while [ $# -gt 0 ]; do
        case $1 in
        --pool) dir=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        *) name=$1; shift ;;
        esac
    done
    { [ -d "$dir" ] && [ -n "$name" ] && [ -n "$size" ]; } || die "usage: volume create --pool DIR NAME --size SIZE"
    truncate -s "$size" "$dir/$name.vol"
    ;;
"serve --pool")
    dir=$3
    shift 3
    set -- "$@"
    args=""
    while [ $# -gt 0 ]; do
        case $1 in
        --listen) args="$args -i ${2%:*} -p ${2##*:}"; shift 2 ;;
        --socket) args="$args -U $2"; shift 2 ;;
        *) die "unknown option $1" ;;
        esac
    done
    vol=""
    for v in "$dir"/*.vol; do [ -f "$v" ] && vol=$v && break; done
    [ -n "$vol" ] || die "no volume in $dir"
    # exec: SIGTERM reaches nbdkit, which exits 0, like `thinnbd serve` must.
    # shellcheck disable=SC2086
    exec nbdkit -f $args file "$vol"
    ;;
"pool status")
    dir=$3
    if [ "${FAKE_THINNBD_CACHED:-0}" = 1 ] && [ -f "$dir/status.txt" ]; then
        cat "$dir/status.txt"
        exit 0
    fi
    : >"$dir/status.txt"
    for v in "$dir"/*.vol; do
        n=$(basename "$v" .vol)
        echo "volume $n size=$(stat -c %s "$v") mapped=$(($(stat -c %b "$v") * $(stat -c %B "$v")))" \
            >>"$dir/status.txt"
    done
    cat "$dir/status.txt"
    ;;
*) die "unsupported: $*" ;;
esac
