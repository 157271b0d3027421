"""``midtrain prepare --hf_dataset NAME``: a Hugging Face hub dataset, streamed, into token shards.

The dataset is read with ``datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)``, so
nothing is downloaded up front and a local dataset directory or data file works the same way as a
hub name. The stream is cut into shards of ``documents_per_shard`` records (``1``, ``2``, ... for
``main``; ``c1``, ``c2``, ... for code). Each shard's ``prepare.json`` records the stream it came
from, the record range ``[start, end)`` it holds and the stream's position after it
(``IterableDataset.state_dict()``), and a shard appears only when complete. A re-run with the same
dataset, config, split and text field therefore continues after the last complete shard: an
interrupted shard is written again from its start, nothing is read twice into the shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from midtrain.data.shards import shard_type_table
from midtrain.errors import MidtrainError
from midtrain.prepare.encoding import default_num_workers, load_tokenizer_spec
from midtrain.prepare.inputs import ReadStats
from midtrain.prepare.manifests import (
    MANIFEST_NAME,
    VAL_DIR,
    check_tokenizer,
    choose_shard_name,
    leftover_temp_dirs,
    read_manifests,
)
from midtrain.prepare.writing import ShardStats, summary, tokenize_to_shard

HUB_KEY = "hub"  # the key of a hub shard's stream record in its prepare.json
SOURCE_FIELDS = ("dataset", "config", "data_dir", "split", "text_key")


def open_stream(dataset: str, config: str | None, split: str, data_dir: str | None = None) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise MidtrainError(
            "--hf_dataset needs the `datasets` package; install it with `pip install 'midtrain[hf]'`."
        ) from e
    try:
        return datasets.load_dataset(dataset, config, data_dir=data_dir, split=split, streaming=True)
    except (FileNotFoundError, ValueError) as e:
        raise MidtrainError(
            f"Cannot open Hugging Face dataset {dataset!r} (config {config!r}, data_dir {data_dir!r}, "
            f"split {split!r}): {e}. Check the name, --hf_config, --hf_data_dir and --split (and network access / "
            "`hf auth login` for gated datasets)."
        ) from e


def hub_shards(manifests: dict[Path, dict], source: dict) -> list[tuple[Path, dict]]:
    """The training shards already cut from ``source``, in stream order; fail on gaps or a type change."""
    found = [
        (path, m)
        for path, m in manifests.items()
        if m.get("split") == "train" and {k: (m.get(HUB_KEY) or {}).get(k) for k in SOURCE_FIELDS} == source
    ]
    found.sort(key=lambda item: item[1][HUB_KEY]["start"])
    position = 0
    for path, m in found:
        if m[HUB_KEY]["start"] != position:
            raise MidtrainError(
                f"Shard {path} holds records {m[HUB_KEY]['start']}.. of {source['dataset']}, but the shards before it "
                f"end at record {position}: a shard of this stream is missing. Delete the shards of this stream "
                f"(see their {MANIFEST_NAME}) and prepare it again."
            )
        position = m[HUB_KEY]["end"]
    return found


def _check_same_type(found: list[tuple[Path, dict]], type: str, val_fraction: float | None) -> None:
    for path, m in found:
        if m.get("type") != type or m.get("val_fraction") != val_fraction:
            raise MidtrainError(
                f"Shard {path} already holds the start of this stream as type {m.get('type')!r} (val_fraction "
                f"{m.get('val_fraction')}); continuing it as {type!r} (val_fraction {val_fraction}) would mix them. "
                "Use the same --type/--val_fraction, or a different --data_path."
            )


def _piece(
    records: Iterator[dict], stream: Any, source: dict, manifest: dict, limit: int, stats: ReadStats, skip_bad: bool
) -> Iterator[str]:
    """Up to ``limit`` records' texts; on exhaustion, the stream's end position goes into ``manifest``."""
    hub = manifest[HUB_KEY]
    key = source["text_key"]
    taken = 0
    while taken < limit:
        try:
            record = next(records)
        except StopIteration:
            hub["exhausted"] = True
            break
        taken += 1
        where = f"{source['dataset']} record {hub['start'] + taken - 1}"
        if key not in record:
            stats.bad(where, f"no field {key!r} (fields: {sorted(record)[:10]}); choose it with --text_key", skip_bad)
            continue
        text = record[key]
        if not isinstance(text, str):
            stats.bad(where, f"{key!r} is {type(text).__name__}, not a string", skip_bad)
        elif text:
            yield text
        else:
            stats.empty_documents += 1
    hub["end"] = hub["start"] + taken
    hub["state"] = stream.state_dict()


def prepare_hub(
    hf_dataset: str,
    type: str,
    data_path: Path,
    tokenizer_dir: Path,
    hf_config: str | None = None,
    hf_data_dir: str | None = None,
    split: str = "train",
    text_key: str = "text",
    documents_per_shard: int = 1_000_000,
    max_documents: int | None = None,
    val_tokens: int | None = None,
    val_fraction: float | None = None,
    num_workers: int | None = None,
    chunk_tokens: int = 1 << 21,
    skip_bad: bool = False,
    shard_types: dict[str, str] | None = None,
) -> list[Path]:
    """Stream a Hugging Face dataset by name into token shards; a re-run continues where the last one stopped.

    Args:
        hf_dataset: Dataset name on the hub (``allenai/c4``) or a local dataset directory / data file.
        type: Shard type (``main``, ``code``, ``math``, ``instruct``, ``qa``, ``web``, ...).
        data_path: Directory holding the shard folders (created when missing).
        tokenizer_dir: litgpt tokenizer/checkpoint directory the model is trained with.
        hf_config: The dataset's configuration name (``en`` for C4).
        hf_data_dir: A folder of the dataset's repository to read (``python`` of ``bigcode/starcoderdata``).
        split: Split to stream (``train``, ``validation``; slices such as ``train[:1000]`` are not streamable).
        text_key: Field holding the document text (alias on the command line: ``--text_field``).
        documents_per_shard: Records per shard: the unit that a re-run after an interruption redoes.
        max_documents: Stop after this many records of the stream in total (over all runs); default: all.
        val_tokens: Hold out the stream's first documents, at least this many tokens, as a validation shard
            (``<data_path>/val/<first shard>``).
        val_fraction: Hold out this fraction of documents of every shard (by a hash of the text).
        num_workers: Tokeniser worker processes; default: the usable CPU cores.
        chunk_tokens: Tokens per litdata chunk file.
        skip_bad: Skip and count records without a string text field instead of failing.
        shard_types: Extra shard types, ``{type name: directory prefix}``.

    Returns:
        Every shard of this stream under ``data_path``, in stream order.
    """
    from midtrain.prepare import _check_args

    table = shard_type_table(shard_types)
    _check_args(type, table, val_tokens, val_fraction)
    if documents_per_shard <= 0:
        raise MidtrainError(f"documents_per_shard must be positive, got {documents_per_shard}.")
    if max_documents is not None and max_documents <= 0:
        raise MidtrainError(f"max_documents must be positive, got {max_documents}.")
    data_path = Path(data_path).expanduser().resolve()
    spec = load_tokenizer_spec(Path(tokenizer_dir))
    data_path.mkdir(parents=True, exist_ok=True)
    manifests = read_manifests(data_path)
    check_tokenizer(manifests, spec)
    source = {"dataset": hf_dataset, "config": hf_config, "data_dir": hf_data_dir, "split": split, "text_key": text_key}
    found = hub_shards(manifests, source)
    _check_same_type(found, type, val_fraction)
    shards = [path for path, _ in found]
    last = found[-1][1][HUB_KEY] if found else None
    position = last["end"] if last else 0
    if last and (last.get("exhausted") or (max_documents is not None and position >= max_documents)):
        print(f"midtrain prepare: {hf_dataset} is already prepared up to record {position} in {len(shards)} shard(s).")
        return shards
    for leftover in leftover_temp_dirs(data_path):
        print(f"midtrain prepare: warning: {leftover} is left over from an interrupted run; it is ignored and safe "
              "to delete.")
    stream = open_stream(hf_dataset, hf_config, split, hf_data_dir)
    if last:
        stream.load_state_dict(last["state"])
        print(f"midtrain prepare: continuing {hf_dataset} after record {position} ({len(shards)} shard(s) done).")
    records = iter(stream)
    workers = default_num_workers() if num_workers is None else num_workers
    while max_documents is None or position < max_documents:
        limit = documents_per_shard if max_documents is None else min(documents_per_shard, max_documents - position)
        name = choose_shard_name(data_path, type, table, None)
        first = position == 0
        want_val = (val_tokens is not None and first) or val_fraction is not None
        manifest = {"type": type, "text_key": text_key, "val_tokens": val_tokens if first else None,
                    "val_fraction": val_fraction, "shard": name, "inputs": [],
                    HUB_KEY: {**source, "start": position}}
        stats = ShardStats()
        texts = _piece(records, stream, source, manifest, limit, stats.read, skip_bad)
        first_text = next(texts, None)
        if first_text is None and manifest[HUB_KEY].get("exhausted") and manifest[HUB_KEY]["end"] == position:
            break  # the stream ended exactly at a shard boundary
        tokenize_to_shard(
            _chain(first_text, texts), data_path / name, spec, manifest,
            val_path=data_path / VAL_DIR / name if want_val else None,
            val_tokens=val_tokens if first else None, val_fraction=val_fraction, num_workers=workers,
            chunk_tokens=chunk_tokens, stats=stats, desc=f"prepare {type}/{name} from {hf_dataset}",
        )
        print(summary(data_path / name, type, stats))
        shards.append(data_path / name)
        position = manifest[HUB_KEY]["end"]
        if manifest[HUB_KEY].get("exhausted"):
            break
    print(f"midtrain prepare: {hf_dataset} prepared up to record {position} in {len(shards)} shard(s) under "
          f"{data_path}.")
    return shards


def _chain(first: str | None, rest: Iterator[str]) -> Iterator[str]:
    if first is not None:
        yield first
    yield from rest


def hub_args(args: list[str]) -> list[str] | None:
    """``midtrain prepare`` args meant for :func:`prepare_hub` (``--text_field`` read as ``--text_key``), else None.

    The hub is asked for by ``--hf_dataset`` on the command line or ``hf_dataset:`` in a ``--config`` file.
    """
    import yaml

    wanted = any(a == "--hf_dataset" or a.startswith("--hf_dataset=") for a in args)
    for flag, value in zip(args, args[1:]):
        if flag == "--config" and Path(value).is_file():
            data = yaml.safe_load(Path(value).read_text())
            wanted = wanted or (isinstance(data, dict) and "hf_dataset" in data)
    if not wanted:
        return None
    return ["--text_key" + a[len("--text_field"):] if a.split("=", 1)[0] == "--text_field" else a for a in args]
