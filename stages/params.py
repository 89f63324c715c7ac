"""Typed, validated view of params.yaml, loaded before any heavy work.

Every section of params.yaml maps to one frozen dataclass below. `load_params` checks the
whole file (unknown keys, wrong types, out-of-range values) and raises one `ParamsError`
that lists every problem with the key and the fix, so a typo costs seconds, not a
download and an hour of training.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from stages.errors import StageError

PARAMS_FILE = Path("params.yaml")


class ParamsError(StageError):
    """Raised with every problem found in params.yaml, one per line."""


def _check(condition: bool, message: str) -> list[str]:
    return [] if condition else [message]


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
        return _check(
            bool(self.name.strip()),
            f"{section}.name: must not be empty; use a Hub id such as google/flan-t5-base or a local model directory",
        )


@dataclass(frozen=True)
class DataParams:
    source: str
    revision: str
    limit: Optional[int]

    def problems(self, section: str) -> list[str]:
        return _check(
            bool(self.source.strip()),
            f"{section}.source: must not be empty; use a Hub "
            "dataset id such as knkarthick/dialogsum or a local directory",
        ) + _check(
            self.limit is None or self.limit >= 1, f"{section}.limit: must be >= 1 or null (all rows), got {self.limit}"
        )


@dataclass(frozen=True)
class PrepareParams:
    prompt_template: str
    max_source_length: int
    max_target_length: int
    # auto: wrap the prompt in the tokenizer's chat template when it has one (stages/prepare.py);
    # the default here serves code that builds prompts directly (params.yaml always sets it)
    chat_template: Literal["auto", "none"] = "none"

    def problems(self, section: str) -> list[str]:
        return (
            _check(
                "{dialogue}" in self.prompt_template,
                f"{section}.prompt_template: must contain the placeholder {{dialogue}}",
            )
            + _check(
                self.max_source_length >= 8,
                f"{section}.max_source_length: must be >= 8 tokens, got {self.max_source_length}",
            )
            + _check(
                self.max_target_length >= 2,
                f"{section}.max_target_length: must be >= 2 tokens, got {self.max_target_length}",
            )
        )


# Schedulers that transformers builds from a name alone (cosine_with_min_lr, warmup_stable_decay and
# reduce_lr_on_plateau need extra arguments this recipe does not pass); a test keeps this list a
# subset of transformers.SchedulerType.
LR_SCHEDULERS = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]


@dataclass(frozen=True)
class TrainParams:
    """One training recipe: the shared `train` section, or a method's resolved recipe (`train` with the
    differences its own section lists, see `MethodParams.recipe`)."""

    epochs: float
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int
    eval_batch_size: int
    weight_decay: float
    warmup_ratio: float
    lr_scheduler: LR_SCHEDULERS
    max_grad_norm: float
    precision: Literal["auto", "bf16", "fp32"]
    group_by_length: bool
    logging_steps: int
    save_steps: int
    auto_find_batch_size: bool
    dataloader_workers: int
    processes: int
    select_by: Literal["rougeL", "loss", "last"]  # which evaluated checkpoint is saved (stages/validation.py)
    patience: int  # evaluations without improvement before stopping; 0 = never stop early
    # Speed and memory levers. The defaults serve code that builds a recipe directly, and are the
    # recipe without them; params.yaml always sets them.
    gradient_checkpointing: bool = False  # recompute activations in backward instead of keeping them
    compile: bool = False  # torch.compile the model (the Trainer's torch_compile, inductor)
    pad_to_multiple_of: int = 8  # pad each batch's lengths up to a multiple of this (compile: shapes repeat)

    def problems(self, section: str) -> list[str]:
        return (
            _check(self.epochs > 0, f"{section}.epochs: must be > 0, got {self.epochs}")
            + _check(self.learning_rate > 0, f"{section}.learning_rate: must be > 0, got {self.learning_rate}")
            + _check(self.batch_size >= 1, f"{section}.batch_size: must be >= 1, got {self.batch_size}")
            + _check(
                self.gradient_accumulation_steps >= 1,
                f"{section}.gradient_accumulation_steps: must be >= 1, got {self.gradient_accumulation_steps}",
            )
            + _check(self.eval_batch_size >= 1, f"{section}.eval_batch_size: must be >= 1, got {self.eval_batch_size}")
            + _check(self.weight_decay >= 0, f"{section}.weight_decay: must be >= 0, got {self.weight_decay}")
            + _check(0 <= self.warmup_ratio < 1, f"{section}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
            + _check(self.max_grad_norm > 0, f"{section}.max_grad_norm: must be > 0, got {self.max_grad_norm}")
            + _check(self.logging_steps >= 1, f"{section}.logging_steps: must be >= 1, got {self.logging_steps}")
            + _check(self.save_steps >= 1, f"{section}.save_steps: must be >= 1, got {self.save_steps}")
            + _check(self.processes >= 1, f"{section}.processes: must be >= 1, got {self.processes}")
            + _check(
                self.dataloader_workers >= 0,
                f"{section}.dataloader_workers: must be >= 0, got {self.dataloader_workers}",
            )
            + _check(self.patience >= 0, f"{section}.patience: must be >= 0 (0 = off), got {self.patience}")
            + _check(
                self.pad_to_multiple_of >= 1,
                f"{section}.pad_to_multiple_of: must be >= 1 (1 = pad to the longest row), got {self.pad_to_multiple_of}",
            )
            + _check(
                self.patience == 0 or self.select_by != "last",
                f"{section}.patience: early stopping needs a validation metric to improve; "
                "set select_by to rougeL or loss, or patience to 0",
            )
        )


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    # all-linear: peft's shorthand for every linear layer but the output head; auto: peft's default
    # for the architecture (stages/family.py default_target_modules)
    target_modules: list[str] | Literal["all-linear", "auto"]
    bias: Literal["none", "all", "lora_only"]
    use_dora: bool
    use_rslora: bool
    init: Literal["default", "gaussian", "pissa", "olora"]
    quantization: Literal["none", "4bit", "8bit"]  # the frozen base's weights (QLoRA: 4bit)

    def problems(self, section: str) -> list[str]:
        targets = self.target_modules
        names_ok = isinstance(targets, list)
        return (
            _check(self.r >= 1, f"{section}.r: must be >= 1, got {self.r}")
            + _check(self.alpha >= 1, f"{section}.alpha: must be >= 1, got {self.alpha}")
            + _check(0 <= self.dropout < 1, f"{section}.dropout: must be in [0, 1), got {self.dropout}")
            + _check(
                not names_ok or len(targets) > 0,
                f"{section}.target_modules: must name at least one module, e.g. [q, v], or be auto or all-linear",
            )
            # PiSSA/OLoRA adapters are saved as the plain-LoRA difference to their initial value, which
            # has no place for DoRA's trained magnitudes: the saved adapter would not be the trained one
            + _check(
                not (self.use_dora and self.init in ("pissa", "olora")),
                f"{section}.use_dora: DoRA cannot be combined with init {self.init!r} (its adapter is "
                "saved converted to plain LoRA, which drops DoRA's magnitudes); use init default or gaussian",
            )
            # PiSSA/OLoRA decompose the base weights, which a quantized base does not hold in full precision
            + _check(
                not (self.quantization != "none" and self.init in ("pissa", "olora")),
                f"{section}.quantization: {self.quantization} cannot be combined with init {self.init!r} (it "
                "rewrites the base weights, which are quantized); use init default or gaussian",
            )
        )


@dataclass(frozen=True)
class Ia3Params:
    target_modules: list[str] | Literal["auto"]  # auto: peft's default for the architecture
    feedforward_modules: list[str] | Literal["auto"]  # auto: peft's feed-forward subset of the targets

    def problems(self, section: str) -> list[str]:
        # with an auto side the subset check waits for the model (stages/methods/ia3.py ia3_config)
        lists = isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list)
        outside = [m for m in self.feedforward_modules if m not in self.target_modules] if lists else []
        return _check(
            self.target_modules == "auto" or len(self.target_modules) > 0,
            f"{section}.target_modules: must name at least one module, e.g. [k, v, wo], or be auto",
        ) + _check(
            not outside,
            f"{section}.feedforward_modules: {', '.join(outside)} not in "
            "target_modules; a feed-forward module must also be a target",
        )


@dataclass(frozen=True)
class PromptParams:
    num_virtual_tokens: int
    init: Literal["text", "sample_vocab", "random"]
    init_text: str

    def problems(self, section: str) -> list[str]:
        return _check(
            self.num_virtual_tokens >= 1, f"{section}.num_virtual_tokens: must be >= 1, got {self.num_virtual_tokens}"
        ) + _check(
            self.init != "text" or bool(self.init_text.strip()),
            f"{section}.init_text: must not be empty with init text; write the task, "
            'e.g. "Summarize the following conversation:"',
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
            _check(self.batch_size >= 1, f"{section}.batch_size: must be >= 1, got {self.batch_size}")
            + _check(self.num_beams >= 1, f"{section}.num_beams: must be >= 1, got {self.num_beams}")
            + _check(self.max_new_tokens >= 1, f"{section}.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
            + _check(
                0 <= self.min_new_tokens <= self.max_new_tokens,
                f"{section}.min_new_tokens: must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}",
            )
            + _check(
                self.length_penalty > 0,
                f"{section}.length_penalty: must be > 0 (1.0 = plain average log-probability), "
                f"got {self.length_penalty}",
            )
            + _check(
                self.repetition_penalty > 0,
                f"{section}.repetition_penalty: must be > 0 (1.0 = off), got {self.repetition_penalty}",
            )
            + _check(
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
            _check(self.dialogues >= 1, f"{section}.dialogues: must be >= 1, got {self.dialogues}")
            + _check(self.num_beams >= 1, f"{section}.num_beams: must be >= 1 (1 = greedy), got {self.num_beams}")
            + _check(self.max_new_tokens >= 1, f"{section}.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
            + _check(self.batch_size >= 1, f"{section}.batch_size: must be >= 1, got {self.batch_size}")
        )


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap_resamples: int

    def problems(self, section: str) -> list[str]:
        return _check(
            self.bootstrap_resamples >= 100,
            f"{section}.bootstrap_resamples: must be >= 100 for a usable 95% interval, got {self.bootstrap_resamples}",
        )


@dataclass(frozen=True)
class LeadParams:
    turns: int

    def problems(self, section: str) -> list[str]:
        return _check(self.turns >= 1, f"{section}.turns: must be >= 1, got {self.turns}")


@dataclass(frozen=True)
class ReportParams:
    examples: int

    def problems(self, section: str) -> list[str]:
        return _check(self.examples >= 0, f"{section}.examples: must be >= 0, got {self.examples}")


@dataclass(frozen=True)
class FullParams:
    """Method type `full`: every weight trains; nothing to configure beyond the recipe."""

    def problems(self, section: str) -> list[str]:
        return []


@dataclass(frozen=True)
class PeftArgs:
    """Any other method type: a peft config type by name (`type: loha`), its arguments as peft names
    them. peft itself is imported only by the training stage, which checks them against peft's config
    class before any weights load (stages/methods/peft_any.py)."""

    args: dict

    def problems(self, section: str) -> list[str]:
        return []


# The method types with code and a schema of their own in this project (stages/methods/<module>.py);
# every other `type` is a peft config type by name (PeftArgs). What the report calls each type.
METHOD_TYPES: dict[str, type] = {
    "full": FullParams,
    "lora": LoraParams,
    "ia3": Ia3Params,
    "prompt_tuning": PromptParams,
}
TYPE_LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA",
    "ia3": "IA3",
    "prompt_tuning": "prompt tuning",
    "prefix_tuning": "prefix tuning",
    "p_tuning": "P-tuning",
    "loha": "LoHa",
    "lokr": "LoKr",
    "vera": "VeRA",
    "oft": "OFT",
    "boft": "BOFT",
}  # any other peft type is shown by its name
RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(TrainParams))
# What no two methods share, so each method section sets it and the shared `train` section cannot:
# a learning rate and a weight decay are tuned per method (-S full.learning_rate=... needs the key there)
PER_METHOD_KEYS = ("learning_rate", "weight_decay")
METHOD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # a stage name (train@<name>), a folder and a params section


@dataclass(frozen=True)
class MethodParams:
    """One method section of params.yaml: its type, its learning rate, weight decay and whatever else its
    recipe changes of the shared `train` section (`overrides`, as written) with the result (`recipe`),
    and its own arguments (`config`)."""

    name: str
    type: str
    overrides: dict
    recipe: TrainParams
    config: Any  # FullParams, LoraParams, Ia3Params, PromptParams or PeftArgs

    @property
    def label(self) -> str:
        return method_label(self.name, self.type)


def method_label(name: str, kind: str) -> str:
    """What the report calls a method: its type's name for the type's usual section (lora: LoRA, prompt:
    prompt tuning), else the section's name with its type's (lora_r8 (LoRA))."""
    type_label = TYPE_LABELS.get(kind, kind)
    usual = kind.removesuffix("_tuning")  # prompt_tuning: prompt, prefix_tuning: prefix
    return type_label if name == usual else f"{name} ({type_label})"


# Sections that are not methods; every other top-level mapping of params.yaml is a method section.
FIXED_SECTIONS = (
    "seed",
    "deterministic",
    "methods",
    "variants",
    "model",
    "data",
    "prepare",
    "train",
    "validate",
    "generate",
    "evaluate",
    "lead",
    "report",
)


@dataclass(frozen=True)
class Params:
    seed: int
    deterministic: bool
    methods: list[str]  # the trained methods, each a section of its own (`sections`)
    variants: list[str]
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

    def method(self, name: str) -> MethodParams:
        if name not in self.methods:
            raise ParamsError(f"unknown method {name!r}; params.yaml methods are {', '.join(self.methods)}")
        return self.sections[name]

    def recipe(self, name: str) -> TrainParams:
        return self.method(name).recipe


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


def _build(cls: type, raw: Any, section: str, problems: list[str], skip: tuple[str, ...] = ()) -> Any:
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
            values[name] = _build(hints[name], raw[name], key, problems)
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


UNTRAINED = ("base", "lead")  # the original model and the lead-N rule: written by their own stages


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
    recipe = _build(TrainParams, {**raw, **placeholders}, "train", problems)
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
        config = _build(METHOD_TYPES[kind], rest, name, problems)
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
    recipe = _build(TrainParams, {**shared, **overrides}, name, problems)
    return None if recipe is None else MethodParams(name, kind, overrides, recipe, config)


def method_problems(methods: list[str], sections: dict[str, Any]) -> list[str]:
    bad = [m for m in methods if not METHOD_NAME.match(m) or m in (*UNTRAINED, *FIXED_SECTIONS)]
    missing = [m for m in methods if m not in sections and m not in bad]
    return (
        _check(
            not bad,
            f"methods: {', '.join(bad)} cannot name a method; use lowercase letters, digits and _ "
            f"(not {', '.join(UNTRAINED)} or a fixed section's name)",
        )
        + _check(
            not missing,
            f"methods: {', '.join(missing)} has no section; add one, e.g. {missing[0] if missing else ''}: "
            "{type: loha, learning_rate: 1.0e-3, r: 8}",
        )
        + _check(len(set(methods)) == len(methods), f"methods: {methods} names a method twice")
    )


def variant_problems(variants: list[str], methods: list[str], sections: dict[str, Any] | None = None) -> list[str]:
    known = [*UNTRAINED, *methods]
    untrained = [v for v in variants if v not in known and v in (sections or {})]
    unknown = [v for v in variants if v not in known and v not in untrained]
    return (
        _check(not unknown, f"variants: unknown {', '.join(unknown)}; each must be one of {', '.join(known)}")
        + _check(
            not untrained,
            f"variants: {', '.join(untrained)} is not trained; add it to methods too "
            f"(-S 'methods=[{', '.join([*methods, *untrained])}]')",
        )
        + _check(len(set(variants)) == len(variants), f"variants: {variants} names a variant twice")
        + _check(bool(variants), "variants: must name at least one variant, e.g. [base, lora]")
    )


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML); raise ParamsError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ParamsError(f"1 problem(s) in params.yaml:\n  - params.yaml must be a mapping, got {type(raw).__name__}")
    fixed = {k: v for k, v in raw.items() if k in FIXED_SECTIONS and k != "train"}  # train: shared_recipe
    params = _build(Params, fixed, "params", problems, skip=("train", "sections"))
    shared = shared_recipe(raw.get("train"), problems)
    sections = {
        name: method_section(name, value, shared, problems) for name, value in raw.items() if name not in FIXED_SECTIONS
    }
    seed = getattr(params, "seed", 0)
    if params is not None and seed < 0:
        problems.append(f"seed: must be >= 0, got {seed}")
    if params is not None:
        problems.extend(method_problems(params.methods, sections))
        problems.extend(variant_problems(params.variants, params.methods, sections))
    if problems:
        # "params.lora.r" reads worse than "lora.r": drop the root prefix
        lines = [p.removeprefix("params.") for p in problems]
        raise ParamsError(f"{len(lines)} problem(s) in params.yaml:\n" + "\n".join(f"  - {line}" for line in lines))
    return dataclasses.replace(params, train=shared, sections={k: v for k, v in sections.items() if v is not None})


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
