"""Stage `train_ia3`: freeze the base model and train (IA)3 scaling vectors on it (peft).

Sibling of train_lora.py: `diff stages/train_lora.py stages/train_ia3.py` shows the (IA)3 part.
(IA)3 (Liu et al. 2022, T-Few) learns one vector per targeted layer that rescales its output
(keys, values) or, for a feed-forward module, its input (the feed-forward's inner activation):
a few thousand trainable numbers per layer stack, evaluated unmerged like LoRA.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from functools import partial

from peft import IA3Config, get_peft_model

from stages import family
from stages.errors import StageError, run_stage
from stages.modeling import check_target_modules, meta_model
from stages.params import Ia3Params, load_params
from stages.training import finish_run, save_adapter, start_run, train


def resolved_modules(params: Ia3Params, model) -> tuple[list[str], list[str]]:
    """(target modules, feed-forward modules) as params mean them for this model: auto = peft's
    defaults for its architecture; feed-forward auto with listed targets = peft's feed-forward
    modules among them."""
    if params.target_modules == "auto":
        targets = family.default_target_modules(model.config, "ia3")
    else:
        targets = list(params.target_modules)
    if params.feedforward_modules != "auto":
        return targets, list(params.feedforward_modules)
    return targets, [m for m in family.default_feedforward_modules(model.config) if m in targets]


def ia3_config(params: Ia3Params, model) -> IA3Config:
    """IA3Config from params for `model` (a meta model will do), after checking every target module
    exists in it and the feed-forward modules are among the targets."""
    targets, feedforward = resolved_modules(params, model)
    check_target_modules("ia3", targets, model)
    outside = [m for m in feedforward if m not in targets]
    if outside:
        raise StageError(
            f"ia3.feedforward_modules: {', '.join(outside)} not in the target modules {', '.join(targets)}; "
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


def main() -> None:
    params = load_params()
    run = start_run("ia3", params)
    config = ia3_config(params.ia3, meta_model(run.base))  # fail fast, before the weights
    trained = train(run, partial(build_model, config=config), params.ia3, frozen_base=True)  # bf16 base under bf16
    resolved = {
        "target_modules": sorted(config.target_modules),
        "feedforward_modules": sorted(config.feedforward_modules),
        "fan_in_fan_out": config.fan_in_fan_out,
    }
    card = {"train_ia3": asdict(params.train_ia3), "ia3": asdict(params.ia3), "ia3_resolved": resolved}
    finish_run(run, trained, save_adapter, card)


if __name__ == "__main__":
    run_stage(main)
