#!/usr/bin/env bash
# Side-by-side NBD benchmark: thinnbd (serve and nbdkit plugin) against nbdkit file, nbdkit
# memory, qemu-nbd on qcow2 and nbdkit null (the protocol ceiling), all on unix sockets, all
# backing files on one filesystem, each server stopped by its PID. The *-tls servers are thinnbd
# serve, nbdkit file and qemu-nbd qcow2 again with TLS required (X.509, the same certificates,
# made for the run with openssl; clients find theirs in libnbd's default directory).
# The RADOS servers (not in the default list: they need a Ceph cluster) are thinnbd serving a
# pool in RADOS and qemu-nbd serving an RBD image of the same size, on one cluster: a
# single-node one that tests/ceph/micro-cluster.sh starts in DIR/ceph for the run (or the one
# of --ceph-dir), each session in a fresh RADOS pool; their report adds the OSD's CPU.
#
#   tests/perf/compare.sh [--quick] [--runtime S] [--workloads LIST] [--servers LIST]
#                         [--reps N] [--dir DIR] [--out FILE] [--no-build] [--list]
#                         [--plugin-threads N] [--ceph-dir DIR] [--rados-block-size SIZE]
#
# LIST is comma separated; workload entries may be shell globs (e.g. 'randread-*').
# --rados-block-size: the data blocks (one object each) of the rados server's pool, default 1M
# (the RADOS default of `thinnbd pool create`).
# Env THINNBD=PATH and THINNBD_PLUGIN=PATH use other builds of the binary and the plugin.
# Results: DIR/results.tsv (one line per run) and a markdown report (--out, default
# DIR/report.md) with medians, thinnbd/peer ratios, server CPU and peak RSS.
# See docs/performance.md for what each workload does and how to read the table.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

quick=0
runtime=""
reps=2
workdir="$repo/target/perf-work"
out=""
build=1
rados_block=1M     # --rados-block-size
plugin_threads=4   # nbdkit --threads for the thinnbd plugin (docs/operator-guide.md)
sel_workloads=""
sel_servers="thinnbd,plugin,file,memory,qcow2,null,thinnbd-tls,file-tls,qcow2-tls"
all_servers="thinnbd plugin file memory qcow2 null thinnbd-tls file-tls qcow2-tls rados rbd"
ceph_dir=""        # a running micro-cluster to use instead of starting one

all_workloads="
prov-qd1-j1 prov-qd32-j1 prov-qd1-j2 prov-qd32-j2
seqwrite
overwrite-qd1-j1 overwrite-qd32-j1 overwrite-qd1-j2 overwrite-qd32-j2
randread-qd1-j1 randread-qd32-j1 randread-qd1-j2 randread-qd32-j2
seqread
cow-qd32-j1
nbdcopy"
quick_workloads="prov-qd32-j1 seqwrite overwrite-qd32-j1 randread-qd32-j1 seqread cow-qd32-j1 nbdcopy"

usage() {
    sed -n '2,/^set -e/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --quick) quick=1 ;;
    --runtime) runtime=$2; shift ;;
    --workloads) sel_workloads=$2; shift ;;
    --servers) sel_servers=$2; shift ;;
    --reps) reps=$2; shift ;;
    --dir) workdir=$2; shift ;;
    --out) out=$2; shift ;;
    --no-build) build=0 ;;
    --plugin-threads) plugin_threads=$2; shift ;;
    --ceph-dir) ceph_dir=$(cd "$2" && pwd); shift ;;
    --rados-block-size) rados_block=$2; shift ;;
    --list) echo "workloads:" $all_workloads; echo "servers: $all_servers"; exit 0 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done

[ -n "$runtime" ] || { [ $quick = 1 ] && runtime=2 || runtime=5; }
[ -n "$out" ] || out="$workdir/report.md"

# Which workloads run: the selection (globs allowed) or the default set for the mode.
pattern_list=${sel_workloads:-$([ $quick = 1 ] && echo "$quick_workloads" || echo "$all_workloads")}
workloads=""
for w in $all_workloads; do
    for p in ${pattern_list//,/ }; do
        # shellcheck disable=SC2053
        if [[ $w == $p ]]; then workloads="$workloads $w"; break; fi
    done
done
[ -n "$workloads" ] || { echo "no workload matches '$pattern_list' (see --list)" >&2; exit 2; }
servers=""
for s in ${sel_servers//,/ }; do
    case " $all_servers " in *" $s "*) servers="$servers $s" ;; *) echo "unknown server $s" >&2; exit 2 ;; esac
