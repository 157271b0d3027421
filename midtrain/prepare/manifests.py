"""Bookkeeping under ``data_path`` for ``midtrain prepare``: manifests, resume, duplicate safety.

Each shard's ``prepare.json`` records its inputs (size, sha256) and the tokenizer fingerprint, so
a re-run with the same inputs is skipped (:func:`find_prepared`), overlapping inputs are refused,
and a tokenizer that differs from the one already used under ``data_path`` is an error
(:func:`check_tokenizer`). New shards take the next free name for their type.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from midtrain.data.shards import MAIN_TYPE, classify
from midtrain.errors import MidtrainError
from midtrain.prepare.encoding import TokenizerSpec
from midtrain.prepare.inputs import InputSource
from midtrain.rundir import MANIFEST_NAME, check_recorded_tokenizer

VAL_DIR = "val"


def sha256_file(path: Path, digest: Any = None) -> Any:
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest


def input_record(src: InputSource) -> dict:
    """``{path, kind, bytes, sha256}`` of one input; directories hash their files' names and contents."""
    if src.kind in ("textdir", "hf"):
        digest = hashlib.sha256()
        for f in src.files:
            digest.update(str(f.relative_to(src.path)).encode() + b"\0")
            sha256_file(f, digest)
        sha = digest.hexdigest()
    else:
        sha = sha256_file(src.path).hexdigest()
    size = sum(f.stat().st_size for f in src.files)
    return {"path": str(src.path), "kind": src.kind, "bytes": size, "sha256": sha}


def input_records(sources: list[InputSource]) -> list[dict]:
    total = sum(f.stat().st_size for src in sources for f in src.files)
    if total > 1 << 30:
        print(f"midtrain prepare: hashing {len(sources)} inputs ({total / 1e9:.1f} GB) to detect duplicates ...")
    return [input_record(src) for src in sources]


def read_manifests(data_path: Path) -> dict[Path, dict]:
    """``prepare.json`` of every shard directly under ``data_path`` and under ``data_path/val``."""
    found: dict[Path, dict] = {}
    for root in (data_path, data_path / VAL_DIR):
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            manifest = child / MANIFEST_NAME
            if child.name.startswith(".") or not manifest.is_file():
                continue
            try:
                found[child] = json.loads(manifest.read_text())
            except json.JSONDecodeError as e:
                raise MidtrainError(f"Corrupt {manifest}: {e}. Delete or repair it before preparing more data.") from e
    return found


def check_tokenizer(manifests: dict[Path, dict], spec: TokenizerSpec) -> None:
    """Fail when shards under the same data_path were prepared with a different tokenizer."""
    for path, manifest in manifests.items():
        check_recorded_tokenizer(
            manifest.get("tokenizer"), spec.fingerprint, spec.directory, f"shard {path} was prepared",
            "all shards under one data_path must share the tokenizer the model is trained with; use that "
            "tokenizer_dir or a different data_path.",
        )  # fmt: skip


def find_prepared(manifests: dict[Path, dict], records: list[dict], settings: dict) -> Path | None:
    """The shard that already holds exactly these inputs with the same ``settings``.

    Raise when any input is already in a shard otherwise (partial overlap, other type or settings):
    preparing it again would duplicate data.
    """
    wanted = {r["sha256"]: r["path"] for r in records}
    for path, manifest in manifests.items():
        if manifest.get("split") != "train":
            continue
        have = {r.get("sha256") for r in manifest.get("inputs", [])}
        same_settings = all(manifest.get(k) == v for k, v in settings.items())
        if have == set(wanted) and same_settings:
            return path
        overlap = sorted(wanted[sha] for sha in set(wanted) & have)
        if overlap:
            raise MidtrainError(
                f"Inputs {overlap} are already prepared in shard {path} (same sha256, see its {MANIFEST_NAME}"
                f"{'' if same_settings else '; prepared with different type/text_key/validation settings'}); "
                "preparing them again would duplicate data. Drop them from --inputs (to repeat data, raise that "
                "shard's mixture weight instead), or delete that shard first."
            )
    return None


RESERVED_SUFFIX = ".reserved"
"""``<data_path>/.<shard>.reserved``: a shard name taken by a running ``prepare`` (created with O_EXCL)."""


def _used_names(data_path: Path) -> set[str]:
    """Shard names taken: existing shards (and validation shards) and the reservations of running prepares."""
    names = set()
    for root in (data_path, data_path / VAL_DIR):
        if root.is_dir():
            for p in root.iterdir():
                if not p.name.startswith("."):
                    names.add(p.name)
                elif root == data_path and p.name.endswith(RESERVED_SUFFIX):
                    names.add(p.name[1 : -len(RESERVED_SUFFIX)])
    return names


@contextmanager
def reserve_shard_name(data_path: Path, type: str, table: dict[str, str], shard: str | None) -> Iterator[str]:
    """Take the shard name :func:`choose_shard_name` gives, atomically: concurrent prepares into one ``data_path``
    (a SLURM array over a corpus's parts) each get their own name. The reservation is a hidden file created with
    ``O_CREAT | O_EXCL`` (atomic on local and NFS v3+ file systems); it is released after the shard is published
    (or on failure), and a name whose shard appeared meanwhile is given back and the next one taken."""
    while True:
        name = choose_shard_name(data_path, type, table, shard)
        marker = data_path / f".{name}{RESERVED_SUFFIX}"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if shard is not None:
                raise MidtrainError(f"Shard name {shard!r} is being written by another prepare ({marker}).") from None
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}\n")
        if (data_path / name).exists() or (data_path / VAL_DIR / name).exists():  # published before our listing
            marker.unlink()
            if shard is not None:
                raise MidtrainError(f"Shard {data_path / shard} already exists.")
            continue
        try:
            yield name
        finally:
            marker.unlink(missing_ok=True)
        return


def choose_shard_name(data_path: Path, type: str, table: dict[str, str], shard: str | None) -> str:
    """The explicit ``shard`` (checked against ``type``) or the next free name for ``type``.

    Names used under ``data_path`` or ``data_path/val`` are taken; numbering continues after the
    highest existing number (gaps are not reused).
    """
    used = _used_names(data_path)
    prefix = "" if type == MAIN_TYPE else table[type]
    numbers = [
        int(name[len(prefix) :])
        for name in used
        if name[len(prefix) :].isdigit() and (classify(name, table) or ("", ""))[1] == type
    ]
    next_name = f"{prefix}{max(numbers, default=0) + 1}"
    if shard is None:
        return next_name
    found = classify(shard, table)
    if found is None or found[1] != type:
        kind = f"a {found[1]!r} shard name" if found else "not a shard name"
        raise MidtrainError(
            f"Shard name {shard!r} does not fit type {type!r} ({shard!r} is {kind}); use e.g. {next_name!r}, or omit "
            "--shard to take the next free one."
        )
    if shard in used:
        raise MidtrainError(
            f"Shard {data_path / shard} (or {VAL_DIR}/{shard}) already exists; the next free name is {next_name!r}."
        )
    return shard


def leftover_temp_dirs(data_path: Path) -> list[Path]:
    """Hidden temp directories that an interrupted writer left behind (never read as shards)."""
    found = []
    for root in (data_path, data_path / VAL_DIR):
        if root.is_dir():
            found.extend(p for p in root.iterdir() if p.is_dir() and p.name.startswith(".") and ".tmp-" in p.name)
    return sorted(found)

