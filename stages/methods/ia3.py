"""Method type `ia3`: freeze the base model and train (IA)3 scaling vectors on it (peft).

(IA)3 (Liu et al. 2022, T-Few) learns one vector per targeted layer that rescales its output
(keys, values) or, for a feed-forward module, its input (the feed-forward's inner activation):
a few thousand trainable numbers per layer stack, evaluated unmerged like LoRA. Its own code is
the feed-forward subset: `feedforward_modules: auto` picks peft's among the targets.
"""

from __future__ import annotations

import copy
from functools import partial

from peft import IA3Config, get_peft_model

from stages import family
from stages.errors import StageError
from stages.method_params import Ia3Params, MethodParams
from stages.methods.plan import Plan
from stages.modeling import check_target_modules, meta_model, save_adapter
from stages.params import ModelParams


def resolved_modules(params: Ia3Params, model, section: str = "ia3") -> tuple[list[str], list[str]]:
    """(target modules, feed-forward modules) as params mean them for this model: auto = peft's
    defaults for its architecture; feed-forward auto with listed targets = peft's feed-forward
    modules among them."""
    if params.target_modules == "auto":
        targets = family.default_target_modules(model.config, "ia3", section)
    else:
        targets = list(params.target_modules)
    if params.feedforward_modules != "auto":
        return targets, list(params.feedforward_modules)
    return targets, [m for m in family.default_feedforward_modules(model.config) if m in targets]


def ia3_config(params: Ia3Params, model, section: str = "ia3") -> IA3Config:
    """IA3Config from params for `model` (a meta model will do), after checking every target module
    exists in it and the feed-forward modules are among the targets."""
    targets, feedforward = resolved_modules(params, model, section)
    check_target_modules(section, targets, model)
    outside = [m for m in feedforward if m not in targets]
    if outside:
        raise StageError(
            f"{section}.feedforward_modules: {', '.join(outside)} not in the target modules {', '.join(targets)}; "
            "a feed-forward module must also be a target"
        )
    return IA3Config(
        task_type=family.task_type(family.family(model.config)),
        target_modules=targets,
        feedforward_modules=feedforward,
        fan_in_fan_out=family.fan_in_fan_out(model, targets),
    )


def build_model(base, config: IA3Config):
    # the base frozen, scaling vectors on the target modules; a copy: peft writes into the config it gets
    return get_peft_model(base, copy.deepcopy(config))


def plan(section: MethodParams, base: ModelParams, seed: int) -> Plan:
    del seed  # (IA)3 starts at ones: nothing drawn
    config = ia3_config(section.config, meta_model(base), section.name)  # fail fast, before the weights
    return Plan(
        build=partial(build_model, config=config),
        save=save_adapter,
        library="peft",
        frozen_base=True,  # bf16 base under bf16
        resolved={
            "target_modules": sorted(config.target_modules),
            "feedforward_modules": sorted(config.feedforward_modules),
            "fan_in_fan_out": config.fan_in_fan_out,
        },
    )
