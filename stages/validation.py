"""Validation by generation during training, best-checkpoint selection and early stopping.

Every train@<method> stage validates at each checkpoint (the recipe's `save_steps`) and at the
last step: the Trainer's validation loss over the whole validation split, then summaries generated
for a fixed seeded subset of `validate.dialogues` validation dialogues, scored with the project's
ROUGE (stages/rouge.py) against their reference. Generation is stages/generate.py's, with the
`validate` section's decoding (greedy by default, to save time; the test summaries use `generate`).

The Trainer's own machinery does the rest:
- `metric_for_best_model` (eval_rougeL or eval_loss, from the recipe's `select_by`) marks the
  best checkpoint, which rotation then keeps beside the newest one despite save_total_limit=1, and
  `load_best_model_at_end` loads it before the stage saves the model;
- `EarlyStoppingCallback` stops after the recipe's `patience` evaluations without improvement.
Validation must therefore run where a checkpoint is saved: eval_steps = save_steps.

Resume: the scores are logged through Trainer.log, so they sit in the log history that every
checkpoint's trainer_state.json carries, with best_metric / best_model_checkpoint; the early
stopping counter is restored from the same file. A kill loses nothing but the work after the
newest checkpoint. Validation time is inside the run's train time (RunLedger measures the whole
train() call) and is counted apart from the training loop's time (stages/ledger.py validation_runtime_s).
"""

from __future__ import annotations

import copy
import random
import time
from typing import Sequence

from datasets import Dataset
from transformers import EarlyStoppingCallback, PreTrainedTokenizerBase, Trainer, TrainerCallback

from stages import family
from stages.generate import generate_summaries
from stages.method_params import TrainParams
from stages.params import GenerateParams, ValidateParams
from stages.rouge import mean_scores, score_corpus

# select_by -> (metric_for_best_model, greater_is_better); `last` keeps the final weights
SELECTION = {"rougeL": ("eval_rougeL", True), "loss": ("eval_loss", False), "last": (None, None)}


def validation_arguments(params: TrainParams) -> dict:
    """TrainingArguments settings for validating at every checkpoint and selecting one."""
    metric, greater = SELECTION[params.select_by]
    return {
        "eval_strategy": "steps",
        "eval_steps": params.save_steps,  # every checkpoint is validated, so the best one exists on disk
        "metric_for_best_model": metric,
        "greater_is_better": greater,
        "load_best_model_at_end": metric is not None,
    }


def validation_subset(validation: Dataset, dialogues: int, seed: int) -> Dataset:
    """A fixed choice of `dialogues` rows (all of them if there are fewer), seeded by `seed` and in
    split order, so every method and every run of one method is scored on the same dialogues."""
    count = min(dialogues, len(validation))
    return validation.select(sorted(random.Random(seed).sample(range(len(validation)), count)))


def validation_decoding(params: ValidateParams) -> GenerateParams:
    """The `validate` decoding as generate.py's params. What `validate` does not set is neutral
    (no forced length, no repetition rules), as the generate section's defaults are."""
    return GenerateParams(
        batch_size=params.batch_size,
        precision="fp32",  # unused here: generation runs in the training model's dtype and autocast
        num_beams=params.num_beams,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=0,
        length_penalty=1.0,
        no_repeat_ngram_size=0,
        repetition_penalty=1.0,
        early_stopping=True,
    )


def prompt_ids(rows: Dataset, model_family: str) -> list[list[int]]:
    """The prompts of prepared training-layout rows: a seq2seq row's input is the prompt; a causal
    row is prompt, summary and EOS, with the prompt's labels masked (-100), so its prompt is the
    masked prefix (generating from the whole row would continue after the reference)."""
    if model_family != family.CAUSAL:
        return list(rows["input_ids"])
    return [
        ids[: next(i for i, label in enumerate(labels) if label != -100)]
        for ids, labels in zip(rows["input_ids"], rows["labels"])
    ]


