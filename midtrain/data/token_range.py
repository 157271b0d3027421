"""The largest token id of a shard, so preflight can refuse ids the model's vocabulary cannot embed.

From the shard's ``prepare.json`` (``max_token_id``, written by ``midtrain prepare``) when present;
otherwise every chunk is read once and the result cached under ``$MIDTRAIN_CACHE`` (default
``~/.cache/midtrain``), keyed by the shard's location and its ``index.json``. Local and remote
(``s3://``, ``gs://``) shards alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.data.shards import Shard
from midtrain.errors import MidtrainError
from midtrain.rundir import MANIFEST_NAME
from midtrain.storage import Store, join


def _reader(path: str | Path, storage_options: dict[str, Any] | None) -> Any:
    """``read(name) -> bytes | None`` for files of the shard at ``path``."""
    store = Store(path, storage_options)
    return lambda name: store.read_bytes(join(path, name))


def read_manifest(path: str | Path, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The shard's ``prepare.json``, or None when it has none."""
    raw = _reader(path, storage_options)(MANIFEST_NAME)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise MidtrainError(f"Corrupt {path}/{MANIFEST_NAME}: {err}; repair it or re-run `midtrain prepare`.") from err


def _cache_file(path: str | Path, index: bytes) -> Path:
    root = Path(os.environ.get("MIDTRAIN_CACHE", Path.home() / ".cache" / "midtrain")).expanduser()
    key = hashlib.sha256(str(path).encode() + b"\0" + index).hexdigest()[:32]
    return root / "max_token_id" / f"{key}.json"


def scan_max_token_id(path: str | Path, storage_options: dict[str, Any] | None = None) -> int:
    """Read every chunk of the shard and return its largest token id (cached; see the module docstring)."""
    from litdata.constants import _TORCH_DTYPES_MAPPING

    read = _reader(path, storage_options)
    raw_index = read("index.json")
    if raw_index is None:
        raise MidtrainError(f"Shard directory {path} has no index.json; it is not a finished litdata shard.")
    cache = _cache_file(path, raw_index)
    if cache.is_file():
        return int(json.loads(cache.read_text())["max_token_id"])
    index = json.loads(raw_index)
    code = int(index["config"]["data_format"][0].rsplit(":", 1)[1])
    dtype = np.dtype(str(_TORCH_DTYPES_MAPPING[code]).removeprefix("torch."))
    top = -1
    for chunk in index["chunks"]:
        data = read(chunk["filename"])
        if data is None:
            raise MidtrainError(f"Shard {path} lists chunk {chunk['filename']}, which is missing.")
        header = (1 + chunk["chunk_size"] + 1) * 4  # litdata's chunk header: item count and offsets
        tokens = np.frombuffer(data, dtype=np.uint8)[header:].view(dtype)[: chunk["dim"]]
        if tokens.size:
            top = max(top, int(tokens.max()))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"path": str(path), "max_token_id": top}))
    tmp.replace(cache)
    return top


def max_token_id(shard: Shard, storage_options: dict[str, Any] | None = None) -> int:
    """The shard's largest token id: ``prepare.json``'s ``max_token_id`` when recorded, else a (cached) scan."""
    manifest = read_manifest(shard.path, storage_options) or {}
    if "max_token_id" in manifest:
        return int(manifest["max_token_id"])
    return scan_max_token_id(shard.path, storage_options)


def check_token_ids(shards: Iterable[Shard], padded_vocab_size: int, storage_options: dict | None = None) -> None:
    """Refuse a sampled shard holding a token id the model's embedding (``padded_vocab_size`` rows) lacks."""
    for shard in dict.fromkeys(shards):
        top = max_token_id(shard, storage_options)
        if top >= padded_vocab_size:
            raise MidtrainError(
                f"Shard {shard.id} ({shard.path}) holds token id {top}, but the model embeds ids below "
                f"{padded_vocab_size} (padded_vocab_size): training would fail with an index error. Prepare the "
                "shard with the model's tokenizer, or use a model whose vocabulary covers it."
            )
