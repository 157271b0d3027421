"""Atomic training checkpoints for a Lightning Fabric run.

On-disk layout of one checkpoint (``out_dir/step-00001000/``)::

    lit_model.pth          fabric.save(state): {"model": ..., "optimizer": ..., <other keys of state>}
    train_state.json       step counters, tokens per source, mixture, loader state (caller's dict)
    hyperparameters.yaml   the run config (caller's dict)
    model_config.yaml      litgpt model config (if given)
    config.json            its HF config (midtrain.train.hf_config), so litgpt's HF conversion loads in transformers
    tokenizer.json, ...    the tokenizer files of tokenizer_dir (if given; never its config.json, which
                           describes whatever model that directory came from)
    COMPLETE               marker, written last: {"step": 1000}

litgpt tools read ``lit_model.pth`` as well (they unwrap the ``"model"`` key), so a checkpoint is a
usable litgpt checkpoint directory. ``save_final`` writes ``out_dir/final/`` with a plain model state
dict only.

Atomicity: everything, the marker included, is written into ``out_dir/.tmp-step-XXXXXXXX/``, synced
to disk, and then renamed to ``step-XXXXXXXX`` (a single ``os.replace``). A kill at any point
leaves either no ``step-*`` directory for that step or a complete one; ``find_latest`` additionally
requires the marker. Re-saving an existing step moves the old one to ``.old-step-XXXXXXXX`` for the
instant between two renames; ``find_latest`` falls back to it if a crash hits exactly there.
Pruning renames a checkpoint to ``.del-step-XXXXXXXX`` before deleting it; :func:`clean_leftovers`
(at every start and save) removes what interrupted saves and deletes left.
``out_dir`` must be on a filesystem shared by all ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from midtrain.errors import MidtrainError
from midtrain.rundir import (
    DEL_PREFIX,
    FINAL_DIR,
    HPARAMS_FILE,
    MARKER_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    OLD_PREFIX,
    STEP_DIR,
    TMP_PREFIX,
    TOKENIZER_FILES,
    TRAIN_STATE_FILE,
    checkpoint_name,
    dump_json,
    dump_yaml,
    incomplete_message,
    is_complete,
    read_train_state,
)
from midtrain.rundir import read_yaml as read_yaml_file
from midtrain.train.hf_config import hf_config_files

if TYPE_CHECKING:
    from lightning.fabric import Fabric

log = logging.getLogger(__name__)


def save_checkpoint(
    fabric: Fabric,
    out_dir: Path | str,
    step: int,
    state: dict[str, Any],
    train_state: dict[str, Any],
    config: dict[str, Any],
    model_config: dict[str, Any] | None = None,
    tokenizer_dir: Path | str | None = None,
) -> Path:
    """Atomically write checkpoint ``out_dir/step-XXXXXXXX`` and return its path.

    Call on all ranks: ``state`` (modules, optimizers, plain values) goes through ``fabric.save``,
    which is collective under FSDP; rank 0 writes the other files and publishes the directory.
    ``train_state`` must be JSON-serialisable (dict keys become strings, key order is kept);
    ``config`` and ``model_config`` YAML-serialisable. Paths, tuples and dataclasses are converted.
    Re-saving an existing step replaces it.
    """
    texts = {
        TRAIN_STATE_FILE: dump_json(train_state, "train_state"),
        HPARAMS_FILE: dump_yaml(config, "config"),
        MARKER_FILE: json.dumps({"step": step}) + "\n",
    }
    if model_config is not None:
        texts[MODEL_CONFIG_FILE] = dump_yaml(model_config, "model_config")
        texts.update(hf_config_files(model_config))  # config.json, so the HF conversion loads in transformers
    return _write_atomically(fabric, Path(out_dir), checkpoint_name(step), state, texts, tokenizer_dir)


def load_checkpoint(fabric: Fabric, path: Path | str, state: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """Restore ``state`` (model, optimizer, ...) in place from checkpoint ``path``; return its train_state.

    Call on all ranks. ``strict``: every key of ``state`` must be in the checkpoint and the model's
    parameter names must match exactly; a mismatch is a MidtrainError naming the checkpoint.
    """
    path = Path(path)
    if not is_complete(path):
        raise MidtrainError(incomplete_message(path))
    if (path / MODEL_FILE).is_file():
        read_weights_only(path / MODEL_FILE)  # FSDP's full-checkpoint reader is not restricted; refuse pickled code
    try:
        from midtrain.train.loading import load_fsdp_resume

        if not load_fsdp_resume(fabric, path / MODEL_FILE, state, strict=strict):
            fabric.load(path / MODEL_FILE, state, strict=strict, weights_only=True)
    except (KeyError, RuntimeError, pickle.UnpicklingError) as err:
        written_for = path / MODEL_CONFIG_FILE
        hint = f"\nIt was written for the model in {written_for}." if written_for.is_file() else ""
        raise MidtrainError(
            f"Checkpoint {path} does not fit the current model/optimizer (strict={strict}): {err}{hint}"
        ) from err
    return read_train_state(path)


def read_weights_only(file: Path | str) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file, memory-mapped (cheap: tensors are read when used) and restricted to
    tensors and plain data (``weights_only=True``); anything else is a MidtrainError."""
    import torch

    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MidtrainError(f"Cannot read {file} as tensors and plain data (weights_only=True): {first}") from err


