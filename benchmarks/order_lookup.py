"""Cold lookup of one step of the data order far into a run: ``blend: exact`` vs ``blend: random``.

    python benchmarks/order_lookup.py [--sources 1000] [--batch 4096] [--indices 1.2e7 1.2e8 1.2e9]

Each row runs in a fresh process (a cold cache, as a loader worker after a resume): build the
order's blend, then look up the last step's ``--batch`` global indices before ``--indices``.
Columns: seconds to build the blend, seconds for the cold lookup (blend plus per-source orders), and
the growth of the process's peak resident memory over build + lookup (MiB). The random blend's lookup time and
memory should not grow with the index.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(blend: str, sources: int, batch: int, n: int) -> dict:
    import numpy as np

    from midtrain.data.order import DataOrder, Generation

    # heavy-tailed weights, the largest capped so the smallest stays above the exact blend's 1/2**20 floor
    raw = np.minimum(np.random.default_rng(0).pareto(1.0, sources), 1000.0) + 0.01
    weights = {f"s{i}": float(w) for i, w in enumerate(raw / raw.sum())}
    layouts = {s: (1000,) * 64 for s in weights}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    order = DataOrder(7, layouts, [Generation(0, weights, blend)])
    order.blend(0)
    t1 = time.perf_counter()
    order.lookup(np.arange(n - batch, n))
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base  # KiB on Linux
    return {"build": t1 - t0, "lookup": t2 - t1, "peak_mib": peak / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--indices", type=float, nargs="+", default=[1.2e7, 1.2e8, 1.2e9])
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one(a.child[0], a.sources, a.batch, int(float(a.child[1])))))
        return
    print(f"{a.sources} sources, last step of {a.batch} indices before n, each row a fresh process")
    print(f"{'n':>14} {'blend':>7} {'build s':>8} {'lookup s':>9} {'peak MiB':>9}")
    for n in a.indices:
        for blend in ("exact", "random"):
            args = ["--sources", str(a.sources), "--batch", str(a.batch), "--child", blend, str(n)]
            out = subprocess.run(
                [sys.executable, __file__, *args],
                check=True, capture_output=True, text=True,
            )
            r = json.loads(out.stdout)
            print(f"{int(n):>14,} {blend:>7} {r['build']:>8.2f} {r['lookup']:>9.3f} {r['peak_mib']:>9.1f}")


if __name__ == "__main__":
    main()
