"""The experiment file: one YAML naming a study, validated section by section when loaded.

Every error is one line naming the file, the field and the valid choices (``MidtrainError``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from midtrain.config.yaml_check import unknown_key
from midtrain.errors import MidtrainError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
BASE_NAME = "base"
"""The name of the base run's end among the fine-tuning targets (``finetune.branches``)."""
MIXTURE_MODES = ("mix_weights_str", "literal_weights_str", "mix_config_path", "proportional_sampling",
                 "proportional_multipliers")
"""The data fields a branch's ``mixture`` mapping may set (one mixture mode of ShardedMixedDataset)."""
CLAIMS = ("midtrain_vs_base", "midtrain_vs_cpt", "forgetting", "replay_efficiency", "timing", "percentage")
"""The papers' claims a report can name (``report.claims``)."""


@dataclass(frozen=True)
class Base:
    """The base pretraining run: a config to train (``config``) or an existing run directory (``run``)."""

    config: str | None = None
    run: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Branch:
    """A new run from the base run's checkpoint at ``at_step`` with another ``mixture``."""

    name: str
    at_step: int
    mixture: str | dict[str, Any]
    """``"main:0.8,code:0.2"`` (mix_weights_str), a mixture file (``.json``/``.yaml``: mix_config_path), or a
    mapping of the data fields of one mixture mode (``{literal_weights_str: {...}}``)."""
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finetune:
    """Every target (the branches, or ``branches``; ``base`` = the base run's end) x sets x replay x seeds."""

    config: str
    sets: dict[str, str]
    replay: tuple[float, ...] = (0.0,)
    seeds: tuple[int, ...] = (42,)
    branches: tuple[str, ...] | None = None
    replay_data: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    set_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per set written as a mapping (``{path, branches, replay, seeds, overrides}``): what it sets for itself."""

    def for_set(self, name: str) -> tuple[tuple[str, ...] | None, tuple[float, ...], tuple[int, ...], dict]:
        """The set's targets (None: the finetune-level choice), replay ratios, seeds and extra overrides."""
        opts = self.set_options.get(name, {})
        return (opts.get("branches", self.branches), opts.get("replay", self.replay), opts.get("seeds", self.seeds),
                opts.get("overrides", {}))


@dataclass(frozen=True)
class Evaluate:
    """Every fine-tuned model on the validation sets ``val`` (name -> path) and lm-eval ``tasks``."""

    val: dict[str, str]
    tasks: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    """Further ``midtrain evaluate`` options (max_samples, batch_size, accelerator, max_seq_length, ...)."""


@dataclass(frozen=True)
class Report:
    """One report over every run: the in-domain set, the general (forgetting) set, the claims to test."""

    in_domain: str = "sft"
    general: str | None = None
    claims: tuple[str | dict[str, str], ...] = ()
    """Claim names, or ``{claim: NAME, metric: TASK/METRIC}`` to judge a claim on a benchmark metric."""


@dataclass(frozen=True)
class Experiment:
    """A whole study (see ``load``)."""

    name: str
    root: Path
    base: Base
    branches: tuple[Branch, ...] = ()
    finetune: Finetune | None = None
    evaluate: Evaluate | None = None
    report: Report | None = None
    source: Path = Path("experiment.yaml")


def _err(src: Path, where: str, what: str) -> MidtrainError:
    return MidtrainError(f"{src}: {where}: {what}")


def _mapping(src: Path, where: str, value: Any, cls: type) -> dict:
    if not isinstance(value, dict):
        raise _err(src, where, f"expected a mapping of {', '.join(f.name for f in fields(cls))}, got {value!r}")
    valid = [f.name for f in fields(cls) if f.name not in ("name", "set_options")]
    for key in value:
        if key not in valid:
            raise MidtrainError(f"{src}: {unknown_key(f'{where}.', str(key), valid)}")
    return value