done

wanted() { case " $workloads " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
wanted_prefix() { case " $workloads " in *" $1"*) return 0 ;; *) return 1 ;; esac; }

for tool in fio nbdkit qemu-nbd qemu-img nbdcopy nbdinfo python3; do
    command -v $tool >/dev/null || { echo "missing $tool (apt-get install fio nbdkit qemu-utils libnbd-bin)" >&2; exit 1; }
done

# THINNBD / THINNBD_PLUGIN point at other builds (e.g. to compare two versions; implies --no-build).
thinnbd="${THINNBD:-$repo/target/release/thinnbd}"
plugin_so="${THINNBD_PLUGIN:-$repo/target/release/libnbdkit_thinnbd_plugin.so}"
[ -z "${THINNBD:-}${THINNBD_PLUGIN:-}" ] || build=0
if [ $build = 1 ]; then
    (cd "$repo" && cargo build --release --workspace)  # the binary and the plugin package
fi
case " $servers " in
*" thinnbd "*|*" plugin "*|*" thinnbd-tls "*)
    [ -x "$thinnbd" ] && [ -f "$plugin_so" ] || { echo "build $thinnbd and $plugin_so first" >&2; exit 1; } ;;
esac

rm -rf "$workdir"
mkdir -p "$workdir"
osd_results="$workdir/osd.tsv"
results="$workdir/results.tsv"
: >"$results"
log() { echo "[$(date +%T)] $*" >&2; }

# TLS credentials for the *-tls servers: a CA, a server certificate for localhost and a client
# certificate, in the layout nbdkit and qemu use; the client's copy where libnbd looks by
# default ($HOME/.pki/libnbd), since fio's nbd engine takes no certificate directory.
TLS_DIR="$workdir/tls"
case " $servers " in
*"-tls "*)
    mkdir -p "$TLS_DIR/server" "$TLS_DIR/home/.pki/libnbd"
    (
        cd "$TLS_DIR"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 \
            -subj /CN=compare-ca 2>/dev/null
        for who in server client; do
            cn=localhost ext="subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
            [ $who = client ] && cn=compare-client ext="extendedKeyUsage=clientAuth"
            openssl req -newkey rsa:2048 -nodes -keyout $who-key.pem -out $who.csr \
                -subj "/CN=$cn" 2>/dev/null
            printf '%s\n' "$ext" >$who.ext
            openssl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
                -out $who-cert.pem -days 2 -extfile $who.ext 2>/dev/null
        done
        cp ca-cert.pem server-cert.pem server-key.pem server/
        cp ca-cert.pem client-cert.pem client-key.pem home/.pki/libnbd/
    )
    # Only libnbd's clients read it, and only for nbds URIs; the build is done by now.
    export HOME="$TLS_DIR/home" ;;
esac

# --- the Ceph cluster of the rados and rbd servers ----------------------------------------
CEPH_STARTED=0
OSD_PID=""
stop_ceph() {
    [ $CEPH_STARTED = 1 ] || return 0
    bash "$repo/tests/ceph/micro-cluster.sh" stop "$ceph_dir" || true
    CEPH_STARTED=0
}
case " $servers " in
*" rados "*|*" rbd "*)
    for tool in ceph rados rbd ceph-mon ceph-osd; do
        command -v $tool >/dev/null || { echo "missing $tool (apt-get install ceph-mon ceph-osd ceph-common)" >&2; exit 1; }
    done
    case " $servers " in
    *" rbd "*) qemu-img --help | grep -q 'Supported formats:.* rbd' ||
        { echo "qemu has no rbd driver (apt-get install qemu-block-extra)" >&2; exit 1; } ;;
    esac
    if [ -z "$ceph_dir" ]; then
        ceph_dir="$workdir/ceph"
        # Room for a session's writes plus PGs of deleted pools not yet purged; sparse.
        MICRO_CLUSTER_MGR=0 MICRO_CLUSTER_OSD_SIZE=32G \
            bash "$repo/tests/ceph/micro-cluster.sh" start "$ceph_dir" >/dev/null
        CEPH_STARTED=1
        trap 'stop_ceph' EXIT
    fi
    export CEPH_CONF="$ceph_dir/ceph.conf"
    unset CEPH_ARGS
    OSD_PID=$(cat "$ceph_dir/pids/osd.0")
    ;;
esac
CEPH_POOL=""
POOL_SEQ=0

