#!/usr/bin/env python
"""Fetch and tokenise the midtraining paper's data into the layout ``midtrain_configs/`` expects.

Run it from the run root (``MIDTRAIN_ROOT``, see ``midtrain_configs/README.md``); it writes
``checkpoints/EleutherAI/pythia-160m`` (tokenizer), ``data/pretrain`` (shards ``1``-``4`` C4, ``c1``
code, ``m1`` math, ``i1`` FLAN, ``q1``-``q4`` QA, ``w1`` web), ``data/val/{c4,code,math}`` and
``data/sft/{pycode,gsm8k,lima,sciq}.json``. Every step is a ``midtrain prepare`` command (or the
tokenizer download), streamed from the Hugging Face hub and resumable: re-running the script after an
interruption continues each stream after its last complete shard and skips finished steps.

    python util_scripts/prepare_paper_data.py --dry_run          # print the commands, run nothing
    python util_scripts/prepare_paper_data.py --only c4 c4-val   # some steps
    python util_scripts/prepare_paper_data.py                    # everything (days of CPU for C4)

Gated sets (``bigcode/starcoderdata``, ``GAIR/lima``) need their terms accepted on the hub and
``hf auth login`` first. See README "Reproduce the paper" for what each source is.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

TOKENIZER = "checkpoints/EleutherAI/pythia-160m"
C4_TRAIN_DOCS = 364_868_892  # allenai/c4 "en" train records; cut into the 4 main shards the configs name
C4_SHARD_DOCS = -(-C4_TRAIN_DOCS // 4)
VAL_TOKENS = 2_000_000  # held out from the first code / math shard as data/val/code, data/val/math

# name -> (shard type, data_path, hub dataset, config, data_dir, split, text field, extra options)
STREAMS: dict[str, tuple[str, str, str, str | None, str | None, str, str, list[str]]] = {
    "c4": ("main", "data/pretrain", "allenai/c4", "en", None, "train", "text",
           ["--documents_per_shard", str(C4_SHARD_DOCS)]),
    "c4-val": ("main", "data/val-src/c4", "allenai/c4", "en", None, "validation", "text",
               ["--max_documents", "20000"]),
    "code": ("code", "data/pretrain", "bigcode/starcoderdata", None, "python", "train", "content",
             ["--documents_per_shard", "20000000", "--val_tokens", str(VAL_TOKENS)]),
    "math": ("math", "data/pretrain", "allenai/dolmino-mix-1124", None, "data/math", "train", "text",
             ["--documents_per_shard", "100000000", "--val_tokens", str(VAL_TOKENS)]),
    "flan": ("instruct", "data/pretrain", "allenai/dolmino-mix-1124", None, "data/flan", "train", "text",
             ["--documents_per_shard", "100000000"]),
    "qa": ("qa", "data/pretrain", "allenai/dolmino-mix-1124", None, "data/stackexchange", "train", "text",
           ["--documents_per_shard", "700000", "--max_documents", "2800000"]),
    "web": ("web", "data/pretrain", "HuggingFaceFW/fineweb-edu", "CC-MAIN-2024-10", None, "train", "text",
            ["--documents_per_shard", "100000000"]),
}
# name -> (hub dataset, config, split, format); written to data/sft/<name>.json
SFT: dict[str, tuple[str, str | None, str, str]] = {
    "pycode": ("iamtarun/python_code_instructions_18k_alpaca", None, "train", "code"),
    "gsm8k": ("openai/gsm8k", "main", "train", "gsm8k"),
    "lima": ("GAIR/lima", None, "train", "lima"),
    "sciq": ("allenai/sciq", None, "train", "sciq"),
}
# validation set -> the shard it is (a link, so the configs' data/val/<set> paths hold)
LINKS = {"data/val/c4": "data/val-src/c4/1", "data/val/code": "data/pretrain/val/c1",
         "data/val/math": "data/pretrain/val/m1"}


def steps(tokenizer_dir: str = TOKENIZER) -> dict[str, list[list[str]]]:
    """Step name -> its commands (argv lists of ``midtrain`` / ``litgpt``), in the order they run."""
    midtrain = ["midtrain"]
    out: dict[str, list[list[str]]] = {
        "tokenizer": [["litgpt", "download", "EleutherAI/pythia-160m",
                       "--tokenizer_only", "true", "--checkpoint_dir", "checkpoints"]],
    }
    for name, (type_, data_path, dataset, config, data_dir, split, field, extra) in STREAMS.items():
        cmd = [*midtrain, "prepare", "--hf_dataset", dataset, "--split", split, "--text_key", field,
               "--type", type_, "--data_path", data_path, "--tokenizer_dir", tokenizer_dir, *extra]
        cmd += ["--hf_config", config] if config else []
        cmd += ["--hf_data_dir", data_dir] if data_dir else []
        out[name] = [cmd]
    for name, (dataset, config, split, fmt) in SFT.items():
        cmd = [*midtrain, "prepare", "sft", "--source", dataset, "--format", fmt, "--split", split,
               "--output", f"data/sft/{name}.json"]
        out[f"sft-{name}"] = [cmd + (["--hf_config", config] if config else [])]
    return out


def link(path: str, target: str, dry_run: bool) -> None:
    """``path`` -> ``target`` (relative), unless it already exists."""
    rel = os.path.relpath(target, Path(path).parent)
    print(f"$ ln -sfn {rel} {path}")
    if not dry_run and not Path(path).exists():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(rel, path, target_is_directory=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="Run only these steps (default: all).")
    parser.add_argument("--tokenizer_dir", default=TOKENIZER, help="The Pythia tokenizer directory.")
    args = parser.parse_args(argv)
    plan = steps(args.tokenizer_dir)
    unknown = sorted(set(args.only or []) - set(plan))
    if unknown:
        parser.error(f"unknown step(s) {unknown}; steps: {', '.join(plan)}")
    for name, commands in plan.items():
        if args.only and name not in args.only:
            continue
        if name == "tokenizer" and not args.dry_run and (Path(args.tokenizer_dir) / "tokenizer.json").is_file():
            print(f"# {name}: {args.tokenizer_dir} is there; skipped")
            continue
        output = Path(f"data/sft/{name.removeprefix('sft-')}.json")
        if name.startswith("sft-") and not args.dry_run and output.exists():
            print(f"# {name}: already written; skipped")
            continue
        print(f"# {name}")
        for cmd in commands:
            print("$ " + shlex.join(cmd))
            if not args.dry_run:
                subprocess.run([sys.executable, "-m", *cmd], check=True)  # this Python's midtrain / litgpt
    if not args.only or any(s in args.only for s in ("c4-val", "code", "math")):
        print("# validation sets")
        for path, target in LINKS.items():
            link(path, target, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
