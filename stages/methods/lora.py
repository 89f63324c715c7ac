"""Method type `lora`: freeze the base model and train LoRA adapters on it (peft).

Variants through params: DoRA (`use_dora`), rank-stabilized scaling (`use_rslora`), the
initialization (`init`: default, gaussian, pissa, olora), `target_modules` (auto = peft's default for
the architecture, all-linear or a list) and QLoRA (`quantization: 4bit`: the frozen base in NF4
through bitsandbytes, which generate@ loads the same way).
PiSSA and OLoRA move the adapter's starting point out of the base weights, so the adapter is
saved converted (see `save_converted`): models/<method> always applies to the untouched base model.
"""

from __future__ import annotations

import atexit
import copy
import shutil
import tempfile
from functools import partial
from pathlib import Path

from peft import LoraConfig, get_peft_model

from stages import family
from stages.method_params import LoraParams, MethodParams
from stages.methods.plan import Plan
from stages.modeling import check_target_modules, load_model, meta_model, save_adapter
from stages.params import ModelParams

# init -> peft's init_lora_weights; True = A Kaiming-uniform, B zero (the LoRA paper's init)
INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
MUTATES_BASE = ("pissa", "olora")  # inits that subtract the initial adapter from the base weights


def resolved_targets(params: LoraParams, model, section: str = "lora") -> list[str] | str:
    """The target modules `target_modules` means for this model (`model`: a meta model will do):
    auto = peft's default for its architecture, all-linear as peft reads it, a list as written."""
    if params.target_modules == "auto":
        return family.default_target_modules(model.config, "lora", section)
    return params.target_modules if params.target_modules == "all-linear" else list(params.target_modules)


def lora_config(params: LoraParams, model, section: str = "lora") -> LoraConfig:
    """LoraConfig from params for `model` (a meta model will do: names and config only), after
    checking every listed target module exists in it (all-linear is peft's shorthand for every
    linear layer but the output head). fan_in_fan_out is set for layers that store their weight
    transposed (GPT-2's Conv1D), so the adapter config records it."""
    targets = resolved_targets(params, model, section)
    if targets != "all-linear":
        check_target_modules(section, targets, model)
    return LoraConfig(
        task_type=family.task_type(family.family(model.config)),
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=targets,
        fan_in_fan_out=family.fan_in_fan_out(model, targets),
        bias=params.bias,
        use_dora=params.use_dora,
        use_rslora=params.use_rslora,
        init_lora_weights=INIT[params.init],
    )


def build_model(base, config: LoraConfig):
    # the base frozen, adapters on the target modules; a copy: peft writes into the config it gets.
    # A quantized base (QLoRA) first gets peft's k-bit preparation (a no-op otherwise), without its
    # own checkpointing: train.gradient_checkpointing decides that, for every base alike
    prepared = family.prepare_for_kbit_training(base, gradient_checkpointing=False)
    return get_peft_model(prepared, copy.deepcopy(config))  # autocast_adapter_dtype: fp32 adapters on a bf16 base


def initial_adapter(base: ModelParams, config: LoraConfig) -> Path:
    """PiSSA/OLoRA: the adapter as initialized, before any training (in a temporary folder, removed at
    exit), which the converted save needs.

    Both take the adapter's starting value out of the base weights (W = W_res + B0 A0), so the
    trained adapter only fits that rewritten base. Built from a fresh copy of the base weights:
    the decomposition is deterministic, so this is the adapter every attempt (and a resumed run)
    started from.
    """
    folder = Path(tempfile.mkdtemp(prefix="lora_initial_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    build_model(load_model(base.name, base.revision), config).save_pretrained(
        folder / "initial", safe_serialization=True
    )
    return folder / "initial"


def save_converted(model, tokenizer, out_dir: Path, base: ModelParams, config: LoraConfig) -> None:
    """PiSSA/OLoRA: peft saves the trained adapter minus the initial one as a plain LoRA adapter of
    rank 2r that applies to the untouched base model."""
    save_adapter(model, tokenizer, out_dir, initial_adapter=initial_adapter(base, config))


def plan(section: MethodParams, base: ModelParams, seed: int) -> Plan:
    del seed  # LoRA's init draws from the run's seeded generator
    params: LoraParams = section.config
    config = lora_config(params, meta_model(base), section.name)  # fail fast, before the weights
    targets = config.target_modules  # peft keeps a list as a set
    mutates = params.init in MUTATES_BASE
    return Plan(
        build=partial(build_model, config=config),
        save=partial(save_converted, base=base, config=config) if mutates else save_adapter,
        library="peft",
        # the frozen base in bf16 under bf16 training, but for PiSSA/OLoRA, which rewrite it as W - B0 A0:
        # in bf16 that residual rounds, and the adapter saved for the untouched base would not be the trained one
        frozen_base=not mutates,
        quantization=params.quantization,  # QLoRA: the frozen base loads through bitsandbytes
        resolved={
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "fan_in_fan_out": config.fan_in_fan_out,
        },
    )
