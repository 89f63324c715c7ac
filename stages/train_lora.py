"""Stage `train_lora`: freeze the base model and train LoRA adapters on it (peft).

Sibling of train_full.py: `diff stages/train_full.py stages/train_lora.py` shows the LoRA part.
Variants through params: DoRA (`lora.use_dora`), rank-stabilized scaling (`lora.use_rslora`), the
initialization (`lora.init`: default, gaussian, pissa, olora) and `lora.target_modules: all-linear`.
PiSSA and OLoRA move the adapter's starting point out of the base weights, so the adapter is
saved converted (see `save_adapter`): models/lora always applies to the untouched base model.
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path

from peft import LoraConfig, TaskType, get_peft_model

from stages.errors import run_stage
from stages.modeling import check_target_modules, linear_layer_names, load_model
from stages.params import LoraParams, ModelParams, load_params
from stages.training import finish_run, save_adapter, start_run, train

# lora.init -> peft's init_lora_weights; True = A Kaiming-uniform, B zero (the LoRA paper's init)
INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
MUTATES_BASE = ("pissa", "olora")  # inits that subtract the initial adapter from the base weights


def lora_config(params: LoraParams, linear_layers: list[str]) -> LoraConfig:
    """LoraConfig from params, after checking every target module is a linear layer of the model
    (all-linear is peft's shorthand for every linear layer but the output head)."""
    targets = params.target_modules if params.target_modules == "all-linear" else list(params.target_modules)
    if targets != "all-linear":
        check_target_modules("lora", targets, linear_layers)
    return LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=targets,
        bias=params.bias,
        use_dora=params.use_dora,
        use_rslora=params.use_rslora,
        init_lora_weights=INIT[params.init],
    )


def build_model(base, config: LoraConfig):
    # the base frozen, adapters on the target modules; a copy: peft writes into the config it gets
    return get_peft_model(base, copy.deepcopy(config))


def save_initial_adapter(base: ModelParams, config: LoraConfig, params: LoraParams) -> Path | None:
    """PiSSA/OLoRA only: the adapter as initialized, before any training (in a temporary folder,
    removed at exit), which `save_adapter` needs to convert the trained adapter; else None.

    Both take the adapter's starting value out of the base weights (W = W_res + B0 A0), so the
    trained adapter only fits that rewritten base. Built from a fresh copy of the base weights:
    the decomposition is deterministic, so this is the adapter every attempt (and a resumed run)
    started from.
    """
    if params.init not in MUTATES_BASE:
        return None
    folder = Path(tempfile.mkdtemp(prefix="lora_initial_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    build_model(load_model(base.name, base.revision), config).save_pretrained(
        folder / "initial", safe_serialization=True
    )
    return folder / "initial"


def main() -> None:
    params = load_params()
    run = start_run("lora", params)
    config = lora_config(params.lora, linear_layer_names(run.base))  # fail fast, before the weights
    trained = train(run, partial(build_model, config=config), params.lora)
    initial = save_initial_adapter(run.base, config, params.lora)  # PiSSA/OLoRA: to convert the adapter on save
    save = partial(save_adapter, initial_adapter=initial)
    finish_run(run, trained, save, {"train_lora": asdict(params.train_lora), "lora": asdict(params.lora)})


if __name__ == "__main__":
    run_stage(main)
