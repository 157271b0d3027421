"""Mixture specs -> an explicit per-shard weight table.

Exactly one mode per spec:

* **literal** ``literal_weights_str: "main/1:0.8,q1:0.1,q2:0.1"`` (or a mapping): weights per shard
  ID. Every ID must exist on disk.
* **weighted** ``mix_weights_str: "main:0.8,code:0.2"`` (or a mapping): weights per *type*, divided
  equally across that type's shards (``divide_by_tokens: true`` divides by token count instead).
  A type with weight > 0 and no shards is an error.
* **proportional** ``proportional_sampling: true``: every shard weighted by its token count, times
  an optional per-type multiplier (``proportional_multipliers: {code: 2.0}``).
* ``mix_config_path``: a JSON or YAML file holding the fields of one of the modes above.

Weights are normalised to sum to 1. Shards on disk that the spec does not name get weight 0 and
are listed as such; nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from midtrain.data.shards import MAIN_TYPE, Shard, shard_type_table
from midtrain.errors import MidtrainError

MODE_FIELDS = ("mix_weights_str", "literal_weights_str", "proportional_sampling", "mix_config_path")


@dataclass
class MixtureSpec:
    """The user-facing mixture fields (same names as the research fork's config)."""

    mix_weights_str: str | dict[str, float] | None = None
    literal_weights_str: str | dict[str, float] | None = None
    proportional_sampling: bool = False
    mix_config_path: str | None = None
    divide_by_tokens: bool = False
    proportional_multipliers: dict[str, float] | None = None

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "mixture") -> MixtureSpec:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MidtrainError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(names)}.")
        return cls(**data)

    def modes(self) -> list[str]:
        given = []
        if self.mix_weights_str not in (None, "", {}):
            given.append("mix_weights_str")
        if self.literal_weights_str not in (None, "", {}):
            given.append("literal_weights_str")
        if self.proportional_sampling:
            given.append("proportional_sampling")
        if self.mix_config_path:
            given.append("mix_config_path")
        return given


@dataclass
class MixtureRow:
    shard: Shard
    weight: float


@dataclass
class Mixture:
    """A resolved mixture: one row per discovered shard (weight 0 = not sampled)."""

    mode: str
    description: str
    rows: list[MixtureRow] = field(default_factory=list)

    @property
    def active(self) -> list[MixtureRow]:
        return [r for r in self.rows if r.weight > 0]

    def weights_by_id(self) -> dict[str, float]:
        return {r.shard.id: r.weight for r in self.active}

    def weights_by_type(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.active:
            out[r.shard.type] = out.get(r.shard.type, 0.0) + r.weight
        return out

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "description": self.description,
            "shards": [
                {
                    "id": r.shard.id,
                    "type": r.shard.type,
                    "path": str(r.shard.path),
                    "tokens": r.shard.tokens,
                    "weight": r.weight,
                }
                for r in self.rows
            ],
        }


def parse_weights(value: str | dict[str, float], field_name: str) -> dict[str, float]:
    """Parse ``"a:0.8,b:0.2"`` (or a mapping) into ``{name: weight}``; reject malformed or negative input."""
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if part.count(":") < 1:
                raise MidtrainError(
                    f"{field_name}: malformed entry {part!r} in {value!r}; expected 'name:weight' pairs separated "
                    "by commas, e.g. 'main:0.8,code:0.2'."
                )
            name, _, weight = part.rpartition(":")
            items.append((name.strip(), weight.strip()))
    else:
        raise MidtrainError(f"{field_name} must be a string like 'main:0.8,code:0.2' or a mapping, got {value!r}.")
    weights: dict[str, float] = {}
    for name, raw in items:
        try:
            w = float(raw)
        except (TypeError, ValueError):
            raise MidtrainError(f"{field_name}: weight {raw!r} of {name!r} is not a number.") from None
        if not math.isfinite(w) or w < 0:
            raise MidtrainError(f"{field_name}: weight of {name!r} is {raw}; weights must be finite and >= 0.")
        if not name:
            raise MidtrainError(f"{field_name}: an entry has an empty name in {value!r}.")
        if name in weights:
            raise MidtrainError(f"{field_name}: {name!r} is given twice.")
        weights[name] = w
    if not weights:
        raise MidtrainError(f"{field_name} is empty; give at least one 'name:weight' pair.")
    if sum(weights.values()) <= 0:
        raise MidtrainError(f"{field_name}: all weights are zero in {value!r}; at least one must be > 0.")
    return weights


