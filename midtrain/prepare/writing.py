"""Shard writing for ``midtrain prepare``: encoded batches -> a litdata token shard (and its
validation shard), published atomically with its ``prepare.json``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from midtrain import __version__
from midtrain.data.shards import read_index
from midtrain.errors import MidtrainError
from midtrain.prepare.encoding import EncodedBatch, TokenizerSpec, batched, encode_batches
from midtrain.prepare.inputs import ReadStats
from midtrain.prepare.manifests import VAL_DIR
from midtrain.rundir import MANIFEST_NAME, write_json


@dataclass
class ShardStats:
    """Counts of one prepare run."""

    documents: int = 0
    tokens: int = 0
    val_documents: int = 0
    val_tokens: int = 0
    eos_dropped: int = 0
    max_token_id: int = -1
    """The largest token id written (training and validation), recorded for the vocabulary preflight."""
    seconds: float = 0.0
    read: ReadStats = field(default_factory=ReadStats)

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens + self.val_tokens) / max(self.seconds, 1e-9)


class _ValSplitter:
    """Decide which documents of a batch go to validation."""

    def __init__(self, val_tokens: int | None):
        self.remaining = val_tokens

    def mask(self, batch: EncodedBatch) -> np.ndarray | None:
        if batch.val_mask is not None:
            return batch.val_mask
        if not self.remaining:
            return None
        cum = np.cumsum(batch.lengths)
        take = min(int(np.searchsorted(cum, self.remaining)) + 1, len(cum))
        self.remaining = max(0, self.remaining - int(cum[take - 1]))
        return np.arange(len(cum)) < take


def _dtype_name(spec: TokenizerSpec) -> str:
    return "uint16" if spec.vocab_size <= 65535 else "int32"


def tokenize_to_shard(
    texts: Iterable[str],
    shard_path: Path,
    spec: TokenizerSpec,
    manifest: dict,
    val_path: Path | None = None,
    val_tokens: int | None = None,
    val_fraction: float | None = None,
    num_workers: int = 0,
    chunk_tokens: int | None = None,
    stats: ShardStats | None = None,
    desc: str | None = None,
) -> ShardStats:
    """Tokenise ``texts`` into a new shard at ``shard_path`` (and ``val_path``); atomic on any error.

    ``manifest`` is completed with the counts and written as ``prepare.json`` inside the shard
    before it is published.
    """
    import torch

    from midtrain.prepare.writer import DEFAULT_CHUNK_TOKENS, TokenShardWriter

    stats = stats if stats is not None else ShardStats()
    dtype = torch.uint16 if spec.vocab_size <= 65535 else torch.int32
    chunk = chunk_tokens or DEFAULT_CHUNK_TOKENS
    start = time.perf_counter()
    train = TokenShardWriter(shard_path, chunk_tokens=chunk, dtype=dtype)
    val = None
    try:
        if val_path is not None:
            val_path.parent.mkdir(parents=True, exist_ok=True)
            val = TokenShardWriter(val_path, chunk_tokens=chunk, dtype=dtype)
        splitter = _ValSplitter(val_tokens)
        bar = tqdm(desc=desc or f"prepare {shard_path.name}", unit=" docs", mininterval=0.5, dynamic_ncols=True)
        with bar:
            for batch in encode_batches(batched(texts), spec, num_workers, val_fraction if val else None):
                _write_batch(batch, splitter.mask(batch) if val else None, train, val, stats)
                bar.update(len(batch.lengths))
                rate = (stats.tokens + stats.val_tokens) / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{stats.tokens + stats.val_tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        stats.seconds = time.perf_counter() - start
        _publish(train, val, stats, manifest, spec, chunk)
    except BaseException:
        train.abort()
        if val is not None:
            val.abort()
        raise
    return stats


def _write_batch(batch: EncodedBatch, mask: np.ndarray | None, train: Any, val: Any | None, stats: ShardStats) -> None:
    stats.eos_dropped += batch.eos_dropped
    if batch.tokens.size:
        stats.max_token_id = max(stats.max_token_id, int(batch.tokens.max()))
    if mask is None or not mask.any():
        train.add(batch.tokens)
        stats.documents += len(batch.lengths)
        stats.tokens += int(batch.tokens.size)
        return
    token_mask = np.repeat(mask, batch.lengths)
    train.add(batch.tokens[~token_mask])
    val.add(batch.tokens[token_mask])
    n_val = int(mask.sum())
    stats.val_documents += n_val
    stats.val_tokens += int(token_mask.sum())
    stats.documents += len(mask) - n_val
    stats.tokens += int(batch.tokens.size - token_mask.sum())


def _publish(train: Any, val: Any | None, stats: ShardStats, manifest: dict, spec: TokenizerSpec, chunk: int) -> None:
    """Check the counts, write both manifests, then move validation and training shards into place."""
    if stats.documents == 0:
        raise MidtrainError(
            f"No training documents with text were found for shard {train.path.name} "
            f"({stats.read.empty_documents} empty, {stats.read.bad_records} malformed, {stats.val_documents} held out "
            "for validation). Check --inputs and --text_key."
        )
    if val is not None and stats.val_documents == 0:
        raise MidtrainError(
            f"The validation split selected no documents out of {stats.documents}; raise --val_fraction/--val_tokens "
            "or leave both unset."
        )
    common = {
        **manifest,
        "midtrain_version": __version__,
        "tokenizer": {k: v for k, v in asdict(spec).items() if k != "model_file"},
        "dtype": _dtype_name(spec),
        "chunk_tokens": chunk,
        "skipped_bad_records": stats.read.bad_records,
        "skipped_empty_documents": stats.read.empty_documents,
        "eos_dropped_documents": stats.eos_dropped,
        "max_token_id": stats.max_token_id,
    }
    train_manifest = {"split": "train", **common, "documents": stats.documents, "tokens": stats.tokens}
    if val is not None:
        rel = f"{VAL_DIR}/{val.path.name}"
        train_manifest["validation"] = {"path": rel, "documents": stats.val_documents, "tokens": stats.val_tokens}
        val_manifest = {
            **common,
            "split": "val",
            "train_shard": train.path.name,
            "documents": stats.val_documents,
            "tokens": stats.val_tokens,
        }
        write_json(val.tmp / MANIFEST_NAME, val_manifest, sort_keys=True)
        val.close()
    write_json(train.tmp / MANIFEST_NAME, train_manifest, sort_keys=True)
    train.close()


def summary(shard_path: Path, type: str, stats: ShardStats) -> str:
    """Human-readable end-of-run summary."""
    lines = [
        f"midtrain prepare: wrote {type} shard {shard_path}: {stats.documents:,} documents, {stats.tokens:,} tokens "
        f"in {stats.seconds:.1f} s ({stats.tokens_per_second:,.0f} tokens/s)"
    ]
    if stats.val_documents:
        lines.append(
            f"  validation shard {shard_path.parent / VAL_DIR / shard_path.name}: {stats.val_documents:,} documents, "
            f"{stats.val_tokens:,} tokens"
        )
    read = stats.read
    if read.bad_records:
        lines.append(f"  skipped {read.bad_records:,} malformed records, e.g.:")
        lines.extend(f"    {example}" for example in read.bad_examples)
    if read.empty_documents:
        lines.append(f"  skipped {read.empty_documents:,} empty documents")
    if stats.eos_dropped:
        lines.append(
            f"  note: {stats.eos_dropped:,} documents end with the EOS token in their text; litgpt's Tokenizer.encode "
            "drops that trailing EOS, and so does prepare (IDs match litgpt)"
        )
    return "\n".join(lines)


def read_shard_tokens(shard_path: Path) -> np.ndarray:
    """All tokens of a litdata token shard, in chunk order (reads the chunk files directly)."""
    from litdata.constants import _TORCH_DTYPES_MAPPING

    index = read_index(Path(shard_path))
    fmt = index["config"]["data_format"][0]
    dtype = _TORCH_DTYPES_MAPPING[int(fmt.rsplit(":", 1)[1])]
    np_dtype = np.dtype(str(dtype).removeprefix("torch."))
    parts = []
    for chunk in index["chunks"]:
        header = (1 + chunk["chunk_size"] + 1) * 4
        data = np.fromfile(Path(shard_path) / chunk["filename"], dtype=np.uint8)[header:]
        parts.append(data.view(np_dtype)[: chunk["dim"]])
    return np.concatenate(parts) if parts else np.empty(0, np_dtype)