def read_yaml(path: Path | str, name: str = HPARAMS_FILE) -> dict[str, Any] | None:
    """A YAML file of checkpoint ``path`` (``hyperparameters.yaml`` by default); None if absent."""
    return read_yaml_file(Path(path) / name)


def save_final(
    fabric: Fabric,
    out_dir: Path | str,
    model: Any,
    config: dict[str, Any],
    model_config: dict[str, Any] | None = None,
    tokenizer_dir: Path | str | None = None,
) -> Path:
    """Atomically write ``out_dir/final/`` for downstream litgpt use and return its path.

    ``lit_model.pth`` there is a plain model state dict (no optimizer); with ``model_config.yaml`` and
    the tokenizer files it works with ``litgpt generate`` / ``convert_from_litgpt``. Call on all ranks
    (FSDP needs ``state_dict_type="full"``).
    """
    texts = {HPARAMS_FILE: dump_yaml(config, "config"), MARKER_FILE: json.dumps({"final": True}) + "\n"}
    if model_config is not None:
        texts[MODEL_CONFIG_FILE] = dump_yaml(model_config, "model_config")
        texts.update(hf_config_files(model_config))  # config.json, so the HF conversion loads in transformers
    return _write_atomically(fabric, Path(out_dir), FINAL_DIR, {"model": model}, texts, tokenizer_dir, unwrap=True)


def prune_checkpoints(out_dir: Path | str, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (None: keep all); return the deleted.

    Call on rank 0 only. Incomplete directories are left alone.
    """
    if keep_last is None:
        return []
    if keep_last < 1:
        raise MidtrainError(f"keep_last must be >= 1 or None (keep all), got {keep_last}.")
    out_dir = Path(out_dir)
    steps = sorted(
        (int(m.group(1)), child)
        for child in out_dir.iterdir()
        if (m := STEP_DIR.fullmatch(child.name)) and is_complete(child)
    )
    doomed = [path for _, path in steps[:-keep_last]]
    for path in doomed:
        _delete(path)
    return doomed


def _delete(path: Path) -> None:
    """Rename ``path`` out of the way (``.del-step-*``, one atomic step), then delete it.

    A reader that opens ``step-*`` afterwards finds it gone rather than half deleted (one that has its files open
    keeps reading them); a kill mid-delete leaves a ``.del-*`` that :func:`clean_leftovers` removes at the next start.
    """
    doomed = path.with_name(f"{DEL_PREFIX}{path.name}")
    os.replace(path, doomed)
    _fsync(path.parent)
    shutil.rmtree(doomed)


def clean_leftovers(out_dir: Path | str) -> list[Path]:
    """Delete what interrupted saves (``.tmp-*``) and deletes (``.del-*``) left in ``out_dir``, and moved-aside old
    checkpoints (``.old-*``) whose replacement is complete; return what was removed. Rank 0 only."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    for child in sorted(out_dir.iterdir()):
        replaced = child.name.startswith(OLD_PREFIX) and is_complete(out_dir / child.name.removeprefix(OLD_PREFIX))
        if child.name.startswith((TMP_PREFIX, DEL_PREFIX)) or replaced:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def _write_atomically(
    fabric: Fabric,
    out_dir: Path,
    name: str,
    state: dict[str, Any],
    texts: dict[str, str],
    tokenizer_dir: Path | str | None,
    unwrap: bool = False,
) -> Path:
    """Write ``state`` and ``texts`` (marker last) into a temp dir, then rename it to ``out_dir/name``."""
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise MidtrainError(f"tokenizer_dir {tokenizer_dir} is not a directory; cannot copy tokenizer files.")
    final, tmp, old = out_dir / name, out_dir / f"{TMP_PREFIX}{name}", out_dir / f"{OLD_PREFIX}{name}"
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out_dir)
        tmp.mkdir()
    fabric.barrier()
    fabric.save(tmp / MODEL_FILE, state)  # collective; ends with a barrier
    if unwrap and (tmp / MODEL_FILE).is_dir():
        raise MidtrainError("save_final needs a single-file model state; use FSDP with state_dict_type='full'.")
    if fabric.global_rank == 0:
        if unwrap:
            _unwrap_model_file(tmp / MODEL_FILE)
        if tokenizer_dir is not None:
            for file_name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / file_name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / file_name, tmp / file_name)
        for file_name, text in texts.items():
            if file_name != MARKER_FILE:
                (tmp / file_name).write_text(text, encoding="utf-8")
        _fsync_tree(tmp)
        (tmp / MARKER_FILE).write_text(texts[MARKER_FILE], encoding="utf-8")
        _fsync(tmp / MARKER_FILE)
        _fsync(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    fabric.barrier()
    return final


def _unwrap_model_file(file: Path) -> None:
    """Rewrite ``{"model": state_dict}`` as the plain state dict."""
    import torch

    state_dict = torch.load(file, mmap=True, weights_only=True)["model"]
    torch.save(state_dict, file.with_suffix(".plain"))
    del state_dict
    os.replace(file.with_suffix(".plain"), file)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for file_name in filenames:
            _fsync(Path(dirpath, file_name))
        _fsync(Path(dirpath))


def _fsync(path: Path) -> None:
    """Flush a file or directory entry to disk (some network/FUSE filesystems refuse it for directories)."""
    with contextlib.suppress(OSError) if path.is_dir() else contextlib.nullcontext():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
