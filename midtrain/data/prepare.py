"""Raw corpora -> typed litdata token shards (``midtrain prepare``).

``prepare`` reads documents from JSONL (plain, ``.gz``, ``.zst``), Parquet, plain-text files or
directories of ``.txt``/``.md`` files, or a Hugging Face ``datasets`` dataset saved with
``save_to_disk``; tokenises them with the same tokenizer the model is trained with (a litgpt
tokenizer directory) and writes one new shard with :class:`~midtrain.data.writer.TokenShardWriter`.

Layout under ``data_path``::

    <data_path>/c1/                 the new shard (index.json, chunk files, prepare.json)
    <data_path>/val/c1/             its held-out validation shard (val_tokens / val_fraction)

``val`` is not a shard name, so shard discovery never treats validation data as training data;
point a validation set at ``<data_path>/val/c1`` instead.

Token IDs are exactly those of litgpt's ``Tokenizer.encode(text, eos=True)`` (BOS when the
tokenizer's config asks for it), but documents are encoded in batches through the Rust
``tokenizers`` library in parallel worker processes.

Safety: a shard appears only when complete (the writer renames a hidden temp directory into
place); each shard's ``prepare.json`` records its inputs (size, sha256) and the tokenizer
fingerprint, so a re-run with the same inputs is skipped, overlapping inputs are refused, and a
tokenizer that differs from the one already used under ``data_path`` is an error.

Heavy libraries (torch, litdata, litgpt) are imported lazily, where used.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from midtrain import __version__
from midtrain.data.shards import MAIN_TYPE, classify, read_index, shard_type_table
from midtrain.errors import MidtrainError
from midtrain.tokenizer_fingerprint import MANIFEST_NAME, tokenizer_fingerprint

VAL_DIR = "val"
BATCH_DOCS = 128
BATCH_CHARS = 1 << 18
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".zst")
MAX_REPORTED_BAD = 5
_GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to reproduce litgpt's ``Tokenizer.encode(text, eos=True)`` (picklable)."""

    directory: str
    backend: str  # "huggingface" | "sentencepiece"
    model_file: str
    use_bos: bool
    bos_id: int | None
    eos_id: int
    vocab_size: int  # including added tokens: every ID is below it
    fingerprint: str


def load_tokenizer_spec(tokenizer_dir: Path) -> TokenizerSpec:
    """Resolve BOS/EOS handling with litgpt's own ``Tokenizer`` (so semantics match training)."""
    from litgpt.tokenizer import Tokenizer

    tokenizer_dir = Path(tokenizer_dir).expanduser()
    if not tokenizer_dir.is_dir():
        raise MidtrainError(f"tokenizer_dir {tokenizer_dir} is not a directory; point it at a litgpt checkpoint dir.")
    try:
        tok = Tokenizer(tokenizer_dir)
    except NotImplementedError as e:
        raise MidtrainError(
            f"tokenizer_dir {tokenizer_dir} holds neither tokenizer.json nor tokenizer.model; point it at a litgpt "
            "checkpoint (or tokenizer) directory."
        ) from e
    if tok.eos_id is None:
        raise MidtrainError(
            f'The tokenizer in {tokenizer_dir} defines no EOS token; add "eos_token" to its tokenizer_config.json '
            "(prepare appends EOS to every document)."
        )
    if tok.use_bos and tok.bos_id is None:
        raise MidtrainError(f"The tokenizer in {tokenizer_dir} asks for BOS (add_bos_token) but defines no bos_token.")
    if tok.backend == "huggingface":
        model_file, vocab = tokenizer_dir / "tokenizer.json", tok.processor.get_vocab_size(with_added_tokens=True)
    else:
        model_file, vocab = tokenizer_dir / "tokenizer.model", tok.processor.vocab_size()
    return TokenizerSpec(
        directory=str(tokenizer_dir.resolve()),
        backend=tok.backend,
        model_file=str(model_file.resolve()),
        use_bos=bool(tok.use_bos),
        bos_id=tok.bos_id,
        eos_id=int(tok.eos_id),
        vocab_size=int(max(vocab, tok.eos_id + 1, (tok.bos_id or 0) + 1)),
        fingerprint=tokenizer_fingerprint(tokenizer_dir),
    )


def finish_ids(ids: list[int], use_bos: bool, bos_id: int | None, eos_id: int) -> tuple[list[int], bool]:
    """Apply litgpt ``Tokenizer.encode(..., eos=True)``'s BOS/EOS rules to raw processor IDs.

    Returns the IDs and whether litgpt's rule *dropped* the EOS: when the text itself already
    encodes to a trailing EOS, litgpt removes it instead of keeping one. Mirrored on purpose (the
    IDs must equal litgpt's) and counted, so the summary can report it.
    """
    if use_bos:
        if not ids or ids[0] != bos_id:
            ids = [bos_id, *ids]
    elif ids and ids[0] == bos_id:
        ids = ids[1:]
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
        return ids, False
    return ids[:-1], True


