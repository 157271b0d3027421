"""``midtrain evaluate``: validation loss of many checkpoints on many sets, into one CSV.

A checkpoint is one of ours (``step-XXXXXXXX/`` with a ``COMPLETE`` marker, step and tokens seen
from its ``train_state.json``) or a litgpt checkpoint directory (``lit_model.pth`` holding a plain
state dict, plus ``model_config.yaml``). A validation set is

* a token shard (a litdata directory with ``index.json``, local or an ``s3://``/``gs://`` URL): a fixed,
  evenly spaced sample of ``max_seq_length + 1`` token windows (:class:`~midtrain.data.sharded_mixed.ValWindows`), every
  next-token prediction scored;
* an SFT file (``.json`` list or ``.jsonl`` of records with ``instruction``, optional ``input``,
  ``output``): prompts rendered by litgpt's ``PromptStyle``, tokenised with the checkpoint's
  tokenizer, padded with ``ignore_index`` labels, so padding, and the prompt when
  ``mask_prompt``, never count.

The loss of a set is the token-weighted mean over every scored token, summed over all ranks.
Rows already in the CSV, keyed by (checkpoint, set), are skipped, so a sweep can be re-run as new
checkpoints appear; after each row the whole CSV is rewritten to a temp file and renamed, so rows
already scored survive an error or a kill later in the sweep.
A preemption signal (SLURM's ``--signal=USR1@...``) finishes the row being scored, writes the CSV
and exits with status 75, on which ``training_scripts/evaluate.sbatch`` requeues; the rerun skips
the rows already written.

Concurrent jobs never write one CSV: with ``--part NAME`` the rows go to ``<out stem>.part-NAME.csv``
next to ``out`` (skipping rows already in ``out`` or in that part), and ``--merge`` adds the rows of
every part to ``out`` once, under a lock, by the same rule, then deletes the parts
(``training_scripts/submit.sh evaluate`` runs an array task per checkpoint, then one merge job).
"""

from __future__ import annotations

import fcntl
import glob
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from litgpt.config import Config
from litgpt.data.base import SFTDataset, get_sft_collate_fn
from litgpt.model import GPT
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader
from tqdm import tqdm

from midtrain.data.sft import RankShare
from midtrain.data.sharded_mixed import ValWindows
from midtrain.data.shards import load_shard
from midtrain.errors import MidtrainError
from midtrain.eval.benchmarks import parse_tasks, run_benchmarks
from midtrain.preemption import EXIT_PREEMPTED
from midtrain.rundir import (
    MARKER_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    has_tokenizer,
    is_complete,
    read_eval_rows,
    read_train_state,
    write_eval_rows,
)
from midtrain.storage import is_remote, location
from midtrain.train.loss import micro_batch_loss
from midtrain.train.runtime import PreemptionFlag, build_fabric, load_initial_weights

_STEP_NAME = re.compile(r"step-(\d+)")
_SET_NAME = re.compile(r"[A-Za-z0-9_.\-/]+")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory and what its train state says about it (None for litgpt checkpoints)."""

    path: Path
    step: int | None = None
    tokens_seen: int | None = None
    max_seq_length: int | None = None


@dataclass(frozen=True)
class ValSet:
    """A named validation set: a token shard directory or an SFT JSON/JSONL file."""

    name: str
    path: Path | str
    kind: Literal["tokens", "sft"]


# ----------------------------------------------------------------------------------------- inputs
def find_checkpoints(patterns: list[str] | str) -> list[Checkpoint]:
    """Expand globs into checkpoints, sorted by path; incomplete ones are skipped with a printed note.

    A pattern may also name a run directory: its ``step-*`` checkpoints are taken.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found: dict[Path, Checkpoint] = {}
    for pattern in patterns:
        for match in sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]:
            for path in _expand_run_dir(Path(match)):
                checkpoint = _checkpoint(path)
                if checkpoint is not None:
                    found.setdefault(checkpoint.path, checkpoint)
    if not found:
        raise MidtrainError(
            f"No checkpoint matches {patterns}. Give globs of checkpoint directories (e.g. 'runs/x/step-*', each "
            f"with {MODEL_FILE}, {MODEL_CONFIG_FILE} and, for ours, a {MARKER_FILE} marker) or run directories."
        )
    return [found[p] for p in sorted(found)]


