"""Input formats of ``midtrain prepare``: JSONL (plain, ``.gz``, ``.zst``), Parquet, text files,
directories of text files and Hugging Face datasets saved with ``save_to_disk``.

Each input is classified once (:func:`expand_inputs`); :func:`iter_documents` yields the document
texts in order and counts what it skipped in a :class:`ReadStats`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from midtrain.errors import MidtrainError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
MAX_REPORTED_BAD = 5
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputSource:
    """One input as the user named it (after glob expansion): a file, a text directory or a HF dataset."""

    path: Path
    kind: str  # "jsonl" | "parquet" | "text" | "textdir" | "hf"
    files: tuple[Path, ...]


@dataclass
class ReadStats:
    """What the reader skipped (reported in the summary and the manifest)."""

    bad_records: int = 0
    empty_documents: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def bad(self, where: str, problem: str, skip_bad: bool) -> None:
        """Count a malformed record, or raise when ``skip_bad`` is off."""
        if not skip_bad:
            raise MidtrainError(
                f"{where}: {problem}. Fix or remove it, or pass skip_bad=True (--skip_bad true) to skip and "
                "count malformed records."
            )
        self.bad_records += 1
        if len(self.bad_examples) < MAX_REPORTED_BAD:
            self.bad_examples.append(f"{where}: {problem}")


def _base_suffix(path: Path) -> str:
    """Suffix with any compression suffix stripped: ``a.jsonl.zst`` -> ``.jsonl``."""
    name = path.name.lower()
    for comp in COMPRESSED_SUFFIXES:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return Path(name).suffix


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def _text_files(directory: Path) -> tuple[Path, ...]:
    files = [
        p
        for p in directory.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        and _base_suffix(p) in TEXT_SUFFIXES
    ]
    return tuple(sorted(files))


def _source(path: Path) -> InputSource:
    """Classify one existing path into an :class:`InputSource`."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise MidtrainError(
                f"{path} is a Hugging Face DatasetDict with splits {splits}; pass one split directory, "
                f"e.g. {path / (splits[0] if splits else 'train')}."
            )
        if _is_hf_dataset(path):
            files = tuple(sorted(p for p in path.iterdir() if p.is_file()))
            return InputSource(path, "hf", files)
        files = _text_files(path)
        if not files:
            raise MidtrainError(
                f"Input directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files (searched recursively) and is "
                "not a Hugging Face dataset saved with save_to_disk."
            )
        return InputSource(path, "textdir", files)
    suffix = _base_suffix(path)
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if suffix in suffixes:
            return InputSource(path, kind, (path,))
    supported = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)
    raise MidtrainError(
        f"Input {path} has an unsupported file type {suffix or '(no suffix)'!r}. Supported: {supported} "
        f"(JSONL and text optionally compressed with {'/'.join(COMPRESSED_SUFFIXES)}), directories of text files, "
        "or a Hugging Face dataset directory."
    )


def expand_inputs(inputs: list[str] | str) -> list[InputSource]:
    """Expand globs (``**`` allowed) and classify every input; fail on patterns that match nothing."""
    patterns = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not patterns:
        raise MidtrainError("No inputs given; pass --inputs with files, directories or glob patterns.")
    sources: list[InputSource] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if _GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise MidtrainError(f"Input pattern {pattern!r} matches no files.")
        else:
            if not os.path.exists(pattern):
                raise MidtrainError(f"Input {pattern} does not exist.")
            matches = [pattern]
        sources.extend(_source(Path(m).resolve()) for m in matches)
    seen: set[Path] = set()
    unique = []
    for src in sources:
        if src.path not in seen:
            seen.add(src.path)
            unique.append(src)
    return unique


def _open_binary(path: Path) -> IO[bytes]:
    """Open a possibly gzip- or zstd-compressed file for binary reading."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed through the wrapping reader
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")  # noqa: SIM115


def _text_of(record: Any, text_key: str) -> tuple[str | None, str | None]:
    """``(text, None)`` or ``(None, problem)`` for one decoded record."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__} (inputs must be JSON Lines)"
    if text_key not in record:
        keys = ", ".join(sorted(map(str, record))[:10])
        return None, f"no key {text_key!r} (keys: {keys}); choose the text field with --text_key"
    text = record[text_key]
    if not isinstance(text, str):
        return None, f"{text_key!r} is {type(text).__name__}, not a string"
    return text, None


def _iter_jsonl(path: Path, text_key: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    with _open_binary(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                stats.bad(f"{path}:{lineno}", f"malformed JSON ({e})", skip_bad)
                continue
            text, problem = _text_of(record, text_key)
            if problem:
                stats.bad(f"{path}:{lineno}", problem, skip_bad)
                continue
            yield text


def _iter_parquet(path: Path, text_key: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise MidtrainError(f"Reading {path} needs pyarrow; install it with `pip install midtrain[parquet]`.") from e
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_key not in names:
        raise MidtrainError(f"Parquet file {path} has no column {text_key!r} (columns: {names}); pass --text_key.")
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str):
                yield text
            else:
                stats.bad(f"{path} row {row}", f"{text_key!r} is {type(text).__name__}, not a string", skip_bad)


def _iter_text_file(path: Path, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    with _open_binary(path) as fh:
        data = fh.read()
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.bad(str(path), f"not UTF-8 text ({e})", skip_bad)


def _iter_hf(path: Path, text_key: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise MidtrainError(
            f"{path} is a Hugging Face dataset; reading it needs the `datasets` package (`pip install midtrain[hf]`)."
        ) from e
    ds = datasets.load_from_disk(str(path))
    if text_key not in ds.column_names:
        raise MidtrainError(f"Dataset {path} has no column {text_key!r} (columns: {ds.column_names}); pass --text_key.")
    row = 0
    for batch in ds.select_columns([text_key]).iter(batch_size=4096):
        for value in batch[text_key]:
            row += 1
            if isinstance(value, str):
                yield value
            else:
                stats.bad(f"{path} row {row}", f"{text_key!r} is {type(value).__name__}, not a string", skip_bad)


def iter_documents(
    sources: Iterable[InputSource], text_key: str = "text", skip_bad: bool = False, stats: ReadStats | None = None
) -> Iterator[str]:
    """Every non-empty document text of ``sources``, in order."""
    stats = stats if stats is not None else ReadStats()
    for src in sources:
        for path in src.files if src.kind != "hf" else (src.path,):
            if src.kind == "jsonl":
                texts = _iter_jsonl(path, text_key, skip_bad, stats)
            elif src.kind == "parquet":
                texts = _iter_parquet(path, text_key, skip_bad, stats)
            elif src.kind == "hf":
                texts = _iter_hf(path, text_key, skip_bad, stats)
            else:
                texts = _iter_text_file(path, skip_bad, stats)
            for text in texts:
                if text:
                    yield text
                else:
                    stats.empty_documents += 1
