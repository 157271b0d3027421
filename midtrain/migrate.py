"""``midtrain migrate FORK.yaml [-o OUT.yaml]``: a config of the research fork as a midtrain config.

The fork (litgpt + ``litgpt.data.ShardedMixedDataset``) ran every job for ``train.max_iters: 10000000``
with the LR horizon fixed in code (61,035 steps in the paper) and stopped it with
``train.max_additional_steps`` counted from the checkpoint it resumed (``resume: true`` on an
``out_dir`` into which the branch checkpoint had been linked). midtrain's length is absolute
(``train.max_steps``) and a branch names its start checkpoint. Every change is returned as one line.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from midtrain.config.litgpt_names import apply, has, translate
from midtrain.config.yaml_check import check_section, fields_of
from midtrain.errors import MidtrainError

FORK_HORIZON = 61035  # the fork's LR horizon in optimizer steps (the paper's 128B tokens)
FORK_DATA = "litgpt.data.ShardedMixedDataset"
DATA = "midtrain.data.ShardedMixedDataset"
FORK_ONLY = ("train.max_iters", "train.lr_scheduler", "train.stable_steps", "data.init_args.mix_weight")
SCHEDULES = ("cosine", "linear", "constant", "wsd")  # the same names in the fork and in midtrain
FLOAT_FIELDS = ("min_lr", "lr_warmup_fraction", "lr_decay_fraction", "max_norm")
MODES = ("mix_weights_str", "literal_weights_str", "proportional_sampling", "mix_config_path")


def fork_fields(cfg: dict) -> list[str]:
    """The fields of ``cfg`` that only the research fork's configs have (empty for a midtrain config)."""
    return [key for key in FORK_ONLY if has(cfg, key)]


def _is_branch(init_args: dict) -> bool:
    """True when the mixture samples something besides ``main``: a midtraining branch, not a continuation."""
    weights = init_args.get("mix_weights_str") or init_args.get("literal_weights_str")
    if isinstance(weights, str):
        pairs = [p.rpartition(":") for p in weights.split(",") if ":" in p]
        weights = {k.strip(): float(v) for k, _, v in pairs}
    if isinstance(weights, dict):
        return any(float(w) > 0 and not str(k).startswith("main") for k, w in weights.items())
    return bool(init_args.get("proportional_sampling") or init_args.get("mix_config_path"))


def _schedule(train: dict, max_steps: int, changes: list[str]) -> None:
    stable = train.pop("stable_steps", None)
    if "lr_scheduler" not in train:
        if stable is not None:
            changes.append(f"train.stable_steps: {stable} dropped (only meaningful with lr_scheduler: decay)")
        return
    old = str(train.pop("lr_scheduler"))
    if old in SCHEDULES:
        train["lr_schedule"] = old
        changes.append(f"train.lr_scheduler: {old} -> train.lr_schedule: {old}")
    elif old == "decay" and (stable is None or int(stable) >= max_steps):
        train["lr_schedule"] = "constant"
        changes.append(
            f"train.lr_scheduler: decay with stable_steps {stable} (never decays within {max_steps} steps) -> "
            "train.lr_schedule: constant after warmup"
        )
    elif old == "decay":
        frac = round(1 - int(stable) / max_steps, 6)
        train["lr_schedule"], train["lr_decay_fraction"] = "wsd", frac
        changes.append(
            f"train.lr_scheduler: decay, stable_steps {stable} -> train.lr_schedule: wsd, lr_decay_fraction {frac}"
        )
    else:
        raise MidtrainError(f"train.lr_scheduler: {old!r} has no midtrain equivalent; choose one of {list(SCHEDULES)}.")
    if stable is not None and old != "decay":
        changes.append(f"train.stable_steps: {stable} dropped (only meaningful with lr_scheduler: decay)")


