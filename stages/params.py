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
    """One training recipe; every `train_<method>` section (full, lora, ia3, prompt) has its own."""

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
    # Speed and memory levers (issue 19). The defaults serve code that builds a recipe directly, and
    # are the recipe without them; params.yaml always sets them.
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
        # with an auto side the subset check waits for the model (train_ia3.ia3_config)
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
class Params:
    seed: int
    deterministic: bool
    variants: list[str]
    model: ModelParams
    data: DataParams
    prepare: PrepareParams
    train_full: TrainParams
    train_lora: TrainParams
    lora: LoraParams
    train_ia3: TrainParams
    ia3: Ia3Params
    train_prompt: TrainParams
    prompt: PromptParams
    validate: ValidateParams
    generate: GenerateParams
    evaluate: EvaluateParams
    lead: LeadParams
    report: ReportParams


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


def _build(cls: type, raw: Any, section: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, appending every problem found to `problems`."""
    if not isinstance(raw, dict):
        problems.append(f"{section}: must be a mapping of keys to values, got {type(raw).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
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


UNTRAINED = ("base", "lead")  # the original model and the lead-N rule: written by the baselines stage


def trained_methods(params: Params) -> list[str]:
    """Methods with a training stage: every `train_<method>` section of params.yaml."""
    return [f.name.removeprefix("train_") for f in dataclasses.fields(params) if f.name.startswith("train_")]


def variant_problems(variants: list[str], methods: list[str]) -> list[str]:
    known = [*UNTRAINED, *methods]
    unknown = [v for v in variants if v not in known]
    return (
        _check(not unknown, f"variants: unknown {', '.join(unknown)}; each must be one of {', '.join(known)}")
        + _check(len(set(variants)) == len(variants), f"variants: {variants} names a variant twice")
        + _check(bool(variants), "variants: must name at least one variant, e.g. [base, lora]")
    )


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from YAML); raise ParamsError listing every problem."""
    problems: list[str] = []
    params = _build(Params, raw, "params", problems)
    seed = getattr(params, "seed", 0)
    if params is not None and seed < 0:
        problems.append(f"seed: must be >= 0, got {seed}")
    if params is not None:
        problems.extend(variant_problems(params.variants, trained_methods(params)))
    if problems:
        # "params.lora.r" reads worse than "lora.r": drop the root prefix
        lines = [p.removeprefix("params.") for p in problems]
        raise ParamsError(f"{len(lines)} problem(s) in params.yaml:\n" + "\n".join(f"  - {line}" for line in lines))
    return params


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent floats without a dot (1e-05) as numbers.

    PyYAML follows YAML 1.1, where 1e-05 is a string; DVC writes params.yaml through ruamel (YAML 1.2),
    and `dvc exp run -S train_full.learning_rate=1.0e-5` writes exactly `1e-05`, so a learning-rate
    grid (scripts/tune.py) would otherwise fail on every rate below 1e-4.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_params(path: Path = PARAMS_FILE) -> Params:
    with open(path, encoding="utf-8") as f:
        return parse_params(yaml.load(f, Loader=ParamsLoader))  # noqa: S506 (a SafeLoader subclass)
