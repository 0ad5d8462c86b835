#!/usr/bin/env python3
"""What a buffered write into new page-cache pages costs on this machine, against rewriting
the same pages, with no NBD server involved.

Usage: new_pages.py [--dir DIR] [--rounds N] [--chunk BYTES] [--pause S]

Each round writes 1 GiB into a new sparse file (16,384 blocks of 64 KiB, each in CHUNK-sized
pwrites, 8 KiB by default as thinnbd's data device does), then writes the same range again,
and prints the CPU time per 64 KiB block of each pass. The file is deleted after each round
and the next round waits PAUSE seconds. Before the rounds, with no file system involved, it
touches 1 GiB of new anonymous memory twice (map, touch every page, unmap; the second time
the kernel hands the same pages back) and prints the CPU time per 4 KiB page of each.

On a guest whose kernel reports free memory to the host (virtio-balloon free page
reporting, /sys/module/page_reporting), a page freed and reported has to be faulted in
again on the host the next time the guest touches it: the first touches cost several times
the second (docs/performance.md, "Seen and not changed").
"""

import argparse
import mmap
import os
import time

BLOCK = 64 << 10
BLOCKS = 16384
PAGE = 4096
ANON = 1 << 30


def write_pass(fd, data, chunk):
    start = time.process_time()
    for block in range(BLOCKS):
        base = block * BLOCK
        for off in range(0, BLOCK, chunk):
            os.pwrite(fd, data[off : off + chunk], base + off)
    return 1e6 * (time.process_time() - start) / BLOCKS


def touch_anonymous():
    m = mmap.mmap(-1, ANON)
    try:
        start = time.process_time()
        for off in range(0, ANON, PAGE):
            m[off] = 1
        return 1e6 * (time.process_time() - start) / (ANON // PAGE)
    finally:
        m.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--dir", default=os.path.join(repo, "target"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--pause", type=float, default=3.0)
    a = p.parse_args()
    if a.chunk <= 0 or BLOCK % a.chunk:
        p.error("--chunk must divide 65536")
    os.makedirs(a.dir, exist_ok=True)
    data = b"\xab" * BLOCK
    path = os.path.join(a.dir, f"new_pages.{os.getpid()}.tmp")
    if os.path.exists("/sys/module/page_reporting"):
        print("free page reporting: on (/sys/module/page_reporting)")
    first, second = touch_anonymous(), touch_anonymous()
    print(
        f"anonymous memory: first touch {first:.2f} us CPU per 4 KiB page, "
        f"the same pages again {second:.2f} us",
        flush=True,
    )
    time.sleep(a.pause)
    for r in range(a.rounds):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            new = write_pass(fd, data, a.chunk)
            again = write_pass(fd, data, a.chunk)
        finally:
            os.close(fd)
            os.unlink(path)
        print(
            f"round {r + 1}: file: new pages {new:6.1f} us CPU per 64 KiB block, "
            f"rewrite {again:5.1f} us",
            flush=True,
        )
        if r + 1 < a.rounds:
            time.sleep(a.pause)


if __name__ == "__main__":
    main()
