"""Check a command's config against its options before jsonargparse sees it.

jsonargparse reports a bad key or value deep inside a "Does not validate against any of the Union
subtypes" dump; these checks name the field, the valid choices and the closest match in one line.
They also recognise the research fork's configs (one line: run ``midtrain migrate``) and translate
litgpt's field names (``midtrain.config.litgpt_names``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable
from importlib import import_module
from typing import Any, Literal

from midtrain.errors import MidtrainError

CLASS_ALIASES = {"litgpt.data.ShardedMixedDataset": "midtrain.data.ShardedMixedDataset"}


def closest(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` when a choice is close to ``name``, else an empty string."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown_key(where: str, key: str, valid: list[str]) -> MidtrainError:
    what = "field" if where else "option"
    return MidtrainError(f"{where}{key}: unknown {what}{closest(key, valid)}. Valid: {', '.join(sorted(valid))}.")


def _hints(obj: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # unresolvable annotations: skip the value checks, keep the key checks
        return {}


def fields_of(obj: Callable) -> dict[str, Any] | None:
    """Accepted keyword fields of a function, dataclass or class -> type hint; None when it takes ``**kwargs``."""
    if dataclasses.is_dataclass(obj):
        hints = _hints(obj)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(obj) if f.init}
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    hints = _hints(target)
    return {n: hints.get(n, Any) for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL}


def import_class(path: str) -> Any:
    path = CLASS_ALIASES.get(path, path)
    module, _, name = path.rpartition(".")
    try:
        return getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _subclass_named(name: str, bases: list[type]) -> type | None:
    """A short ``class_path`` (``JSON``) names a subclass of the option's type, as jsonargparse resolves it."""
    todo = list(bases)
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _members(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(hint) for m in _members(a)]
    return [hint]


def check_value(where: str, value: Any, hint: Any) -> None:
    """Check ``value`` against ``hint`` where a one-line message beats jsonargparse's: choices, sections."""
    members = _members(hint)
    literals = [a for m in members if typing.get_origin(m) is Literal for a in typing.get_args(m)]
    if literals and not any(typing.get_origin(m) is not Literal and m is not type(None) for m in members):
        if value not in literals and value is not None:
            raise MidtrainError(f"{where}: {value!r} is not a valid choice; choose one of {literals}.")
        return
    if value is None or not isinstance(value, dict) or any(m is dict or typing.get_origin(m) is dict for m in members):
        return  # a plain mapping is a valid value (e.g. optimizer: {class_path, init_args} for ``str | dict``)
    classes = [m for m in members if inspect.isclass(m) and m.__module__ != "builtins"]
    sections = [m for m in members if dataclasses.is_dataclass(m)]
    if len(sections) == 1 and "class_path" not in value:
        check_section(where + ".", value, sections[0])
    elif classes and "class_path" in value:
        cls = import_class(str(value["class_path"])) or _subclass_named(str(value["class_path"]), classes)
        if cls is None:
            raise MidtrainError(f"{where}.class_path: cannot import {value['class_path']!r}.")
        if not any(issubclass(cls, c) for c in classes if inspect.isclass(c)):
            names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in classes)
            raise MidtrainError(f"{where}.class_path: {value['class_path']} is not a {names}.")
        extra = sorted(set(value) - {"class_path", "init_args", "dict_kwargs"})
        if extra:
            raise MidtrainError(f"{where}: {extra} belong under {where}.init_args.")
        check_section(where + ".init_args.", value.get("init_args") or {}, cls)


def check_section(where: str, values: dict, target: Callable) -> None:
    """Every key of ``values`` is a field of ``target``, and each value fits where checked."""
    accepted = fields_of(target)
    if accepted is None or not isinstance(values, dict):
        return
    for key, value in values.items():
        if key not in accepted:
            raise unknown_key(where, str(key), list(accepted))
        check_value(f"{where}{key}", value, accepted[key])
