"""Shard discovery: find litdata token shards under a ``data_path`` and give each a typed ID.

A shard is a directory directly under ``data_path`` that holds a litdata ``index.json``.
``data_path`` may be local or an ``s3://`` / ``gs://`` prefix (see :mod:`midtrain.data.remote`):
remote shards are listed and their ``index.json`` read here; litdata streams and caches the chunks.

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
from functools import cached_property
from pathlib import Path
from typing import Any

from midtrain.data.remote import RemoteStore, is_remote, join_url
from midtrain.errors import MidtrainError

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
    """One litdata token shard on disk."""

    id: str
    type: str
    path: Path
    tokens: int
    num_chunks: int
    dtype_code: int | None
    min_chunk_tokens: int

    def samples(self, block_size: int) -> int:
        """Number of ``block_size`` token windows litdata's ``TokensLoader`` serves from this shard."""
        return sum(dim // block_size for dim in self.chunk_dims)

    @cached_property
    def chunk_dims(self) -> tuple[int, ...]:
        return tuple(int(c["dim"]) for c in read_index(self.path)["chunks"])

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


@dataclass(frozen=True)
class RemoteShard(Shard):
    """A shard in object storage: ``path`` is its URL; chunk sizes come from the index read at discovery."""

    path: str
    dims: tuple[int, ...] = ()

    @property
    def chunk_dims(self) -> tuple[int, ...]:
        return self.dims


def _missing_index(path: Path | str) -> MidtrainError:
    return MidtrainError(f"Shard directory {path} has no index.json; it is not a finished litdata shard.")


def read_index(path: Path) -> dict:
    """Read and validate a shard's ``index.json``; raise a clear error when missing or corrupt."""
    index = Path(path) / "index.json"
    if not index.is_file():
        raise _missing_index(path)
    return parse_index(index.read_bytes(), path)


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
    shard_id: str, shard_type: str, path: Path | str, storage_options: dict[str, Any] | None = None
) -> Shard:
    """The shard at ``path``: a local directory, or an ``s3://``/``gs://`` URL (see :func:`load_remote_shard`)."""
    if is_remote(path):
        return load_remote_shard(shard_id, shard_type, str(path), storage_options)
    data = read_index(path)
    dims = [int(c["dim"]) for c in data["chunks"]]
    return Shard(
        id=shard_id,
        type=shard_type,
        path=Path(path),
        tokens=sum(dims),
        num_chunks=len(dims),
        dtype_code=_dtype_code(data.get("config")),
        min_chunk_tokens=min(dims),
    )


def load_remote_shard(
    shard_id: str,
    shard_type: str,
    url: str,
    storage_options: dict[str, Any] | None = None,
    store: RemoteStore | None = None,
) -> RemoteShard:
    """The shard at ``url`` in object storage, sized from its ``index.json`` (read once)."""
    store = store or RemoteStore(url, storage_options)
    raw = store.read_bytes(join_url(url, "index.json"))
    if raw is None:
        raise _missing_index(url)
    data = parse_index(raw, url)
    dims = tuple(int(c["dim"]) for c in data["chunks"])
    return RemoteShard(
        id=shard_id,
        type=shard_type,
        path=url.rstrip("/"),
        tokens=sum(dims),
        num_chunks=len(dims),
        dtype_code=_dtype_code(data.get("config")),
        min_chunk_tokens=min(dims),
        dims=dims,
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
    """All shards directly under ``data_path``, sorted by type then number.

    Directories whose names are not shard names (e.g. ``val``, ``tokenizer``) are ignored unless they
    hold an ``index.json`` (see :func:`check_shard_names`); a directory with a shard name but a missing
    or corrupt ``index.json`` is an error, and so are two directories with one ID (``1`` and ``01``).
    An ``s3://``/``gs://`` ``data_path`` is listed with ``storage_options`` (see :func:`discover_remote_shards`).
    """
    if data_path is None:
        raise MidtrainError("data.data_path is not set; point it at the directory holding the shard folders.")
    if is_remote(data_path):
        return discover_remote_shards(str(data_path), shard_types, storage_options)
    root = Path(data_path).expanduser()
    if not root.is_dir():
        hint = ""
        if root.name == "demo":
            hint = f"; build the demo corpus first: `midtrain prepare demo --data_path {data_path}`"
        raise MidtrainError(f"data_path {root} does not exist or is not a directory{hint}.")
    table = shard_type_table(shard_types)
    children = [c for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith((".", "_"))]
    named = check_shard_names([(c.name, (c / "index.json").is_file()) for c in children], table)
    shards = [load_shard(shard_id, shard_type, root / name) for name, (shard_id, shard_type) in named.items()]
    if not shards:
        raise _no_shards(root, table)
    return sorted(shards, key=_sort_key)


def discover_remote_shards(
    url: str, shard_types: dict[str, str] | None = None, storage_options: dict[str, Any] | None = None
) -> list[Shard]:
    """All shards directly under the ``s3://``/``gs://`` prefix ``url``, named and checked as local ones.

    Lists the prefix's subdirectories and reads each shard's ``index.json`` (in parallel threads);
    ``storage_options`` go to the storage client as they go to litdata's.
    """
    table = shard_type_table(shard_types)
    store = RemoteStore(url, storage_options)
    names = [name for name in store.list_dirs(url) if not name.startswith((".", "_"))]
    found = [(classified, name) for name, classified in check_shard_names([(n, False) for n in names], table).items()]
    if not found:
        raise _no_shards(url, table)
    with ThreadPoolExecutor(min(16, len(found))) as pool:
        shards = list(pool.map(lambda item: load_remote_shard(*item[0], join_url(url, item[1]), store=store), found))
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
