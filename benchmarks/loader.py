"""Tokens/s of midtrain's mixed loader vs plain litdata loaders on the same shards, interleaved in one run.

    python benchmarks/loader.py [--tokens 16000000] [--workers 2] [--rounds 3]

Columns:
  plain     litdata StreamingDataLoader over one StreamingDataset holding all the tokens
  combined  litdata CombinedStreamingDataset (weights) over the typed shards
  midtrain  ShardedMixedDataset (MixedLoader) over the same typed shards
Each round runs the three loaders back to back (order rotated), so a noisy machine affects all
alike; the table reports the median over rounds and the ratio to ``plain``. The last table is the
realised share per source of the midtrain loader against its resolved weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset, TokensLoader

from midtrain.data.sharded_mixed import ShardedMixedDataset
from midtrain.data.synthetic import write_shard

WEIGHTS = {"main/1": 0.4, "main/2": 0.3, "c1": 0.2, "m1": 0.1}
DIRS = {"main/1": "1", "main/2": "2", "c1": "c1", "m1": "m1"}


def build(root: Path, tokens: int) -> None:
    for i, name in enumerate(DIRS.values()):
        write_shard(root / "mix" / name, tokens // len(DIRS), seed=i, vocab_size=50_000, chunk_tokens=1 << 21)
    write_shard(root / "plain", tokens, seed=99, vocab_size=50_000, chunk_tokens=1 << 21)


def timed(loader, batches: int, batch_size: int, block: int, on_batch=None) -> float:
    """Steady-state tokens/s over ``batches`` batches after the first (which pays for worker start-up)."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        if on_batch is not None:
            on_batch(batch)
    return batches * batch_size * block / (time.perf_counter() - start)


def plain_loader(root: Path, block: int, batch_size: int, workers: int):
    ds = StreamingDataset(str(root / "plain"), item_loader=TokensLoader(block_size=block), shuffle=True)
    return StreamingDataLoader(ds, batch_size=batch_size, num_workers=workers, drop_last=True)


def combined_loader(root: Path, block: int, batch_size: int, workers: int):
    datasets = [
        StreamingDataset(str(root / "mix" / name), item_loader=TokensLoader(block_size=block), shuffle=True)
        for name in DIRS.values()
    ]
    combined = CombinedStreamingDataset(datasets, weights=list(WEIGHTS.values()), iterate_over_all=False)
    return StreamingDataLoader(combined, batch_size=batch_size, num_workers=workers, drop_last=True)


def midtrain_loader(root: Path, block: int, batch_size: int, workers: int):
    dm = ShardedMixedDataset(data_path=root / "mix", literal_weights_str=dict(WEIGHTS), num_workers=workers)
    dm.connect(batch_size=batch_size, max_seq_length=block - 1, with_source=True)
    return dm.train_dataloader()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16_000_000)
    parser.add_argument("--block", type=int, default=2049)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.tokens)
        makers = {"plain": plain_loader, "combined": combined_loader, "midtrain": midtrain_loader}
        results: dict[str, list[float]] = {name: [] for name in makers}
        shares: Counter = Counter()
        for r in range(args.rounds):
            order = list(makers)[r % 3 :] + list(makers)[: r % 3]
            for name in order:
                loader = makers[name](root, args.block, args.batch_size, args.workers)
                count = None
                if name == "midtrain":
                    count = lambda b, ld=loader: shares.update(ld.sources[i].id for i in b["source"].tolist())  # noqa: E731
                results[name].append(timed(loader, args.batches, args.batch_size, args.block, count))

        base = statistics.median(results["plain"])
        print(f"\n{args.tokens:,} tokens, block {args.block}, batch {args.batch_size}, workers {args.workers}, "
              f"{args.batches} batches x {args.rounds} rounds (median)")
        print(f"{'loader':<10} {'tokens/s':>14} {'vs plain':>9}   rounds")
        for name, values in results.items():
            med = statistics.median(values)
            runs = ", ".join(f"{v:,.0f}" for v in values)
            print(f"{name:<10} {med:>14,.0f} {med / base:>8.2f}x   {runs}")
        total = sum(shares.values())
        print(f"\nrealised share per source (midtrain, {total:,} samples)")
        print(f"{'source':<8} {'target':>7} {'realised':>9}")
        for sid, w in WEIGHTS.items():
            print(f"{sid:<8} {w:>7.3f} {shares[sid] / total:>9.3f}")


if __name__ == "__main__":
    main()