REGION=1g          # every fio workload works inside one GiB of the 4 GiB export
REGION_BYTES=$((1 << 30))
VOLSIZE=4G
PROV_PASSES=4      # provisioning writes the export's four regions, one after the other
SRV_PID=""
SOCK=""

# --- servers -------------------------------------------------------------------------------

# Fresh backing store for $1 in $workdir/$1 (pool + 4 GiB volume, sparse file, qcow2 image).
setup_backing() {
    local s=$1 d="$workdir/$1"
    rm -rf "$d"
    mkdir -p "$d"
    case $s in
    thinnbd|plugin|thinnbd-tls)
        "$thinnbd" pool create "$d/pool" --data-size 8G --block-size 64K >/dev/null
        "$thinnbd" volume create --pool "$d/pool" vol --size $VOLSIZE >/dev/null ;;
    file|file-tls) truncate -s $VOLSIZE "$d/disk.raw" ;;
    qcow2|qcow2-tls) qemu-img create -q -f qcow2 "$d/disk.qcow2" $VOLSIZE ;;
    memory|null) ;;
    rados|rbd)
        # A fresh RADOS pool per session; deleted again by discard_backing.
        POOL_SEQ=$((POOL_SEQ + 1))
        CEPH_POOL="perf-$s-$POOL_SEQ"
        ceph osd pool create "$CEPH_POOL" 32 32 >/dev/null 2>&1
        if [ $s = rados ]; then
            ceph osd pool application enable "$CEPH_POOL" thinnbd >/dev/null 2>&1
            "$thinnbd" pool create "rados:$CEPH_POOL/tp" --data-size 8G --block-size $rados_block >/dev/null
            "$thinnbd" volume create --pool "rados:$CEPH_POOL/tp" vol --size $VOLSIZE >/dev/null
        else
            rbd pool init "$CEPH_POOL"
            rbd create "$CEPH_POOL/vol" --size $VOLSIZE
        fi ;;
    esac
}

# Frees the disk space of a session's backing store (logs and fio output stay).
discard_backing() {
    rm -rf "$workdir/$1/pool" "$workdir/$1/disk.raw" "$workdir/$1/disk.qcow2"
    case $1 in
    rados|rbd) ceph osd pool delete "$CEPH_POOL" "$CEPH_POOL" --yes-i-really-really-mean-it \
                   >/dev/null 2>&1 ;;
    esac
}

start_server() {
    local s=$1 d="$workdir/$1"
    SOCK="$d/nbd.sock"
    rm -f "$SOCK" "$d/pid"
    case $s in *-tls) TLS_URI=1 ;; *) TLS_URI=0 ;; esac
    case $s in
    thinnbd) "$thinnbd" serve --pool "$d/pool" --socket "$SOCK" 2>>"$d/server.log" & ;;
    plugin) nbdkit -f -t "$plugin_threads" -U "$SOCK" -P "$d/pid" "$plugin_so" pool="$d/pool" \
                2>>"$d/server.log" & ;;
    file) nbdkit -f -U "$SOCK" -P "$d/pid" file file="$d/disk.raw" 2>>"$d/server.log" & ;;
    memory) nbdkit -f -U "$SOCK" -P "$d/pid" memory size=$VOLSIZE 2>>"$d/server.log" & ;;
    null) nbdkit -f -U "$SOCK" -P "$d/pid" null size=$VOLSIZE 2>>"$d/server.log" & ;;
    qcow2) qemu-nbd -k "$SOCK" --pid-file="$d/pid" -x vol -f qcow2 --cache=writeback \
               --discard=unmap --shared=16 --persistent "$d/disk.qcow2" 2>>"$d/server.log" & ;;
    thinnbd-tls) "$thinnbd" serve --pool "$d/pool" --socket "$SOCK" --tls require \
                     --tls-certificates "$TLS_DIR/server" 2>>"$d/server.log" & ;;
    file-tls) nbdkit -f -U "$SOCK" -P "$d/pid" --tls=require --tls-certificates="$TLS_DIR/server" \
                  file file="$d/disk.raw" 2>>"$d/server.log" & ;;
    qcow2-tls) qemu-nbd -k "$SOCK" --pid-file="$d/pid" -x vol -f qcow2 --cache=writeback \
                   --object "tls-creds-x509,id=tls0,dir=$TLS_DIR/server,endpoint=server,verify-peer=off" \
                   --tls-creds tls0 --discard=unmap --shared=16 --persistent "$d/disk.qcow2" \
                   2>>"$d/server.log" & ;;
    rados) "$thinnbd" serve --pool "rados:$CEPH_POOL/tp" --socket "$SOCK" 2>>"$d/server.log" & ;;
    # cache=none: no librbd write-back cache, so a write is on the OSD when acknowledged, as
    # thinnbd's are on RADOS.
    rbd) qemu-nbd -k "$SOCK" --pid-file="$d/pid" -x vol -f raw --cache=none --discard=unmap \
             --shared=16 --persistent "rbd:$CEPH_POOL/vol:conf=$CEPH_CONF" 2>>"$d/server.log" & ;;
    esac
    SRV_PID=$!
    local _
    for _ in $(seq 1 200); do
        if [ -S "$SOCK" ] && nbdinfo --size "$(uri)" >/dev/null 2>&1; then return 0; fi
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "server $s did not start; log:" >&2
    tail -20 "$d/server.log" >&2
    exit 1
}

