"""What a run directory holds, and the one way to read and write it.

A run directory (``out_dir`` of ``pretrain`` / ``finetune``)::

    metrics.jsonl            one JSON row per log step / validation (read with :func:`read_metrics`)
    mixture_history.json     the mixture in force from each step on (pretrain)
    branch_point.json        the checkpoint a run started from, when not its own
    summary.json             written once the run finished
    step-XXXXXXXX/           checkpoints: lit_model.pth, train_state.json, hyperparameters.yaml,
                             model_config.yaml, the tokenizer files, COMPLETE (written last)
    final/                   the plain litgpt checkpoint of the finished run

Shards carry ``prepare.json`` (:data:`MANIFEST_NAME`) with the fingerprint of the tokenizer they
were prepared with; training compares it with :func:`tokenizer_fingerprint` of its ``tokenizer_dir``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from midtrain.errors import MidtrainError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
BRANCH_FILE = "branch_point.json"
MIXTURE_HISTORY_FILE = "mixture_history.json"
FINAL_DIR = "final"
MODEL_FILE = "lit_model.pth"
TRAIN_STATE_FILE = "train_state.json"
HPARAMS_FILE = "hyperparameters.yaml"
MODEL_CONFIG_FILE = "model_config.yaml"
MARKER_FILE = "COMPLETE"
MANIFEST_NAME = "prepare.json"
"""The manifest ``midtrain prepare`` writes into each shard directory."""
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")
"""A tokenizer directory holds at least one of these (litgpt's ``Tokenizer`` loads either)."""
TOKENIZER_FILES = (*TOKENIZER_MODEL_FILES, "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
"""Files that define how text becomes token IDs (copied into checkpoints, hashed into the fingerprint)."""


# ------------------------------------------------------------------------------------ plain data
def to_plain(value: Any, other: Callable[[Any], Any] = lambda v: v, finite: bool = False) -> Any:
    """``value`` as JSON/YAML data: dataclasses (their init fields) and mappings become dicts, sequences
    lists, paths strings; anything else goes through ``other``; ``finite``: NaN and infinities become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name), other, finite) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, other, finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, other, finite) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and finite and not math.isfinite(value):
        return None
    return value if isinstance(value, (str, int, float, bool, type(None))) else other(value)


# ------------------------------------------------------------------------------- atomic files
def write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to a temp file next to ``path`` and rename it over ``path`` (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def dump_json(value: Any, what: str, sort_keys: bool = False) -> str:
    """``value`` (made plain) as indented JSON text; an error naming ``what`` when it cannot be."""
    try:
        return json.dumps(to_plain(value), indent=2, sort_keys=sort_keys) + "\n"
    except (TypeError, ValueError) as err:
        raise MidtrainError(f"{what} must be JSON-serialisable: {err}") from err


def dump_yaml(value: Any, what: str) -> str:
    """``value`` (made plain) as YAML text; an error naming ``what`` when it cannot be."""
    try:
        return yaml.safe_dump(to_plain(value), sort_keys=False)
    except yaml.YAMLError as err:
        raise MidtrainError(f"{what} must be YAML-serialisable: {err}") from err


def write_json(path: Path | str, value: Any, sort_keys: bool = False) -> None:
    """``value`` as indented JSON at ``path``, atomically."""
    write_text(path, dump_json(value, str(path), sort_keys))


def read_json(path: Path | str, default: Any = None) -> Any:
    """The JSON at ``path``; ``default`` when it does not exist; a clear error when it is corrupt."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MidtrainError(f"Corrupt {path}: {err}; repair or delete it.") from err


def read_yaml(path: Path | str, default: Any = None) -> Any:
    """The YAML at ``path``; ``default`` when it does not exist; a clear error naming the line when invalid."""
    path = Path(path)
    if not path.is_file():
        return default
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


def parse_yaml(text: str, name: str) -> Any:
    """``text`` (from ``name``) as YAML data, or an error naming the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise MidtrainError(f"{name} is not valid YAML{line}: {getattr(e, 'problem', None) or e}") from None


def read_csv(path: Path | str) -> tuple[list[str], list[dict[str, str]]] | None:
    """Header and rows of the CSV at ``path`` (``evaluate`` results); None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


# --------------------------------------------------------------------------------- run files
def read_metrics(run_dir: Path | str) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` in file order (an unreadable line, e.g. cut by a kill, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"report: {path}:{number} is not JSON; skipped.")
    return rows


# --------------------------------------------------------------------------------- tokenizer
def has_tokenizer(directory: Path | str) -> bool:
    """True when ``directory`` holds a tokenizer litgpt can load (one of :data:`TOKENIZER_MODEL_FILES`)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_MODEL_FILES)


_FINGERPRINTS: dict[tuple, str] = {}


def tokenizer_fingerprint(tokenizer_dir: Path | str) -> str:
    """sha256 over the tokenizer model file and its config files (names and contents).

    Computed once per directory and file state (path, size, mtime), however often a run asks.
    """
    files = [(name, Path(tokenizer_dir) / name) for name in TOKENIZER_FILES]
    present = [(name, path) for name, path in files if path.is_file()]
    key = (str(Path(tokenizer_dir).resolve()), *((n, p.stat().st_size, p.stat().st_mtime_ns) for n, p in present))
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for name, path in present:
            digest.update(name.encode() + b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def check_recorded_tokenizer(
    recorded: Mapping | None, expected: str, tokenizer_dir: Path | str, what: str, fix: str
) -> None:
    """Refuse ``what`` (a shard, a checkpoint) whose recorded tokenizer (``{"fingerprint", "directory"}``)
    differs from ``expected``, the fingerprint of ``tokenizer_dir``; nothing recorded passes."""
    fingerprint = (recorded or {}).get("fingerprint")
    if fingerprint is not None and fingerprint != expected:
        raise MidtrainError(
            f"Tokenizer mismatch: {what} with tokenizer {(recorded or {}).get('directory')} (fingerprint "
            f"{fingerprint}), this run uses {tokenizer_dir} (fingerprint {expected}); {fix}"
        )


def check_shard_tokenizers(
    tokenizer_dir: Path | str, shard_dirs: Iterable[Path | str], read: Callable[[Any], dict | None] | None = None
) -> str | None:
    """Refuse shards whose ``prepare.json`` names another tokenizer than ``tokenizer_dir`` (``read``: a shard's
    manifest, e.g. for remote shards; default: the local file).

    Returns a note naming the shards that have no manifest (not prepared by ``midtrain prepare``,
    so their tokenizer cannot be checked), or None when every shard was checked.
    """
    expected = tokenizer_fingerprint(tokenizer_dir)
    unchecked: list[str] = []
    read = read or (lambda shard: read_json(Path(shard) / MANIFEST_NAME))
    for shard in dict.fromkeys(shard_dirs):
        recorded = (read(shard) or {}).get("tokenizer") or {}
        if recorded.get("fingerprint") is None:
            unchecked.append(str(shard))
        check_recorded_tokenizer(
            recorded, expected, tokenizer_dir, f"shard {shard} was prepared",
            "train with the tokenizer the shards were prepared with, or prepare them again.",
        )  # fmt: skip
    if not unchecked:
        return None
    shown = ", ".join(unchecked[:4]) + (f" and {len(unchecked) - 4} more" if len(unchecked) > 4 else "")
    return (
        f"note: {len(unchecked)} shard(s) have no {MANIFEST_NAME} with a tokenizer fingerprint, so their "
        f"tokenizer is not checked: {shown}."
    )