def _expand_run_dir(path: Path) -> list[Path]:
    if path.is_dir() and not (path / MODEL_FILE).exists():
        steps = sorted(p for p in path.iterdir() if _STEP_NAME.fullmatch(p.name) and p.is_dir())
        if steps:
            return steps
    return [path]


def _checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path``, or None (with a printed note) when it is not a usable one."""
    path = path.resolve()
    if not path.is_dir():
        print(f"evaluate: skipping {path}: not a directory.")
        return None
    if (path / TRAIN_STATE_FILE).exists():  # ours (a ``final/`` dir has none: a plain litgpt checkpoint)
        if not is_complete(path):
            print(f"evaluate: skipping incomplete checkpoint {path} (no {MARKER_FILE} marker or missing files).")
            return None
        state = read_train_state(path)
        return Checkpoint(path, int(state["step"]), state.get("tokens_seen"), state.get("max_seq_length"))
    missing = [name for name in (MODEL_FILE, MODEL_CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        print(f"evaluate: skipping {path}: missing {', '.join(missing)}.")
        return None
    match = _STEP_NAME.fullmatch(path.name)
    return Checkpoint(path, int(match.group(1)) if match else None)


def parse_val_sets(specs: list[str] | str | dict[str, str]) -> list[ValSet]:
    """``["c4=DIR", "pycode=FILE.json"]`` (or a mapping name -> path) into validated sets."""
    if isinstance(specs, str):
        specs = [specs]
    pairs = list(specs.items()) if isinstance(specs, dict) else [_split_spec(s) for s in specs]
    if not pairs:
        raise MidtrainError("No validation set given; use --val name=PATH (a token shard directory or SFT JSON file).")
    sets: list[ValSet] = []
    for name, raw in pairs:
        if not _SET_NAME.fullmatch(name):
            raise MidtrainError(f"Validation set name {name!r} must use letters, digits, '_', '-', '.', '/' only.")
        if any(s.name == name for s in sets):
            raise MidtrainError(f"Validation set {name!r} is given twice.")
        sets.append(ValSet(name, location(raw), _kind(name, location(raw))))
    return sets


def _split_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise MidtrainError(f"--val {spec!r} is not name=PATH (e.g. c4=data/val/c4 or sft=data/sft_val.json).")
    return name.strip(), path.strip()


def _kind(name: str, path: Path | str) -> Literal["tokens", "sft"]:
    if is_remote(path):
        return "tokens"  # its index.json is read (and checked) when the set is loaded
    if path.is_dir() and (path / "index.json").is_file():
        return "tokens"
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        return "sft"
    problem = "does not exist" if not path.exists() else "is not a usable validation set"
    raise MidtrainError(
        f"Validation set {name!r}: {path} {problem}. Give a token shard directory (with index.json) "
        "or an SFT file (.json list or .jsonl of instruction/input/output records)."
    )


def read_sft_records(path: Path) -> list[dict]:
    """Records of an SFT ``.json`` (a list) or ``.jsonl`` file; each needs ``instruction`` and ``output``."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise MidtrainError(f"SFT file {path} is not valid JSON: {err}") from err
    if not isinstance(records, list) or not records:
        raise MidtrainError(f"SFT file {path} must hold a non-empty list of records.")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not {"instruction", "output"} <= record.keys():
            raise MidtrainError(
                f"SFT file {path}: record {i} needs 'instruction' and 'output' keys (and optional 'input')."
            )
        record.setdefault("input", "")
    return records