stop_server() {
    [ -n "$SRV_PID" ] || return 0
    kill -TERM "$SRV_PID" 2>/dev/null || true
    local _
    for _ in $(seq 1 300); do
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SRV_PID" 2>/dev/null; then
        log "server $SRV_PID ignored SIGTERM for 30 s; SIGKILL"
        kill -KILL "$SRV_PID" 2>/dev/null || true
    fi
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=""
}
trap 'stop_server; stop_ceph' EXIT
trap 'exit 130' INT TERM

TLS_URI=0
uri() {
    if [ "$TLS_URI" = 1 ]; then echo "nbds+unix:///vol?socket=$SOCK"; else echo "nbd+unix:///vol?socket=$SOCK"; fi
}

# Takes a snapshot of the export's volume so the next writes break sharing (not in a
# subshell: it may restart the server). Says what it did in SNAP_NOTE.
snapshot() {
    local s=$1 d="$workdir/$1"
    case $s in
    thinnbd|thinnbd-tls) "$thinnbd" snapshot --pool "$d/pool" vol snap >/dev/null; SNAP_NOTE="online snapshot" ;;
    plugin)
        stop_server
        "$thinnbd" snapshot --pool "$d/pool" vol snap >/dev/null
        start_server "$s"; SNAP_NOTE="offline snapshot, nbdkit restarted" ;;
    qcow2|qcow2-tls)
        stop_server
        qemu-img snapshot -c snap "$d/disk.qcow2"
        start_server "$s"; SNAP_NOTE="internal qcow2 snapshot, qemu-nbd restarted" ;;
    rados) "$thinnbd" snapshot --pool "rados:$CEPH_POOL/tp" vol snap >/dev/null
        SNAP_NOTE="online snapshot (copy-on-write by thinnbd)" ;;
    rbd) rbd snap create "$CEPH_POOL/vol@snap" >/dev/null 2>&1
        SNAP_NOTE="online RBD snapshot (copy-on-write by the OSD)" ;;
    *) SNAP_NOTE="no snapshot (plain overwrite)" ;;
    esac
}

# --- measurement ---------------------------------------------------------------------------

cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
now() { date +%s.%N; }

# record WORKLOAD REP SERVER VALUE UNIT OPS CPU0 CPU1 T0 T1
record() {
    local rss
    rss=$(hwm_kib "$SRV_PID")
    python3 - "$@" "$rss" >>"$results" <<'EOF'
import os, sys
w, rep, s, value, unit, ops, c0, c1, t0, t1, rss = sys.argv[1:]
hz = os.sysconf("SC_CLK_TCK")
cpu_s = (int(c1) - int(c0)) / hz
wall = float(t1) - float(t0)
pct = 100.0 * cpu_s / wall if wall > 0 else 0.0
us_per_op = 1e6 * cpu_s / float(ops) if float(ops) > 0 else 0.0
print(f"{w}\t{rep}\t{s}\t{float(value):.3f}\t{unit}\t{pct:.1f}\t{us_per_op:.2f}\t{int(rss)}")
EOF
}

# record_osd WORKLOAD REP SERVER OPS CPU0 CPU1 T0 T1: the OSD's CPU over a run of a Ceph server.
record_osd() {
    [ -n "$OSD_PID" ] || return 0
    case $3 in rados|rbd) ;; *) return 0 ;; esac
    python3 - "$@" >>"$osd_results" <<'EOF'
