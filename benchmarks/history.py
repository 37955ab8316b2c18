"""History costs that must not grow with the run: reading it every step, and its memory per row.

1. Reading ``watch.history`` at every step: the time of each block of 1,000
   steps should stay flat (it grew linearly per block -- quadratically over the
   run -- when every read concatenated all rows).
2. Memory of a history filled one row per flush (``flush_every=1``) against one
   filled 10,000 rows at a time, each in a fresh process: resident memory growth
   and its ratio to the bytes of the recorded data.

Usage: ``python benchmarks/history.py [--steps 200000] [--params 100]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


def read_every_step(blocks: int = 5, block: int = 1000) -> list[float]:
    import torch

    import gradwatch as gw

    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])
    watch = gw.GradWatch(model, flush_every=1)
    x = torch.randn(4, 8)
    times = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            model.zero_grad()
            model(x).sum().backward()
            watch.step()
            _ = watch.history.norms[-1]
        times.append(time.perf_counter() - t0)
    return times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def fill(steps: int, params: int, rows_per_flush: int) -> dict[str, float]:
    """Run in a child process: fill a History as a watch's flushes would, report memory."""
    from gradwatch.history import History

    names = [f"layers.{i}.weight" for i in range(params)]
    rng = np.random.default_rng(0)
    block = rng.random((rows_per_flush, params), dtype=np.float32)
    before = _rss_bytes()
    h = History(names)
    for start in range(0, steps, rows_per_flush):
        n = min(rows_per_flush, steps - start)
        chunk = History(names)
        chunk.append(np.arange(start, start + n), block[:n], total=np.linalg.norm(block[:n], axis=1))
        h.extend(chunk)
    grown = _rss_bytes() - before
    data = h.steps.nbytes + h.norms.nbytes + h.total.nbytes
    return {"rss_growth_mb": grown / 1e6, "data_mb": data / 1e6, "ratio": grown / data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--params", type=int, default=100)
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(fill(*args.child)))
        return
    times = read_every_step()
    print("reading watch.history at every step, seconds per block of 1,000 steps:")
    print("  " + "  ".join(f"{t:.3f}" for t in times) + f"   (last / first = {times[-1] / times[0]:.2f})")
    print(f"\nmemory of {args.steps:,} rows x {args.params} parameters (float32), each in a fresh process:")
    for rows in (1, 10_000):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(args.steps), str(args.params), str(rows)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout)
        print(
            f"  flush_every={rows:>6}: RSS grew {r['rss_growth_mb']:7.1f} MB for {r['data_mb']:.1f} MB of data "
            f"({r['ratio']:.2f}x)"
        )


if __name__ == "__main__":
    main()
