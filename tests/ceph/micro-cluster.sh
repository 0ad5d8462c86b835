#!/usr/bin/env bash
# A throwaway single-node Ceph cluster (one mon, one BlueStore OSD on a sparse file, optionally
# one mgr) for the RADOS tests and perf runs. Everything it creates lives under DIR: config,
# monitor store, OSD block file, logs, admin sockets and the PIDs of the daemons it started.
# Nothing is written under /etc/ceph, /var/lib/ceph or /var/run/ceph, and nothing is ever
# stopped by name: `stop` signals exactly the PIDs recorded in DIR/pids/.
#
# Usage:
#   micro-cluster.sh start DIR      create (or restart) the cluster, wait until it stores an
#                                   object, print `export CEPH_CONF=DIR/ceph.conf`
#   micro-cluster.sh stop DIR       TERM the recorded daemons, KILL what is left after a timeout
#   micro-cluster.sh osd-stop DIR   stop only the OSD (data stays in its block file)
#   micro-cluster.sh osd-start DIR  start the OSD again and wait until it serves I/O
#   micro-cluster.sh status DIR     `ceph -s` of the cluster
#
# A fresh start takes about 11 s on the 2-core test machine (mon mkfs, BlueStore mkfs of the
# OSD, PG peering of the probe pool); a restart of a stopped DIR about 10 s; osd-stop 2 s and
# osd-start 5 s. The daemons idle at ~40 MB (mon, OSD) and ~300 MB plus a few % CPU (mgr).
#
# Environment:
#   MICRO_CLUSTER_OSD_SIZE   size of the sparse BlueStore file (default 8G)
#   MICRO_CLUSTER_MGR        1 (default) starts a ceph-mgr, 0 does not (plain RADOS and RBD
#                            I/O need no mgr)
#   MICRO_CLUSTER_OWNER_PID  when set, a watcher stops the cluster once that process is gone,
#                            so a test binary that dies (or keeps its cluster in a static that
#                            is never dropped) does not leave daemons behind
#   MICRO_CLUSTER_REMOVE_WITH_OWNER  1: the watcher also removes DIR after that stop
#   MICRO_CLUSTER_TIMEOUT    seconds to wait for each step (default 60)
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|osd-stop|osd-start|status DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
ACTION=$1
DIR=$2
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/ceph.conf
PIDS=$DIR/pids
TIMEOUT=${MICRO_CLUSTER_TIMEOUT:-60}
export CEPH_CONF=$CONF
# A client started by this script must not pick up the caller's cluster arguments.
unset CEPH_ARGS

