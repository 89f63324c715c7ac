"""Stage `train_lora`: freeze the base model and train LoRA adapters on it (peft).

Sibling of train_full.py: `diff stages/train_full.py stages/train_lora.py` shows the LoRA part.
Variants through params: DoRA (`lora.use_dora`), rank-stabilized scaling (`lora.use_rslora`), the
initialization (`lora.init`: default, gaussian, pissa, olora) and `lora.target_modules: all-linear`.
PiSSA and OLoRA move the adapter's starting point out of the base weights, so the adapter is
saved converted (see `save_adapter`): models/lora always applies to the untouched base model.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from peft import LoraConfig, TaskType, get_peft_model

from stages.errors import run_stage
from stages.jsonio import read_json, write_json
from stages.modeling import check_target_modules, linear_layer_names, load_base, pick_device, read_pin, set_determinism
from stages.params import LoraParams, load_params
from stages.training import (
    attach_curves,
    build_trainer,
    exit_with_launcher,
    fingerprint,
    load_training_splits,
    model_card,
    remove_checkpoints,
    resumable_checkpoint,
    saved_mb,
    training_arguments,
    training_costs,
    training_metrics,
)
from stages.validation import attach_validation, selection_metrics, validation_record, validation_runtime_s

PREPARED_DIR = Path("data/prepared")
BASE_PIN = Path("models/base/pin.json")
MODEL_DIR = Path("models/lora")
CHECKPOINT_DIR = Path("checkpoints/train_lora")
CURVES_DIR = Path("dvclive/train_lora")
METRICS_FILE = Path("metrics/train/lora.json")
COSTS_FILE = Path("metrics/timing/train_lora.json")
VALIDATION_FILE = Path("metrics/validation/lora.json")
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


def save_initial_adapter(model, params: LoraParams) -> Path | None:
    """PiSSA/OLoRA only: the adapter as initialized, before any training (in a temporary folder,
    removed at exit), which `save_adapter` needs to convert the trained adapter; else None.

    Both take the adapter's starting value out of the base weights (W = W_res + B0 A0), so the
    trained adapter only fits that rewritten base. Called before training: a resumed run
    re-initializes from the same base weights (a deterministic decomposition) and only then
    loads the checkpoint's adapter, so this is the initial adapter either way.
    """
    if params.init not in MUTATES_BASE:
        return None
    folder = Path(tempfile.mkdtemp(prefix="lora_initial_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.save_pretrained(folder / "initial", safe_serialization=True)
    return folder / "initial"


def save_adapter(model, tokenizer, out_dir: Path, initial_adapter: Path | None = None) -> None:
    # only the adapter weights (a few MB) and the tokenizer; the base model comes from model.name.
    # After PiSSA/OLoRA, peft saves the trained adapter minus the initial one as a plain LoRA
    # adapter of rank 2r ([B | -B0] [A ; A0]) that applies to the untouched base model
    model.save_pretrained(
        out_dir,
        safe_serialization=True,
        path_initial_model_for_weight_conversion=(None if initial_adapter is None else str(initial_adapter)),
    )
    tokenizer.save_pretrained(out_dir)


def main() -> None:
    params = load_params()
    exit_with_launcher()
    set_determinism(params.seed, params.deterministic)
    device = pick_device()
    base = read_pin(BASE_PIN, params.model)  # the commit baselines pinned
    config = lora_config(params.lora, linear_layer_names(base))  # fail fast, before the weights
    tokenizer, model = load_base(base)
    model = get_peft_model(model, config)
    initial = save_initial_adapter(model, params.lora)  # PiSSA/OLoRA: to convert the adapter on save
    train, validation = load_training_splits(PREPARED_DIR)
    args = training_arguments(params.train_lora, params.seed, CHECKPOINT_DIR, device, "train_lora")
    trainer = build_trainer(model, tokenizer, train, validation, args)
    subset = attach_validation(trainer, tokenizer, validation, params.train_lora, params.validate, params.seed)
    resume = resumable_checkpoint(
        trainer,
        CHECKPOINT_DIR,
        fingerprint(PREPARED_DIR, params.seed, read_json(BASE_PIN), params.train_lora, params.validate, params.lora),
    )
    attach_curves(trainer, CURVES_DIR, resume)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():  # under torchrun, one process writes the outputs
        save_adapter(trainer.model, tokenizer, MODEL_DIR, initial)
        metrics = {
            **training_metrics(trainer),
            **selection_metrics(trainer, params.train_lora, subset),
            "saved_mb": saved_mb(MODEL_DIR),
        }
        write_json(metrics, METRICS_FILE)
        write_json(validation_record(trainer, subset, params.train_lora, params.seed), VALIDATION_FILE)
        costs = {**training_costs(trainer), "validation_runtime_s": validation_runtime_s(trainer.state.log_history)}
        write_json(costs, COSTS_FILE)
        card_params = {
            "seed": params.seed,
            "model": asdict(params.model),
            "train_lora": asdict(params.train_lora),
            "validate": asdict(params.validate),
            "lora": asdict(params.lora),
        }
        (MODEL_DIR / "README.md").write_text(model_card(BASE_PIN, "peft", card_params, metrics))
        remove_checkpoints(CHECKPOINT_DIR)


if __name__ == "__main__":
    run_stage(main)
