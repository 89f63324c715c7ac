"""Stage `train_prompt`: freeze the base model and train a soft prompt for it (peft prompt tuning).

Sibling of train_lora.py: `diff stages/train_lora.py stages/train_prompt.py` shows the prompt part.
Prompt tuning (Lester et al. 2021) prepends `prompt.num_virtual_tokens` trainable embeddings to
the encoder input; nothing inside the model changes, so it cannot be merged and is evaluated
as an adapter (peft prepends the prompt, and ones to the attention mask, in generate()).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from stages.errors import run_stage
from stages.jsonio import read_json, write_json
from stages.modeling import load_base, pick_device, read_pin, set_determinism
from stages.params import ModelParams, PromptParams, load_params
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
MODEL_DIR = Path("models/prompt")
CHECKPOINT_DIR = Path("checkpoints/train_prompt")
CURVES_DIR = Path("dvclive/train_prompt")
METRICS_FILE = Path("metrics/train/prompt.json")
COSTS_FILE = Path("metrics/timing/train_prompt.json")
VALIDATION_FILE = Path("metrics/validation/prompt.json")
INIT = {"text": PromptTuningInit.TEXT, "sample_vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}


def prompt_config(params: PromptParams, model: ModelParams) -> PromptTuningConfig:
    """PromptTuningConfig from params: the prompt goes to the encoder only.

    num_transformer_submodules=1: peft's seq2seq default (2) allocates a second block of
    num_virtual_tokens rows for the decoder that prompt tuning never uses, so the trainable
    count (and the saved adapter) would be twice what trains. The text init tokenizes
    prompt.init_text with the model's own tokenizer (same name and revision).
    """
    text = params.init == "text"
    return PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=params.num_virtual_tokens,
        num_transformer_submodules=1,
        prompt_tuning_init=INIT[params.init],
        prompt_tuning_init_text=params.init_text if text else None,
        tokenizer_name_or_path=model.name if text else None,
        tokenizer_kwargs={"revision": model.revision} if text else None,
    )


def save_adapter(model, tokenizer, out_dir: Path) -> None:
    # only the prompt embeddings (a few kB) and the tokenizer; the base model comes from model.name
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main() -> None:
    params = load_params()
    exit_with_launcher()
    set_determinism(params.seed, params.deterministic)
    device = pick_device()
    base = read_pin(BASE_PIN, params.model)  # the commit baselines pinned
    config = prompt_config(params.prompt, base)  # fail fast, before the weights
    tokenizer, model = load_base(base)
    model = get_peft_model(model, config)
    train, validation = load_training_splits(PREPARED_DIR)
    args = training_arguments(params.train_prompt, params.seed, CHECKPOINT_DIR, device, "train_prompt")
    trainer = build_trainer(model, tokenizer, train, validation, args)
    subset = attach_validation(trainer, tokenizer, validation, params.train_prompt, params.validate, params.seed)
    resume = resumable_checkpoint(
        trainer,
        CHECKPOINT_DIR,
        fingerprint(
            PREPARED_DIR, params.seed, read_json(BASE_PIN), params.train_prompt, params.validate, params.prompt
        ),
    )
    attach_curves(trainer, CURVES_DIR, resume)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():  # under torchrun, one process writes the outputs
        save_adapter(trainer.model, tokenizer, MODEL_DIR)
        metrics = {
            **training_metrics(trainer),
            **selection_metrics(trainer, params.train_prompt, subset),
            "saved_mb": saved_mb(MODEL_DIR),
        }
        write_json(metrics, METRICS_FILE)
        write_json(validation_record(trainer, subset, params.train_prompt, params.seed), VALIDATION_FILE)
        costs = {**training_costs(trainer), "validation_runtime_s": validation_runtime_s(trainer.state.log_history)}
        write_json(costs, COSTS_FILE)
        card_params = {
            "seed": params.seed,
            "model": asdict(params.model),
            "train_prompt": asdict(params.train_prompt),
            "validate": asdict(params.validate),
            "prompt": asdict(params.prompt),
        }
        (MODEL_DIR / "README.md").write_text(model_card(BASE_PIN, "peft", card_params, metrics))
        remove_checkpoints(CHECKPOINT_DIR)


if __name__ == "__main__":
    run_stage(main)