# ------------------------------------------------------------------------------------- batches
def even_subset(n: int, max_samples: int | None) -> list[int]:
    """``max_samples`` evenly spaced indices of ``range(n)`` (all when None), like ``ValWindows``."""
    k = n if max_samples is None else min(n, int(max_samples))
    return [i * n // k for i in range(k)]


def _stack_windows(windows: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of ``ValWindows`` items (a rank's padding windows have every target masked)."""
    return torch.stack([w["input_ids"] for w in windows]).long(), torch.stack([w["labels"] for w in windows]).long()


def _shift_sft(samples: list[dict], collate) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate(samples)
    return batch["input_ids"][:, :-1], batch["labels"][:, 1:]


def token_loader(path: Path | str, seq_len: int, max_samples: int | None, batch_size: int) -> DataLoader:
    """(inputs, targets) batches of fixed windows of a token shard, this rank's share."""
    load_shard("val", "val", path).check_block_size(seq_len + 1)
    windows = ValWindows(path, seq_len + 1, max_samples)
    return DataLoader(windows, batch_size=batch_size, collate_fn=_stack_windows)


def sft_loader(
    records: list[dict],
    tokenizer: Tokenizer,
    seq_len: int,
    prompt_style: str,
    mask_prompt: bool,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """(inputs, targets) batches of SFT examples, this rank's share; padding and masked tokens are -100."""
    dataset = SFTDataset(records, tokenizer, prompt_style, seq_len + 1, mask_prompt)
    collate = partial(_shift_sft, collate=get_sft_collate_fn(pad_id=0, ignore_index=-100))
    return DataLoader(RankShare(dataset, len(records), rank, world_size), batch_size=batch_size, collate_fn=collate)


@torch.no_grad()
def loss_sum_and_count(fabric: L.Fabric, model: torch.nn.Module, loader: DataLoader) -> tuple[float, int]:
    """Summed token loss and number of scored tokens over ``loader``, all-reduced over ranks."""
    total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
    for inputs, targets in loader:
        loss = micro_batch_loss(model(inputs.to(fabric.device)), targets.to(fabric.device))
        total += torch.stack([loss.total.double(), loss.scored.double()])
    total = fabric.all_reduce(total, reduce_op="sum")
    return float(total[0]), int(total[1])


# -------------------------------------------------------------------------------------- model
def load_model(fabric: L.Fabric, checkpoint: Checkpoint, seq_len: int) -> torch.nn.Module:
    """The checkpoint's GPT (weights only), set up by Fabric, in eval mode."""
    config = Config.from_file(checkpoint.path / MODEL_CONFIG_FILE)
    if seq_len > config.block_size:
        raise MidtrainError(
            f"max_seq_length {seq_len} exceeds the block_size {config.block_size} of {checkpoint.path}."
        )
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    model.max_seq_length = seq_len
    model = fabric.setup_module(model)
    load_initial_weights(fabric, model, checkpoint.path)  # after setup, weights_only=True, FSDP-safe
    return model.eval()


def checkpoint_tokenizer(checkpoint: Checkpoint, tokenizer_dir: Path | None) -> Tokenizer:
    """``tokenizer_dir`` if given, else the tokenizer files stored in the checkpoint."""
    directory = Path(tokenizer_dir) if tokenizer_dir is not None else checkpoint.path
    if not has_tokenizer(directory):
        raise MidtrainError(
            f"SFT sets need a tokenizer, and {directory} has no tokenizer.json / tokenizer.model; "
            "pass --tokenizer_dir or train with tokenizer_dir so checkpoints carry it."
        )
    return Tokenizer(directory)


# ---------------------------------------------------------------------------------------- CSV
def part_path(out: Path, name: str) -> Path:
    """The part CSV ``name`` of ``out``: ``<stem>.part-<name><suffix>`` next to it."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise MidtrainError(f"--part {name!r}: use letters, digits, '_', '-', '.' only (e.g. the SLURM job and task).")
    return Path(out).with_name(f"{Path(out).stem}.part-{name}{Path(out).suffix}")


def _row_key(row: dict) -> tuple[str, str, str]:
    """What makes a row unique in a CSV: a loss row per (checkpoint, set), a score per (checkpoint, set, metric)."""
    return row["checkpoint"], row["set"], row.get("metric") or ""


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    lock = Path(out).with_name(f".{Path(out).name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def merge_parts(out: Path) -> int:
    """Add to ``out`` the rows of its part CSVs that it lacks, then delete those parts; the rows added.

    Runs under a lock file next to ``out``; a part rewritten while being merged is kept for the next merge.
    """
    out = Path(out)
    parts = sorted(out.parent.glob(f"{out.stem}.part-*{out.suffix}"))
    with _locked(out):
        rows = read_eval_rows(out)
        seen = {_row_key(r) for r in rows}
        stamps, added = {}, 0
        for part in parts:
            stamps[part] = part.stat().st_mtime_ns
            for row in read_eval_rows(part):
                if _row_key(row) not in seen:
                    seen.add(_row_key(row))
                    rows.append(row)
                    added += 1
        if added or not out.exists():
            write_eval_rows(out, rows)
        for part, stamp in stamps.items():
            if part.stat().st_mtime_ns == stamp:
                part.unlink()
    print(f"evaluate: merged {len(parts)} part(s) into {out}: {added} new row(s).")
    return added


def no_tokens_error(checkpoint: Checkpoint, val_set: ValSet, seq_len: int, needed: int | None) -> MidtrainError:
    """The error for a set that scored nothing; ``needed``: the length that scores every SFT example in full."""
    fix = f"--max_seq_length {min(needed, _block_size(checkpoint))}" if needed else "--max_seq_length N (longer)"
    return MidtrainError(
        f"Validation set {val_set.name!r} scored no tokens for {checkpoint.path} at max_seq_length {seq_len}: "
        f"the likely cause is the sequence length (every example's prompt fills it, so no response token is "
        f"left to score); rerun with {fix}. The rows scored so far are in the CSV."
    )


def sft_lengths_needed(records: list[dict], tokenizer: Tokenizer, prompt_style: str) -> int:
    """The max_seq_length that holds the longest rendered SFT example (prompt, response and EOS) whole."""
    dataset = SFTDataset(records, tokenizer, prompt_style, -1, False)
    return max(len(dataset[i]["input_ids"]) for i in range(len(dataset))) - 1


def make_row(checkpoint: Checkpoint, set_name: str, loss_sum: float, n_tokens: int) -> dict:
    loss = loss_sum / n_tokens
    return {
        "checkpoint": str(checkpoint.path),
        "step": "" if checkpoint.step is None else checkpoint.step,
        "tokens_seen": "" if checkpoint.tokens_seen is None else checkpoint.tokens_seen,
        "set": set_name,
        "loss": f"{loss:.6f}",
        "ppl": f"{math.exp(loss) if loss < 700 else math.inf:.4f}",
        "n_tokens": n_tokens,
    }


# -------------------------------------------------------------------------------------- command
@dataclass(frozen=True)
class EvalOptions:
    """How every (checkpoint, set) pair is scored."""

    max_samples: int | None = 512
    batch_size: int = 8
    max_seq_length: int | None = None
    tokenizer_dir: Path | None = None
    prompt_style: str = "alpaca"
    mask_prompt: bool = True


def evaluate(
    checkpoints: list[str] | str | None = None,
    val: list[str] | str | dict[str, str] | None = None,
    out: Path = Path("eval.csv"),
    max_samples: int | None = 512,
    batch_size: int = 8,
    max_seq_length: int | None = None,
    tokenizer_dir: Path | None = None,
    prompt_style: str = "alpaca",
    mask_prompt: bool = True,
    devices: int | str = 1,
    accelerator: str = "auto",
    precision: str | None = None,
    tasks: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: Path | None = None,
    preemption_signal: str | None = "SIGUSR1",
    part: str | None = None,
    merge: bool = False,
    list_checkpoints: bool = False,
) -> list[dict] | None:
    """Validation loss and perplexity of each checkpoint on each set, appended to one CSV.

    Args:
        checkpoints: Globs of checkpoint directories (``'runs/x/step-*'``: ours, with a COMPLETE marker;
            or litgpt checkpoint dirs) or run directories. Incomplete checkpoints are skipped with a note.
        val: Validation sets as ``name=PATH``; PATH is a token shard directory or an SFT ``.json``/``.jsonl``
            file. Several: ``--val c4=DIR --val+ sft=FILE.json`` or ``--val '[c4=DIR, sft=FILE.json]'``.
        out: The CSV (checkpoint, step, tokens_seen, set, loss, ppl, n_tokens). Rows already there, keyed by
            (checkpoint, set), are skipped; use a new file after changing max_samples or max_seq_length.
        max_samples: Evenly spaced windows (token sets) or examples (SFT sets) per set; None: all.
        batch_size: Sequences per forward pass and device.
        max_seq_length: Tokens of context per sequence; default: the checkpoint's training length, else
            its block_size. SFT examples are truncated to it.
        tokenizer_dir: Tokenizer for SFT sets; default: the tokenizer files in each checkpoint.
        prompt_style: litgpt prompt style for SFT sets (``alpaca``, ``chatml``, ...).
        mask_prompt: Score only the response tokens of SFT examples.
        devices: Devices (processes); windows and examples are split across them and the sums all-reduced.
        accelerator: ``auto``, ``cpu``, ``cuda``, ...
        precision: Fabric precision; default ``32-true`` on CPU, ``bf16-mixed`` (or ``16-mixed``) on GPU.
        tasks: Comma-separated lm-eval-harness tasks (``arc_easy,sciq``; needs the ``eval`` extra) run on each
            checkpoint, converted once to ``<checkpoint>/evaluate/``; one CSV row per task and metric
            (:mod:`midtrain.eval.benchmarks`). ``val`` may then be left out.
        num_fewshot: Few-shot examples per task (lm-eval's default when None).
        limit: Examples per task (a fraction if < 1); None: all. Use a new CSV after changing it.
        include_path: Directory of extra task YAMLs (local, offline tasks).
        preemption_signal: Signal that finishes the current row, writes the CSV and exits with status 75
            (the sbatch script requeues; the rerun skips written rows), or None.
        part: Write the rows to the part CSV ``<out stem>.part-<part>.csv`` next to ``out`` instead, skipping
            rows already in ``out`` or in that part: concurrent jobs never write one file (SLURM arrays).
        merge: Only add the rows of ``out``'s part CSVs that ``out`` lacks (same checkpoint, set and metric),
            once, under a lock, and delete the parts; nothing is scored.
        list_checkpoints: Only print the matched checkpoints (``checkpoint: PATH`` lines); nothing is scored.

    Returns:
        All rows of the CSV (on rank 0; None on other ranks).
    """
    if merge:
        merge_parts(Path(out))
        return read_eval_rows(Path(out))
    if not checkpoints:
        raise MidtrainError("No checkpoints given; use --checkpoints 'runs/x/step-*' (globs or run directories).")
    found = find_checkpoints(checkpoints)
    if list_checkpoints:
        print("".join(f"checkpoint: {c.path}\n" for c in found), end="")
        return None
    sets = parse_val_sets(val) if val or not tasks else []
    if tasks:
        parse_tasks(tasks)  # fails before any scoring when lm-eval is missing
    if precision is None and (accelerator == "cpu" or not torch.cuda.is_available()):
        precision = "32-true"
    fabric = build_fabric(devices, 1, precision, strategy="ddp", accelerator=accelerator)
    options = EvalOptions(max_samples, batch_size, max_seq_length, tokenizer_dir, prompt_style, mask_prompt)
    target = part_path(Path(out), part) if part else Path(out)
    known = read_eval_rows(Path(out)) if part else []  # rows in the merged CSV count as done
    rows = (fabric.launch(_evaluate_all, found, sets, target, options, preemption_signal, known) if sets
            else read_eval_rows(target))  # fmt: skip
    if tasks and fabric.global_rank == 0:
        rows = run_benchmarks(
            found, tasks, target, rows, num_fewshot, limit, include_path, batch_size,
            "cpu" if accelerator == "cpu" else None, PreemptionFlag(preemption_signal), known,
        )  # fmt: skip
    return rows


def _evaluate_all(
    fabric: L.Fabric,
    checkpoints: list[Checkpoint],
    sets: list[ValSet],
    out: Path,
    options: EvalOptions,
    preemption_signal: str | None,
    known: list[dict],
) -> list[dict] | None:
    preempt = PreemptionFlag(preemption_signal)  # in each process (launch may spawn them)
    rows = read_eval_rows(out)
    done = {(r["checkpoint"], r["set"]) for r in rows + known if not r.get("metric")}
    todo = {c: [s for s in sets if (str(c.path), s.name) not in done] for c in checkpoints}
    skipped = len(checkpoints) * len(sets) - sum(map(len, todo.values()))
    fabric.print(f"evaluate: {len(checkpoints)} checkpoints x {len(sets)} sets; {skipped} rows already in {out}.")
    sft_records = {s.name: _subset(read_sft_records(s.path), options.max_samples) for s in sets if s.kind == "sft"}
    bar = tqdm(total=sum(map(len, todo.values())), desc="evaluate", disable=fabric.global_rank != 0)
    for checkpoint, pending in todo.items():
        if not pending:
            continue
        seq_len = options.max_seq_length or checkpoint.max_seq_length or _block_size(checkpoint)
        model = load_model(fabric, checkpoint, seq_len)
        tokenizer: Tokenizer | None = None
        for val_set in pending:
            if val_set.kind == "tokens":
                loader = token_loader(val_set.path, seq_len, options.max_samples, options.batch_size)
            else:
                tokenizer = tokenizer or checkpoint_tokenizer(checkpoint, options.tokenizer_dir)
                loader = sft_loader(
                    sft_records[val_set.name], tokenizer, seq_len, options.prompt_style, options.mask_prompt,
                    options.batch_size, fabric.global_rank, fabric.world_size,
                )  # fmt: skip
            loss_sum, n_tokens = loss_sum_and_count(fabric, model, loader)
            if n_tokens == 0:  # the same on every rank (all-reduced); what is scored so far is already written
                needed = None
                if val_set.kind == "sft" and tokenizer is not None:
                    needed = sft_lengths_needed(sft_records[val_set.name], tokenizer, options.prompt_style)
                raise no_tokens_error(checkpoint, val_set, seq_len, needed)
            rows.append(make_row(checkpoint, val_set.name, loss_sum, n_tokens))
            if fabric.global_rank == 0:
                write_eval_rows(out, rows)  # each row as it is scored: an error or kill later keeps it
            bar.set_postfix_str(f"{checkpoint.path.name} {val_set.name} loss {rows[-1]['loss']}")
            bar.update()
            if preempt.agreed(fabric):
                fabric.barrier()
                fabric.print(
                    f"\nevaluate: preemption signal: {len(rows)} rows written to {out}; exiting with status "
                    f"{EXIT_PREEMPTED} so the job is requeued (the rerun skips them)."
                )
                sys.exit(EXIT_PREEMPTED)
        fabric.barrier()
    bar.close()
    return rows if fabric.global_rank == 0 else None


def _subset(records: list[dict], max_samples: int | None) -> list[dict]:
    return [records[i] for i in even_subset(len(records), max_samples)]


def _block_size(checkpoint: Checkpoint) -> int:
    return Config.from_file(checkpoint.path / MODEL_CONFIG_FILE).block_size

