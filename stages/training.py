"""The training skeleton every method shares (stages/train.py runs it): data, the Trainer recipe,
out-of-memory retries, resume, save, metrics and model card.

Every method fine-tunes with the same recipe (stages/recipe.py); only what trains and how it is
saved differ, and a method type says that in a Plan (stages/methods/). Checkpoints and their
fingerprint are stages/checkpoints.py's, costs stages/ledger.py's, the card stages/card.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase, Trainer

from stages import family
from stages.card import model_card
from stages.checkpoints import checkpoint_batch, fingerprint, remove_checkpoints, resumable_checkpoint
from stages.curves import attach_curves
from stages.generate import QUANTIZATION_FILE  # beside an adapter: how its base loads
from stages.input_format import read_stop_ids
from stages.jsonio import read_json, write_json
from stages.ledger import saved_mb, training_costs, training_metrics
from stages.method_params import MethodParams, TrainParams
from stages.methods.plan import Plan
from stages.modeling import load_model, load_tokenizer, pick_device, read_pin, set_determinism, use_bf16
from stages.oom import discard_attempt, halved, out_of_memory
from stages.params import ModelParams, Params
from stages.recipe import build_trainer, training_arguments
from stages.runs import run_name
from stages.sharding import full_state_dict
from stages.validation import attach_validation, selection_metrics, validation_record

PREPARED_DIR = Path("data/prepared")  # training reads its train/ and validation/ folders only
BASE_PIN = Path("models/base/pin.json")


def exit_with_launcher() -> None:
    """Under torchrun, exit when the launcher dies (e.g. `dvc repro` killed with SIGKILL).

    torchrun starts workers in their own session, so a kill aimed at DVC's process group never
    reaches them; an orphaned worker would keep training and race the next run's checkpoints.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:  # re-parented once the launcher is gone
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def load_training_splits(prepared_dir: Path) -> tuple[Dataset, Dataset]:
    # each split's own folder (not the DatasetDict): dvc.yaml declares only these two as deps, so
    # a test-split or reference edit never retrains
    return load_from_disk(str(prepared_dir / "train")), load_from_disk(str(prepared_dir / "validation"))


def frozen_base_dtype(precision: str, device: torch.device, quantization: str = "none") -> torch.dtype:
    """The dtype a PEFT method loads its frozen base in: bf16 when training runs in bf16 (precision
    auto on a bf16-native device, or bf16), so the frozen weights take half the memory and no fp32
    copy; the adapter weights stay fp32 (peft's autocast_adapter_dtype), and only they have
    gradients and optimizer state. fp32 training keeps an fp32 base; a quantized base (QLoRA)
    loads as family.load_model decides."""
    if quantization != "none" or not use_bf16(precision, device):
        return torch.float32
    return torch.bfloat16


@dataclass(frozen=True)
class Run:
    """One training stage's run: its method, the params, the device and the pinned base model.

    The paths follow from the run's name alone (stages/runs.py: `<method>/seed<seed>`): models/<run>,
    checkpoints/<run>, dvclive/<run>, metrics/train/<run>.json, metrics/validation/<run>.json and
    metrics/timing/train/<run>.json.
    """

    method: str
    seed: int  # the training seed (init, data order, dropout); params.seed draws the validation subset
    params: Params
    device: torch.device
    base: ModelParams  # params.model at the commit the base stage pinned

    @property
    def section(self) -> MethodParams:
        return self.params.method(self.method)

    @property
    def recipe(self) -> TrainParams:
        return self.section.recipe

    @property
    def name(self) -> str:
        return run_name(self.method, self.seed)

    @property
    def model_dir(self) -> Path:
        return Path("models") / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path("checkpoints") / self.name

    @property
    def curves_dir(self) -> Path:
        return Path("dvclive") / self.name


