"""Shard discovery: find litdata token shards under a ``data_path`` and give each a typed ID.

A shard is a directory directly under ``data_path`` that holds a litdata ``index.json``.
``data_path`` may be local or an ``s3://`` / ``gs://`` prefix: both are listed and each ``index.json``
read (once) through :mod:`midtrain.storage`; litdata streams and caches remote chunks.

* Numbered directories ``1``, ``2``, ... are of type ``main`` and get the ID ``main/<n>``.
* Typed directories are ``<prefix><n>`` (``c1`` is code shard 1) or a bare ``<prefix>`` (``b``).
  Their ID is the directory name. The prefix table is :data:`DEFAULT_SHARD_TYPES` plus whatever
  the user adds with ``shard_types: {pubmed: pm}``; when several prefixes match, the longest wins
  (``pm1`` is pubmed, not papers).

The size of a shard is its number of **tokens**: the sum of each chunk's ``dim`` in ``index.json``.
Directories that look like shards but cannot be read are errors, never skipped.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midtrain.errors import MidtrainError
from midtrain.storage import Store, is_remote, join, location

DEFAULT_SHARD_TYPES: dict[str, str] = {
    "code": "c",
    "math": "m",
    "instruct": "i",
    "qa": "q",
    "books": "b",
    "news": "n",
    "papers": "p",
    "web": "w",
}
MAIN_TYPE = "main"
_INTEGER_DTYPE_CODES = {11, 12, 13, 14, 15, 16, 17, 18, 20}  # litdata's torch dtype table: integer kinds
_NAME = re.compile(r"^(?P<prefix>[A-Za-z_]+?)?(?P<num>\d*)$")


@dataclass(frozen=True)
class Shard:
    """One litdata token shard: a local directory (``Path``) or a URL (``str``); sized from its ``index.json``."""

    id: str
    type: str
    path: Path | str
    tokens: int
    num_chunks: int
    dtype_code: int | None
    min_chunk_tokens: int
    chunk_dims: tuple[int, ...] = ()

    def samples(self, block_size: int) -> int:
        """Number of ``block_size`` token windows litdata's ``TokensLoader`` serves from this shard."""
        return sum(dim // block_size for dim in self.chunk_dims)

    def check_block_size(self, block_size: int) -> None:
        """Fail when this shard cannot serve windows of ``block_size`` tokens."""
        if self.dtype_code is not None and self.dtype_code not in _INTEGER_DTYPE_CODES:
            raise MidtrainError(
                f"Shard {self.id} ({self.path}) stores non-integer data (litdata dtype code {self.dtype_code}); "
                "a token shard must hold integer token IDs written with litdata's TokensLoader."
            )
        if self.samples(block_size) == 0:
            raise MidtrainError(
                f"Shard {self.id} ({self.path}) has {self.tokens} tokens in chunks of at most "
                f"{max(self.chunk_dims, default=0)} tokens, so it cannot serve a single sequence of "
                f"{block_size} tokens (max_seq_length + 1). Use a shorter max_seq_length or re-prepare the shard "
                f"with chunks of at least {block_size} tokens."
            )


def _missing_index(path: Path | str) -> MidtrainError:
    return MidtrainError(f"Shard directory {path} has no index.json; it is not a finished litdata shard.")


def read_index(path: Path | str, store: Store | None = None) -> dict:
    """Read and validate a shard's ``index.json`` (local or URL); raise a clear error when missing or corrupt."""
    raw = (store or Store(path)).read_bytes(join(path, "index.json"))
    if raw is None:
        raise _missing_index(path)
    return parse_index(raw, path)


def parse_index(raw: bytes, path: Path | str) -> dict:
    """Decode and validate the contents of the ``index.json`` of shard ``path``."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MidtrainError(f"Corrupt index.json in {path}: {e}. Re-run `midtrain prepare` for this shard.") from e
    chunks = data.get("chunks") if isinstance(data, dict) else None
    if not isinstance(chunks, list) or not chunks:
        raise MidtrainError(f"index.json in {path} lists no chunks; the shard is empty or was not finished.")
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("dim"), int) or "filename" not in chunk:
            raise MidtrainError(
                f"index.json in {path}: chunk {i} has no integer 'dim' (token count); this is not a token shard "
                "written with litdata's TokensLoader."
            )
    return data


def _dtype_code(config: dict | None) -> int | None:
    formats = (config or {}).get("data_format") or []
    for fmt in formats:
        if isinstance(fmt, str) and ":" in fmt and "tensor" in fmt:
            try:
                return int(fmt.rsplit(":", 1)[1])
            except ValueError:
                return None
    return None


def load_shard(
    shard_id: str,
    shard_type: str,
    path: Path | str,
    storage_options: dict[str, Any] | None = None,
    store: Store | None = None,
) -> Shard:
    """The shard at ``path`` (a local directory or an ``s3://``/``gs://`` URL), sized from its ``index.json``."""
    path = location(path) if is_remote(path) else Path(path)
    data = read_index(path, store or Store(path, storage_options))
    dims = tuple(int(c["dim"]) for c in data["chunks"])
    return Shard(
        id=shard_id,
        type=shard_type,
        path=path,
        tokens=sum(dims),
        num_chunks=len(dims),
        dtype_code=_dtype_code(data.get("config")),
        min_chunk_tokens=min(dims),
        chunk_dims=dims,
    )


def shard_type_table(shard_types: dict[str, str] | None = None) -> dict[str, str]:
    """Type name -> directory prefix: the defaults plus user additions (which may override)."""
    table = dict(DEFAULT_SHARD_TYPES)
    for name, prefix in (shard_types or {}).items():
        if name == MAIN_TYPE:
            raise MidtrainError("Type 'main' is reserved for numbered shard directories (1, 2, ...).")
        if not re.fullmatch(r"[A-Za-z_]+", str(prefix)):
            raise MidtrainError(f"Shard prefix {prefix!r} for type {name!r} must be letters only (e.g. 'pm').")
        table[name] = str(prefix)
    prefixes = list(table.values())
    dupes = {p for p in prefixes if prefixes.count(p) > 1}
    if dupes:
        raise MidtrainError(f"Shard prefixes must be unique; {sorted(dupes)} is used by several types: {table}")
    return table


def classify(name: str, table: dict[str, str]) -> tuple[str, str] | None:
    """Map a directory name to ``(shard_id, type)``, or None when the name is not a shard name."""
    if name.isdigit():
        return f"{MAIN_TYPE}/{int(name)}", MAIN_TYPE
    m = _NAME.match(name)
    if not m or not m.group("prefix"):
        return None
    best = None
    for type_name, prefix in table.items():
        rest = name[len(prefix) :] if name.startswith(prefix) else None
        if rest is not None and (rest == "" or rest.isdigit()):
            if best is None or len(prefix) > len(table[best]):
                best = type_name
    return (name, best) if best else None


def discover_shards(
    data_path: str | Path, shard_types: dict[str, str] | None = None, storage_options: dict[str, Any] | None = None
) -> list[Shard]:
    """All shards directly under ``data_path`` (a directory or ``s3://``/``gs://`` prefix), by type then number.

    Directories whose names are not shard names (e.g. ``val``, ``tokenizer``) are ignored unless they
    hold an ``index.json`` (see :func:`check_shard_names`; checked for local paths only); a directory with a
    shard name but a missing or corrupt ``index.json`` is an error, and so are two directories with one ID
    (``1`` and ``01``). A remote prefix is listed with ``storage_options``; its indexes are read in parallel.
    """
    if data_path is None:
        raise MidtrainError("data.data_path is not set; point it at the directory holding the shard folders.")
    root, remote = location(data_path), is_remote(data_path)
    if not remote and not root.is_dir():
        hint = ""
        if root.name == "demo":
            hint = f"; build the demo corpus first: `midtrain prepare demo --data_path {data_path}`"
        raise MidtrainError(f"data_path {root} does not exist or is not a directory{hint}.")
    table = shard_type_table(shard_types)
    store = Store(root, storage_options)
    names = [n for n in store.list_dirs(root) if not n.startswith((".", "_"))]
    entries = [(n, not remote and (root / n / "index.json").is_file()) for n in names]
    found = list(check_shard_names(entries, table).items())
    if not found:
        raise _no_shards(root, table)

    def load(item: tuple[str, tuple[str, str]]) -> Shard:
        name, (shard_id, shard_type) = item
        return load_shard(shard_id, shard_type, join(root, name), store=store)

    if remote:
        with ThreadPoolExecutor(min(16, len(found))) as pool:
            shards = list(pool.map(load, found))
    else:
        shards = [load(item) for item in found]
    return sorted(shards, key=_sort_key)


def _no_shards(root: Path | str, table: dict[str, str]) -> MidtrainError:
    names = ", ".join(f"{t}: {p}1" for t, p in table.items())
    return MidtrainError(
        f"No shards under {root}. Expected numbered directories (1, 2, ... for type main) or typed ones "
        f"({names}), each holding a litdata index.json."
    )


NOT_SHARDS = frozenset({"val", "valid", "validation", "test", "eval", "tokenizer"})
"""Directory names under ``data_path`` that are never shards, even with an ``index.json`` (validation sets)."""


def check_shard_names(entries: list[tuple[str, bool]], table: dict[str, str]) -> dict[str, tuple[str, str]]:
    """``{directory name: (shard ID, type)}`` for the shard directories among ``(name, has index.json)`` entries.

    Two directories with the same ID (``1`` and ``01``) are an error, and so is a directory that holds an
    ``index.json`` but whose name is not a shard name (``code1``): it would otherwise be dropped silently.
    """
    named: dict[str, tuple[str, str]] = {}
    owner: dict[str, str] = {}
    for name, has_index in entries:
        found = classify(name, table)
        if found is None:
            if has_index and name not in NOT_SHARDS:
                prefixes = ", ".join(f"{p}<n> ({t})" for t, p in table.items())
                raise MidtrainError(
                    f"Directory {name!r} under data_path holds an index.json but is not a shard name: use 1, 2, ... "
                    f"(main) or {prefixes}; rename it or add its type (data.shard_types: {{mytype: {_letters(name)}}})."
                )
            continue
        if found[0] in owner:
            raise MidtrainError(
                f"Directories {owner[found[0]]!r} and {name!r} under data_path are both shard {found[0]}; "
                "keep one of them (shard IDs must be unique)."
            )
        owner[found[0]] = name
        named[name] = found
    return named


def _letters(name: str) -> str:
    return re.sub(r"[^A-Za-z_]", "", name) or "x"


def _sort_key(shard: Shard) -> tuple:
    num = re.sub(r"\D", "", shard.id)
    return (shard.type != MAIN_TYPE, shard.type, int(num) if num else -1, shard.id)
