"""The ``midtrain`` command line: ``midtrain <command> [--config X.yaml] [--dotted.overrides ...]``.

Each command is a plain function whose signature jsonargparse turns into options, exactly like
``litgpt``. ``inspect`` parses the same config as ``pretrain`` and prints the resolved mixture
table instead of training. ``migrate`` rewrites a config of the research fork.

Every error a user can cause ends in a few lines on stderr and exit status 2: the config is
checked field by field before jsonargparse sees it (``midtrain.config.yaml_check``), jsonargparse's own
messages are condensed, and a ``MidtrainError`` raised while a class is built is reported as it is,
not inside jsonargparse's "Does not validate against any of the Union subtypes". Usage is printed
on ``--help`` only.
"""
from __future__ import annotations

import copy
import inspect
import os
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_docstring_parse_options

from midtrain import preemption
from midtrain.errors import MidtrainError
from midtrain.rundir import parse_yaml

# command -> (what its options are read from: a function or a config dataclass, what it does). Imported lazily so
# `midtrain --help` is fast. A dataclass's command runs RUNNERS[command] on the built (checked) object.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("midtrain.prepare:prepare", "Tokenise raw corpora into a typed token shard."),
    "inspect": ("midtrain.config.commands:PretrainConfig", "Dry run: the resolved mixture table of a pretrain "
                "config, a warning per shard read more than data.repeat_warning (4) times; refuses what pretrain "
                "refuses."),
    "migrate": ("midtrain.migrate:migrate_file", "Rewrite a config of the research fork as a midtrain config."),
    "pretrain": ("midtrain.config.commands:PretrainConfig", "Pretrain / midtrain on a mixture of token shards."),
    "finetune": ("midtrain.config.commands:FinetuneConfig", "Full fine-tuning, optional replay of pretraining shards."),
    "evaluate": ("midtrain.eval.losses:evaluate", "Validation losses and lm-eval scores of checkpoints into one CSV."),
    "similarity": ("midtrain.eval.similarity:similarity", "n-gram / token similarity and proximity advantage."),
    "efficiency": ("midtrain.eval.efficiency:efficiency", "Fit loss = A/x^B + C and report data-efficiency."),
    "report": ("midtrain.report.report:report", "Plots and a markdown summary of one or more runs."),
    "demo": ("midtrain.demo.run:demo", "The whole method on one CPU in minutes, no download."),
    "experiment": ("midtrain.experiment:main", "A study as a graph of runs: plan | run | submit | status FILE."),
}
RUNNERS = {"pretrain": "midtrain.train.pretrain:setup", "finetune": "midtrain.train.finetune:setup"}
PREPARE_DEMO = "midtrain.demo.corpus:prepare_demo"
PREPARE_SFT = "midtrain.prepare.sft_formats:prepare_sft"
PREPARE_HUB = "midtrain.prepare.hub:prepare_hub"
TRAINING = ("inspect", "pretrain", "finetune")


def _load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(import_module(module), name)