import os, sys
w, rep, s, ops, c0, c1, t0, t1 = sys.argv[1:]
cpu_s = (int(c1) - int(c0)) / os.sysconf("SC_CLK_TCK")
wall = float(t1) - float(t0)
print(f"{w}\t{rep}\t{s}\t{100.0 * cpu_s / wall:.1f}\t{1e6 * cpu_s / max(float(ops), 1):.2f}")
EOF
}
osd_ticks() { if [ -n "$OSD_PID" ]; then cpu_ticks "$OSD_PID"; else echo 0; fi; }

# run_fio WORKLOAD REP SERVER fio-args...: one measured fio run against the running server.
run_fio() {
    run_fio_passes 1 "$@"
}

# run_fio_passes N WORKLOAD REP SERVER fio-args...: N fio runs, the k-th (from 0) on the k-th
# $REGION of the export, measured as one: the operations of all passes over the sum of their
# run times. Fixed-work rows that take a fraction of a second on one region use it to run for
# the few seconds a ratio needs.
run_fio_passes() {
    local passes=$1 w=$2 rep=$3 s=$4
    shift 4
    local c0 c1 o0 o1 t0 t1 pass json err jsons=()
    c0=$(cpu_ticks "$SRV_PID"); o0=$(osd_ticks); t0=$(now)
    for pass in $(seq 0 $((passes - 1))); do
        json="$workdir/$s/$w.$rep.$pass.json"
        err="$workdir/$s/$w.$rep.$pass.err"
        jsons+=("$json")
        fio --name="$w" --ioengine=nbd --uri="$(uri)" --size=$REGION \
            --offset=$((pass * REGION_BYTES)) \
            --group_reporting --output-format=json --output="$json" --randrepeat=0 "$@" \
            >/dev/null 2>"$err" || { log "fio failed: $(tail -3 "$err")"; exit 1; }
    done
    c1=$(cpu_ticks "$SRV_PID"); o1=$(osd_ticks); t1=$(now)
    local v
    v=$(python3 - "${jsons[@]}" <<'EOF'
import json, sys
ops = io_bytes = runtime_ms = 0
for path in sys.argv[1:]:
    j = json.load(open(path))["jobs"][0]
    r, w = j["read"], j["write"]
    d = w if w["io_bytes"] > r["io_bytes"] else r
    ops += d["total_ios"]
    io_bytes += d["io_bytes"]
    runtime_ms += d["runtime"]
secs = max(runtime_ms, 1) / 1000
# 1 MiB workloads are reported in MiB/s, 4 KiB ones in IOPS.
if io_bytes >= ops * 1048576 * 0.99 and ops > 0:
    print(io_bytes / 1048576 / secs, "MiB/s", ops)
else:
    print(ops / secs, "IOPS", ops)
EOF
)
    # shellcheck disable=SC2086
    record "$w" "$rep" "$s" $v "$c0" "$c1" "$t0" "$t1"
    record_osd "$w" "$rep" "$s" "$(echo "$v" | awk '{print $3}')" "$o0" "$o1" "$t0" "$t1"
    log "  $s $w rep $rep: $(tail -1 "$results" | cut -f4,5,6,8 | tr '\t' ' ')"
}

