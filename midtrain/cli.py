"""The ``midtrain`` command line: ``midtrain <command> [--config X.yaml] [--dotted.overrides ...]``.

Each command is a plain function whose signature jsonargparse turns into options, exactly like
``litgpt``. ``inspect`` parses the same config as ``pretrain`` and prints the resolved mixture
table instead of training.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from importlib import import_module
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, set_docstring_parse_options

from midtrain.errors import MidtrainError

# command -> (signature function, what it does). Imported lazily so `midtrain --help` is fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("midtrain.prepare:prepare", "Tokenise raw corpora into a typed token shard."),
    "inspect": ("midtrain.train.pretrain:setup", "Dry run: print the resolved mixture table of a pretrain config."),
    "pretrain": ("midtrain.train.pretrain:setup", "Pretrain / midtrain on a mixture of token shards."),
    "finetune": ("midtrain.train.finetune:setup", "Full fine-tuning with optional replay of pretraining shards."),
    "evaluate": ("midtrain.eval.losses:evaluate", "Validation losses of many checkpoints on many sets into a CSV."),
    "similarity": ("midtrain.eval.similarity:similarity", "n-gram / token similarity and proximity advantage."),
    "efficiency": ("midtrain.eval.efficiency:efficiency", "Fit loss = A/x^B + C and report data-efficiency."),
    "report": ("midtrain.report.report:report", "Plots and a markdown summary of one or more runs."),
    "demo": ("midtrain.demo:demo", "The whole method on one CPU in minutes, no download."),
}
PREPARE_DEMO = "midtrain.data.demo_corpus:prepare_demo"


def _load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(import_module(module), name)


def _parser(fn: Callable, prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=(fn.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config file (fields as below).")
    parser.add_function_arguments(fn, fail_untyped=False)
    return parser


def _repeatable_lists(fn: Callable, args: list[str]) -> list[str]:
    """``--val a --val b`` means both: later repeats of a list option become jsonargparse's ``--val+``."""
    list_params = {
        name for name, p in inspect.signature(fn).parameters.items() if "list" in str(p.annotation).lower()
    }
    seen: set[str] = set()
    out = []
    for arg in args:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name in list_params:
            if name in seen:
                arg = f"--{name}+" + arg[2 + len(name):]
            seen.add(name)
        out.append(arg)
    return out


def run(command: str, args: list[str]) -> Any:
    """Parse ``args`` for ``command`` and run it."""
    target = COMMANDS[command][0]
    if command == "prepare" and args[:1] == ["demo"]:
        target, args, command = PREPARE_DEMO, args[1:], "prepare demo"
    if command in ("inspect", "pretrain", "finetune", "demo"):
        from midtrain.data.sharded_mixed import register_litgpt_alias

        register_litgpt_alias()
    fn = _load(target)
    parser = _parser(fn, f"midtrain {command}")
    cfg = parser.parse_args(_repeatable_lists(fn, args))
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in vars(init).items() if k != "config"}
    if command == "inspect":
        from midtrain.inspect_mixture import inspect

        return inspect(**kwargs)
    return fn(**kwargs)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: midtrain <command> [--config X.yaml] [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
            print(f"\nmidtrain: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    set_docstring_parse_options(attribute_docstrings=True)
    warnings.filterwarnings("ignore", message=r".*The epoch parameter in `scheduler.step\(\)`.*")
    torch.set_float32_matmul_precision("high")
    try:
        run(argv[0], argv[1:])
    except MidtrainError as e:
        print(f"midtrain {argv[0]}: error: {e}", file=sys.stderr)
        sys.exit(2)
