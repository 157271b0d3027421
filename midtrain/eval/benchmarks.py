"""lm-eval-harness benchmarks of checkpoints (``midtrain evaluate --tasks``), as rows of the evaluate CSV.

Each checkpoint is converted once to a Hugging Face directory, ``<checkpoint>/evaluate/`` (the
directory ``litgpt evaluate`` converts into and reuses too): litgpt's weight conversion, the
``config.json`` from :mod:`midtrain.train.hf_config` and the checkpoint's tokenizer files. Then every
task runs through lm-eval's ``HFLM``; each (task, metric) gives one CSV row with the stderr lm-eval
reports. The row's ``set`` is the task, ``<task>:<k>shot`` with ``num_fewshot``, so a rerun skips the
(checkpoint, set) pairs already there and a different shot count is a different row. A preemption
signal finishes the current task, writes the CSV and exits with status 75.

:func:`write_choice_task` builds a local multiple-choice task (YAML + JSON) from an SFT validation
file, so a fine-tuned model can be benchmarked offline on its own domain.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from midtrain.errors import MidtrainError
from midtrain.preemption import EXIT_PREEMPTED
from midtrain.rundir import MODEL_CONFIG_FILE, TOKENIZER_FILES, write_eval_rows
from midtrain.train.hf_config import HF_CONFIG_FILE, hf_config_json

if TYPE_CHECKING:
    from midtrain.eval.losses import Checkpoint

HF_DIR = "evaluate"  # litgpt evaluate's default out_dir, so both tools share one conversion
HF_WEIGHTS = "pytorch_model.bin"


def set_name(task: str, num_fewshot: int | None) -> str:
    """The CSV ``set`` of a benchmark row."""
    return task if num_fewshot is None else f"{task}:{num_fewshot}shot"


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """``"arc_easy,sciq"`` (or a list) into task names; lm-eval must be installed."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise MidtrainError("--tasks is empty; give lm-eval task names, e.g. --tasks arc_easy,sciq.")
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise MidtrainError("--tasks needs lm-eval-harness: pip install -c constraints.txt -e '.[eval]'.") from err
    return names


def hf_dir(checkpoint: Path) -> Path:
    """``checkpoint/evaluate/``: the HF conversion of a checkpoint, made once (atomically) and reused."""
    target = checkpoint / HF_DIR
    if (target / HF_WEIGHTS).is_file() and (target / HF_CONFIG_FILE).is_file():
        return target
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

    config_text = hf_config_json(yaml.safe_load((checkpoint / MODEL_CONFIG_FILE).read_text()))  # refuses early
    tmp = checkpoint / f".tmp-{HF_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_lit_checkpoint(checkpoint, tmp)
    # HFLM loads with weights_only=True, which litgpt's incremental save does not satisfy: re-save plainly.
    torch.save(torch.load(tmp / "model.pth", weights_only=False), tmp / HF_WEIGHTS)
    (tmp / "model.pth").unlink()
    (tmp / HF_CONFIG_FILE).write_text(config_text, encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, tmp / name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def metric_rows(checkpoint: Checkpoint, name: str, results: dict[str, Any]) -> list[dict]:
    """CSV rows of one ``simple_evaluate`` result: every metric of every task and group it reports."""
    rows = []
    for task, metrics in {**results.get("results", {}), **results.get("groups", {})}.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            shown = metric if filt == "none" else f"{metric},{filt}"
            rows.append({
                "checkpoint": str(checkpoint.path),
                "step": "" if checkpoint.step is None else checkpoint.step,
                "tokens_seen": "" if checkpoint.tokens_seen is None else checkpoint.tokens_seen,
                "set": name if task == name.split(":")[0] else f"{name}/{task}",
                "metric": shown,
                "value": f"{value:.6g}",
                "stderr": f"{stderr:.6g}" if isinstance(stderr, (int, float)) else "",
            })  # fmt: skip
    return rows


def run_benchmarks(
    checkpoints: list[Checkpoint],
    tasks: str | list[str],
    out: Path,
    rows: list[dict],
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: Path | None = None,
    batch_size: int = 8,
    device: str | None = None,
    preempt: Any = None,
    known: list[dict] | None = None,
) -> list[dict]:
    """Run every task on every checkpoint not yet in ``rows`` (or ``known``); append, write ``out`` after each task."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = parse_tasks(tasks)
    if include_path is not None and not Path(include_path).is_dir():
        raise MidtrainError(f"--include_path {include_path} is not a directory of lm-eval task YAMLs.")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise MidtrainError(
            f"Unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks` (or --include_path)."
        )
    done = {(r["checkpoint"], r["set"]) for r in [*rows, *(known or [])] if r.get("metric")}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # lm-eval bootstraps the stderr of perplexity/F1/BLEU in a forked multiprocessing.Pool; forked from this
    # process (torch's threads, a tokenizer, tqdm's monitor) a pool worker can deadlock on an inherited lock
    # and the job hangs forever. One process it is; DISABLE_MULTIPROC="" set by the user brings the pool back.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    for checkpoint in checkpoints:
        pending = [t for t in names if (str(checkpoint.path), set_name(t, num_fewshot)) not in done]
        if not pending:
            continue
        model = HFLM(pretrained=str(hf_dir(checkpoint.path)), device=device, batch_size=batch_size, dtype="float32")
        for task in pending:
            result = evaluator.simple_evaluate(
                model=model, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=False, random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
            )  # fmt: skip
            rows += metric_rows(checkpoint, set_name(task, num_fewshot), result)
            write_eval_rows(out, rows)
            print(f"evaluate: {task} on {checkpoint.path} -> {out}")
            if preempt is not None and preempt.requested:
                print(
                    f"evaluate: preemption signal: exiting with status {EXIT_PREEMPTED} (the rerun skips written rows)."
                )
                sys.exit(EXIT_PREEMPTED)
    return rows


def write_choice_task(
    sft_file: Path | str,
    out_dir: Path | str,
    name: str,
    n_choices: int = 4,
    prompt_style: str = "alpaca",
    max_examples: int | None = None,
) -> Path:
    """A local lm-eval multiple-choice task from an SFT file: ``out_dir/<name>.yaml`` + ``<name>.json``.

    Each record's prompt (rendered with litgpt's ``prompt_style``) is the question; its ``output`` is
    the right answer among ``n_choices`` candidates, the others being the outputs of the following
    records (distinct ones, cyclically), at a position that cycles with the record index. Scored by
    ``acc`` and ``acc_norm``. Use ``out_dir`` as ``--include_path``.
    """
    from litgpt.prompts import PromptStyle

    from midtrain.eval.losses import read_sft_records

    records = read_sft_records(Path(sft_file))[:max_examples]
    answers = list(dict.fromkeys(r["output"] for r in records))
    if len(answers) < n_choices:
        raise MidtrainError(f"{sft_file} has {len(answers)} distinct outputs; a {n_choices}-way task needs more.")
    style = PromptStyle.from_name(prompt_style)
    docs = []
    for i, record in enumerate(records):
        start = answers.index(record["output"])
        wrong = [answers[(start + k) % len(answers)] for k in range(1, n_choices)]
        label = i % n_choices
        choices = [*wrong[:label], record["output"], *wrong[label:]]
        docs.append({"question": style.apply(record["instruction"], **record), "choices": choices, "label": label})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = (out_dir / f"{name}.json").resolve()
    data.write_text(json.dumps(docs, indent=1), encoding="utf-8")
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path