class ValidationByGeneration(TrainerCallback):
    """After the Trainer's validation loss: generate the subset's summaries, score ROUGE-L (x100,
    as the report) and add it to the evaluation metrics, where best-checkpoint selection and early
    stopping (added after this callback) read it, and to the log (DVCLive: eval/rougeL)."""

    def __init__(
        self,
        trainer: Trainer,
        tokenizer: PreTrainedTokenizerBase,
        subset: Dataset,
        params: ValidateParams,
        stop_ids: Sequence[int] = (),
    ):
        self.trainer, self.tokenizer, self.subset, self.decoding = (
            trainer,
            tokenizer,
            subset,
            validation_decoding(params),
        )
        self.stop_ids = list(stop_ids)  # a chat-wrapped prompt's end-of-turn token, as generate@ stops

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        started = time.perf_counter()
        rouge_l = self.score(self.trainer.model)
        metrics["eval_rougeL"] = rouge_l
        # every process generates the same summaries with the same weights (under DDP no collective
        # calls; under FSDP in step, synced_gpus), so each one's metrics agree on the best checkpoint;
        # only the first process's logger writes
        self.trainer.log({"eval_rougeL": rouge_l, "eval_generation_runtime": round(time.perf_counter() - started, 3)})

    def score(self, model) -> float:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        saved_config, was_training = copy.deepcopy(inner.generation_config), model.training
        model.eval()
        try:
            with self.trainer.accelerator.autocast():  # bf16 training generates in bf16, as it evaluates
                prompts = prompt_ids(self.subset, family.family(inner.config))
                # sharded (FSDP): every rank takes each decoding step, as each step gathers the shards
                synced = self.trainer.is_fsdp_enabled
                summaries = generate_summaries(
                    model, self.tokenizer, prompts, self.decoding, synced_gpus=synced, stop_ids=self.stop_ids
                ).summaries
        finally:
            # generate_summaries installs its config on the model: the saved model keeps its own
            inner.generation_config = saved_config
            model.train(was_training)
        return mean_scores(score_corpus(summaries, [[summary] for summary in self.subset["summary"]]))["rougeL"]


class ResumableEarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping, with its count of evaluations without improvement restored
    on resume from the checkpoint's trainer_state.json (the Trainer restores callback state only
    with restore_callback_states_from_checkpoint, which would rebuild every callback from saved
    arguments, RunLedger's device included)."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        saved = state.stateful_callbacks.get(type(self).__name__, {})
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        self.early_stopping_patience_counter = attributes.get("early_stopping_patience_counter", 0)


def attach_validation(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    validation: Dataset,
    train_params: TrainParams,
    params: ValidateParams,
    seed: int,
    stop_ids: Sequence[int] = (),
) -> Dataset:
    """Validate by generation at every evaluation, and stop early if train_params.patience > 0.
    Returns the subset scored. `stop_ids`: tokens that end a summary besides EOS (generate@'s)."""
    subset = validation_subset(validation, params.dialogues, seed)
    trainer.add_callback(ValidationByGeneration(trainer, tokenizer, subset, params, stop_ids))
    if train_params.patience > 0:
        trainer.add_callback(ResumableEarlyStopping(early_stopping_patience=train_params.patience))
    return subset


def validation_history(log_history: list[dict]) -> list[dict]:
    """One entry per evaluation, in step order: step, ROUGE-L (x100) and validation loss."""
    losses = {e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e}
    return [
        {"step": e["step"], "rougeL": e["eval_rougeL"], "loss": losses.get(e["step"])}
        for e in log_history
        if "eval_rougeL" in e
    ]


def selection_metrics(trainer: Trainer, params: TrainParams, subset: Dataset) -> dict[str, float]:
    """Which evaluated checkpoint the saved model is and its validation scores; whether and where
    early stopping ended the run. Flat and deterministic, for metrics/train/<method>.json."""
    history = validation_history(trainer.state.log_history)
    state = trainer.state
    selected_step = state.global_step if params.select_by == "last" else state.best_global_step
    selected = next(e for e in history if e["step"] == selected_step)
    return {
        "select_by": params.select_by,
        "selected_step": selected_step,
        "selected_val_rougeL": selected["rougeL"],
        "selected_val_loss": round(selected["loss"], 6),
        "best_val_rougeL": max(e["rougeL"] for e in history),
        "evaluations": len(history),
        "validation_dialogues": len(subset),
        "stopped_early": int(state.global_step < state.max_steps),
        "last_step": state.global_step,
        "planned_steps": state.max_steps,
    }


def training_history(log_history: list[dict]) -> list[dict]:
    """One entry per logged training window, in step order: step, mean train loss, learning rate."""
    return [
        {"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
        for e in log_history
        if "loss" in e
    ]


def validation_record(trainer: Trainer, subset: Dataset, params: TrainParams, seed: int) -> dict:
    """The run's validation as data (metrics/validation/<method>.json): how the checkpoint was
    chosen, the seeded subset's dialogue ids, every evaluation and the training curves (the report
    draws them, through evaluate@<method>)."""
    return {
        "select_by": params.select_by,
        "patience": params.patience,
        "seed": seed,
        "ids": list(subset["id"]),
        "history": validation_history(trainer.state.log_history),
        "training": training_history(trainer.state.log_history),
    }