@dataclass
class EncodedBatch:
    """A batch of documents as one flat token array plus per-document lengths."""

    tokens: np.ndarray
    lengths: np.ndarray
    val_mask: np.ndarray | None
    eos_dropped: int


class BatchEncoder:
    """Batch-encode texts with the raw tokenizer backend, then apply litgpt's BOS/EOS rules."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        if spec.backend == "huggingface":
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(spec.model_file)
            if tok.padding is not None and tok.padding.get("length") is None:
                tok.no_padding()  # batch-longest padding is a no-op for one text; keep batches identical
            encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: same IDs, no offsets
            self._encode = lambda texts: [e.ids for e in encode(texts)]
        elif spec.backend == "sentencepiece":
            from sentencepiece import SentencePieceProcessor

            sp = SentencePieceProcessor(model_file=spec.model_file)
            self._encode = lambda texts: sp.encode(list(texts))
        else:
            raise MidtrainError(f"Unsupported tokenizer backend {spec.backend!r}.")
        self._dtype = np.uint16 if spec.vocab_size <= 65535 else np.int32

    def encode(self, texts: list[str], val_fraction: float | None = None) -> EncodedBatch:
        """Encode ``texts``; with ``val_fraction`` also mark the documents held out for validation."""
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        dropped = 0
        s = self.spec
        for i, ids in enumerate(self._encode(texts)):
            ids, lost = finish_ids(ids, s.use_bos, s.bos_id, s.eos_id)
            dropped += lost
            flat.extend(ids)
            lengths[i] = len(ids)
        mask = None if val_fraction is None else np.array([in_validation(t, val_fraction) for t in texts], bool)
        return EncodedBatch(np.array(flat, dtype=self._dtype), lengths, mask, dropped)


def in_validation(text: str, fraction: float) -> bool:
    """Stable per-document split: a hash of the text, so duplicates land on the same side."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h < fraction * 2.0**64


_WORKER_ENCODER: BatchEncoder | None = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    _WORKER_ENCODER = BatchEncoder(spec)


def _encode_in_worker(texts: list[str], val_fraction: float | None) -> EncodedBatch:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode(texts, val_fraction)


def batched(texts: Iterable[str], max_docs: int = BATCH_DOCS, max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    """Group texts into batches of at most ``max_docs`` documents or about ``max_chars`` characters."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_batches(
    batches: Iterable[list[str]], spec: TokenizerSpec, num_workers: int, val_fraction: float | None = None
) -> Iterator[EncodedBatch]:
    """Encode batches in input order: in this process (``num_workers`` 0) or in worker processes.

    At most ``2 * num_workers`` batches are in flight, so memory stays bounded on huge inputs.
    """
    if num_workers <= 0:
        encoder = BatchEncoder(spec)
        for batch in batches:
            yield encoder.encode(batch, val_fraction)
        return
    with _env(TOKENIZERS_PARALLELISM="false"), _pool(num_workers, spec) as pool:
        pending: deque[Future] = deque()
        try:
            for batch in batches:
                pending.append(pool.submit(_encode_in_worker, batch, val_fraction))
                if len(pending) >= 2 * num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _pool(num_workers: int, spec: TokenizerSpec) -> ProcessPoolExecutor:
    """Worker pool: forked on Linux, spawned elsewhere.

    Forked workers start instantly; spawned ones re-import the caller's main module (for the CLI that
    means litgpt and Lightning: seconds per worker).
    """
    method = "fork" if sys.platform == "linux" and "fork" in get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(num_workers, mp_context=get_context(method), initializer=_init_worker, initargs=(spec,))


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables (inherited by forked workers) for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------------
# data_path bookkeeping: manifests, names, duplicates
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path, digest: Any = None) -> Any:
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
            _sha256_file(f, digest)
        sha = digest.hexdigest()
    else:
        sha = _sha256_file(src.path).hexdigest()
    size = sum(f.stat().st_size for f in src.files)
    return {"path": str(src.path), "kind": src.kind, "bytes": size, "sha256": sha}


def _input_records(sources: list[InputSource]) -> list[dict]:
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
        recorded = (manifest.get("tokenizer") or {}).get("fingerprint")
        if recorded and recorded != spec.fingerprint:
            raise MidtrainError(
                f"Tokenizer mismatch: shard {path} was prepared with tokenizer fingerprint {recorded} "
                f"({manifest['tokenizer'].get('directory')}), but {spec.directory} has fingerprint "
                f"{spec.fingerprint}. All shards under one data_path must share the tokenizer the model is trained "
                "with; use that tokenizer_dir or a different data_path."
            )


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


def _used_names(data_path: Path) -> set[str]:
    names = set()
    for root in (data_path, data_path / VAL_DIR):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if not p.name.startswith("."))
    return names


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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class ShardStats:
    """Counts of one prepare run."""

    documents: int = 0
    tokens: int = 0
    val_documents: int = 0
    val_tokens: int = 0
    eos_dropped: int = 0
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

    from midtrain.data.writer import DEFAULT_CHUNK_TOKENS, TokenShardWriter

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
        _write_json(val.tmp / MANIFEST_NAME, val_manifest)
        val.close()
    _write_json(train.tmp / MANIFEST_NAME, train_manifest)
    train.close()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def default_num_workers() -> int:
    """Usable CPU cores of this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_args(type: str, table: dict[str, str], val_tokens: int | None, val_fraction: float | None) -> None:
    if type != MAIN_TYPE and type not in table:
        raise MidtrainError(
            f"Unknown shard type {type!r}. Valid types: {[MAIN_TYPE, *table]}; add new ones with "
            "shard_types={name: prefix}."
        )
    if val_tokens is not None and val_fraction is not None:
        raise MidtrainError("Pass at most one of val_tokens and val_fraction, not both.")
    if val_tokens is not None and val_tokens <= 0:
        raise MidtrainError(f"val_tokens must be a positive number of tokens, got {val_tokens}.")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise MidtrainError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")


