"""Typed, validated view of params.yaml, loaded before any heavy work.

Every section of params.yaml maps to one frozen dataclass: the fixed sections' below, the recipe and
the method sections' in stages/method_params.py, built and checked by stages/schema.py. `load_params` checks the
whole file (unknown keys, wrong types, out-of-range values) and raises one `ParamsError`
that lists every problem with the key and the fix, so a typo costs seconds, not a
download and an hour of training.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from stages.method_params import (
    METHOD_NAME,
    METHOD_TYPES,
    PER_METHOD_KEYS,
    RECIPE_KEYS,
    MethodParams,
    PeftArgs,
    TrainParams,
)
from stages.run_lists import baseline_problems, method_problems, seed_problems, variant_problems
from stages.schema import ParamsError, build, check
from stages.tune_params import TuneParams, parse_tune

PARAMS_FILE = Path("params.yaml")


# attention implementations transformers 5.24 can load a model with (auto: the model's own best
# supported one, transformers' choice: sdpa where the architecture supports it, T5 included)
ATTN_IMPLEMENTATIONS = Literal["auto", "eager", "sdpa", "flex_attention"]


@dataclass(frozen=True)
class ModelParams:
    name: str
    revision: str
    # the default serves code that names a model by its pin alone (params.yaml always sets it)
    attn_implementation: ATTN_IMPLEMENTATIONS = "auto"

    def problems(self, section: str) -> list[str]:
        return check(
            bool(self.name.strip()),
            f"{section}.name: must not be empty; use a Hub id such as google/flan-t5-base or a local model directory",
        )


@dataclass(frozen=True)
class DataParams:
    source: str
    revision: str
    limit: Optional[int]
    # the pipeline's column -> the source's column holding it; unnamed columns keep their own name.
    # Typed `object` (any YAML value passes the converter) and checked in problems(): a mapping of str.
    # The defaults below serve code that builds DataParams directly (params.yaml always sets them).
    columns: object = dataclasses.field(default_factory=dict)
    split_seed: int = 0  # draws the dialogues split off train when the source lacks validation or test
    validation_size: float = 0.1  # fraction of the train dialogues split off as validation, when missing
    test_size: float = 0.1  # the same for test

    COLUMNS = ("id", "dialogue", "summary", "topic")  # the pipeline's names (not a field: unannotated)

    def column_problems(self, section: str) -> list[str]:
        if not isinstance(self.columns, dict):
            return [
                f"{section}.columns: expected a mapping of the pipeline's columns to the source's "
                f"(e.g. {{dialogue: transcript, summary: notes}}), or {{}} for the names as they are; got {self.columns!r}"
            ]
        problems = []
        for key, column in self.columns.items():
            if key not in self.COLUMNS:
                problems.append(
                    f"{section}.columns.{key}: unknown key; valid keys are {', '.join(sorted(self.COLUMNS))} "
                    "(the pipeline's columns, each mapped to the source's column that holds it)"
                )
            elif not isinstance(column, str) or not column.strip():
                problems.append(f"{section}.columns.{key}: expected the source's column name, got {column!r}")
        named = [(k, c) for k, c in self.columns.items() if k in self.COLUMNS and isinstance(c, str)]
        for column in sorted({c for _, c in named}):
            keys = [k for k, c in named if c == column]
            if len(keys) > 1:
                problems.append(
                    f"{section}.columns: {', '.join(keys)} map to the same column {column!r}; "
                    "each needs its own source column"
                )
        return problems

    def problems(self, section: str) -> list[str]:
        return (
            check(
                bool(self.source.strip()),
                f"{section}.source: must not be empty; use a Hub "
                "dataset id such as knkarthick/dialogsum or a local directory",
            )
            + check(
                self.limit is None or self.limit >= 1,
                f"{section}.limit: must be >= 1 or null (all rows), got {self.limit}",
            )
            + self.column_problems(section)
            + check(self.split_seed >= 0, f"{section}.split_seed: must be >= 0, got {self.split_seed}")
            + self.size_problems(section)
        )

    def size_problems(self, section: str) -> list[str]:
        sizes = {"validation_size": self.validation_size, "test_size": self.test_size}
        problems = [
            f"{section}.{name}: must be a fraction of the train dialogues in (0, 1), got {size}"
            for name, size in sizes.items()
            if not 0 < size < 1
        ]
        return problems or check(
            self.validation_size + self.test_size < 1,
            f"{section}.validation_size + test_size: must be < 1 to leave dialogues in train, "
            f"got {self.validation_size} + {self.test_size}",
        )


@dataclass(frozen=True)
class PrepareParams:
    prompt_template: str
    max_source_length: int
    max_target_length: int
    # auto: wrap the prompt in the tokenizer's chat template for chat-tuned models only, always:
    # whenever the tokenizer has one, none: never (stages/input_format.py has the rule); the
    # defaults here serve code that builds prompts directly (params.yaml always sets both)
    chat_template: Literal["auto", "always", "none"] = "none"
    chat_date: str = "26 Jul 2024"  # the date a chat template that prints one is rendered with

    def problems(self, section: str) -> list[str]:
        return (
            check(
                "{dialogue}" in self.prompt_template,
                f"{section}.prompt_template: must contain the placeholder {{dialogue}}",
            )
            + check(
                self.max_source_length >= 8,
                f"{section}.max_source_length: must be >= 8 tokens, got {self.max_source_length}",
            )
            + check(
                self.max_target_length >= 2,
                f"{section}.max_target_length: must be >= 2 tokens, got {self.max_target_length}",
            )
            + check(
                bool(self.chat_date.strip()),
                f"{section}.chat_date: must not be empty; use a fixed date such as 26 Jul 2024",
            )
        )


@dataclass(frozen=True)
class GenerateParams:
    batch_size: int
    precision: Literal["auto", "bf16", "fp32"]
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    length_penalty: float
    no_repeat_ngram_size: int
    repetition_penalty: float
    early_stopping: bool

    def problems(self, section: str) -> list[str]:
        return (
            check(self.batch_size >= 1, f"{section}.batch_size: must be >= 1, got {self.batch_size}")
            + check(self.num_beams >= 1, f"{section}.num_beams: must be >= 1, got {self.num_beams}")
            + check(self.max_new_tokens >= 1, f"{section}.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
            + check(
                0 <= self.min_new_tokens <= self.max_new_tokens,
                f"{section}.min_new_tokens: must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}",
            )
            + check(
                self.length_penalty > 0,
                f"{section}.length_penalty: must be > 0 (1.0 = plain average log-probability), "
                f"got {self.length_penalty}",
            )
            + check(
                self.repetition_penalty > 0,
                f"{section}.repetition_penalty: must be > 0 (1.0 = off), got {self.repetition_penalty}",
            )
            + check(
                self.no_repeat_ngram_size >= 0,
                f"{section}.no_repeat_ngram_size: must be >= 0 (0 = off), got {self.no_repeat_ngram_size}",
            )
        )


@dataclass(frozen=True)
class ValidateParams:
    """Validation by generation during training (stages/validation.py)."""

    dialogues: int
    num_beams: int
    max_new_tokens: int
    batch_size: int

    def problems(self, section: str) -> list[str]:
        return (
            check(self.dialogues >= 1, f"{section}.dialogues: must be >= 1, got {self.dialogues}")
            + check(self.num_beams >= 1, f"{section}.num_beams: must be >= 1 (1 = greedy), got {self.num_beams}")
            + check(self.max_new_tokens >= 1, f"{section}.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
            + check(self.batch_size >= 1, f"{section}.batch_size: must be >= 1, got {self.batch_size}")
        )


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap_resamples: int

    def problems(self, section: str) -> list[str]:
        return check(
            self.bootstrap_resamples >= 100,
            f"{section}.bootstrap_resamples: must be >= 100 for a usable 95% interval, got {self.bootstrap_resamples}",
        )


@dataclass(frozen=True)
class LeadParams:
    turns: int

    def problems(self, section: str) -> list[str]:
        return check(self.turns >= 1, f"{section}.turns: must be >= 1, got {self.turns}")


@dataclass(frozen=True)
class ReportParams:
    examples: int

    def problems(self, section: str) -> list[str]:
        return check(self.examples >= 0, f"{section}.examples: must be >= 0, got {self.examples}")


# Sections that are not methods; every other top-level mapping of params.yaml is a method section.
FIXED_SECTIONS = (
    "seed",
    "deterministic",
    "methods",
    "seeds",
    "variants",
    "baselines",
    "model",
    "data",
    "prepare",
    "train",
    "validate",
    "generate",
    "evaluate",
    "lead",
    "report",
    "tune",
)


@dataclass(frozen=True)
class Params:
    seed: int
    deterministic: bool
    methods: list[str]  # the trained methods, each a section of its own (`sections`)
    seeds: list[int]  # the training seeds: every trained method trains once per seed
    variants: list[str]  # the trained methods compared (each under every seed)
    baselines: list[str]  # the zero-cost variants compared (base, lead): no training, no seed
    model: ModelParams
    data: DataParams
    prepare: PrepareParams
    validate: ValidateParams
    generate: GenerateParams
    evaluate: EvaluateParams
    lead: LeadParams
    report: ReportParams
    # the recipe every method shares: every TrainParams key but PER_METHOD_KEYS, converted and checked
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    # every method section in the file, trained (in `methods`) or not; set by parse_params
    sections: dict[str, MethodParams] = dataclasses.field(default_factory=dict)
    # the tuning protocol (scripts/tune.py); set by parse_params
    tune: TuneParams = TuneParams(trials=2, space={})

    def method(self, name: str) -> MethodParams:
        if name not in self.methods:
            raise ParamsError(f"unknown method {name!r}; params.yaml methods are {', '.join(self.methods)}")
        return self.sections[name]

    def recipe(self, name: str) -> TrainParams:
        return self.method(name).recipe


def shared_recipe(raw: Any, problems: list[str]) -> dict[str, Any] | None:
    """The shared `train` section, checked as a recipe without its per-method keys (placeholders stand
    in for them while checking); None if it has problems of its own."""
    if not isinstance(raw, dict):
        problems.append(
            "train: missing; add the shared recipe to params.yaml" if raw is None else "train: must be a mapping"
        )
        return None
    for key in PER_METHOD_KEYS:
        if key in raw:
            problems.append(
                f"train.{key}: set per method, not shared; put it in each method's section (e.g. lora.{key})"
            )
    placeholders = {"learning_rate": 1.0, "weight_decay": 0.0}
    before = len(problems)
    recipe = build(TrainParams, {**raw, **placeholders}, "train", problems)
    if recipe is None or len(problems) > before:
        return None
    return {k: v for k, v in dataclasses.asdict(recipe).items() if k not in PER_METHOD_KEYS}


def method_section(
    name: str,
    raw: Any,
    shared: dict[str, Any] | None,
    problems: list[str],
    shared_problems: frozenset[str] = frozenset(),
) -> MethodParams | None:
    """One method section: `type`, recipe keys (what differs from `train`) and the type's arguments.
    A problem its resolved recipe only inherits from `train` (in `shared_problems`) is reported once,
    under `train`, not again for every method."""
    if not isinstance(raw, dict) or "type" not in raw:
        legacy = name.removeprefix("train_")
        if name.startswith("train_") and isinstance(raw, dict):
            problems.append(
                f"{name}: per-method recipe sections are gone; put what differs from the shared `train` "
                f"section in the method's own section (e.g. {legacy}.learning_rate: ...; -S {legacy}.learning_rate=...)"
            )
        else:
            problems.append(
                f"{name}: unknown section; a method section is a mapping with a type (e.g. {name}: {{type: lora, ...}}), "
                f"the other sections are {', '.join(FIXED_SECTIONS)}"
            )
        return None
    kind = raw["type"]
    if not isinstance(kind, str) or not METHOD_NAME.match(kind.lower()):
        problems.append(f"{name}.type: expected a method type such as full, lora or loha, got {kind!r}")
        return None
    kind = kind.lower()
    overrides = {k: v for k, v in raw.items() if k in RECIPE_KEYS}
    rest = {k: v for k, v in raw.items() if k not in RECIPE_KEYS and k != "type"}
    if kind in METHOD_TYPES:
        before = len(problems)
        config = build(METHOD_TYPES[kind], rest, name, problems)
        for i in range(before, len(problems)):  # the type's keys, and the recipe's the section may set too
            if ": unknown key; valid keys are " in problems[i]:
                keys = sorted({f.name for f in dataclasses.fields(METHOD_TYPES[kind])} | {"type", *RECIPE_KEYS})
                problems[i] = problems[i].split(": unknown key")[0] + (
                    f": unknown key for method type {kind}; valid keys are {', '.join(keys)}"
                )
    else:
        config = PeftArgs(rest)
    if shared is None or config is None:
        return None
    recipe = build(TrainParams, {**shared, **overrides}, name, problems)
    if recipe is not None and recipe.sharding == "fsdp" and kind != "full":
        # the frozen base is the only large part of a PEFT method, and a bf16 copy of an 8B base (16 GB)
        # fits one card: DDP replicates it, sharding would only add an all-gather to every layer
        problems.append(
            f"{name}.sharding: fsdp is for full fine-tuning; {name} ({kind}) trains on a frozen base, which "
            "DDP replicates on every GPU (processes > 1, sharding: none); set sharding: fsdp in the full "
            "method's section, not in train"
        )
        return None
    return None if recipe is None else MethodParams(name, kind, overrides, recipe, config)


def edited_section_problems(raw: dict, shared: dict[str, Any] | None) -> Callable[[str, dict], list[str] | None]:
    """For the tuning space's checks: the problems a method section has with some of its params edited
    that it does not have as written (None if `name` is no method section)."""

    def problems_of(name: str, edits: dict) -> list[str] | None:
        section = raw.get(name)
        if name in FIXED_SECTIONS or not isinstance(section, dict) or "type" not in section:
            return None
        before, after = [], []
        method_section(name, section, shared, before)
        method_section(name, {**section, **edits}, shared, after)
        return [p for p in after if p not in before]

    return problems_of


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML); raise ParamsError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ParamsError(f"1 problem(s) in params.yaml:\n  - params.yaml must be a mapping, got {type(raw).__name__}")
    # train: shared_recipe; tune: parse_tune
    fixed = {k: v for k, v in raw.items() if k in FIXED_SECTIONS and k not in ("train", "tune")}
    params = build(Params, fixed, "params", problems, skip=("train", "sections", "tune"))
    shared = shared_recipe(raw.get("train"), problems)
    sections = {
        name: method_section(name, value, shared, problems) for name, value in raw.items() if name not in FIXED_SECTIONS
    }
    tune = parse_tune(raw.get("tune"), edited_section_problems(raw, shared), problems)
    seed = getattr(params, "seed", 0)
    if params is not None and seed < 0:
        problems.append(f"seed: must be >= 0, got {seed}")
    if params is not None:
        problems.extend(method_problems(params.methods, sections, FIXED_SECTIONS))
        problems.extend(variant_problems(params.variants, params.methods, sections))
        problems.extend(baseline_problems(params.baselines))
        problems.extend(seed_problems(params.seeds))
    if problems:
        # "params.lora.r" reads worse than "lora.r": drop the root prefix
        lines = [p.removeprefix("params.") for p in problems]
        raise ParamsError(f"{len(lines)} problem(s) in params.yaml:\n" + "\n".join(f"  - {line}" for line in lines))
    kept = {k: v for k, v in sections.items() if v is not None}
    return dataclasses.replace(params, train=shared, sections=kept, tune=tune)


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent floats without a dot (1e-05) as numbers.

    PyYAML follows YAML 1.1, where 1e-05 is a string; DVC writes params.yaml through ruamel (YAML 1.2),
    and `dvc exp run -S full.learning_rate=1.0e-5` writes exactly `1e-05`, so a learning-rate
    grid (scripts/tune.py) would otherwise fail on every rate below 1e-4.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_params(path: Path = PARAMS_FILE) -> Params:
    with open(path, encoding="utf-8") as f:
        return parse_params(yaml.load(f, Loader=ParamsLoader))  # noqa: S506 (a SafeLoader subclass)
