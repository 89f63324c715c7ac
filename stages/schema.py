"""The checking machinery behind params.yaml's dataclasses: a mapping becomes a frozen dataclass, and
every problem (unknown key, missing key, wrong type, out-of-range value) is collected with its key and
the fix, so stages/params.py can raise them all at once."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from stages.errors import StageError


class ParamsError(StageError):
    """Raised with every problem found in params.yaml, one per line."""


def check(condition: bool, message: str) -> list[str]:
    return [] if condition else [message]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in inner)
        return names + " or null" if type(None) in typing.get_args(annotation) else names
    if origin is list:
        return "a list of " + {str: "strings", int: "integers"}[typing.get_args(annotation)[0]]
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[annotation]


def _convert(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Return (ok, converted value) for one YAML value against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation), value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in typing.get_args(annotation), None
        for inner in (a for a in typing.get_args(annotation) if a is not type(None)):
            ok, converted = _convert(value, inner)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        converted = [_convert(v, typing.get_args(annotation)[0]) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        # YAML ints are fine where a float is expected; bools are not
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    return isinstance(value, annotation), value


def _float_hint(value: Any) -> str:
    # PyYAML reads 1e-4 (no dot) as a string; tell the user the spelling that works
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (PyYAML reads numbers like 1e-4 as strings: write 1.0e-4)"
    return ""


def build(cls: type, raw: Any, section: str, problems: list[str], skip: tuple[str, ...] = ()) -> Any:
    """Build dataclass `cls` from a mapping, appending every problem found to `problems`; fields in
    `skip` are left to their defaults (set by the caller)."""
    if not isinstance(raw, dict):
        problems.append(f"{section}: must be a mapping of keys to values, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)} - set(skip)
    for key in sorted(set(raw) - fields):
        problems.append(f"{section}.{key}: unknown key; valid keys are {', '.join(sorted(fields))}")
    values, ok_all = {}, True
    for name in sorted(fields):
        key = f"{section}.{name}"
        if name not in raw:
            problems.append(f"{key}: missing; add it to params.yaml")
            ok_all = False
            continue
        if dataclasses.is_dataclass(hints[name]):
            values[name] = build(hints[name], raw[name], key, problems)
            ok_all = ok_all and values[name] is not None
            continue
        ok, values[name] = _convert(raw[name], hints[name])
        if not ok:
            problems.append(
                f"{key}: expected {_type_name(hints[name])}, got {raw[name]!r}"
                + (_float_hint(raw[name]) if float in _leaf_types(hints[name]) else "")
            )
            ok_all = False
    if not ok_all:
        return None
    instance = cls(**values)
    if hasattr(instance, "problems"):
        problems.extend(instance.problems(section))
    return instance


def _leaf_types(annotation: Any) -> tuple:
    args = typing.get_args(annotation)
    return args if args else (annotation,)
