"""What the per-process hash cache saves `make verify`: the same run folder verified with every file hashed
each time it is asked for (as before the cache) and with the cache, in one process, one after the other.

    .venv/bin/python benchmarks/bench_verify.py runs/default

Prints the wall time and the bytes hashed by each, and the ratios. Measure with
nothing else running: the figure is I/O and SHA-256 throughput on this machine.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.core import machine, storage  # noqa: E402
from common.experiments.verify import verify_run  # noqa: E402


class _Forgetful(dict):
    """A hash cache that keeps nothing: every request reads and hashes the file again."""

    def __setitem__(self, key, value):
        pass


def timed(run: str, cached: bool) -> dict:
    read = [0]
    hash_bytes = storage._hash_bytes

    def counting(path):
        read[0] += os.path.getsize(path)
        return hash_bytes(path)

    storage._HASHES.clear()
    saved = storage._HASHES
    storage._hash_bytes = counting
    if not cached:
        storage._HASHES = _Forgetful()
    try:
        t0 = time.perf_counter()
        findings = verify_run(run)
        seconds = time.perf_counter() - t0
    finally:
        storage._hash_bytes, storage._HASHES = hash_bytes, saved
    return {"seconds": seconds, "read_mb": read[0] / 2 ** 20, "files": len(findings),
            "problems": sum(f.problem for f in findings)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder, e.g. runs/default (after make reproduce)")
    args = p.parse_args()
    if not os.path.isdir(args.run):
        sys.exit(f"error: {args.run} is not a folder; run `make reproduce` first")
    print(f"[bench_verify] {machine.describe()}")
    timed(args.run, cached=True)  # untimed: the files into the OS page cache, so both passes read from memory
    rows = {"without cache": timed(args.run, cached=False), "with cache": timed(args.run, cached=True)}
    for name, r in rows.items():
        print(f"{name:14s} {r['seconds']:7.2f} s  {r['read_mb']:9.1f} MB hashed  ({r['files']} findings, "
              f"{r['problems']} problems)")
    a, b = rows["without cache"], rows["with cache"]
    print(f"cache: {a['seconds'] / b['seconds']:.2f}x faster, {a['read_mb'] / max(b['read_mb'], 1e-9):.2f}x fewer "
          f"bytes hashed")


if __name__ == "__main__":
    main()
