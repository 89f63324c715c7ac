"""Validation by generation during training on the tiny model: the peak checkpoint is the one kept,
early stopping stops, and a killed run resumes with its validation history and best checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from stages.checkpoints import complete_checkpoints
from stages.ledger import training_costs
from stages.modeling import load_model, load_tokenizer
from stages.params import PrepareParams, ValidateParams
from stages.prepare import prepare_training_split
from stages.recipe import build_trainer, training_arguments
from stages.validation import (
    ValidationByGeneration,
    attach_validation,
    selection_metrics,
    validation_history,
    validation_subset,
)
from tests.conftest import dialogsum_rows, problems, tiny_train_params

PREPARE = PrepareParams(
    prompt_template="Summarize:\n{dialogue}\nSummary: ", max_source_length=128, max_target_length=32
)
VALIDATE = ValidateParams(dialogues=4, num_beams=1, max_new_tokens=16, batch_size=4)
# Memorize 4 dialogues (validated on the same 4) while linear warm-up raises the learning rate to
# 0.15 by the end: it learns while the rate is small, and the ever larger steps then wreck what it
# learned, so validation ROUGE-L peaks (step 16 here, on CPU) and ends far lower
OVERFIT = tiny_train_params(
    epochs=40,  # 4 rows / 4 per step: 40 optimizer steps
    learning_rate=1.5e-1,
    warmup_ratio=0.95,
    lr_scheduler="linear",
    batch_size=4,
    eval_batch_size=4,
    save_steps=4,  # validate (and checkpoint) every 4 steps: 10 evaluations
    logging_steps=100,
    select_by="rougeL",
)


def splits(model_dir: Path):
    tokenizer = load_tokenizer(str(model_dir))
    rows = dialogsum_rows("train", 4)
    train, _ = prepare_training_split(rows, tokenizer, PREPARE)
    validation = train.add_column("id", [r["id"] for r in rows]).add_column("summary", [r["summary"] for r in rows])
    return tokenizer, train, validation


def trainer_for(model_dir: Path, output_dir: Path, params, callbacks=()):
    tokenizer, train, validation = splits(model_dir)
    args = training_arguments(params, seed=0, output_dir=output_dir, device=torch.device("cpu"), section="full")
    trainer = build_trainer(load_model(str(model_dir)), tokenizer, train, validation, args)
    subset = attach_validation(trainer, tokenizer, validation, params, VALIDATE, seed=0)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer, subset


@pytest.fixture(scope="module")
def overfit_run(tiny_model_dir, tmp_path_factory):
    trainer, subset = trainer_for(tiny_model_dir, tmp_path_factory.mktemp("overfit"), OVERFIT)
    trainer.train()
    return trainer, subset


def test_peak_checkpoint_is_the_one_kept(overfit_run):
    trainer, subset = overfit_run
    history = validation_history(trainer.state.log_history)
    assert [e["step"] for e in history] == list(range(4, 41, 4))  # every checkpoint, the last step included
    peak = max(history, key=lambda e: e["rougeL"])
    assert peak["step"] < 40 and history[-1]["rougeL"] < peak["rougeL"] - 10  # the premise: it peaked, then fell
    metrics = selection_metrics(trainer, OVERFIT, subset)
    assert metrics["selected_step"] == peak["step"]
    assert metrics["selected_val_rougeL"] == metrics["best_val_rougeL"] == peak["rougeL"]
    assert metrics["stopped_early"] == 0 and metrics["evaluations"] == 10 and metrics["validation_dialogues"] == 4
    # the weights the stage saves are the peak's: scoring the final model again gives the peak score
    scorer = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ValidationByGeneration))
    assert scorer.score(trainer.model) == peak["rougeL"]


def test_the_reloaded_best_checkpoint_keeps_the_embedding_aliases_and_the_warning_about_them_is_dropped(overfit_run):
    """The Trainer reloads the best checkpoint with strict=False and lists the encoder/decoder
    embed_tokens as missing: they are `shared.weight` itself (one tensor), so they were restored,
    and stages/__init__.py drops that one warning; another missing key still warns."""
    model = overfit_run[0].model
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    assert model.lm_head.weight is not model.shared.weight  # FLAN-T5's separate head stays apart
    trainer_log = logging.getLogger("transformers.trainer")

    def shown(keys: list[str]) -> bool:
        message = f"There were missing keys in the checkpoint model loaded: {keys}."
        return trainer_log.filter(logging.LogRecord("transformers.trainer", logging.WARNING, "", 0, message, (), None))

    assert not shown(["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"])
    assert not shown(["base_model.model.encoder.embed_tokens.weight"])
    assert shown(["encoder.embed_tokens.weight", "lm_head.weight"])
    assert shown(["lm_head.weight"])


def stopping_step(history: list[dict], patience: int) -> int:
    """Where early stopping should end this history: after `patience` evaluations in a row that do
    not beat the best score so far (the first evaluation sets it)."""
    best, waited = None, 0
    for entry in history:
        if best is None or entry["rougeL"] > best:
            best, waited = entry["rougeL"], 0
        else:
            waited += 1
        if waited == patience:
            return entry["step"]
    return history[-1]["step"]


def test_early_stopping_stops_after_patience_evaluations_without_improvement(overfit_run, tiny_model_dir, tmp_path):
    full_history = validation_history(overfit_run[0].state.log_history)
    stop = stopping_step(full_history, patience=3)
    assert stop < 40  # the premise: three evaluations without a new best come before the end
    trainer, subset = trainer_for(tiny_model_dir, tmp_path, dataclasses.replace(OVERFIT, patience=3))
    trainer.train()
    assert trainer.state.global_step == stop
    assert validation_history(trainer.state.log_history) == [e for e in full_history if e["step"] <= stop]
    metrics = selection_metrics(trainer, OVERFIT, subset)
    assert metrics["stopped_early"] == 1 and metrics["planned_steps"] == 40 and metrics["last_step"] == stop
    costs = training_costs(trainer)  # throughput counts the samples of the steps that ran: 4 per step
    assert costs["train_samples_per_second"] * costs["train_runtime_s"] == pytest.approx(4 * stop, rel=0.01)
    best_before_stop = max((e for e in full_history if e["step"] <= stop), key=lambda e: e["rougeL"])
    assert metrics["selected_step"] == best_before_stop["step"]


def test_select_by_loss_keeps_the_lowest_validation_loss_checkpoint(overfit_run, tiny_model_dir, tmp_path):
    """The same run selected by validation loss: the kept weights are the lowest-loss checkpoint's, which
    is not the last one (the overfitting run's loss rises again as its steps grow)."""
    by_loss = dataclasses.replace(OVERFIT, select_by="loss")
    trainer, subset = trainer_for(tiny_model_dir, tmp_path, by_loss)
    trainer.train()
    history = validation_history(trainer.state.log_history)
    assert [e["rougeL"] for e in history] == [e["rougeL"] for e in validation_history(overfit_run[0].state.log_history)]
    lowest = min(history, key=lambda e: e["loss"])
    assert lowest["step"] < 40  # the premise: the loss is lowest before the end
    metrics = selection_metrics(trainer, by_loss, subset)
    assert metrics["select_by"] == "loss" and metrics["selected_step"] == lowest["step"]
    assert metrics["selected_val_loss"] == round(lowest["loss"], 6)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(lowest["loss"], rel=1e-5)  # the kept weights are its


class KillAfterSave(TrainerCallback):
    """Ends the run (as a kill would) right after the checkpoint of `step` is on disk."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after checkpoint-{self.step}")


def test_killed_run_resumes_with_its_validation_history_best_checkpoint_and_patience(
    overfit_run, tiny_model_dir, tmp_path
):
    full_history = validation_history(overfit_run[0].state.log_history)
    peak = max(full_history, key=lambda e: e["rougeL"])["step"]
    patient = dataclasses.replace(OVERFIT, patience=3)
    stop, kill_at = stopping_step(full_history, patience=3), peak + 8  # killed two validations past the best
    assert kill_at < stop  # the premise: the kill comes while early stopping is counting
    trainer, _ = trainer_for(tiny_model_dir, tmp_path, patient, [KillAfterSave(kill_at)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    # on disk: the newest checkpoint to resume from, and the best so far, kept despite save_total_limit=1
    assert [p.name for p in complete_checkpoints(tmp_path)] == [f"checkpoint-{peak}", f"checkpoint-{kill_at}"]

    resumed, subset = trainer_for(tiny_model_dir, tmp_path, patient)
    resumed.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{kill_at}"))
    # the history before the kill came back, and early stopping went on counting from 2, not from 0
    assert validation_history(resumed.state.log_history) == [e for e in full_history if e["step"] <= stop]
    assert resumed.state.global_step == stop
    assert selection_metrics(resumed, patient, subset)["selected_step"] == peak


def test_validation_subset_is_a_seeded_fixed_choice(overfit_run):
    _, validation = overfit_run[1], overfit_run[0].eval_dataset
    ids = validation_subset(validation, 2, seed=7)["id"]
    assert ids == validation_subset(validation, 2, seed=7)["id"] and len(set(ids)) == 2
    assert ids == sorted(ids, key=list(validation["id"]).index)  # in split order
    assert validation_subset(validation, 10, seed=7)["id"] == list(validation["id"])  # fewer rows: all of them


def test_params_refuse_early_stopping_without_a_metric_and_an_empty_subset(raw):
    raw["lora"].update(select_by="last", patience=2)  # LoRA's own recipe differences
    raw["validate"]["dialogues"] = 0
    message = problems(raw)
    assert (
        "lora.patience: early stopping needs a validation metric to improve; "
        "set select_by to rougeL or loss, or patience to 0"
    ) in message
    assert "validate.dialogues: must be >= 1, got 0" in message
    raw["lora"]["select_by"] = "bleu"
    assert "lora.select_by: expected one of 'rougeL', 'loss', 'last', got 'bleu'" in problems(raw)


def test_validation_generates_from_the_prompt_of_a_causal_row():
    """A decoder-only training row is prompt, summary, EOS with the prompt's labels masked: the
    validation prompt is that masked prefix, never the reference it would otherwise continue."""
    from datasets import Dataset

    from stages.validation import prompt_ids

    rows = Dataset.from_dict(
        {
            "input_ids": [[5, 6, 7, 20, 21, 2], [8, 9, 30, 2]],
            "labels": [[-100, -100, -100, 20, 21, 2], [-100, -100, 30, 2]],
        }
    )
    assert prompt_ids(rows, "causal") == [[5, 6, 7], [8, 9]]
    assert prompt_ids(rows, "seq2seq") == [[5, 6, 7, 20, 21, 2], [8, 9, 30, 2]]  # seq2seq: the input is the prompt