def load_mix_config(path: str | Path) -> MixtureSpec:
    """Read a JSON/YAML mixture file holding the fields of exactly one mode."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MidtrainError(f"mix_config_path {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text()) if p.suffix in (".yaml", ".yml") else json.loads(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise MidtrainError(f"mix_config_path {p} is not valid {p.suffix.lstrip('.').upper()}: {e}") from e
    if not isinstance(data, dict):
        raise MidtrainError(f"mix_config_path {p} must hold a mapping, got {type(data).__name__}.")
    spec = MixtureSpec.from_mapping(data, where=f"mix_config_path {p}")
    if spec.mix_config_path:
        raise MidtrainError(f"mix_config_path {p} may not point to another mix_config_path.")
    return spec


def resolve_mixture(spec: MixtureSpec, shards: list[Shard], shard_types: dict[str, str] | None = None) -> Mixture:
    """Resolve ``spec`` against the discovered ``shards`` into normalised per-shard weights."""
    modes = spec.modes()
    if len(modes) > 1:
        raise MidtrainError(f"Give exactly one mixture mode; got {len(modes)}: {modes}. Choose one of {MODE_FIELDS}.")
    if not modes:
        raise MidtrainError(f"No mixture given; set one of {MODE_FIELDS}.")
    if modes == ["mix_config_path"]:
        inner = load_mix_config(spec.mix_config_path)
        mixture = resolve_mixture(inner, shards, shard_types)
        mixture.description += f" (from {spec.mix_config_path})"
        return mixture

    types = sorted({MAIN_TYPE, *shard_type_table(shard_types)})
    by_id = {s.id: s for s in shards}
    raw: dict[str, float] = {}
    if modes == ["literal_weights_str"]:
        weights = parse_weights(spec.literal_weights_str, "literal_weights_str")
        for name in weights:
            if name in by_id:
                continue
            if name in types:
                raise MidtrainError(
                    f"literal_weights_str names the type {name!r}, but literal mode takes shard IDs "
                    f"(available: {sorted(by_id)}). For per-type weights use mix_weights_str."
                )
            raise MidtrainError(f"literal_weights_str: shard {name!r} does not exist. Shards on disk: {sorted(by_id)}.")
        raw = {s.id: weights.get(s.id, 0.0) for s in shards}
        mode, desc = "literal", _fmt(weights)
    elif modes == ["mix_weights_str"]:
        weights = parse_weights(spec.mix_weights_str, "mix_weights_str")
        present = sorted({s.type for s in shards})
        for name, w in weights.items():
            if name not in types:
                raise MidtrainError(
                    f"mix_weights_str: unknown type {name!r}. Known types: {types} "
                    "(add new ones with data.shard_types, e.g. {pubmed: pm})."
                )
            if w > 0 and name not in present:
                raise MidtrainError(
                    f"mix_weights_str gives type {name!r} weight {w}, but no {name} shards exist under the data_path "
                    f"(types present: {present})."
                )
        for type_name, w in weights.items():
            members = [s for s in shards if s.type == type_name]
            total = sum(s.tokens for s in members)
            for s in members:
                raw[s.id] = w * (s.tokens / total if spec.divide_by_tokens else 1 / len(members))
        raw = {s.id: raw.get(s.id, 0.0) for s in shards}
        mode = "weighted" + (" (by tokens within type)" if spec.divide_by_tokens else "")
        desc = _fmt(weights)
    else:
        mult = spec.proportional_multipliers or {}
        for name, m in mult.items():
            if name not in types:
                raise MidtrainError(f"proportional_multipliers: unknown type {name!r}. Known types: {types}.")
            if not isinstance(m, (int, float)) or m < 0 or not math.isfinite(m):
                raise MidtrainError(f"proportional_multipliers: {name!r} has {m!r}; multipliers must be >= 0.")
        raw = {s.id: s.tokens * float(mult.get(s.type, 1.0)) for s in shards}
        if sum(raw.values()) <= 0:
            raise MidtrainError("proportional_sampling: every shard ends up with weight 0 (check the multipliers).")
        mode, desc = "proportional", "by tokens" + (f", multipliers {_fmt(mult)}" if mult else "")

    total = sum(raw.values())
    rows = [MixtureRow(shard=s, weight=raw[s.id] / total) for s in shards]
    return Mixture(mode=mode, description=desc, rows=rows)


def spec_to_dict(spec: MixtureSpec) -> dict:
    return {k: v for k, v in asdict(spec).items() if v not in (None, False, {}, "")}


def _fmt(weights: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in weights.items())
