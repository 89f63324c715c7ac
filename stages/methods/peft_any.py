"""Any peft method by name: a section `type: loha` (any peft config type, lowercase) with peft's own
argument names, built through peft's config class and its `auto` target mapping.

Checked on a meta model (names and shapes, no weights) before anything loads: the type must be one
peft ships, every argument one its config class accepts, the target modules present in the model,
and peft must build the method on this model's family. Each failure is one StageError (exit 2)
naming the key and what peft accepts. Such a method trains and is evaluated like LoRA: the frozen
base, an adapter-only save, generation on the pinned base with the adapter unmerged.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import peft
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PromptLearningConfig, get_peft_model
from peft.utils import constants

from stages import family
from stages.errors import StageError
from stages.methods.plan import Plan
from stages.modeling import check_target_modules, linear_layer_names, meta_model, save_adapter
from stages.params import MethodParams, ModelParams

# PeftConfig fields that describe the run, not the method: set by peft or by this module
INTERNAL = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
}


def config_class(kind: str, section: str) -> type:
    """peft's config class for a type name (loha -> LoHaConfig)."""
    classes = {str(getattr(t, "value", t)).lower(): c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if kind not in classes:
        raise StageError(
            f"{section}.type: {kind!r} is not a method type; use full or one of peft {peft.__version__}'s: "
            + ", ".join(sorted(classes))
        )
    return classes[kind]


def accepted_arguments(config_cls: type) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(config_cls) if f.name not in INTERNAL)


def default_targets(kind: str, model_type: str) -> list[str] | None:
    """peft's own default target modules for this type and architecture (its `auto` mapping), or None."""
    mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{kind.upper()}_TARGET_MODULES_MAPPING", {})
    targets = mapping.get(model_type)
    return [targets] if isinstance(targets, str) else (list(targets) if targets else None)


def method_arguments(section: MethodParams, config_cls: type, model) -> dict:
    """The section's arguments for peft, with `target_modules: auto` (or left out) resolved through peft's
    mapping, listed targets checked against the model, and fan_in_fan_out set for GPT-2's Conv1D."""
    args = dict(section.config.args)
    accepted = accepted_arguments(config_cls)
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise StageError(
            f"{section.name}.{unknown[0]}: not an argument of peft's {config_cls.__name__} "
            f"({', '.join(unknown)} unknown); it accepts: {', '.join(accepted)} (besides type and the train.* recipe keys)"
        )
    if "target_modules" not in accepted:
        return args
    if args.get("target_modules", "auto") == "auto":
        targets = default_targets(section.type, model.config.model_type)
        if targets is None:
            raise StageError(
                f"{section.name}.target_modules: peft has no default {section.type} target modules for model type "
                f"{model.config.model_type!r}; list layer names, e.g. [{', '.join(linear_layer_names(model)[:2])}] "
                f"(linear layers available: {', '.join(linear_layer_names(model))})"
            )
        args["target_modules"] = targets
    if isinstance(args["target_modules"], list):
        check_target_modules(section.name, args["target_modules"], model)
    if "fan_in_fan_out" in accepted and "fan_in_fan_out" not in args:
        args["fan_in_fan_out"] = family.fan_in_fan_out(model, args["target_modules"])
    return args


def peft_config(section: MethodParams, model):
    """peft's config for a section on `model` (a meta model), after trying the method on it: a type
    peft cannot build for this family fails here, saying so, rather than after the weights load."""
    config_cls = config_class(section.type, section.name)
    model_family = family.family(model.config)
    args = method_arguments(section, config_cls, model)
    try:
        config = config_cls(task_type=family.task_type(model_family), **args)
    except (TypeError, ValueError) as error:
        raise StageError(f"{section.name}: peft's {config_cls.__name__} refused its arguments: {error}") from None
    try:
        get_peft_model(model, copy.deepcopy(config))
    except (TypeError, ValueError, NotImplementedError, AttributeError, KeyError, RuntimeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StageError(
            f"{section.name}: peft cannot build {section.type} for {model_family} models like "
            f"{model.config.model_type!r}: {first_line}"
        ) from None
    return config


def build_model(base, config):
    # the base frozen, the method's weights added; a copy: peft writes into the config it gets
    return get_peft_model(base, copy.deepcopy(config))


def plan(section: MethodParams, base: ModelParams, seed: int) -> Plan:
    del seed  # peft's inits draw from the run's seeded generator
    config = peft_config(section, meta_model(base))  # fail fast, before the weights
    targets = getattr(config, "target_modules", None)
    resolved = {"target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets} if targets else {}
    if isinstance(config, PromptLearningConfig):
        resolved["num_virtual_tokens"] = config.num_virtual_tokens
    return Plan(
        build=partial(build_model, config=config),
        save=save_adapter,
        library="peft",
        frozen_base=True,  # the base only runs forward: bf16 under bf16 training
        resolved=resolved,
    )