def prepare(
    inputs: list[str] | str,
    type: str,
    data_path: Path,
    tokenizer_dir: Path,
    shard: str | None = None,
    text_key: str = "text",
    val_tokens: int | None = None,
    val_fraction: float | None = None,
    num_workers: int | None = None,
    chunk_tokens: int = 1 << 21,
    skip_bad: bool = False,
    shard_types: dict[str, str] | None = None,
) -> Path:
    """Tokenise raw corpora into a new typed litdata token shard under ``data_path``.

    The shard goes to the next free directory for ``type`` (``c1``, ``c2``, ... for code; ``1``,
    ``2``, ... for main) with a ``prepare.json`` manifest. A held-out validation shard, when
    asked for, goes to ``<data_path>/val/<shard>``, which shard discovery does not read as
    training data. Re-running with inputs already prepared under ``data_path`` skips them and
    returns the existing shard.

    Args:
        inputs: Files, directories or glob patterns (``**`` allowed): JSONL (``.jsonl``, ``.ndjson``,
            ``.json``; plain, ``.gz`` or ``.zst``), Parquet, ``.txt``/``.md`` files (one document each),
            directories of those, or a Hugging Face dataset saved with ``save_to_disk``.
        type: Shard type: ``main`` or a type of the shard-type table (``code``, ``math``, ``instruct``,
            ``qa``, ``books``, ``news``, ``papers``, ``web`` or one added with ``shard_types``).
        data_path: Directory holding the shard folders (created when missing).
        tokenizer_dir: litgpt tokenizer/checkpoint directory (``tokenizer.json`` or ``tokenizer.model``
            plus config files): the tokenizer the model is trained with.
        shard: Shard directory name to write (e.g. ``c3``); default: the next free one for ``type``.
        text_key: Field holding the document text in JSONL, Parquet and Hugging Face inputs.
        val_tokens: Hold out the first documents of the input, at least this many tokens, as a
            validation shard.
        val_fraction: Hold out this fraction of documents (chosen by a hash of each text, so stable
            and spread over the input) as a validation shard.
        num_workers: Tokeniser worker processes; default: the number of usable CPU cores; 0 encodes in
            this process.
        chunk_tokens: Tokens per litdata chunk file.
        skip_bad: Skip malformed records (bad JSON lines, missing or non-string text) and count them,
            instead of failing at the first one.
        shard_types: Extra shard types, ``{type name: directory prefix}``, e.g. ``{"pubmed": "pm"}``.

    Returns:
        The shard directory (the existing one when these inputs were already prepared).
    """
    table = shard_type_table(shard_types)
    _check_args(type, table, val_tokens, val_fraction)
    data_path = Path(data_path).expanduser().resolve()
    sources = expand_inputs(inputs)
    spec = load_tokenizer_spec(Path(tokenizer_dir))
    data_path.mkdir(parents=True, exist_ok=True)
    manifests = read_manifests(data_path)
    check_tokenizer(manifests, spec)
    records = _input_records(sources)
    settings = {"type": type, "text_key": text_key, "val_tokens": val_tokens, "val_fraction": val_fraction}
    existing = find_prepared(manifests, records, settings)
    if existing is not None:
        print(f"midtrain prepare: these inputs are already prepared in shard {existing} ({MANIFEST_NAME}); skipping.")
        return existing
    name = choose_shard_name(data_path, type, table, shard)
    for leftover in leftover_temp_dirs(data_path):
        print(
            f"midtrain prepare: warning: {leftover} is left over from an interrupted run; it is ignored and "
            "safe to delete."
        )
    manifest = {**settings, "shard": name, "inputs": records}
    stats = ShardStats()
    want_val = val_tokens is not None or val_fraction is not None
    tokenize_to_shard(
        iter_documents(sources, text_key, skip_bad, stats.read),
        data_path / name,
        spec,
        manifest,
        val_path=data_path / VAL_DIR / name if want_val else None,
        val_tokens=val_tokens,
        val_fraction=val_fraction,
        num_workers=default_num_workers() if num_workers is None else num_workers,
        chunk_tokens=chunk_tokens,
        stats=stats,
        desc=f"prepare {type}/{name}",
    )
    print(summary(data_path / name, type, stats))
    return data_path / name


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
