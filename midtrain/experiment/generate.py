"""Per-run configs generated from an experiment file, and the guard that a finished run's config never changes.

Each training node's config is a plain ``pretrain``/``finetune`` config (the schema of
``midtrain_configs/tiny/`` and the paper configs); ``midtrain <command> --config <it>`` reruns the
node by hand. Next to every node's output, ``<out>.experiment.json`` records the config it ran with
and its SHA-256: once the output exists, a changed experiment file that would change that config is
refused instead of mixing two configs in one run directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from midtrain.errors import MidtrainError
from midtrain.experiment.graph import Node, build, run_dir
from midtrain.experiment.spec import BASE_NAME, MIXTURE_MODES, Experiment
from midtrain.rundir import FINAL_DIR, HPARAMS_FILE, SUMMARY_FILE, checkpoint_name

MIXTURE_FIELDS = (*MIXTURE_MODES, "stages")
"""What a branch's mixture replaces in the base config's data fields."""
RECORD_SUFFIX = ".experiment.json"


@dataclass
class Plan:
    """The experiment, its nodes (dependency order) and each node's config."""

    exp: Experiment
    nodes: list[Node]
    configs: dict[str, dict]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)


def read_config(path: str, where: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MidtrainError(f"{where}: config {path} does not exist (paths are relative to the working directory).")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise MidtrainError(f"{where}: {path} is not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise MidtrainError(f"{where}: {path} must hold a mapping of options.")
    return data


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """``cfg["a"]["b"] = value`` for ``key="a.b"`` (a dotted override, as on the command line)."""
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(cfg.get(part), dict):
            cfg[part] = {}
        cfg = cfg[part]
    cfg[leaf] = copy.deepcopy(value)


def _with(cfg: dict, overrides: dict[str, Any]) -> dict:
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        set_dotted(out, key, value)
    return out


def _init_args(cfg: dict, where: str) -> dict:
    data = cfg.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("init_args"), dict):
        raise MidtrainError(f"{where}: the config has no data.init_args to set the mixture in.")
    return data["init_args"]


def _base_run_config(exp: Experiment) -> dict:
    cfg = _with(read_config(exp.base.config, f"{exp.source}: base.config"), exp.base.overrides)
    cfg["out_dir"] = str(exp.root / "runs" / BASE_NAME)
    cfg["resume"] = "auto"
    train = cfg.setdefault("train", {})
    train.pop("max_additional_steps", None)
    if train.get("keep_last_checkpoints"):
        raise MidtrainError(f"{exp.source}: base: train.keep_last_checkpoints would delete the checkpoints the "
                            "branches start from; remove it (base.overrides: {train.keep_last_checkpoints: null}).")
    return cfg


def _max_steps(cfg: dict, where: str) -> int:
    steps = (cfg.get("train") or {}).get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MidtrainError(f"{where}: train.max_steps must be a positive integer (the run's length), got {steps!r}.")
    return steps


def plan(exp: Experiment) -> Plan:
    """Build every node and its config (reads the base and fine-tuning configs; writes nothing)."""
    base = _base_run_config(exp) if exp.base.config else None
    max_steps = _max_steps(base, f"{exp.source}: base.config {exp.base.config}") if base else None
    nodes = build(exp, max_steps)
    configs: dict[str, dict] = {}
    branches = {b.name: b for b in exp.branches}
    ft_cfg = read_config(exp.finetune.config, f"{exp.source}: finetune.config") if exp.finetune else None
    for node in nodes:
        if node.kind == "pretrain":
            cfg = copy.deepcopy(base)
            if node.end_step != max_steps:
                cfg["train"]["max_additional_steps"] = node.end_step  # the base run's branch point is step 0
        elif node.kind == "branch":
            b = branches[node.name]
            if base is not None:
                cfg = copy.deepcopy(base)
            else:
                start = Path(exp.base.run) / checkpoint_name(b.at_step)
                hparams = start / HPARAMS_FILE
                if not hparams.is_file():
                    raise MidtrainError(f"{exp.source}: branches.{b.name}: base.run has no checkpoint {start} "
                                        "(with its {HPARAMS_FILE}) to branch from.")
                cfg = read_config(str(hparams), f"branches.{b.name}")
            start = run_dir(nodes, BASE_NAME) if base is not None else Path(exp.base.run)
            cfg["resume"] = str(start / checkpoint_name(b.at_step))
            cfg["out_dir"] = str(node.out)
            cfg.setdefault("train", {}).pop("max_additional_steps", None)
            init = _init_args(cfg, f"{exp.source}: branches.{b.name}")
            for key in MIXTURE_FIELDS:
                init.pop(key, None)
            if isinstance(b.mixture, dict):
                init.update(copy.deepcopy(b.mixture))
            else:
                is_file = b.mixture.endswith((".json", ".yaml", ".yml"))
                init["mix_config_path" if is_file else "mix_weights_str"] = b.mixture
            cfg = _with(cfg, b.overrides)
            node.end_step = _end_step(cfg, b.at_step, f"{exp.source}: branches.{b.name}")
        elif node.kind == "finetune":
            cfg = _finetune_config(exp, ft_cfg, node, nodes)
        elif node.kind == "evaluate":
            ev = exp.evaluate
            cfg = {"checkpoints": [str(Path(configs[node.deps[0]]["out_dir"]) / FINAL_DIR)], "val": dict(ev.val),
                   "out": str(node.out), **copy.deepcopy(ev.options)}
            if ev.tasks:
                cfg["tasks"] = ",".join(ev.tasks)
        else:
            rep = exp.report
            runs = [str(n.out) for n in nodes if n.kind in ("branch", "finetune") or n.name == BASE_NAME]
            if base is None:
                runs.insert(0, exp.base.run)
            cfg = {"runs": runs, "out": str(node.out), "in_domain": rep.in_domain}
            if rep.general:
                cfg["general"] = rep.general
        configs[node.name] = cfg
    return Plan(exp, nodes, configs)


def _end_step(cfg: dict, start: int, where: str) -> int:
    steps = _max_steps(cfg, where)
    extra = cfg["train"].get("max_additional_steps")
    end = min(steps, start + extra) if extra else steps
    if end <= start:
        raise MidtrainError(f"{where}: starts at step {start} and ends at step {end} (train.max_steps / "
                            "max_additional_steps): nothing to train.")
    return end


def _finetune_config(exp: Experiment, ft_cfg: dict, node: Node, nodes: list[Node]) -> dict:
    ft = exp.finetune
    target, sft_set, ratio, seed = (node.params[k] for k in ("target", "set", "ratio", "seed"))
    cfg = copy.deepcopy(ft_cfg)
    source = run_dir(nodes, target) if any(n.name == target for n in nodes) else Path(exp.base.run)
    cfg["checkpoint_dir"] = str(source / FINAL_DIR)
    cfg["out_dir"] = str(node.out)
    cfg["seed"] = seed
    data = cfg.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("init_args"), dict):
        raise MidtrainError(f"{exp.source}: finetune.config {ft.config} has no data.init_args to set the SFT set in.")
    data["init_args"]["json_path"] = ft.sets[sft_set]
    set_overrides = ft.for_set(sft_set)[3]
    if ratio:
        replay = cfg.get("replay") if isinstance(cfg.get("replay"), dict) else {}
        replay_data = ft.replay_data or replay.get("data")
        if not replay_data:
            raise MidtrainError(f"{exp.source}: finetune.replay_data: replay ratio {ratio:g} needs the pretraining "
                                f"data to replay (data_path, mix_weights_str), and {ft.config} has no replay.data.")
        cfg["replay"] = {**replay, "ratio": ratio, "data": copy.deepcopy(replay_data)}
    else:
        cfg.pop("replay", None)
    return _with(_with(cfg, ft.overrides), set_overrides)