def start_run(method: str, seed: int, params: Params) -> Run:
    """Before anything heavy: watch the launcher, seed, pick the device, read the base's pin."""
    exit_with_launcher()
    set_determinism(seed, params.deterministic)
    params.method(method)  # an unknown method fails here, naming the ones there are
    return Run(method, seed, params, pick_device(), read_pin(BASE_PIN, params.model))


class Trained(typing.NamedTuple):
    trainer: Trainer
    tokenizer: PreTrainedTokenizerBase
    validation_subset: Dataset  # the seeded validation dialogues scored by generation (stages/validation.py)
    oom_retries: int  # attempts that ran out of memory before the one that finished
    oom_lost_s: float  # their wall clock: spent, but not part of the recipe's train time


def train(run: Run, plan: Plan, prepared_dir: Path = PREPARED_DIR) -> Trained:
    """Train the model `plan.build` makes from freshly loaded base weights, with the run's recipe.

    On a CUDA out-of-memory error (with the recipe's auto_find_batch_size), the attempt is thrown
    away whole (model, optimizer, checkpoints, curves) and the next starts clean with half the
    per-device batch and twice the accumulation, so every optimizer step still averages the same
    samples (token_mean_loss makes the loss equal too). The result is the run the smaller batch
    would have given from the start. Every attempt validates by generation at each checkpoint and
    keeps the best (stages/validation.py). The method's type and arguments go into the checkpoints'
    fingerprint beside the recipe, the validation settings, the seed and the pin.
    `plan.quantization` (LoRA's QLoRA) loads the frozen base through bitsandbytes; `plan.build` then
    prepares it for training. `plan.frozen_base` (PEFT methods): the base only runs forward, so under
    bf16 training it loads in bf16 (see frozen_base_dtype); full fine-tuning trains fp32 master weights.
    """
    recipe, validate, section = run.recipe, run.params.validate, run.section
    tokenizer = load_tokenizer(run.base.name, run.base.revision)
    family.ensure_pad_token(tokenizer)  # GPT-2, Llama 3: pad = EOS (masks come from lengths, never from ids)
    train_split, validation = load_training_splits(prepared_dir)
    run_fingerprint = fingerprint(
        prepared_dir, [run.seed, run.params.seed], read_json(BASE_PIN), recipe, validate, section.type, section.config
    )
    batch = (recipe.batch_size, recipe.gradient_accumulation_steps)
    resumed = checkpoint_batch(run.checkpoint_dir, run_fingerprint)
    while resumed is not None and batch[0] > resumed:  # a resume continues at the batch that fit
        batch = halved(batch)
    dtype = frozen_base_dtype(recipe.precision, run.device, plan.quantization) if plan.frozen_base else torch.float32
    retries, lost = 0, 0.0
    while True:
        started = time.perf_counter()
        base = load_model(run.base.name, run.base.revision, dtype, plan.quantization, run.base.attn_implementation)
        model = plan.build(base)
        args = training_arguments(recipe, run.seed, run.checkpoint_dir, run.device, run.method, batch)
        trainer = build_trainer(model, tokenizer, train_split, validation, args, recipe.pad_to_multiple_of)
        stops = read_stop_ids(prepared_dir)  # a chat-wrapped prompt's end-of-turn token
        subset = attach_validation(trainer, tokenizer, validation, recipe, validate, run.params.seed, stops)
        resume = resumable_checkpoint(trainer, run.checkpoint_dir, run_fingerprint)
        attach_curves(trainer, run.curves_dir, resume)
        try:
            trainer.train(resume_from_checkpoint=resume)
            return Trained(trainer, tokenizer, subset, retries, round(lost, 2))
        except torch.cuda.OutOfMemoryError as error:
            if not recipe.auto_find_batch_size or batch[0] == 1 or recipe.processes > 1:
                stage = f"train@{run.method}-{run.seed}"
                full = section.type == "full"
                raise out_of_memory(stage, run.method, batch, recipe.processes, full, run.params.variants) from error
            retries, lost = retries + 1, lost + time.perf_counter() - started
            discard_attempt(trainer, run.checkpoint_dir, run.curves_dir)
            batch = halved(batch)
            print(
                f"CUDA out of memory: restarting train@{run.method}-{run.seed} clean with per-device batch {batch[0]} x "
                f"{batch[1]} accumulation (= {batch[0] * batch[1]} per device per optimizer step)"
            )


