#!/usr/bin/env bash
# Serve a thinnbd pool with nbdkit instead of `thinnbd serve`: every volume is an export, the
# same on-disk pool, so the two can take turns on it (never both at once: the pool is locked).
#
#   nbdkit-serve.sh POOL_DIR [--config FILE] [--export NAME] [--socket PATH | --port PORT]
#                   [--dry-run] [-- extra nbdkit args, e.g. --filter=stats statsfile=/tmp/s]
#
#   POOL_DIR   a pool made by `thinnbd pool create DIR --data-size SIZE`
#   --config   thinnbd TOML config ([pool] and [engine] settings apply)
#   --export   serve this one volume only (it also becomes the default export)
#   --socket   listen on a unix socket instead of TCP 127.0.0.1:PORT (default port 10809)
#   --dry-run  print the commands instead of running them
#
# It builds the plugin when missing (cargo build --release -p thinnbd-nbdkit, which leaves
# target/release/libnbdkit_thinnbd_plugin.so, under CARGO_TARGET_DIR when that is set; env
# THINNBD_PLUGIN names another .so) and runs nbdkit in the foreground; Ctrl-C or SIGTERM
# commits the pool and exits. For example:
#
#   thinnbd pool create /srv/pool --data-size 100G
#   thinnbd volume create --pool /srv/pool vm1 --size 20G
#   examples/nbdkit-serve.sh /srv/pool
#   nbdinfo --list nbd://127.0.0.1:10809
set -euo pipefail

usage() {
    sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
}

pool="" config="" export_name="" socket="" port=10809 dry=""
while [ $# -gt 0 ]; do
    case $1 in
    --config) config=$2; shift 2 ;;
    --export) export_name=$2; shift 2 ;;
    --socket) socket=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dry-run) dry=echo; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) pool=$1; shift ;;
    esac
done
[ -n "$pool" ] || usage
# Absolute paths: the build below runs from the checkout, and nbdkit may change directory.
pool=$(realpath -m "$pool")
[ -z "$config" ] || config=$(realpath -m "$config")
[ -z "$socket" ] || socket=$(realpath -m "$socket")

plugin=${THINNBD_PLUGIN:-}
if [ -z "$plugin" ]; then
    root=$(cd "$(dirname "$0")/.." && pwd)
    target=${CARGO_TARGET_DIR:-$root/target}
    # cargo takes a relative CARGO_TARGET_DIR from where it runs, the checkout.
    [[ $target == /* ]] || target=$root/$target
    plugin=$target/release/libnbdkit_thinnbd_plugin.so
    if [ -n "$dry" ] || ! nbdkit "$plugin" --dump-plugin >/dev/null 2>&1; then
        (cd "$root" && $dry cargo build --release -p thinnbd-nbdkit)
    fi
fi

listen=(-i 127.0.0.1 -p "$port")
[ -z "$socket" ] || listen=(-U "$socket")
keys=("pool=$pool")
[ -z "$config" ] || keys+=("config=$config")
[ -z "$export_name" ] || keys+=("export=$export_name")

# -f: stay in the foreground. Options for nbdkit come before the plugin, its keys after.
# --threads 4: fewer threads per connection than nbdkit's 16 serve this plugin faster
# (docs/operator-guide.md); a later -t in the extra arguments wins.
exec $dry nbdkit -f --threads 4 "${listen[@]}" "$@" "$plugin" "${keys[@]}"