# ------------------------------------------------------------------------------------ records
def digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def record_path(out: Path) -> Path:
    return out.with_name(out.name + RECORD_SUFFIX)


def started(node: Node) -> bool:
    """The node's output exists: a run directory with a checkpoint or summary, a CSV, a report."""
    out = node.out
    if node.kind in ("pretrain", "branch", "finetune"):
        return out.is_dir() and (any(out.glob("step-*")) or (out / SUMMARY_FILE).exists())
    return out.exists()


def _diff(old: Any, new: Any, key: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _diff(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def check_unchanged(p: Plan) -> None:
    """Refuse when a node whose output exists would now run with another config than the one recorded."""
    for node in p.nodes:
        if node.run:  # a segment: the base run's record covers it
            continue
        rec = record_path(node.out)
        if not rec.is_file() or not started(node):
            continue
        old = json.loads(rec.read_text(encoding="utf-8"))
        if old.get("sha256") != digest(p.configs[node.name]):
            changes = "; ".join(_diff(old.get("config"), p.configs[node.name])[:3])
            raise MidtrainError(f"{p.exp.source}: node {node.name} already ran in {node.out} with another config "
                                f"({changes}); rename it (or the experiment root) or delete {node.out}.")


def write(p: Plan) -> None:
    """Write every node's config under ``<root>/configs/`` and its record next to its output (after the check)."""
    check_unchanged(p)
    for node in p.nodes:
        text = (f"# GENERATED by `midtrain experiment` from {p.exp.source} (node {node.name}, kind {node.kind}).\n"
                f"# Rerun by hand: midtrain {node.command} --config {node.config}\n")
        node.config.parent.mkdir(parents=True, exist_ok=True)
        node.config.write_text(text + yaml.safe_dump(p.configs[node.name], sort_keys=False))
        if not node.run:
            cfg = p.configs[node.name]
            rec = record_path(node.out)
            rec.parent.mkdir(parents=True, exist_ok=True)
            tmp = rec.with_name(rec.name + ".tmp")
            tmp.write_text(json.dumps({"experiment": p.exp.name, "node": node.name, "config_file": str(node.config),
                                       "sha256": digest(cfg), "config": cfg}, indent=1, default=str))
            tmp.replace(rec)