def _name(src: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise _err(src, where, f"{value!r} is not a valid name (letters, digits, '.', '_', '+', '-')")
    return value


def _str(src: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _err(src, where, f"expected a non-empty string, got {value!r}")
    return value


def _overrides(src: Path, where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _err(src, where, f"expected a mapping of dotted config keys to values, got {value!r}")
    return dict(value)


def _paths(src: Path, where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise _err(src, where, f"expected a mapping of names to paths, got {value!r}")
    return {_name(src, f"{where}.{k}", k): _str(src, f"{where}.{k}", v) for k, v in value.items()}


def _list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _base(src: Path, raw: Any) -> Base:
    raw = _mapping(src, "base", raw, Base)
    if ("config" in raw) == ("run" in raw):
        raise _err(src, "base", "give exactly one of config (a pretrain config to run) or run (an existing run dir)")
    if "run" in raw and raw.get("overrides"):
        raise _err(src, "base.overrides", "an existing run (base.run) is not trained again; remove the overrides")
    key = "config" if "config" in raw else "run"
    return Base(**{key: _str(src, f"base.{key}", raw[key])}, overrides=_overrides(src, "base.overrides",
                                                                                raw.get("overrides")))


def _branches(src: Path, raw: Any) -> tuple[Branch, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _err(src, "branches", f"expected a mapping of branch name to {{at_step, mixture}}, got {raw!r}")
    out = []
    for name, body in raw.items():
        where = f"branches.{name}"
        _name(src, where, name)
        if name == BASE_NAME:
            raise _err(src, where, f"'{BASE_NAME}' names the base run; choose another branch name")
        body = _mapping(src, where, body, Branch)
        for key in ("at_step", "mixture"):
            if key not in body:
                raise _err(src, f"{where}.{key}", "required")
        step = body["at_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise _err(src, f"{where}.at_step", f"expected a positive integer (an optimizer step), got {step!r}")
        mixture = body["mixture"]
        if isinstance(mixture, dict):
            for key in mixture:
                if key not in MIXTURE_MODES:
                    raise _err(src, f"{where}.mixture.{key}", f"not a mixture field; valid: {', '.join(MIXTURE_MODES)}")
        else:
            mixture = _str(src, f"{where}.mixture", mixture)
        out.append(Branch(name, step, mixture,
                          _overrides(src, f"{where}.overrides", body.get("overrides"))))
    return tuple(out)


SET_FIELDS = ("path", "branches", "replay", "seeds", "overrides")
"""A fine-tuning set written as a mapping: its path and what it sets for itself instead of the finetune section."""


def _ratios(src: Path, where: str, raw: Any) -> tuple[float, ...]:
    ratios = _list(raw)
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise _err(src, where, f"replay ratios must be numbers in [0, 1), got {r!r}")
    return tuple(float(r) for r in dict.fromkeys(ratios))


def _seeds(src: Path, where: str, raw: Any) -> tuple[int, ...]:
    seeds = _list(raw)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise _err(src, where, f"seeds must be integers, got {s!r}")
    return tuple(dict.fromkeys(seeds))


def _targets(src: Path, where: str, raw: Any, branches: tuple[Branch, ...]) -> tuple[str, ...]:
    valid = [BASE_NAME, *(b.name for b in branches)]
    targets = _list(raw)
    for t in targets:
        if t not in valid:
            raise _err(src, where, f"{t!r} is not a branch; valid: {', '.join(valid)}")
    return tuple(targets)


def _sets(src: Path, raw: Any, branches: tuple[Branch, ...]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """``finetune.sets``: name -> path, or name -> ``{path, branches, replay, seeds, overrides}``."""
    if not isinstance(raw, dict) or not raw:
        raise _err(src, "finetune.sets", f"expected a mapping of names to paths, got {raw!r}")
    paths, options = {}, {}
    for name, value in raw.items():
        where = f"finetune.sets.{name}"
        _name(src, where, name)
        if not isinstance(value, dict):
            paths[name] = _str(src, where, value)
            continue
        for key in value:
            if key not in SET_FIELDS:
                raise MidtrainError(f"{src}: {unknown_key(f'{where}.', str(key), list(SET_FIELDS))}")
        if "path" not in value:
            raise _err(src, f"{where}.path", "required")
        paths[name] = _str(src, f"{where}.path", value["path"])
        parse = {"branches": lambda w, v: _targets(src, w, v, branches), "replay": lambda w, v: _ratios(src, w, v),
                 "seeds": lambda w, v: _seeds(src, w, v), "overrides": lambda w, v: _overrides(src, w, v)}
        options[name] = {k: parse[k](f"{where}.{k}", v) for k, v in value.items() if k != "path"}
    return paths, options


def _finetune(src: Path, raw: Any, branches: tuple[Branch, ...]) -> Finetune | None:
    if raw is None:
        return None
    raw = _mapping(src, "finetune", raw, Finetune)
    for key in ("config", "sets"):
        if key not in raw:
            raise _err(src, f"finetune.{key}", "required")
    targets = raw.get("branches")
    if targets is not None:
        targets = _targets(src, "finetune.branches", targets, branches)
    replay_data = raw.get("replay_data")
    if replay_data is not None and not isinstance(replay_data, dict):
        raise _err(src, "finetune.replay_data", f"expected the replay data fields (data_path, mix_weights_str, ...), "
                   f"got {replay_data!r}")
    sets, options = _sets(src, raw["sets"], branches)
    return Finetune(_str(src, "finetune.config", raw["config"]), sets,
                    _ratios(src, "finetune.replay", raw.get("replay", [0.0])),
                    _seeds(src, "finetune.seeds", raw.get("seeds", [42])), targets,
                    replay_data, _overrides(src, "finetune.overrides", raw.get("overrides")), options)


def _evaluate(src: Path, raw: Any) -> Evaluate | None:
    if raw is None:
        return None
    raw = _mapping(src, "evaluate", raw, Evaluate)
    if "val" not in raw:
        raise _err(src, "evaluate.val", "required (name: path of each validation set)")
    tasks = tuple(_str(src, "evaluate.tasks", t) for t in _list(raw.get("tasks") or []))
    options = _overrides(src, "evaluate.options", raw.get("options"))
    for key in ("checkpoints", "val", "out", "tasks"):
        if key in options:
            raise _err(src, f"evaluate.options.{key}", "set by the experiment; remove it")
    return Evaluate(_paths(src, "evaluate.val", raw["val"]), tasks, options)


def _claim_metric(src: Path, claim: dict, tasks: tuple[str, ...]) -> None:
    """A claim written ``{claim: NAME, metric: "TASK/METRIC"}``: judged on a benchmark metric of ``evaluate.tasks``."""
    where = f"report.claims.{claim['claim']}"
    for key in claim:
        if key not in ("claim", "metric"):
            raise MidtrainError(f"{src}: {unknown_key(f'{where}.', str(key), ['claim', 'metric'])}")
    metric = claim.get("metric")
    task, _, name = str(metric).partition("/")
    if not isinstance(metric, str) or not name:
        raise _err(src, f"{where}.metric", f"expected TASK/METRIC (e.g. 'arc_easy/acc'), got {metric!r}")
    if task not in tasks:
        raise _err(src, f"{where}.metric", f"task {task!r} is not among evaluate.tasks {list(tasks)}; add it there")


def _report(src: Path, raw: Any, tasks: tuple[str, ...] = ()) -> Report | None:
    if raw is None:
        return None
    raw = _mapping(src, "report", raw, Report)
    claims = tuple(_list(raw.get("claims") or []))
    for c in claims:
        name = c.get("claim") if isinstance(c, dict) else c
        if name not in CLAIMS:
            raise _err(src, "report.claims", f"unknown claim {name!r}; valid: {', '.join(CLAIMS)}")
        if isinstance(c, dict):
            _claim_metric(src, c, tasks)
    general = raw.get("general")
    return Report(_str(src, "report.in_domain", raw.get("in_domain", "sft")),
                  None if general is None else _str(src, "report.general", general), claims)


TOP = ("name", "root", "base", "branches", "finetune", "evaluate", "report")


def load(path: Path | str) -> Experiment:
    """Read and validate an experiment file."""
    src = Path(path)
    if not src.is_file():
        raise MidtrainError(f"experiment file {src} does not exist.")
    try:
        raw = yaml.safe_load(src.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MidtrainError(f"{src} is not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise MidtrainError(f"{src} must hold a mapping with {', '.join(TOP)}.")
    for key in raw:
        if key not in TOP:
            raise MidtrainError(f"{src}: {unknown_key('', str(key), list(TOP))}".replace("option", "field"))
    for key in ("name", "root", "base"):
        if key not in raw:
            raise _err(src, key, "required")
    branches = _branches(src, raw.get("branches"))
    evaluate = _evaluate(src, raw.get("evaluate"))
    finetune = _finetune(src, raw.get("finetune"), branches)
    if evaluate is not None and finetune is None:
        raise _err(src, "evaluate", "evaluates the fine-tuned models; add a finetune section")
    return Experiment(_name(src, "name", raw["name"]), Path(_str(src, "root", raw["root"])), _base(src, raw["base"]),
                      branches, finetune, evaluate,
                      _report(src, raw.get("report"), evaluate.tasks if evaluate else ()), src)
