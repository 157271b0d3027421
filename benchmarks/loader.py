"""Tokens/s of midtrain's training loader vs plain litdata iteration over the same tokens, interleaved rounds.

    python benchmarks/loader.py [--tokens 16000000] [--workers 2] [--rounds 5] [--sources 4 16] [--combined]

Columns:
  plain     litdata StreamingDataLoader over one shuffled StreamingDataset holding all the tokens
  combined  (--combined) litdata CombinedStreamingDataset with the weights, over the per-source shards
  midtrain  ShardedMixedDataset's loader (the data order, read by index) over the per-source shards
Same block, micro-batch and workers for all. Each round runs the loaders back to back (order rotated),
so a noisy machine affects all alike; the table reports the median over rounds and the ratio to
``plain``, and the CPU time (main process plus its loader workers, user + system) per batch, which a
busy machine disturbs far less than the wall clock. Then the realised share per source of the midtrain
loader against its weights, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset, TokensLoader

from midtrain.data.sharded_mixed import ShardedMixedDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/ holds the shard writer
from tests.synthetic import write_shard  # noqa: E402


def weights_for(n: int) -> dict[str, float]:
    """Skewed weights over main shards ``1..n`` (each half the previous, floored at 1/4n), normalised."""
    raw = [max(0.5**i, 1 / (4 * n)) for i in range(n)]
    return {f"main/{i + 1}": w / sum(raw) for i, w in enumerate(raw)}


def build(root: Path, tokens: int, n: int) -> None:
    for i in range(n):
        write_shard(root / f"mix{n}" / str(i + 1), tokens // n, seed=i, vocab_size=50_000, chunk_tokens=1 << 21)
    if not (root / "plain").exists():
        write_shard(root / "plain", tokens, seed=99, vocab_size=50_000, chunk_tokens=1 << 21)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the loader workers)."""
    own = os.times()
    total = own.user + own.system
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = f.read().split()
    for child in children:
        try:
            with open(f"/proc/{child}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def timed(loader, batches: int, batch_size: int, block: int, workers: int, on_batch=None) -> tuple[float, float]:
    """Steady-state tokens/s and CPU ms per batch over ``batches`` batches after two from every worker (which
    pay for start-up); NaN when the loader ends first (litdata's combined stream stops when a small source
    runs out)."""
    it = iter(loader)
    for _ in range(2 * max(1, workers)):
        next(it)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        batch = next(it, None)
        if batch is None:
            return float("nan"), float("nan")
        if on_batch is not None:
            on_batch(batch)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return batches * batch_size * block / wall, 1000 * cpu / batches


def plain_loader(root: Path, n: int, block: int, batch_size: int, workers: int):
    ds = StreamingDataset(str(root / "plain"), item_loader=TokensLoader(block_size=block), shuffle=True)
    return StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=True)


def combined_loader(root: Path, n: int, block: int, batch_size: int, workers: int):
    weights = weights_for(n)
    datasets = [
        StreamingDataset(str(root / f"mix{n}" / sid.split("/")[1]), item_loader=TokensLoader(block_size=block),
                         shuffle=True)
        for sid in weights
    ]
    combined = CombinedStreamingDataset(datasets, weights=list(weights.values()), iterate_over_all=False)
    return StreamingDataLoader(combined, batch_size=batch_size, num_workers=workers, drop_last=True)


def midtrain_loader(root: Path, n: int, block: int, batch_size: int, workers: int):
    dm = ShardedMixedDataset(data_path=root / f"mix{n}", literal_weights_str=weights_for(n), num_workers=workers)
    dm.connect(batch_size=batch_size, max_seq_length=block - 1, with_source=True)
    return dm.train_dataloader()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16_000_000)
    parser.add_argument("--block", type=int, default=2049)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sources", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--combined", action="store_true", help="also time litdata's CombinedStreamingDataset")
    args = parser.parse_args()

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in args.sources:
            build(root, args.tokens, n)
            makers = {"plain": plain_loader, "midtrain": midtrain_loader}
            if args.combined:
                makers["combined"] = combined_loader
            results: dict[str, list[float]] = {name: [] for name in makers}
            cpu: dict[str, list[float]] = {name: [] for name in makers}
            shares: Counter = Counter()
            for r in range(args.rounds):
                order = list(makers)[r % len(makers):] + list(makers)[: r % len(makers)]
                for name in order:
                    loader = makers[name](root, n, args.block, args.batch_size, args.workers)
                    count = None
                    if name == "midtrain":
                        count = lambda b, ld=loader, c=shares: c.update(ld.sources[i].id for i in b["source"].tolist())  # noqa: E731
                    speed, ms = timed(loader, args.batches, args.batch_size, args.block, args.workers, count)
                    results[name].append(speed)
                    cpu[name].append(ms)

            base = statistics.median(results["plain"])
            print(f"\n{n} sources, {args.tokens:,} tokens, block {args.block}, batch {args.batch_size}, "
                  f"workers {args.workers}, {args.batches} batches x {args.rounds} rounds (median)")
            print(f"{'loader':<10} {'tokens/s':>14} {'vs plain':>9} {'CPU ms/batch':>13} {'vs plain':>9}   "
                  "rounds (tokens/s)")
            base_cpu = statistics.median(cpu["plain"])
            for name, values in results.items():
                med, ms = statistics.median(values), statistics.median(cpu[name])
                runs = ", ".join(f"{v:,.0f}" for v in values)
                print(f"{name:<10} {med:>14,.0f} {med / base:>8.2f}x {ms:>13.2f} {ms / base_cpu:>8.2f}x   {runs}")
            total = sum(shares.values())
            print(f"realised share per source (midtrain, {total:,} samples): "
                  + ", ".join(f"{sid} {w:.3f}/{shares[sid] / total:.3f}" for sid, w in weights_for(n).items()))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
