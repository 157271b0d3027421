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
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from midtrain.errors import MidtrainError

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------ evaluate's CSV
EVAL_LOSS_COLUMNS = ("checkpoint", "step", "tokens_seen", "set", "loss", "ppl", "n_tokens")
EVAL_COLUMNS = (*EVAL_LOSS_COLUMNS, "metric", "value", "stderr")  # benchmark rows fill the last three


def read_eval_rows(path: Path | str) -> list[dict[str, str]]:
    """Rows of a ``midtrain evaluate`` CSV (empty when the file does not exist); older loss-only files too."""
    found = read_csv(path)
    if found is None:
        return []
    fields, rows = found
    if fields and tuple(fields) not in (EVAL_COLUMNS, EVAL_LOSS_COLUMNS):
        raise MidtrainError(f"{path} has columns {fields}, not an evaluate CSV {list(EVAL_COLUMNS)}.")
    return [{c: row.get(c) or "" for c in EVAL_COLUMNS} for row in rows]


def write_eval_rows(path: Path | str, rows: list[dict]) -> None:
    """Write all rows to a temp file next to ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=EVAL_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


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


# ------------------------------------------------------------------------ checkpoints of a run
REQUIRED_FILES = (MODEL_FILE, TRAIN_STATE_FILE)

STEP_DIR = re.compile(r"step-(\d+)")  # a checkpoint directory (litgpt's naming)
OLD_PREFIX = ".old-"
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"  # a checkpoint being deleted (pruning)


def checkpoint_name(step: int) -> str:
    """``step-00001000`` for step 1000 (litgpt's naming)."""
    return f"step-{step:08d}"


def is_complete(path: Path | str) -> bool:
    """True if ``path`` is a finished checkpoint: marker plus model and train-state files, not a temp dir."""
    path = Path(path)
    return not path.name.startswith(TMP_PREFIX) and not _missing(path)


def find_latest(out_dir: Path | str) -> Path | None:
    """The complete checkpoint with the highest step in ``out_dir``, or None.

    Interrupted saves (``.tmp-*``) and ``step-*`` directories without the marker are skipped with
    a warning.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    complete: dict[int, Path] = {}
    fallbacks: dict[int, Path] = {}
    for child in sorted(out_dir.iterdir()):
        if child.name.startswith(TMP_PREFIX):
            log.warning("Ignoring %s: an interrupted checkpoint save.", child)
            continue
        old = child.name.startswith(OLD_PREFIX)
        match = STEP_DIR.fullmatch(child.name.removeprefix(OLD_PREFIX))
        if match is None or not child.is_dir():
            continue
        if not is_complete(child):
            log.warning("Ignoring incomplete checkpoint %s (missing %s).", child, ", ".join(_missing(child)))
            continue
        (fallbacks if old else complete)[int(match.group(1))] = child
    for step, path in fallbacks.items():
        complete.setdefault(step, path)
    return complete[max(complete)] if complete else None


def own_checkpoint(out_dir: Path | str, resume: bool | Literal["auto"] | Path | str | None) -> Path | None:
    """``out_dir``'s newest complete checkpoint, which a run continues whatever ``resume`` names; None if none.

    ``resume: false`` next to such a checkpoint is refused: a fresh start would train over it.
    """
    own = find_latest(out_dir)
    if own is not None and (resume is None or resume is False):
        raise MidtrainError(
            f"{out_dir} already holds checkpoints (newest {own.name}) and resume is false; use resume: auto "
            "(the default) to continue that run, or another out_dir to start a new one."
        )
    return own


def resolve_resume(resume: bool | Literal["auto"] | Path | str | None, out_dir: Path | str) -> Path | None:
    """The checkpoint directory to resume from, or None to start fresh.

    * ``False`` / ``None``: None.
    * ``"auto"``: the newest complete checkpoint in ``out_dir``, or None if there is none.
    * ``True``: the newest complete checkpoint in ``out_dir``; an error if there is none.
    * a path: a complete checkpoint directory (or its ``lit_model.pth``), or a run directory,
      meaning its newest complete checkpoint. It may belong to another run.
    """
    out_dir = Path(out_dir)
    if resume is None or resume is False:
        return None
    if resume == "auto":
        return find_latest(out_dir)
    if resume is True:
        latest = find_latest(out_dir)
        if latest is None:
            raise MidtrainError(
                f"resume=true but {out_dir} holds no complete checkpoint; "
                "use resume: auto to start fresh when there is none."
            )
        return latest
    return _resolve_path(Path(resume).expanduser())


def read_train_state(path: Path | str) -> dict[str, Any]:
    """The ``train_state.json`` of checkpoint ``path``."""
    return json.loads((Path(path) / TRAIN_STATE_FILE).read_text(encoding="utf-8"))


def _resolve_path(path: Path) -> Path:
    if path.is_file():  # e.g. .../step-00001000/lit_model.pth
        path = path.parent
    if not path.exists():
        raise MidtrainError(f"resume path {path} does not exist{_listing(path.parent)}.")
    if is_complete(path):
        return path
    if STEP_DIR.fullmatch(path.name) or (path / MODEL_FILE).exists():
        raise MidtrainError(incomplete_message(path))
    latest = find_latest(path)  # a run directory
    if latest is None:
        raise MidtrainError(
            f"resume path {path} is neither a complete checkpoint nor a run directory holding one "
            f"(step-* directories with a {MARKER_FILE} marker). To start from weights only, use initial_checkpoint_dir."
        )
    return latest


def _missing(path: Path) -> list[str]:
    return [name for name in (MARKER_FILE, *REQUIRED_FILES) if not (path / name).is_file()]


def incomplete_message(path: Path) -> str:
    if path.name.startswith(TMP_PREFIX):
        return f"{path} is an interrupted checkpoint save, not a checkpoint{_listing(path.parent)}."
    missing = ", ".join(_missing(path))
    why = " (its save was interrupted)" if MARKER_FILE in missing else ""
    return (
        f"{path} is not a complete checkpoint{why}: missing {missing}{_listing(path.parent)}. "
        "To start from weights only, use initial_checkpoint_dir."
    )


def _listing(directory: Path) -> str:
    """``; complete checkpoints in D: a, b`` (or that there are none)."""
    if not directory.is_dir():
        return ""
    found = [
        child.name for child in sorted(directory.iterdir()) if STEP_DIR.fullmatch(child.name) and is_complete(child)
    ]
    return f"; complete checkpoints in {directory}: {', '.join(found) if found else 'none'}"


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
