"""Stage `train_ia3`: freeze the base model and train (IA)3 scaling vectors on it (peft).

Sibling of train_lora.py: `diff stages/train_lora.py stages/train_ia3.py` shows the (IA)3 part.
(IA)3 (Liu et al. 2022, T-Few) learns one vector per targeted layer that rescales its output
(keys, values) or, for a feed-forward module, its input (the feed-forward's inner activation):
a few thousand trainable numbers per layer stack, evaluated unmerged like LoRA.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from peft import IA3Config, TaskType, get_peft_model

from stages.errors import run_stage
from stages.jsonio import read_json, write_json
from stages.modeling import check_target_modules, linear_layer_names, load_base, pick_device, read_pin, set_determinism
from stages.params import Ia3Params, load_params
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
MODEL_DIR = Path("models/ia3")
CHECKPOINT_DIR = Path("checkpoints/train_ia3")
CURVES_DIR = Path("dvclive/train_ia3")
METRICS_FILE = Path("metrics/train/ia3.json")
COSTS_FILE = Path("metrics/timing/train_ia3.json")
VALIDATION_FILE = Path("metrics/validation/ia3.json")


def ia3_config(params: Ia3Params, linear_layers: list[str]) -> IA3Config:
    """IA3Config from params, after checking every target module is a linear layer of the model
    (ia3.feedforward_modules is a subset of the targets: params.py checks that)."""
    check_target_modules("ia3", list(params.target_modules), linear_layers)
    return IA3Config(
        task_type=TaskType.SEQ_2_SEQ_LM,
        target_modules=list(params.target_modules),
        feedforward_modules=list(params.feedforward_modules),
    )


def save_adapter(model, tokenizer, out_dir: Path) -> None:
    # only the adapter weights (a few kB) and the tokenizer; the base model comes from model.name
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main() -> None:
    params = load_params()
    exit_with_launcher()
    set_determinism(params.seed, params.deterministic)
    device = pick_device()
    base = read_pin(BASE_PIN, params.model)  # the commit baselines pinned
    config = ia3_config(params.ia3, linear_layer_names(base))  # fail fast, before the weights
    tokenizer, model = load_base(base)
    model = get_peft_model(model, config)
    train, validation = load_training_splits(PREPARED_DIR)
    args = training_arguments(params.train_ia3, params.seed, CHECKPOINT_DIR, device, "train_ia3")
    trainer = build_trainer(model, tokenizer, train, validation, args)
    subset = attach_validation(trainer, tokenizer, validation, params.train_ia3, params.validate, params.seed)
    resume = resumable_checkpoint(
        trainer,
        CHECKPOINT_DIR,
        fingerprint(PREPARED_DIR, params.seed, read_json(BASE_PIN), params.train_ia3, params.validate, params.ia3),
    )
    attach_curves(trainer, CURVES_DIR, resume)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():  # under torchrun, one process writes the outputs
        save_adapter(trainer.model, tokenizer, MODEL_DIR)
        metrics = {
            **training_metrics(trainer),
            **selection_metrics(trainer, params.train_ia3, subset),
            "saved_mb": saved_mb(MODEL_DIR),
        }
        write_json(metrics, METRICS_FILE)
        write_json(validation_record(trainer, subset, params.train_ia3, params.seed), VALIDATION_FILE)
        costs = {**training_costs(trainer), "validation_runtime_s": validation_runtime_s(trainer.state.log_history)}
        write_json(costs, COSTS_FILE)
        card_params = {
            "seed": params.seed,
            "model": asdict(params.model),
            "train_ia3": asdict(params.train_ia3),
            "validate": asdict(params.validate),
            "ia3": asdict(params.ia3),
        }
        (MODEL_DIR / "README.md").write_text(model_card(BASE_PIN, "peft", card_params, metrics))
        remove_checkpoints(CHECKPOINT_DIR)


if __name__ == "__main__":
    run_stage(main)
