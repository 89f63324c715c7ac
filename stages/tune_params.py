"""The tuning protocol's section of params.yaml (`tune`): how many trials every method gets and each
method's search space, checked with the rest of the file (stages/params.py). scripts/tune.py runs the
protocol; stages/search.py draws the trials from a space.

A space maps a method's params to what is tried:
    learning_rate: {log: [2.0e-4, 3.0e-3]}   # log-uniform between the bounds
    warmup_ratio: {range: [0.0, 0.1]}        # uniform between the bounds
    r: [8, 16, 32]                           # these values
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from stages.schema import check

KINDS = ("log", "range")  # the two continuous kinds; a list is the third


@dataclass(frozen=True)
class Dimension:
    """One tuned param: `values` tried as listed, or a continuous `kind` between `low` and `high`."""

    kind: str  # "values", "log" or "range"
    values: tuple = ()  # kind "values"
    low: float = 0.0  # kinds "log" and "range"
    high: float = 0.0

    def describe(self) -> str:
        if self.kind == "values":
            return "[" + ", ".join(map(str, self.values)) + "]"
        return f"{self.kind} {self.low:g}..{self.high:g}"

    def as_data(self) -> Any:
        """As params.yaml writes it (recorded in metrics/tuning.json)."""
        return list(self.values) if self.kind == "values" else {self.kind: [self.low, self.high]}


@dataclass(frozen=True)
class TuneParams:
    trials: int  # per method: the same budget for every method
    space: dict[str, dict[str, Dimension]]  # method section -> its param -> what is tried


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def dimension(key: str, spec: Any, problems: list[str]) -> Dimension | None:
    """One param's spec: a list of values, {log: [low, high]} or {range: [low, high]}."""
    if isinstance(spec, list):
        if not spec or len({repr(v) for v in spec}) < len(spec):
            problems.append(f"{key}: a list of values must name at least one value, each once, got {spec}")
            return None
        return Dimension("values", tuple(spec))
    bounds = spec.get(next(iter(spec))) if isinstance(spec, dict) and len(spec) == 1 else None
    kind = next(iter(spec)) if bounds is not None else None
    if kind not in KINDS or not (isinstance(bounds, list) and len(bounds) == 2 and all(map(number, bounds))):
        problems.append(
            f"{key}: expected a list of values, {{log: [low, high]}} or {{range: [low, high]}}, got {spec!r}"
        )
        return None
    low, high = (float(b) for b in bounds)
    if not low < high or (kind == "log" and low <= 0):
        problems.append(
            f"{key}: {kind} bounds must satisfy {'0 < ' if kind == 'log' else ''}low < high, got [{low:g}, {high:g}]"
        )
        return None
    return Dimension(kind, low=low, high=high)


def candidates(dim: Dimension) -> tuple:
    """The values a dimension can hand a method: each listed value, or both bounds."""
    return dim.values if dim.kind == "values" else (dim.low, dim.high)


def method_space(
    method: str,
    raw: Any,
    trials: int,
    section_problems: Callable[[str, dict], list[str] | None],
    problems: list[str],
) -> dict[str, Dimension] | None:
    """One method's space, each value checked as that method's param (`section_problems(method, edits)`
    returns the problems of the method's section with `edits` applied, or None if it has no section)."""
    key = f"tune.space.{method}"
    if not isinstance(raw, dict) or not raw:
        problems.append(
            f"{key}: must map the method's params to what is tried, e.g. {{learning_rate: {{log: [1.0e-4, 1.0e-2]}}}}"
        )
        return None
    if section_problems(method, {}) is None:
        problems.append(f"{key}: {method} is not a method section of params.yaml; tune one that is")
        return None
    space, before = {}, len(problems)
    for name, spec in raw.items():
        if name == "type":
            problems.append(f"{key}.type: a method's type is what is compared, not a setting to tune")
            continue
        dim = dimension(f"{key}.{name}", spec, problems)
        if dim is not None:
            failing: dict[str, list] = {}  # each problem once, with the values that have it
            for value in candidates(dim):
                for problem in section_problems(method, {name: value}) or []:
                    failing.setdefault(problem, []).append(value)
            problems.extend(f"{key}.{name}: {', '.join(map(repr, v))} cannot train: {p}" for p, v in failing.items())
            space[name] = dim
    if len(problems) > before:
        return None
    discrete = [d for d in space.values() if d.kind == "values"]
    settings = math.prod(len(d.values) for d in discrete)
    problems.extend(
        check(
            len(discrete) < len(space) or settings >= trials,
            f"{key}: only {settings} distinct settings, fewer than tune.trials ({trials}): identical trials would "
            "train the same model twice; add values or a {log: [low, high]} range, or lower tune.trials",
        )
    )
    return space


def parse_tune(
    raw: Any, section_problems: Callable[[str, dict], list[str] | None], problems: list[str]
) -> TuneParams | None:
    """The `tune` section, every problem appended to `problems`."""
    if not isinstance(raw, dict):
        problems.append(
            "tune: missing; add the tuning protocol (tune: {trials: 6, space: {...}})"
            if raw is None
            else "tune: must be a mapping"
        )
        return None
    for key in sorted(set(raw) - {"trials", "space"}):
        problems.append(f"tune.{key}: unknown key; valid keys are space, trials")
    trials = raw.get("trials")
    if not (isinstance(trials, int) and not isinstance(trials, bool) and trials >= 2):
        problems.append(f"tune.trials: must be an integer >= 2 (a pick needs something to choose from), got {trials!r}")
        return None
    spaces = raw.get("space")
    if not isinstance(spaces, dict):
        problems.append(f"tune.space: must map method sections to their search spaces, got {spaces!r}")
        return None
    space = {m: method_space(m, s, trials, section_problems, problems) for m, s in spaces.items()}
    return TuneParams(trials, {m: s for m, s in space.items() if s is not None})
