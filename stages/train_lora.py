"""Stage `train_lora`: freeze the base model and train LoRA adapters on it (peft).

Sibling of train_full.py: `diff stages/train_full.py stages/train_lora.py` shows the LoRA part.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from peft import LoraConfig, TaskType, get_peft_model

from stages.errors import StageError, run_stage
from stages.modeling import linear_layer_names, load_base, pick_device, set_determinism
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
    training_arguments,
    training_costs,
    training_metrics,
    write_json,
)

PREPARED_DIR = Path("data/prepared")
MODEL_DIR = Path("models/lora")
CHECKPOINT_DIR = Path("checkpoints/train_lora")
CURVES_DIR = Path("dvclive/train_lora")
METRICS_FILE = Path("metrics/train/lora.json")
COSTS_FILE = Path("metrics/timing/train_lora.json")


def lora_config(params: LoraParams, linear_layers: list[str]) -> LoraConfig:
    """LoraConfig from params, after checking every target module is a linear layer of the model."""
    unknown = [m for m in params.target_modules if m not in linear_layers]
    if unknown:
        raise StageError(f"lora.target_modules: {', '.join(unknown)} not found in the model; "
                         f"linear layers available: {', '.join(linear_layers)}")
    return LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=params.r, lora_alpha=params.alpha,
                      lora_dropout=params.dropout, target_modules=list(params.target_modules),
                      bias=params.bias)


def save_adapter(model, tokenizer, out_dir: Path) -> None:
    # only the adapter weights (a few MB) and the tokenizer; the base model comes from model.name
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main() -> None:
    params = load_params()
    exit_with_launcher()
    set_determinism(params.seed, params.deterministic)
    device = pick_device()
    config = lora_config(params.lora, linear_layer_names(params.model))  # fail fast, before the weights
    tokenizer, model = load_base(params.model)
    model = get_peft_model(model, config)
    train, validation = load_training_splits(PREPARED_DIR)
    args = training_arguments(params.train_lora, params.seed, CHECKPOINT_DIR, device, "train_lora")
    trainer = build_trainer(model, tokenizer, train, validation, args)
    resume = resumable_checkpoint(trainer, CHECKPOINT_DIR, fingerprint(PREPARED_DIR, params.seed, params.model,
                                                                       params.train_lora, params.lora))
    attach_curves(trainer, CURVES_DIR, resume)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():  # under torchrun, one process writes the outputs
        save_adapter(trainer.model, tokenizer, MODEL_DIR)
        metrics = training_metrics(trainer)
        write_json(metrics, METRICS_FILE)
        write_json(training_costs(trainer), COSTS_FILE)
        card_params = {"seed": params.seed, "model": asdict(params.model), "train_lora": asdict(params.train_lora),
                       "lora": asdict(params.lora)}
        (MODEL_DIR / "README.md").write_text(model_card(params.model.name, "peft",
                                                        card_params, metrics))
        remove_checkpoints(CHECKPOINT_DIR)


if __name__ == "__main__":
    run_stage(main)