# Parses "kind-qdN-jM" into fio arguments for 4 KiB random I/O.
rand_args() {
    local w=$1 qd j
    qd=${w#*-qd}; qd=${qd%%-*}
    j=${w##*-j}
    echo "--bs=4k --iodepth=$qd --numjobs=$j"
}

order() {  # servers in run order for repetition $1 (reversed on even reps)
    if [ $(($1 % 2)) = 1 ]; then echo $servers; else echo $servers | tr ' ' '\n' | tac | tr '\n' ' '; fi
}

# --- phase A: provisioning, each run on a fresh volume -------------------------------------
# A fixed count of writes per region (as many as it has 64 KiB blocks), so every server does
# the same work and about two thirds of the writes land in blocks nobody has written yet. One
# region takes 0.1-0.4 s here, too short to compare two servers by: each run writes the
# volume's four regions in turn, each of them fresh.
for w in prov-qd1-j1 prov-qd32-j1 prov-qd1-j2 prov-qd32-j2; do
    wanted $w || continue
    log "phase A: $w"
    for rep in $(seq 1 "$reps"); do
        for s in $(order "$rep"); do
            setup_backing "$s"; start_server "$s"
            # shellcheck disable=SC2046
            run_fio_passes $PROV_PASSES "$w" "$rep" "$s" --rw=randwrite $(rand_args $w) \
                --norandommap --io_size=$((64 / ${w##*-j}))m
            stop_server
            discard_backing "$s"
        done
    done
done

# --- phase B: one session per server on a volume whose region gets written first ---------
phase_b=0
for w in seqwrite seqread overwrite randread cow; do wanted_prefix $w && phase_b=1; done
if [ $phase_b = 1 ]; then
    for rep in $(seq 1 "$reps"); do
        for s in $(order "$rep"); do
            log "phase B: $s rep $rep"
            setup_backing "$s"; start_server "$s"
            # The sequential write fills the whole region once (fixed work, not time based);
            # everything after it reads and overwrites written blocks.
            if wanted seqwrite; then
                run_fio seqwrite "$rep" "$s" --rw=write --bs=1m --iodepth=32
            else
                fio --name=fill --ioengine=nbd --uri="$(uri)" --size=$REGION --rw=write \
                    --bs=1m --iodepth=32 >/dev/null
            fi
            for w in $workloads; do
                case $w in
                overwrite-*)
                    # shellcheck disable=SC2046
                    run_fio "$w" "$rep" "$s" --rw=randwrite $(rand_args $w) --norandommap \
                        --time_based --runtime="$runtime" ;;
                randread-*)
                    # shellcheck disable=SC2046
                    run_fio "$w" "$rep" "$s" --rw=randread $(rand_args $w) --norandommap \
                        --time_based --runtime="$runtime" ;;
                esac
            done
            if wanted seqread; then
                run_fio seqread "$rep" "$s" --rw=read --bs=1m --iodepth=32 \
                    --time_based --runtime="$runtime"
            fi
            if wanted cow-qd32-j1; then
                snapshot "$s"
                log "  $s: $SNAP_NOTE"
                # No ramp: the first writes after the snapshot are the copy-on-write ones.
                run_fio cow-qd32-j1 "$rep" "$s" --rw=randwrite --bs=4k --iodepth=32 \
                    --numjobs=1 --norandommap --time_based --runtime="$runtime"
            fi
            stop_server
            discard_backing "$s"
        done
    done
fi

# --- phase C: nbdcopy of a 4 GiB export with 10% written, to null: -------------------------
if wanted nbdcopy; then
    log "phase C: nbdcopy"
    for rep in $(seq 1 "$reps"); do
        for s in $(order "$rep"); do
            setup_backing "$s"; start_server "$s"
            # 1 MiB written in every 10 MiB: 410 MiB spread over the whole export.
            fio --name=fill --ioengine=nbd --uri="$(uri)" --size=4g --rw=write:9m --bs=1m \
                --iodepth=16 >/dev/null
            c0=$(cpu_ticks "$SRV_PID"); o0=$(osd_ticks); t0=$(now)
            nbdcopy "$(uri)" null:
            c1=$(cpu_ticks "$SRV_PID"); o1=$(osd_ticks); t1=$(now)
            secs=$(python3 -c "print(float('$t1') - float('$t0'))")
            record nbdcopy "$rep" "$s" "$secs" s 1 "$c0" "$c1" "$t0" "$t1"
            record_osd nbdcopy "$rep" "$s" 1 "$o0" "$o1" "$t0" "$t1"
            log "  $s nbdcopy rep $rep: ${secs}s"
            stop_server
            discard_backing "$s"
        done
    done
fi

# --- report --------------------------------------------------------------------------------
{
    echo "Run of $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')), kernel $(uname -r), $(df -T "$workdir" | awk 'NR==2 {print $2}') filesystem."
    echo "fio $(fio --version), nbdkit $(nbdkit --version | awk '{print $2}'), qemu-nbd $(qemu-nbd --version | awk 'NR==1 {print $2}'), $(nbdcopy --version | head -1)."
    echo "Mode: $([ $quick = 1 ] && echo quick || echo full), runtime ${runtime}s (no ramp: server CPU covers exactly the counted requests), $reps repetitions (median), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
    # New page-cache pages cost a host fault each where the guest hands free memory back
    # (tests/perf/new_pages.py measures it): the rows that write new data pay it, null does not.
    if [ -d /sys/module/page_reporting ]; then
        echo "Free page reporting to the host is on: new pages (provisioning, seqwrite, cow) may cost a host fault each (tests/perf/new_pages.py)."
    fi
    if [ -n "$OSD_PID" ]; then
        echo "Ceph $(ceph --version | awk '{print $3}'): one mon and one BlueStore OSD (on a file in $ceph_dir), pool size 1, 32 PGs per pool; thinnbd's pool in $rados_block objects (one per data block), RBD's image in 4 MiB objects."
    fi
    echo
    python3 "$here/summarize.py" "$results"
} >"$out"
cat "$out"
log "results: $results, report: $out"