def _parser(fn: Callable, prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=(fn.__doc__ or "").split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config file (fields as below).")
    if inspect.isclass(fn):
        parser.add_class_arguments(fn, as_group=False, fail_untyped=False)
    else:
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


# ---- the config as the user wrote it: YAML files plus dotted overrides -------------------------------


def _read_yaml(source: str) -> dict:
    path = Path(source).expanduser()
    if not path.is_file():
        if "\n" in source or ": " in source:  # jsonargparse also takes the YAML text itself
            text, name = source, "--config"
        else:
            raise MidtrainError(f"--config {source}: no such file.")
    else:
        text, name = path.read_text(), str(path)
    data = parse_yaml(text, name)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MidtrainError(f"{name} must hold a mapping of options, not a {type(data).__name__}.")
    return data


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and "class_path" not in value:
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _set(cfg: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(cfg.get(part), dict):
            cfg[part] = {}
        cfg = cfg[part]
    cfg[leaf] = value


def _split_args(args: list[str]) -> tuple[dict, list[tuple[str, list[str]]], list[str]]:
    """``(merged --config files, [(dotted key, its argv tokens)], other tokens)``."""
    files: dict = {}
    overrides: list[tuple[str, list[str]]] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg in ("--help", "--print_config"):
            rest.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        tokens = [arg]
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            tokens.append(value)
        i += len(tokens)
        if key == "config":
            _merge(files, _read_yaml(value))
        else:
            overrides.append((key, tokens))
    return files, overrides, rest


def _value(tokens: list[str]) -> Any:
    raw = tokens[0].partition("=")[2] if len(tokens) == 1 else tokens[1]
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _prepare_args(command: str, fn: Callable, args: list[str]) -> list[str]:
    """Check the config against ``fn``'s options and translate litgpt's names; the args for jsonargparse."""
    from midtrain.config.litgpt_names import apply, translate
    from midtrain.config.yaml_check import check_section
    from midtrain.migrate import fork_fields

    if any(a in ("-h", "--help", "--print_config") or a.startswith("--print_config=") for a in args):
        return args
    files, overrides, rest = _split_args(args)
    view = copy.deepcopy(files)
    for key, tokens in overrides:
        if not key.endswith("+"):
            _set(view, key, _value(tokens))
    if command in TRAINING:
        fork = fork_fields(view)
        if fork:
            source = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"), "FORK.yaml")
            out = re.sub(r"\.ya?ml$", "", source) + ".midtrain.yaml"
            raise MidtrainError(
                f"{source} is a config of the research fork ({', '.join(fork)}): convert it with "
                f"`midtrain migrate {source} -o {out}`, then use {out}."
            )
        changes, notes = translate(command, view)
        if changes:
            apply(view, changes)
            apply(files, changes)
            overrides = [(k, t) for k, t in overrides if k not in changes]
            args = (["--config", yaml.safe_dump(files, sort_keys=False)] if files else []) + [
                t for _, tokens in overrides for t in tokens
            ] + rest
            for note in notes:
                print(f"note: litgpt's {note}")
        _check_mode_switch(view, [k for k, _ in overrides])
    check_section("", view, fn)
    return args


def _check_mode_switch(view: dict, overridden: list[str]) -> None:
    """A mixture mode set on the command line next to another from the config: say how to null the other."""
    from midtrain.data.mixture import MODE_FIELDS

    data = view.get("data")
    if not isinstance(data, dict):
        return
    nested = isinstance(data.get("init_args"), dict)
    prefix, fields = ("data.init_args", data["init_args"]) if nested else ("data", data)
    given = [m for m in MODE_FIELDS if fields.get(m) not in (None, "", {}, False)]
    new = [m for m in given if f"{prefix}.{m}" in overridden]
    if len(given) > 1 and new:
        others = [m for m in given if m not in new]
        nulls = " ".join(f"--{prefix}.{m} {'false' if m == 'proportional_sampling' else 'null'}" for m in others)
        raise MidtrainError(
            f"--{prefix}.{new[0]} switches the mixture mode, but the config also sets {', '.join(others)}; a mixture "
            f"has exactly one mode: add {nulls}."
        )


# ---- building the objects ------------------------------------------------------------------------


def _instantiate(parser: ArgumentParser, cfg: Namespace) -> Namespace:
    """jsonargparse's ``instantiate_classes``, but a class's own error reaches the user as it is."""
    try:
        return parser.instantiate_classes(cfg)
    except MidtrainError:
        raise
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, MidtrainError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        for key, value in vars(cfg).items():  # rebuild each class on its own to get its real error
            if isinstance(value, Namespace) and isinstance(getattr(value, "class_path", None), str):
                from midtrain.config.yaml_check import import_class

                cls = import_class(value.class_path)
                init = value.get("init_args")
                kwargs = init.as_dict() if isinstance(init, Namespace) else dict(init or {})
                try:
                    cls(**kwargs)
                except MidtrainError:
                    raise
                except Exception as e:
                    raise MidtrainError(f"{key} ({value.class_path}): {type(e).__name__}: {e}") from None
        raise


def run(command: str, args: list[str]) -> Any:
    """Parse ``args`` for ``command`` and run it."""
    if command == "migrate":
        return _migrate(args)
    if command == "experiment":
        return _load(COMMANDS[command][0])(args)
    target = COMMANDS[command][0]
    if command == "prepare" and args[:1] == ["demo"]:
        target, args, command = PREPARE_DEMO, args[1:], "prepare demo"
    elif command == "prepare" and args[:1] == ["sft"]:
        target, args, command = PREPARE_SFT, args[1:], "prepare sft"
    elif command == "prepare":
        from midtrain.prepare.hub import hub_args

        hub = hub_args(args)
        target, args = (PREPARE_HUB, hub) if hub is not None else (target, args)
    if command in ("inspect", "pretrain", "finetune", "demo"):
        from midtrain.data.sharded_mixed import register_litgpt_alias

        register_litgpt_alias()
    fn = _load(target)
    if command == "inspect":
        from midtrain.inspect_mixture import split_step_option

        args, step = split_step_option(args)
    parser = _parser(fn, f"midtrain {command}")
    if command == "inspect":
        parser.description = COMMANDS["inspect"][1]
        parser.add_argument("--step", type=int | None, default=None, help="Also print the samples optimizer step N "
                            "trains on (rank, source, epoch, index) and the epochs per source read by then.")
    args = _prepare_args(command, fn, _repeatable_lists(fn, args))
    cfg = parser.parse_args(args)
    init = _instantiate(parser, cfg)
    kwargs = {k: v for k, v in vars(init).items() if k not in ("config", "step")}
    if command == "inspect":
        from midtrain.inspect_mixture import inspect

        return inspect(**kwargs, step=step)
    try:
        return _load(RUNNERS[command])(fn(**kwargs)) if command in RUNNERS else fn(**kwargs)
    finally:
        preemption.clear()  # acted on (or too late to matter): a next command in this process starts clean


def _migrate(args: list[str]) -> list[str]:
    from midtrain.migrate import FORK_HORIZON, migrate_file

    parser = ArgumentParser(
        prog="midtrain migrate", exit_on_error=False,
        description="Rewrite a config of the research fork as a midtrain config, printing each change.",
    )
    parser.add_argument("fork_config", type=str | None, nargs="?", help="The fork's YAML config.")
    parser.add_argument("--config", type=str | None, help="The fork's YAML config (instead of the positional).")
    parser.add_argument("-o", "--output", type=str, help="Where to write the midtrain config (default: stdout).")
    parser.add_argument("--pretrain_dir", type=str, help="The pretraining run holding the branch checkpoint "
                        "(default: the fork config's out_dir).")
    parser.add_argument("--out_dir", type=str, help="out_dir of the migrated run.")
    parser.add_argument("--max_steps", type=int, default=FORK_HORIZON, help="The run's length (LR horizon).")
    ns = parser.parse_args(args)
    if (ns.fork_config is None) == (ns.config is None):
        raise MidtrainError("Give the fork's config once: `midtrain migrate FORK.yaml -o X.yaml` (or --config X).")
    return migrate_file(Path(ns.fork_config or ns.config), ns.output, ns.pretrain_dir, ns.out_dir, ns.max_steps)


# ---- errors ---------------------------------------------------------------------------------------

_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "Parser key", "Problem with given")


def condense(message: str) -> str:
    """jsonargparse's error as ``dotted.key: what is wrong`` in one line."""
    required = re.search(r'Key "([^"]+)" is required', message)
    if required:
        return f"--{required.group(1)} is required (in the config or on the command line)"
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if "Problem with given class_path" in message and len(keys) > 1:
        key = keys[0] + ".init_args." + ".".join(keys[1:])
    else:
        key = ".".join(keys)
    expected = [t for t in re.findall(r"Expected a <class '([\w.]+)'>", message) if t != "NoneType"]
    got = re.search(r"(?:Got|Given) value: (.*)$", message, re.MULTILINE)
    if expected:
        detail = f"expected {' or '.join(dict.fromkeys(expected))}" + (f", got {got.group(1).strip()!r}" if got else "")
    else:
        lines = [ln.strip().lstrip("- ").strip() for ln in message.splitlines()]
        detail = " ".join(ln for ln in lines if ln and not ln.startswith(_NOISE) and "NoneType" not in ln)[:300]
    return f"{key}: {detail}" if key else detail or message.splitlines()[0]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # first: a SLURM signal during the imports and setup below still means checkpoint + requeue
    preemption.install(sigterm=bool(argv) and argv[0] in preemption.COMMANDS)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
            from midtrain.config.yaml_check import closest

            print(f"midtrain: unknown command {argv[0]!r}{closest(argv[0], list(COMMANDS))}; "
                  f"commands: {', '.join(COMMANDS)}.", file=sys.stderr)
            sys.exit(2)
        print("usage: midtrain <command> [--config X.yaml] [options]\n\ncommands:\n" + "\n".join(lines))
        return
    set_docstring_parse_options(attribute_docstrings=True)
    warnings.filterwarnings("ignore", message=r".*The epoch parameter in `scheduler.step\(\)`.*")
    if "SLURM_JOB_ID" not in os.environ:  # Lightning's hint to use srun means nothing outside a SLURM job
        warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system but is not used.*")
    command = argv[0]
    if command in TRAINING or command in ("evaluate", "demo"):  # torch is imported only where a model runs
        import torch

        torch.set_float32_matmul_precision("high")
    try:
        run(command, argv[1:])
    except MidtrainError as e:
        print(f"midtrain {command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ArgumentError as e:
        print(f"midtrain {command}: error: {condense(str(e))}\n(options: midtrain {command} --help)", file=sys.stderr)
        sys.exit(2)
