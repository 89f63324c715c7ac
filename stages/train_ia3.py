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

from peft import IA3Config, TaskType, get_peft_model

from stages.errors import run_stage
from stages.modeling import check_target_modules, linear_layer_names
from stages.params import Ia3Params, load_params
from stages.training import finish_run, save_adapter, start_run, train


def ia3_config(params: Ia3Params, linear_layers: list[str]) -> IA3Config:
    """IA3Config from params, after checking every target module is a linear layer of the model
    (ia3.feedforward_modules is a subset of the targets: params.py checks that)."""
    check_target_modules("ia3", list(params.target_modules), linear_layers)
    return IA3Config(
        task_type=TaskType.SEQ_2_SEQ_LM,
        target_modules=list(params.target_modules),
        feedforward_modules=list(params.feedforward_modules),
    )


def build_model(base, config: IA3Config):
    # the base frozen, scaling vectors on the target modules; a copy: peft writes into the config it gets
    return get_peft_model(base, copy.deepcopy(config))


def main() -> None:
    params = load_params()
    run = start_run("ia3", params)
    config = ia3_config(params.ia3, linear_layer_names(run.base))  # fail fast, before the weights
    trained = train(run, partial(build_model, config=config), params.ia3)
    finish_run(run, trained, save_adapter, {"train_ia3": asdict(params.train_ia3), "ia3": asdict(params.ia3)})


if __name__ == "__main__":
    run_stage(main)