log() { echo "micro-cluster: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# A free TCP port on 127.0.0.1: the kernel picks one, we release it and hand it to the mon.
# Another process could take it in between; the mon would then fail to bind and `start` fails
# with its log, which is rare enough for a test cluster.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ceph/rados calls with a bound on how long they may hang when a daemon is down.
ceph_cli() { timeout "$TIMEOUT" ceph --connect-timeout "$TIMEOUT" "$@"; }

pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

recorded_pid() {
    local file=$PIDS/$1
    [ -f "$file" ] && cat "$file" || true
}

# Start one daemon in the foreground of its own session, recording its PID. `-f` keeps ceph
# from forking, so $! is the daemon itself (no pid-file race), and stdout/stderr go to DIR/log.
spawn() {
    local name=$1
    shift
    setsid "$@" -f </dev/null >>"$DIR/log/$name.stdout" 2>&1 &
    echo $! >"$PIDS/$name"
}

write_conf() {
    local fsid=$1 v2=$2 v1=$3
    cat >"$CONF" <<EOF
# Written by micro-cluster.sh: a throwaway single-node test cluster, not for real data.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
public addr = 127.0.0.1
run dir = $DIR/run
crash dir = $DIR/crash
keyring = $DIR/keyring
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
log to syslog = false
err to syslog = false
clog to syslog = false
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon max pg per osd = 2000
mon warn on pool no redundancy = false
# One OSD: never mark it out (its PGs would have nowhere to go), and keep the mon running
# on a nearly full test disk rather than shutting down at the default 5 % free.
mon osd down out interval = 0
mon warn on osd down out interval zero = false
mon data avail warn = 2
mon data avail crit = 1
ms async op threads = 2

[mon]
mon data = $DIR/mon
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
mon cluster log file = $DIR/log/cluster.log

[mgr]
mgr data = $DIR/mgr
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok

[osd]
osd data = $DIR/osd
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $OSD_BYTES
bluestore fsck on mount = false
osd memory target = 1073741824
osd op num shards = 2
osd op num threads per shard = 1
osd crush update on start = true
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
EOF
}

size_to_bytes() {
    numfmt --from=iec "$1"
}

# Wait until the cluster stores and returns an object: the one readiness test that matters to
# the RADOS clients (the mon answers, the OSD is up and its PGs are active).
wait_for_io() {
    local deadline=$((SECONDS + TIMEOUT))
    local probe=$DIR/probe.in back=$DIR/probe.out
    head -c 4096 /dev/urandom >"$probe"
    until timeout 10 rados -p micro-cluster-probe put probe "$probe" 2>/dev/null &&
        timeout 10 rados -p micro-cluster-probe get probe "$back" 2>/dev/null &&
        cmp -s "$probe" "$back"; do
        if [ $SECONDS -ge $deadline ]; then
            die "the cluster in $DIR stores no object after ${TIMEOUT}s; see $DIR/log"
        fi
        local osd
        osd=$(recorded_pid osd.0)
        pid_alive "$osd" || die "ceph-osd died; see $DIR/log/osd.0.log and osd.0.stdout"
        sleep 0.5
    done
    rm -f "$probe" "$back"
}

start_osd() {
    spawn osd.0 ceph-osd -c "$CONF" -i 0
}

start_watcher() {
    local owner=${MICRO_CLUSTER_OWNER_PID:-}
    [ -n "$owner" ] || return 0
    pid_alive "$owner" || die "MICRO_CLUSTER_OWNER_PID $owner is not running"
    # The watcher runs in its own session so that signals to the caller's process group do
    # not take it down before it has cleaned up.
    setsid bash -c '
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        MICRO_CLUSTER_WATCHER=1 bash "$2" stop "$3"
        # Only a directory this script set up (it has our ceph.conf) is ever removed.
        if [ "$4" = 1 ] && grep -q "^# Written by micro-cluster.sh" "$3/ceph.conf"; then
            rm -rf "$3"
        fi
    ' micro-cluster-watcher "$owner" "$(readlink -f "$0")" "$DIR" "${MICRO_CLUSTER_REMOVE_WITH_OWNER:-0}" </dev/null >/dev/null 2>&1 &
    echo $! >"$PIDS/watcher"
}

do_start() {
    local started=$SECONDS
    if [ -f "$CONF" ] && pid_alive "$(recorded_pid mon.a)"; then
        die "a cluster is already running in $DIR (stop it first)"
    fi
    command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null &&
        command -v monmaptool >/dev/null && command -v rados >/dev/null ||
        die "Ceph is not installed (need ceph-mon ceph-osd ceph-common)"
    OSD_BYTES=$(size_to_bytes "${MICRO_CLUSTER_OSD_SIZE:-8G}")
    mkdir -p "$DIR/log" "$DIR/run" "$DIR/crash" "$PIDS"
    # A start that fails half way must not leave the daemons it did start running.
    trap 'log "start failed; stopping what was started"; do_stop' EXIT

    if [ ! -f "$DIR/mon/store.db/CURRENT" ]; then
        local fsid v2 v1
        fsid=$(uuidgen)
        v2=$(free_port)
        v1=$(free_port)
        [ "$v1" != "$v2" ] || v1=$(free_port)
        rm -rf "$DIR/mon" "$DIR/osd" "$DIR/mgr"
        mkdir -p "$DIR/mon" "$DIR/osd" "$DIR/mgr/ceph-x"
        : >"$DIR/keyring"
        write_conf "$fsid" "$v2" "$v1"
        monmaptool --create --clobber --fsid "$fsid" \
            --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" "$DIR/monmap" >/dev/null
        ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring /dev/null
        spawn mon.a ceph-mon -c "$CONF" -i a
        local uuid
        uuid=$(uuidgen)
        local id
        id=$(ceph_cli osd new "$uuid")
        [ "$id" = 0 ] || die "expected OSD id 0, the mon gave $id"
        ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" --no-mon-config \
            >>"$DIR/log/osd.0.stdout" 2>&1 || die "ceph-osd --mkfs failed; see $DIR/log"
    else
        # A stopped cluster keeps its store and block file; start it as it was.
        spawn mon.a ceph-mon -c "$CONF" -i a
    fi
    start_osd
    if [ "${MICRO_CLUSTER_MGR:-1}" = 1 ]; then
        spawn mgr.x ceph-mgr -c "$CONF" -i x
    fi
    start_watcher
    if ! ceph_cli osd pool ls | grep -qx micro-cluster-probe; then
        ceph_cli osd pool create micro-cluster-probe 1 1 >/dev/null 2>&1
        ceph_cli osd pool application enable micro-cluster-probe rados >/dev/null 2>&1
    fi
    wait_for_io
    trap - EXIT
    log "cluster up in $((SECONDS - started))s: $DIR"
    echo "export CEPH_CONF=$CONF"
}

# TERM each recorded PID, wait up to $1 seconds for all to exit, then KILL the rest.
stop_pids() {
    local grace=$1
    shift
    local name pid alive=()
    for name in "$@"; do
        pid=$(recorded_pid "$name")
        if pid_alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$name")
        fi
    done
    local deadline=$((SECONDS + grace))
    while [ ${#alive[@]} -gt 0 ] && [ $SECONDS -lt $deadline ]; do
        local still=()
        for name in "${alive[@]}"; do
            pid_alive "$(recorded_pid "$name")" && still+=("$name")
        done
        alive=(${still[@]+"${still[@]}"})
        [ ${#alive[@]} -eq 0 ] || sleep 0.2
    done
    for name in ${alive[@]+"${alive[@]}"}; do
        pid=$(recorded_pid "$name")
        log "$name (pid $pid) did not stop after ${grace}s: KILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
    for name in "$@"; do
        rm -f "$PIDS/$name"
    done
}

do_stop() {
    [ -d "$PIDS" ] || return 0
    stop_pids 15 mgr.x osd.0 mon.a
    if [ -z "${MICRO_CLUSTER_WATCHER:-}" ]; then
        stop_pids 2 watcher
    else
        rm -f "$PIDS/watcher"
    fi
}

do_osd_stop() {
    pid_alive "$(recorded_pid osd.0)" || die "no running OSD recorded in $DIR"
    stop_pids 15 osd.0
}

do_osd_start() {
    pid_alive "$(recorded_pid mon.a)" || die "no running mon recorded in $DIR"
    pid_alive "$(recorded_pid osd.0)" && die "the OSD in $DIR is already running"
    start_osd
    wait_for_io
}

case $ACTION in
start) do_start ;;
stop) do_stop ;;
osd-stop) do_osd_stop ;;
osd-start) do_osd_start ;;
status) ceph_cli -s ;;
*) usage ;;
esac
