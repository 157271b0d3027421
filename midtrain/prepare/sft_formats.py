"""``midtrain prepare sft``: the paper's SFT sets -> litgpt's instruction JSON.

litgpt's ``litgpt.data.JSON`` reads a JSON list of ``{"instruction", "input", "output"}`` records
(``input`` may be empty; the loss is on ``output`` with ``mask_prompt: true``). Each format below maps
one record of a source set to one such record:

``gsm8k``   (``openai/gsm8k``, config ``main``): ``question`` -> instruction, ``answer`` (the worked
            solution ending in ``#### <number>``) -> output.
``sciq``    (``allenai/sciq``): ``question`` -> instruction, ``support`` (the evidence paragraph, often
            empty) -> input, ``correct_answer`` -> output. ``distractor1..3`` are the multiple-choice
            options of evaluation; an SFT target has none, so they are checked to be present but not written.
``lima``    (``GAIR/lima``): ``conversations`` (a list of turns, user first) -> the first turn is the
            instruction, the second the output; later turns are dropped.
``code``    (PyCode-style Python instruction sets such as ``iamtarun/python_code_instructions_18k_alpaca``):
            ``instruction`` -> instruction, ``input`` (optional) -> input, ``output`` -> output.

Sources are a local ``.jsonl``/``.json``/``.parquet`` file, or a dataset name (or local dataset
directory) read with ``datasets.load_dataset`` (``--hf_config``, ``--split``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from midtrain.errors import MidtrainError
from midtrain.prepare.inputs import JSONL_SUFFIXES, PARQUET_SUFFIXES

Example = dict[str, str]


class _Skip(Exception):
    """A record that is well-formed but holds no example (e.g. a LIMA conversation with one turn)."""


def _text(record: dict, key: str) -> str:
    if key not in record:
        raise ValueError(f"no field {key!r} (fields: {sorted(record)[:10]})")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is {type(value).__name__}, not a string")
    return value


def _gsm8k(record: dict) -> Example:
    return {"instruction": _text(record, "question"), "input": "", "output": _text(record, "answer")}


def _sciq(record: dict) -> Example:
    for key in ("distractor1", "distractor2", "distractor3"):
        _text(record, key)
    support = record.get("support") or ""
    if not isinstance(support, str):
        raise ValueError(f"'support' is {type(support).__name__}, not a string")
    question, answer = _text(record, "question"), _text(record, "correct_answer")
    return {"instruction": question, "input": support.strip(), "output": answer}


def _lima(record: dict) -> Example:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise ValueError("'conversations' must be a list of strings (user turn, assistant turn, ...)")
    if len(turns) < 2:
        raise _Skip
    return {"instruction": turns[0], "input": "", "output": turns[1]}


def _code(record: dict) -> Example:
    raw_input = record.get("input") or ""
    if not isinstance(raw_input, str):
        raise ValueError(f"'input' is {type(raw_input).__name__}, not a string")
    return {"instruction": _text(record, "instruction"), "input": raw_input, "output": _text(record, "output")}


FORMATS: dict[str, Callable[[dict], Example]] = {"gsm8k": _gsm8k, "sciq": _sciq, "lima": _lima, "code": _code}


def _read_local(path: Path) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise MidtrainError(f"{path}:{lineno}: malformed JSON ({e}).") from None


def read_records(source: str, hf_config: str | None = None, split: str = "train") -> Iterator[dict]:
    """Records of a local JSONL/JSON/Parquet file, or of a dataset read with ``datasets.load_dataset``."""
    path = Path(os.path.expanduser(source))
    if path.is_file():
        if path.suffix.lower() not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
            raise MidtrainError(f"{path}: expected a .jsonl, .json or .parquet file, or a dataset name.")
        yield from _read_local(path)
        return
    from midtrain.prepare.hub import open_stream

    yield from open_stream(source, hf_config, split)


def convert(records: Iterator[Any], format: str, where: str, skip_bad: bool = False) -> tuple[list[Example], dict]:
    """Map ``records`` with ``format``; ``(examples, counts)``; a bad record fails unless ``skip_bad``."""
    if format not in FORMATS:
        raise MidtrainError(f"Unknown SFT format {format!r}; choose one of {sorted(FORMATS)}.")
    to_example = FORMATS[format]
    examples: list[Example] = []
    counts = {"records": 0, "skipped_bad": 0, "skipped_empty": 0}
    for i, record in enumerate(records):
        counts["records"] += 1
        try:
            if not isinstance(record, dict):
                raise ValueError(f"expected an object, got {type(record).__name__}")
            example = to_example(record)
        except _Skip:
            counts["skipped_empty"] += 1
            continue
        except ValueError as e:
            if not skip_bad:
                raise MidtrainError(
                    f"{where} record {i}: {e}; is --format {format} right for this set? (--skip_bad true skips and "
                    "counts such records)"
                ) from None
            counts["skipped_bad"] += 1
            continue
        if not example["instruction"].strip() or not example["output"].strip():
            counts["skipped_empty"] += 1
            continue
        examples.append(example)
    return examples, counts


def prepare_sft(
    source: str,
    format: str,
    output: Path,
    hf_config: str | None = None,
    split: str = "train",
    max_examples: int | None = None,
    skip_bad: bool = False,
) -> Path:
    """Write a litgpt SFT JSON (instruction/input/output) from one of the paper's SFT sets.

    Args:
        source: A local ``.jsonl``/``.json``/``.parquet`` file, or a dataset name / local dataset directory for
            ``datasets.load_dataset`` (``openai/gsm8k``, ``allenai/sciq``, ``GAIR/lima``, a PyCode set).
        format: The source's record format: ``gsm8k``, ``sciq``, ``lima`` or ``code`` (see the module docs).
        output: The JSON file to write (for ``litgpt.data.JSON``'s ``json_path``).
        hf_config: Dataset configuration when ``source`` is a dataset name (``main`` for GSM8K).
        split: Split when ``source`` is a dataset name.
        max_examples: Keep only the first this many examples.
        skip_bad: Skip and count malformed records instead of failing at the first one.

    Returns:
        The written file.
    """
    if format not in FORMATS:
        raise MidtrainError(f"Unknown SFT format {format!r}; choose one of {sorted(FORMATS)}.")
    records = read_records(source, hf_config, split)
    examples, counts = convert(records, format, source, skip_bad)
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        raise MidtrainError(f"{source} gave no examples in format {format!r} ({counts}); check --source and --format.")
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(examples, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(output)
    skipped = ", ".join(f"{v} {k.removeprefix('skipped_')}" for k, v in counts.items() if k != "records" and v)
    print(f"midtrain prepare sft: wrote {len(examples):,} {format} examples to {output} "
          f"(from {counts['records']:,} records{'; skipped ' + skipped if skipped else ''}).")
    return output
