"""Benchmark ``midtrain prepare`` against the research fork's way of tokenising a corpus.

The fork's way (litgpt's own ``prepare_*`` scripts do the same): litdata ``optimize`` with a
function that calls litgpt ``Tokenizer.encode(text, eos=True)`` once per document and yields
the tensor. Both run in one process tree on the same JSONL input (the demo corpus text, repeated
to reach ``--mb`` megabytes) with the same tokenizer and the same number of workers; the script
checks that both produce the same documents' token sequences (chunk order differs, so documents
are compared as a multiset) and prints tokens/s and the ratio.

    .venv/bin/python benchmarks/prepare.py --mb 8 --workers 2

Wall time includes each approach's start-up (worker processes, imports), which is what a user waits for;
CPU seconds (this process plus its finished workers) show the work done, independent of machine load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from collections import Counter
from functools import lru_cache, partial
from pathlib import Path


@lru_cache(maxsize=1)
def _litgpt_tokenizer(tokenizer_dir: str):
    from litgpt.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dir)


def fork_tokenize(path: str, tokenizer_dir: str):
    """The research fork's per-document function for litdata ``optimize`` (module level: spawn-picklable)."""
    tokenizer = _litgpt_tokenizer(tokenizer_dir)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield tokenizer.encode(json.loads(line)["text"], eos=True)


def make_input(work: Path, megabytes: float, files: int) -> tuple[list[str], Path]:
    """Demo corpus text as ``files`` JSONL files of about ``megabytes`` in total, plus the demo tokenizer."""
    from midtrain.demo.corpus import build_demo_corpus, demo_documents

    info = build_demo_corpus(work / "demo")
    docs = [d for domain in ("main", "code", "math") for d in demo_documents()[domain]]
    lines = [json.dumps({"text": d}) + "\n" for d in docs]
    per_file = megabytes * 1e6 / files
    paths = []
    for i in range(files):
        path = work / f"raw-{i}.jsonl"
        size, k = 0, i
        with open(path, "w", encoding="utf-8") as fh:
            while size < per_file:
                line = lines[k % len(lines)]
                fh.write(line)
                size += len(line)
                k += files
        paths.append(str(path))
    return paths, Path(info["tokenizer_dir"])


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker pools are joined before we read it)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn(*args)``."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    fn(*args)
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def run_midtrain(paths: list[str], tokenizer_dir: Path, out: Path, workers: int) -> None:
    from midtrain.prepare import prepare

    prepare(paths, type="main", data_path=out, tokenizer_dir=tokenizer_dir, num_workers=workers)


def run_fork(paths: list[str], tokenizer_dir: Path, out: Path, workers: int, chunk_tokens: int) -> None:
    from litdata import TokensLoader, optimize

    optimize(
        fn=partial(fork_tokenize, tokenizer_dir=str(tokenizer_dir)),
        inputs=paths,
        output_dir=str(out),
        num_workers=workers,
        chunk_size=chunk_tokens,
        item_loader=TokensLoader(),
        verbose=False,
    )


def document_multiset(shard: Path, eos_id: int) -> tuple[Counter, int]:
    """Hashes of the documents (split at EOS) of a token shard, and its token count."""
    from midtrain.prepare import read_shard_tokens

    tokens = read_shard_tokens(shard).astype("int64")
    ends = (tokens == eos_id).nonzero()[0]
    starts = [0, *(ends[:-1] + 1)]
    docs = Counter(hashlib.blake2b(tokens[s : e + 1].tobytes(), digest_size=16).digest() for s, e in zip(starts, ends))
    return docs, int(tokens.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="input size in megabytes of JSONL")
    parser.add_argument("--files", type=int, default=4, help="number of input files")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes")
    parser.add_argument("--work_dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("midtrain", "fork"):
        shutil.rmtree(work / name, ignore_errors=True)
    paths, tokenizer_dir = make_input(work, args.mb, args.files)
    chunk_tokens = 1 << 21

    t_fork, cpu_fork = timed(run_fork, paths, tokenizer_dir, work / "fork", args.workers, chunk_tokens)
    t_mid, cpu_mid = timed(run_midtrain, paths, tokenizer_dir, work / "midtrain", args.workers)

    eos = _litgpt_tokenizer(str(tokenizer_dir)).eos_id
    docs_mid, n_mid = document_multiset(work / "midtrain" / "1", eos)
    docs_fork, n_fork = document_multiset(work / "fork", eos)
    same = docs_mid == docs_fork and n_mid == n_fork
    mb = sum(os.path.getsize(p) for p in paths) / 1e6

    print(
        f"\ninput: {len(paths)} JSONL files, {mb:.1f} MB, {sum(docs_mid.values()):,} documents; "
        f"{args.workers} workers on {os.cpu_count()} CPUs; tokenizer {tokenizer_dir}"
    )
    print(f"| {'method':<52} | {'tokens':>10} | {'wall s':>7} | {'tokens/s':>10} | {'ratio':>5} | {'CPU s':>6} |")
    print(f"|{'-' * 54}|{'-' * 12}|{'-' * 9}|{'-' * 12}|{'-' * 7}|{'-' * 8}|")
    rows = [
        ("litdata optimize + litgpt Tokenizer.encode per doc", n_fork, t_fork, cpu_fork),
        ("midtrain prepare (batched Rust tokenizers, workers)", n_mid, t_mid, cpu_mid),
    ]
    for name, n, t, cpu in rows:
        print(f"| {name:<52} | {n:>10,} | {t:>7.2f} | {n / t:>10,.0f} | {t_fork / t:>4.2f}x | {cpu:>6.1f} |")
    print(f"\nsame token sequences (documents as a multiset): {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
