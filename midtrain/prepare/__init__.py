"""Raw corpora -> typed litdata token shards (``midtrain prepare``).

``prepare`` reads documents from JSONL (plain, ``.gz``, ``.zst``), Parquet, plain-text files or
directories of ``.txt``/``.md`` files, or a Hugging Face ``datasets`` dataset saved with
``save_to_disk``; tokenises them with the same tokenizer the model is trained with (a litgpt
tokenizer directory) and writes one new shard with :class:`~midtrain.prepare.writer.TokenShardWriter`.

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

Modules, one per concern: :mod:`~midtrain.prepare.inputs` (input formats),
:mod:`~midtrain.prepare.encoding` (batch tokenisation), :mod:`~midtrain.prepare.manifests`
(``prepare.json``, resume, duplicate safety), :mod:`~midtrain.prepare.writing` (shards),
:mod:`~midtrain.prepare.hub` (``--hf_dataset NAME``: a hub dataset streamed into shards, resumable),
:mod:`~midtrain.prepare.sft_formats` (``prepare sft``: GSM8K/SciQ/LIMA/code sets -> litgpt JSON).
"""

from __future__ import annotations

from pathlib import Path

from midtrain.data.shards import MAIN_TYPE, shard_type_table
from midtrain.errors import MidtrainError
from midtrain.prepare.encoding import (
    TokenizerSpec,
    default_num_workers,
    load_tokenizer_spec,
    tokenizer_fingerprint,
)
from midtrain.prepare.inputs import InputSource, ReadStats, expand_inputs, iter_documents
from midtrain.prepare.manifests import (
    MANIFEST_NAME,
    VAL_DIR,
    check_tokenizer,
    find_prepared,
    input_records,
    leftover_temp_dirs,
    read_manifests,
    reserve_shard_name,
)
from midtrain.prepare.writing import ShardStats, read_shard_tokens, summary, tokenize_to_shard

__all__ = [
    "MANIFEST_NAME",
    "VAL_DIR",
    "InputSource",
    "ReadStats",
    "ShardStats",
    "TokenizerSpec",
    "expand_inputs",
    "iter_documents",
    "load_tokenizer_spec",
    "prepare",
    "read_shard_tokens",
    "tokenize_to_shard",
    "tokenizer_fingerprint",
]


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
    records = input_records(sources)
    settings = {"type": type, "text_key": text_key, "val_tokens": val_tokens, "val_fraction": val_fraction}
    existing = find_prepared(manifests, records, settings)
    if existing is not None:
        print(f"midtrain prepare: these inputs are already prepared in shard {existing} ({MANIFEST_NAME}); skipping.")
        return existing
    with reserve_shard_name(data_path, type, table, shard) as name:
        for leftover in leftover_temp_dirs(data_path):
            print(
                f"midtrain prepare: warning: {leftover} is left over from an interrupted run (or belongs to a "
                "prepare running now); it is ignored."
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
