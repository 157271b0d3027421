"""The one tokenizer fingerprint: what ``prepare`` records in each shard and training compares against.

A fingerprint is a sha256 over the tokenizer files of a directory (names and contents). ``midtrain
prepare`` writes it into every shard's ``prepare.json``; ``pretrain`` and ``finetune`` compute it
for their ``tokenizer_dir``, store it in every checkpoint and refuse shards prepared with another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from midtrain.errors import MidtrainError

MANIFEST_NAME = "prepare.json"
"""The manifest ``midtrain prepare`` writes into each shard directory."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
)
"""Files that define how text becomes token IDs (copied into checkpoints, hashed into the fingerprint)."""


def tokenizer_fingerprint(tokenizer_dir: Path | str) -> str:
    """sha256 over the tokenizer model file and its config files (names and contents)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def check_shard_tokenizers(
    tokenizer_dir: Path | str, shard_dirs: Iterable[Path | str], read: Callable[[str], dict | None] | None = None
) -> str | None:
    """Refuse shards whose ``prepare.json`` names another tokenizer than ``tokenizer_dir`` (``read``: a shard's
    manifest, for remote shards; default: the local file).

    Returns a note naming the shards that have no manifest (not prepared by ``midtrain prepare``,
    so their tokenizer cannot be checked), or None when every shard was checked.
    """
    expected = tokenizer_fingerprint(tokenizer_dir)
    unchecked: list[str] = []
    for shard in dict.fromkeys(shard_dirs if read is not None else (Path(s) for s in shard_dirs)):
        if read is not None:
            recorded = ((read(shard) or {}).get("tokenizer") or {})
        else:
            manifest = shard / MANIFEST_NAME
            if not manifest.is_file():
                unchecked.append(str(shard))
                continue
            try:
                recorded = (json.loads(manifest.read_text()).get("tokenizer") or {})
            except json.JSONDecodeError as err:
                raise MidtrainError(f"Corrupt {manifest}: {err}; repair it or re-run `midtrain prepare`.") from err
        fingerprint = recorded.get("fingerprint")
        if fingerprint is None:
            unchecked.append(str(shard))
        elif fingerprint != expected:
            raise MidtrainError(
                f"Tokenizer mismatch: shard {shard} was prepared with tokenizer {recorded.get('directory')} "
                f"(fingerprint {fingerprint[:12]}), this run uses {tokenizer_dir} (fingerprint {expected[:12]}); "
                "train with the tokenizer the shards were prepared with, or prepare them again."
            )
    if not unchecked:
        return None
    shown = ", ".join(unchecked[:4]) + (f" and {len(unchecked) - 4} more" if len(unchecked) > 4 else "")
    return (
        f"note: {len(unchecked)} shard(s) have no {MANIFEST_NAME} with a tokenizer fingerprint, so their "
        f"tokenizer is not checked: {shown}."
    )