def _mixture(init: dict, changes: list[str]) -> None:
    """The fork's mixture spellings midtrain reads differently: type names in literal mode, ``{weights: ...}`` files."""
    from midtrain.data.shards import DEFAULT_SHARD_TYPES, MAIN_TYPE

    literal = init.get("literal_weights_str")
    if isinstance(literal, str):
        names = [p.rpartition(":")[0].strip() for p in literal.split(",") if ":" in p]
        if names and all(n in (MAIN_TYPE, *DEFAULT_SHARD_TYPES) for n in names):
            init["mix_weights_str"] = init.pop("literal_weights_str")
            changes.append(
                f"data.init_args.literal_weights_str: {literal!r} -> mix_weights_str (it names types, not shard IDs; "
                "the fork skipped literal IDs it did not find)"
            )
    path = init.get("mix_config_path")
    if path:
        try:
            spec = json.loads(Path(path).expanduser().read_text())
        except (OSError, json.JSONDecodeError):
            changes.append(f"data.init_args.mix_config_path: {path} kept (not readable here; midtrain expects the "
                           "fields of one mode in it, e.g. mix_weights_str)")
            return
        if isinstance(spec, dict) and set(spec) == {"weights"} and isinstance(spec["weights"], dict):
            weights = ",".join(f"{k}:{v}" for k, v in spec["weights"].items())
            init["mix_weights_str"] = weights
            del init["mix_config_path"]
            changes.append(f"data.init_args.mix_config_path: {path} (the fork's {{weights: ...}} file) -> "
                           f'mix_weights_str: "{weights}"')


def _drop_unknown(where: str, section: dict, target: Any, changes: list[str], why: dict[str, str]) -> None:
    accepted = fields_of(target) or {}
    for key in [k for k in section if k not in accepted]:
        value = section.pop(key)
        changes.append(f"{where}{key}: {value!r} dropped ({why.get(key, 'not a midtrain field')})")


def migrate(
    cfg: dict,
    source: str = "FORK.yaml",
    pretrain_dir: str | None = None,
    out_dir: str | None = None,
    max_steps: int = FORK_HORIZON,
) -> tuple[dict, list[str]]:
    """The midtrain config for the fork config ``cfg`` and one line per change."""
    from midtrain.config.commands import PretrainConfig
    from midtrain.config.sections import EvalArgs, TrainArgs
    from midtrain.data.sharded_mixed import ShardedMixedDataset

    if not isinstance(cfg, dict):
        raise MidtrainError(f"{source} does not hold a YAML mapping.")
    new = copy.deepcopy(cfg)
    changes: list[str] = []

    for key in [k for k, v in new.items() if v is None]:
        del new[key]
        changes.append(f"{key}: (empty) removed")

    data = new.get("data")
    init = data.get("init_args") if isinstance(data, dict) else None
    if not isinstance(init, dict) or not init.get("data_path"):
        raise MidtrainError(f"{source}: data.init_args.data_path is not set; there is no shard mixture to migrate.")
    old_class = data.get("class_path")
    if old_class != DATA:
        data["class_path"] = DATA
        why = "same fields, midtrain's module" if old_class == FORK_DATA else "data_path must hold litdata token shards"
        changes.append(f"data.class_path: {old_class} -> {DATA} ({why})")
    stale_weight = init.get("mix_weight")
    _mixture(init, changes)
    _drop_unknown(
        "data.init_args.", init, ShardedMixedDataset, changes,
        {"mix_weight": "a stale field: no mixture mode reads it"},
    )
    if not any(init.get(m) for m in MODES):
        init["mix_weights_str"] = "main:1.0"
        why = "no mixture given: the main shards"
        if stale_weight is not None:
            why = f"the stale mix_weight {stale_weight} names no data type: set the mixture you meant"
        changes.append(f'data.init_args.mix_weights_str: "main:1.0" added ({why})')

    train = new.setdefault("train", {})
    iters = train.pop("max_iters", None)
    if iters is not None:
        changes.append(f"train.max_iters: {iters} dropped (a never-reached cap; the fork's length was its LR horizon)")
    if train.get("max_steps") is None:
        train["max_steps"] = max_steps
        changes.append(f"train.max_steps: {max_steps} added (the fork's LR horizon; --max_steps to change)")
    max_steps = int(train["max_steps"])
    _schedule(train, max_steps, changes)
    for key in FLOAT_FIELDS:
        if isinstance(train.get(key), str):
            train[key] = float(train[key])

    notes_changes, notes = translate("pretrain", new)
    apply(new, notes_changes)
    changes += notes
    _drop_unknown("train.", train, TrainArgs, changes, {})
    if isinstance(new.get("eval"), dict):
        _drop_unknown("eval.", new["eval"], EvalArgs, changes, {})

    _resume(new, train, init, source, pretrain_dir, out_dir, max_steps, changes, stale_weight)
    _drop_unknown("", new, PretrainConfig, changes, {})
    if new.get("logger_name") == "wandb":
        changes.append("logger_name: wandb kept (needs the wandb extra: pip install 'midtrain[wandb]')")
    check_section("", new, PretrainConfig)
    return new, changes


