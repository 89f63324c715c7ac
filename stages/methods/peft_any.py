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

from stages import family
from stages.errors import StageError
from stages.method_params import MethodParams
from stages.methods.plan import Plan
from stages.modeling import check_target_modules, linear_layer_names, meta_model, save_adapter
from stages.params import ModelParams

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


# peft types whose training needs more than the shared Trainer recipe runs: refused rather than trained
# as something else
NEEDS_ITS_OWN_LOOP = {
    "adalora": "reallocates its ranks by calling update_and_allocate(step) after every optimizer step and adds "
    "an orthogonality loss, which the shared Trainer recipe does neither of: it would train as a fixed-rank "
    "LoRA; use type lora (or add its callback in a module of its own, stages/methods/)",
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


def method_arguments(section: MethodParams, config_cls: type, model) -> dict:
    """The section's arguments for peft: every one a field of its config class; listed target modules
    checked against the model; `target_modules: auto` left to peft, which resolves it from its own
    mapping for the architecture; fan_in_fan_out set for GPT-2's Conv1D layers."""
    args = dict(section.config.args)
    accepted = accepted_arguments(config_cls)
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise StageError(
            f"{section.name}.{unknown[0]}: not an argument of peft's {config_cls.__name__} "
            f"({', '.join(unknown)} unknown); it accepts: {', '.join(accepted)} (besides type and the train.* recipe keys)"
        )
    if args.get("target_modules") == "auto":
        del args["target_modules"]  # peft's default for the architecture
    if isinstance(args.get("target_modules"), list):
        check_target_modules(section.name, args["target_modules"], model)
    if "fan_in_fan_out" in accepted and "fan_in_fan_out" not in args:
        args["fan_in_fan_out"] = family.fan_in_fan_out(model, args.get("target_modules") or "all-linear")
    return args


def dry_run(section: MethodParams, model):
    """The method built by peft on `model` (a meta model: no weights), from the section's config:
    a type or setting peft cannot build for this model fails here, saying why, rather than after the
    weights load. Its `peft_config["default"]` has `auto` resolved as peft resolves it."""
    config_cls = config_class(section.type, section.name)
    if section.type in NEEDS_ITS_OWN_LOOP:
        raise StageError(f"{section.name}.type: {section.type} {NEEDS_ITS_OWN_LOOP[section.type]}")
    model_family, model_type = family.family(model.config), model.config.model_type
    args = method_arguments(section, config_cls, model)
    try:
        config = config_cls(task_type=family.task_type(model_family), **args)
    except (TypeError, ValueError) as error:
        if "task_type" in str(error):
            raise StageError(
                f"{section.name}: peft's {section.type} does not support {model_family} models ({model_type}): {error}"
            ) from None
        raise StageError(f"{section.name}: peft's {config_cls.__name__} refused its arguments: {error}") from None
    try:
        built = get_peft_model(model, copy.deepcopy(config))
    except (TypeError, ValueError, NotImplementedError, AttributeError, KeyError, RuntimeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "target_modules" in first_line and "target_modules" not in section.config.args:
            raise StageError(
                f"{section.name}.target_modules: peft has no default {section.type} target modules for model type "
                f"{model_type!r}; list layer names (linear layers available: {', '.join(linear_layer_names(model))})"
            ) from None
        raise StageError(
            f"{section.name}: peft cannot build {section.type} for {model_family} models like {model_type!r}: {first_line}"
        ) from None
    return built


def build_model(base, config):
    # the base frozen, the method's weights added; a copy: peft writes into the config it gets
    return get_peft_model(base, copy.deepcopy(config))


def plan(section: MethodParams, base: ModelParams, seed: int) -> Plan:
    del seed  # peft's inits draw from the run's seeded generator
    built = dry_run(section, meta_model(base))  # fail fast, before the weights
    config = built.peft_config["default"]
    # the layers peft adapted (a target that matches nothing is not recorded as if it were)
    adapted = sorted({name.rsplit(".", 1)[-1] for name in getattr(built, "targeted_module_names", [])})
    resolved = {"target_modules": adapted} if adapted else {}
    if isinstance(config, PromptLearningConfig):
        resolved["num_virtual_tokens"] = config.num_virtual_tokens
    return Plan(
        build=partial(build_model, config=config),
        save=save_adapter,
        library="peft",
        frozen_base=True,  # the base only runs forward: bf16 under bf16 training
        resolved=resolved,
    )
