#!/usr/bin/env python3
"""Turns compare.sh's results.tsv into markdown tables: medians per server, thinnbd/peer
ratios, server CPU, peak RSS, and the performance targets checked against this run.

Usage: summarize.py results.tsv
Columns of results.tsv: workload rep server value unit cpu% cpu-us-per-op vmhwm-kib
An osd.tsv beside it (runs of the RADOS servers: workload rep server cpu% cpu-us-per-op of the
Ceph OSD) adds the OSD's CPU.
"""

import os

import statistics
import sys
from collections import defaultdict

SERVERS = ["thinnbd", "plugin", "file", "memory", "qcow2", "null", "thinnbd-tls", "file-tls",
           "qcow2-tls", "rados", "rbd"]
TITLES = {
    "thinnbd": "thinnbd serve",
    "plugin": "thinnbd nbdkit plugin",
    "file": "nbdkit file",
    "memory": "nbdkit memory",
    "qcow2": "qemu-nbd qcow2",
    "null": "nbdkit null",
    "thinnbd-tls": "thinnbd serve TLS",
    "file-tls": "nbdkit file TLS",
    "qcow2-tls": "qemu-nbd qcow2 TLS",
    "rados": "thinnbd serve RADOS",
    "rbd": "qemu-nbd RBD",
}
# Servers on a Ceph cluster: compared with each other, not with the local ones.
CEPH = ("rados", "rbd")
# (workload, peer, minimum of thinnbd/peer): the performance targets. For nbdcopy the ratio is
# peer time / thinnbd time, so "within 1.5x of qemu-nbd's time" is a ratio of at least 1/1.5.
TARGETS = [
    ("randread-qd32-j1", "file", 1.0),
    ("randread-qd32-j1", "qcow2", 2.0),
    ("overwrite-qd32-j1", "file", 1.0),
    ("overwrite-qd32-j1", "qcow2", 2.0),
    ("prov-qd32-j1", "file", 0.8),
    ("prov-qd32-j1", "qcow2", 2.0),
    ("seqread", "file", 0.9),
    ("seqwrite", "file", 0.9),
    ("nbdcopy", "qcow2", 1 / 1.5),
]


def fmt(v, unit):
    if unit == "IOPS":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:.0f}"


