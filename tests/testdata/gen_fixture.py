#!/usr/bin/env python3
"""Writes tests/testdata/pool.xml: a thin_dump (0.9.0) style XML with

* device 0: an origin with ~1,200 mappings (runs of varying length and single blocks),
* devices 1 and 2: snapshots of 0 taken at times 1 and 2; they share most of the origin's
  data blocks (data ref counts 2 and 3, so the overflow ref-count tree is used) and each
  has some copied-on-write blocks of its own,
* device 7: an independent thin created at time 2 with a few mappings,
* device 9: an empty thin.

Shared blocks keep time 0, below every sharer's snap_time (the kernel's sharing rule);
exclusive blocks have snap_time <= time <= superblock time. Runs are written exactly as
thin_dump merges them, so `thin_dump` of a restore reproduces the file byte for byte.

Usage: python3 gen_fixture.py > pool.xml   (deterministic: fixed seed)
"""
import random

rng = random.Random(20240611)
NR_DATA = 6000
next_data = 0


def alloc(n):
    global next_data
    b = next_data
    next_data += n
    assert next_data <= NR_DATA
    return b


# origin: list of (vblock, data, time), built as runs separated by gaps
origin = []
v = 0
while len(origin) < 1200:
    v += rng.choice([0, 1, 3, 17])
    n = rng.choice([1, 1, 2, 5, 40, 120])
    d = alloc(n)
    if rng.random() < 0.3:
        alloc(1)  # a hole in data space: the next run does not continue this one
    for i in range(n):
        origin.append((v + i, d + i, 0))
    v += n


def snapshot(src, cow_fraction, time):
    out = []
    for (vb, d, t) in src:
        if rng.random() < cow_fraction:
            out.append((vb, alloc(1), time))
        else:
            out.append((vb, d, t))
    return out


snap1 = snapshot(origin, 0.05, 1)
# snapshot 2 is taken at time 2 from the origin as it was (all time 0)
snap2 = snapshot(origin, 0.02, 2)
thin7 = [(1000 + i, alloc(1), 2) for i in range(25)] + [(5000, alloc(1), 2)]

devices = [
    (0, 0, 0, 2, origin),
    (1, 1, 1, 1, snap1),
    (2, 2, 2, 2, snap2),
    (7, 3, 2, 2, thin7),
    (9, 4, 2, 2, []),
]


def runs(maps):
    out = []
    for (vb, d, t) in maps:
        if out:
            v0, d0, n, t0 = out[-1]
            if v0 + n == vb and d0 + n == d and t0 == t:
                out[-1] = (v0, d0, n + 1, t0)
                continue
        out.append((vb, d, 1, t))
    return out


print('<superblock uuid="" time="2" transaction="4" flags="0" version="2" '
      'data_block_size="128" nr_data_blocks="%d">' % NR_DATA)
for (dev, trans, ctime, stime, maps) in devices:
    print('  <device dev_id="%d" mapped_blocks="%d" transaction="%d" creation_time="%d" snap_time="%d">'
          % (dev, len(maps), trans, ctime, stime))
    for (vb, d, n, t) in runs(maps):
        if n == 1:
            print('    <single_mapping origin_block="%d" data_block="%d" time="%d"/>' % (vb, d, t))
        else:
            print('    <range_mapping origin_begin="%d" data_begin="%d" length="%d" time="%d"/>'
                  % (vb, d, n, t))
    print('  </device>')
print('</superblock>')
