"""Stage `train_full`: fine-tune every weight of the base model.

Sibling of train_lora.py: `diff stages/train_full.py stages/train_lora.py` shows the LoRA part.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from stages.errors import run_stage
from stages.jsonio import read_json, write_json
from stages.modeling import load_base, pick_device, read_pin, save_seq2seq, set_determinism
from stages.params import load_params
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
MODEL_DIR = Path("models/full")
CHECKPOINT_DIR = Path("checkpoints/train_full")
CURVES_DIR = Path("dvclive/train_full")
METRICS_FILE = Path("metrics/train/full.json")
COSTS_FILE = Path("metrics/timing/train_full.json")
VALIDATION_FILE = Path("metrics/validation/full.json")


def main() -> None:
    params = load_params()
    exit_with_launcher()
    set_determinism(params.seed, params.deterministic)
    device = pick_device()
    base = read_pin(BASE_PIN, params.model)  # the commit baselines pinned
    tokenizer, model = load_base(base)
    train, validation = load_training_splits(PREPARED_DIR)
    args = training_arguments(params.train_full, params.seed, CHECKPOINT_DIR, device, "train_full")
    trainer = build_trainer(model, tokenizer, train, validation, args)
    subset = attach_validation(trainer, tokenizer, validation, params.train_full, params.validate, params.seed)
    resume = resumable_checkpoint(
        trainer,
        CHECKPOINT_DIR,
        fingerprint(PREPARED_DIR, params.seed, read_json(BASE_PIN), params.train_full, params.validate),
    )
    attach_curves(trainer, CURVES_DIR, resume)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():  # under torchrun, one process writes the outputs
        save_seq2seq(trainer.model, tokenizer, MODEL_DIR)
        metrics = {
            **training_metrics(trainer),
            **selection_metrics(trainer, params.train_full, subset),
            "saved_mb": saved_mb(MODEL_DIR),
        }
        write_json(metrics, METRICS_FILE)
        write_json(validation_record(trainer, subset, params.train_full, params.seed), VALIDATION_FILE)
        costs = {**training_costs(trainer), "validation_runtime_s": validation_runtime_s(trainer.state.log_history)}
        write_json(costs, COSTS_FILE)
        card_params = {
            "seed": params.seed,
            "model": asdict(params.model),
            "train_full": asdict(params.train_full),
            "validate": asdict(params.validate),
        }
        (MODEL_DIR / "README.md").write_text(model_card(BASE_PIN, "transformers", card_params, metrics))
        remove_checkpoints(CHECKPOINT_DIR)


if __name__ == "__main__":
    run_stage(main)