def _resume(
    new: dict, train: dict, init: dict, source: str, pretrain_dir: str | None, out_dir: str | None,
    max_steps: int, changes: list[str], stale_weight: object = None,
) -> None:
    """``resume: true`` + ``max_additional_steps`` -> an explicit branch checkpoint, or ``auto`` for a continuation."""
    extra = train.get("max_additional_steps")
    fork_out = new.get("out_dir")
    if new.get("resume") is True and extra is not None and 0 < int(extra) < max_steps:
        branch = max_steps - int(extra)
        if _is_branch(init) or stale_weight is not None:
            base = pretrain_dir or fork_out
            if base is None:
                raise MidtrainError(f"{source}: resume: true without out_dir; pass --pretrain_dir DIR.")
            target = out_dir or (fork_out if pretrain_dir else str(Path(str(base)).parent / Path(source).stem))
            new["resume"] = f"{str(base).rstrip('/')}/step-{branch:08d}"
            new["out_dir"] = target
            changes.append(
                f"resume: true -> {new['resume']} (the branch checkpoint: max_steps {max_steps} - "
                f"max_additional_steps {extra}; --pretrain_dir to change)"
            )
            changes.append(f"out_dir: {fork_out} -> {target} (a branch writes its own run directory; --out_dir)")
            changes.append(
                f"train.max_additional_steps: {extra} kept (counted from the branch step {branch}: ends at {max_steps})"
            )
            return
        new["resume"] = "auto"
        del train["max_additional_steps"]
        changes.append(
            "resume: true -> auto (continues this run's newest checkpoint; main data only, so not a branch)"
        )
        changes.append(
            f"train.max_additional_steps: {extra} dropped (the fork resumed at step {branch}, so it ended at "
            f"{max_steps} = train.max_steps, which midtrain counts absolutely)"
        )
    elif extra is not None and int(extra) >= max_steps:
        del train["max_additional_steps"]
        changes.append(f"train.max_additional_steps: {extra} dropped (>= train.max_steps {max_steps})")
    elif extra is not None:
        changes.append(
            f"train.max_additional_steps: {extra} kept (stop {extra} steps after the start; the LR horizon stays "
            f"max_steps {max_steps})"
        )
    if out_dir:
        changes.append(f"out_dir: {new.get('out_dir')} -> {out_dir}")
        new["out_dir"] = out_dir


def migrate_file(
    fork_config: Path, output: Path | None = None, pretrain_dir: str | None = None, out_dir: str | None = None,
    max_steps: int = FORK_HORIZON,
) -> list[str]:
    """Read ``fork_config``, write (or print) the midtrain config, print the changes; return them."""
    path = Path(fork_config)
    if not path.is_file():
        raise MidtrainError(f"{path} does not exist.")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MidtrainError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    new, changes = migrate(cfg, str(path), pretrain_dir, out_dir, max_steps)
    header = f"# Migrated from {path.name} by `midtrain migrate`:\n" + "".join(f"#   {c}\n" for c in changes)
    text = header + yaml.safe_dump(new, sort_keys=False, default_flow_style=False)
    report = [f"{path}: {len(changes)} changes"] + [f"  {c}" for c in changes]
    if output is None:
        print("\n".join(report), file=sys.stderr)
        print(text, end="")
    else:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        print("\n".join(report + [f"wrote {output}"]))
    return changes
