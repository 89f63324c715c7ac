"""Stage `train_full`: fine-tune every weight of the base model.

Sibling of train_lora.py: `diff stages/train_full.py stages/train_lora.py` shows the LoRA part.
"""

from __future__ import annotations

from pathlib import Path

from transformers import set_seed

from stages.errors import run_stage
from stages.modeling import load_base, pick_device, save_seq2seq
from stages.params import load_params
from stages.training import (
    build_trainer,
    fingerprint,
    load_training_splits,
    remove_checkpoints,
    resumable_checkpoint,
    training_arguments,
    training_metrics,
    write_json,
)

PREPARED_DIR = Path("data/prepared")
MODEL_DIR = Path("models/full")
CHECKPOINT_DIR = Path("checkpoints/train_full")
METRICS_FILE = Path("metrics/train_full.json")


def main() -> None:
    params = load_params()
    set_seed(params.seed)
    device = pick_device()
    tokenizer, model = load_base(params.model)
    train, validation = load_training_splits(PREPARED_DIR)
    args = training_arguments(params.train_full, params.seed, CHECKPOINT_DIR, device)
    trainer = build_trainer(model, tokenizer, train, validation, args)
    resume = resumable_checkpoint(CHECKPOINT_DIR, fingerprint(PREPARED_DIR, params.seed, params.model,
                                                              params.train_full))
    result = trainer.train(resume_from_checkpoint=resume)
    save_seq2seq(trainer.model, tokenizer, MODEL_DIR)
    write_json(training_metrics(trainer, result), METRICS_FILE)
    remove_checkpoints(CHECKPOINT_DIR)


if __name__ == "__main__":
    run_stage(main)