def resolved_metrics(resolved: dict) -> dict[str, str | int]:
    """What `auto` resolved to, as flat metrics: lists joined with commas, bools as 0/1."""
    flat = {}
    for key, value in resolved.items():
        if isinstance(value, (list, tuple, set)):
            value = ",".join(sorted(value))
        flat[f"resolved_{key}"] = int(value) if isinstance(value, bool) else value
    return flat


def ran_with(run: Run) -> dict:
    """The params this run trained with, flat as `dvc params diff` and scripts/tune.py name them
    (lora.r, train.epochs): the report checks tuned settings against them."""
    return {
        **{f"train.{k}": v for k, v in run.params.train.items()},
        **{f"{run.method}.{k}": v for k, v in run.section.as_written().items()},
    }


def card_params(run: Run, resolved: dict) -> dict:
    """What the model card records: the seed, model, validation, the resolved recipe and the method."""
    section = run.section
    return {
        "seed": run.seed,  # training
        "validation_seed": run.params.seed,  # the validation subset's draw
        "model": dataclasses.asdict(run.params.model),
        "validate": dataclasses.asdict(run.params.validate),
        "train": dataclasses.asdict(section.recipe),  # the shared recipe with this method's differences
        run.method: section.as_written(),
        **({f"{run.method}_resolved": resolved} if resolved else {}),
    }


def finish_run(run: Run, trained: Trained, plan: Plan) -> None:
    """On the first process: save the model (`plan.save`), its metrics, costs and model card; remove
    the checkpoints of the finished run. The same for every method. A sharded model (FSDP) is gathered
    first, with every process taking part, and saved whole by the first."""
    trainer = trained.trainer
    started = time.perf_counter()
    whole = full_state_dict(trainer.model)  # sharded: a collective, so before the other ranks leave
    if not trainer.is_world_process_zero():  # under torchrun, one process writes the outputs
        return
    save = plan.save if whole is None else functools.partial(plan.save, state_dict=whole)
    save(trainer.model, trained.tokenizer, run.model_dir)  # full fine-tuning writes the whole model
    save_s = round(time.perf_counter() - started, 2)
    if plan.library == "peft":  # an adapter names the exact base it applies to, and how it loads
        shutil.copy2(BASE_PIN, run.model_dir / "pin.json")
        write_json({"quantization": plan.quantization}, run.model_dir / QUANTIZATION_FILE)
    subset = trained.validation_subset
    metrics = {
        "method_type": run.section.type,
        **training_metrics(trainer),
        **selection_metrics(trainer, run.recipe, subset),  # which checkpoint select_by kept, its scores
        **resolved_metrics(plan.resolved),
        "saved_mb": saved_mb(run.model_dir),
    }
    write_json(metrics, Path("metrics/train") / f"{run.name}.json")
    validation = {**validation_record(trainer, subset, run.recipe, run.params.seed), "params": ran_with(run)}
    write_json(validation, Path("metrics/validation") / f"{run.name}.json")
    costs = {
        **training_costs(trainer),  # the training loop's time apart from its validations'
        "save_runtime_s": save_s,  # the final save: not training (PiSSA/OLoRA also re-decompose the base here)
        "train_oom_retries": trained.oom_retries,
        "train_oom_lost_s": trained.oom_lost_s,
    }
    write_json(costs, Path("metrics/timing/train") / f"{run.name}.json")
    card = model_card(
        BASE_PIN, plan.library, card_params(run, plan.resolved), metrics, family.unwrap(trainer.model).config
    )
    (run.model_dir / "README.md").write_text(card)
    remove_checkpoints(run.checkpoint_dir)