def main():
    rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
    value = defaultdict(list)
    cpu = defaultdict(list)
    us = defaultdict(list)
    rss = defaultdict(list)
    unit = {}
    order = []
    for w, _rep, s, v, u, pct, per_op, hwm in rows:
        if w not in order:
            order.append(w)
        value[w, s].append(float(v))
        cpu[w, s].append(float(pct))
        us[w, s].append(float(per_op))
        rss[w, s].append(int(hwm))
        unit[w] = u
    servers = [s for s in SERVERS if any((w, s) in value for w in order)]
    med = {k: statistics.median(v) for k, v in value.items()}

    def ratio(w, a, b):
        """a relative to b, >1 meaning a is faster (times are inverted)."""
        if (w, a) not in med or (w, b) not in med or med[w, a] == 0 or med[w, b] == 0:
            return None
        r = med[w, a] / med[w, b]
        return 1 / r if unit[w] == "s" else r

    def cell(r):
        return "-" if r is None else f"{r:.2f}"

    out = []
    out.append("Throughput (median; IOPS for 4 KiB, MiB/s for 1 MiB, seconds for nbdcopy):\n")
    out.append("| workload | unit | " + " | ".join(TITLES[s] for s in servers) + " |")
    out.append("|---|---|" + "---:|" * len(servers))
    for w in order:
        vals = [fmt(med[w, s], unit[w]) if (w, s) in med else "-" for s in servers]
        out.append(f"| {w} | {unit[w]} | " + " | ".join(vals) + " |")

    def ratio_table(title, base, peers):
        """thinnbd's ratios against its peers, one column each, when the run has both."""
        if base not in servers or not peers:
            return
        out.append(title)
        out.append("| workload | " + " | ".join(f"/ {TITLES[s]}" for s in peers) + " |")
        out.append("|---|" + "---:|" * len(peers))
        for w in order:
            out.append(f"| {w} | " + " | ".join(cell(ratio(w, base, s)) for s in peers) + " |")

    ratio_table("\nRatios thinnbd serve / peer (>1: thinnbd faster; nbdcopy: peer time / "
                "thinnbd time):\n", "thinnbd",
                [s for s in servers
                 if s != "thinnbd" and not s.endswith("-tls") and s not in CEPH])
    ratio_table("\nRatios with TLS required, thinnbd serve / peer (same certificates; >1: "
                "thinnbd faster):\n", "thinnbd-tls",
                [s for s in servers if s.endswith("-tls") and s != "thinnbd-tls"])
    ratio_table("\nRatios on one Ceph cluster, thinnbd serve on a RADOS pool / qemu-nbd on an RBD "
                "image (>1: thinnbd faster):\n", "rados", [s for s in servers if s == "rbd"])

    def server_cpu(w, s):
        p = statistics.median(cpu[w, s])
        if unit[w] == "s":
            return f"{p:.0f}% / {p * med[w, s] / 100:.2f} s"
        return f"{p:.0f}% / {statistics.median(us[w, s]):.1f}"

    cpu_table(out, "\nServer CPU during the run: % of one core / CPU microseconds per request "
              "(nbdcopy: CPU seconds):\n", order, servers, cpu, server_cpu)

    out.append("\nServer peak RSS (VmHWM, MiB; the largest over the runs of each server):\n")
    out.append("| " + " | ".join(TITLES[s] for s in servers) + " |")
    out.append("|" + "---:|" * len(servers))
    out.append("| " + " | ".join(
        f"{max(max(rss[w, s]) for w in order if (w, s) in rss) / 1024:.0f}" for s in servers)
        + " |")

    osd_table(os.path.join(os.path.dirname(sys.argv[1]), "osd.tsv"), order, out)

    checks = []
    for w, peer, need in TARGETS:
        r = ratio(w, "thinnbd", peer)
        if r is not None:
            checks.append((f"{w}: thinnbd / {TITLES[peer]} >= {need:.2f}", r, need, []))
    for w in order:
        r = ratio(w, "thinnbd", "null")
        if r is not None:
            checks.append((f"{w}: thinnbd / nbdkit null >= 0.60", r, 0.6, []))
    for w in order:
        r = ratio(w, "plugin", "thinnbd")
        if r is not None:
            # What nbdkit itself reaches relative to serve on the same row: memory is the
            # cheapest plugin that still moves the data, null the protocol alone. A plugin
            # row whose ceilings are below 0.90 is out of reach for any nbdkit plugin.
            ceilings = [ratio(w, peer, "thinnbd") for peer in ("memory", "null")]
            checks.append((f"{w}: plugin / thinnbd serve >= 0.90", r, 0.9, ceilings))
    if checks:
        out.append("\nThe performance targets in this run (for the plugin rows, the last two columns "
                   "are nbdkit memory / thinnbd serve and nbdkit null / thinnbd serve: what "
                   "nbdkit reaches with a plugin that only copies, and with one that does nothing):\n")
        out.append("| target | ratio | met | memory / serve | null / serve |")
        out.append("|---|---:|---|---:|---:|")
        for what, r, need, ceilings in checks:
            cols = " | ".join(cell(c) for c in ceilings) if ceilings else "- | -"
            out.append(f"| {what} | {r:.2f} | {'yes' if r >= need else 'NO'} | {cols} |")
    print("\n".join(out))


def osd_table(path, order, out):
    """The Ceph OSD's CPU during the runs of the RADOS servers, when the run had any."""
    if not os.path.exists(path):
        return
    cpu = defaultdict(list)
    us = defaultdict(list)
    for line in open(path):
        if line.strip():
            w, _rep, s, pct, per_op = line.rstrip("\n").split("\t")
            cpu[w, s].append(float(pct))
            us[w, s].append(float(per_op))
    servers = [s for s in CEPH if any((w, s) in cpu for w in order)]
    if not servers:
        return
    def osd_cpu(w, s):
        p = statistics.median(cpu[w, s])
        if w == "nbdcopy":
            return f"{p:.0f}%"
        return f"{p:.0f}% / {statistics.median(us[w, s]):.1f}"

    cpu_table(out, "\nCeph OSD CPU during the run: % of one core / CPU microseconds per request "
              "(nbdcopy: % only):\n", order, servers, cpu, osd_cpu)


def cpu_table(out, title, order, servers, cpu, cell):
    """A workload-by-server table of CPU figures: `cell(w, s)` where the run has any."""
    out.append(title)
    out.append("| workload | " + " | ".join(TITLES[s] for s in servers) + " |")
    out.append("|---|" + "---:|" * len(servers))
    for w in order:
        cells = [cell(w, s) if (w, s) in cpu else "-" for s in servers]
        out.append(f"| {w} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
