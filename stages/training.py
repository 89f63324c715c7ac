"""The training skeleton shared by every train_<method> stage (full, lora, ia3, prompt): data,
Trainer, checkpoints, metrics.

They all fine-tune with the same Seq2SeqTrainer recipe; only what is trainable (all weights or a
peft adapter) and what is saved differs, so everything else lives here once.

Checkpoints go to checkpoints/<stage>/, a `persist: true` output that DVC leaves alone, so a
run killed overnight resumes from its last checkpoint on the next `dvc repro`. A fingerprint of
the params and the prepared data sits beside them: checkpoints made with anything else are
discarded, never resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import torch
import yaml
from datasets import Dataset, load_from_disk
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)
from transformers.integrations import DVCLiveCallback
from transformers.trainer_callback import ExportableState

from stages.errors import StageError
from stages.jsonio import read_json
from stages.modeling import use_bf16
from stages.params import TrainParams
from stages.progress import TrainerProgress
from stages.validation import validation_arguments


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
    splits = load_from_disk(str(prepared_dir))
    return splits["train"], splits["validation"]


def fingerprint(prepared_dir: Path, *params: object) -> str:
    """sha256 over the params (dataclasses or plain values) and the prepared train/validation files."""
    digest = hashlib.sha256(
        json.dumps(
            [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in params], sort_keys=True
        ).encode()
    )
    for path in sorted((prepared_dir / "train").glob("*.arrow")) + sorted(
        (prepared_dir / "validation").glob("*.arrow")
    ):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json parses, oldest first.

    The Trainer writes trainer_state.json last, so a run killed mid-save leaves a folder
    without it (or with a truncated one): that folder cannot be resumed from.
    """
    complete = []
    for path in sorted(checkpoint_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        complete.append(path)
    return complete


def discard_unusable_checkpoints(checkpoint_dir: Path, run_fingerprint: str) -> None:
    """Delete checkpoints made with other params or data, and ones cut short by a kill."""
    marker = checkpoint_dir / "fingerprint.txt"
    if checkpoint_dir.exists() and (not marker.is_file() or marker.read_text() != run_fingerprint):
        if list(checkpoint_dir.glob("checkpoint-*")):
            print(f"discarding checkpoints in {checkpoint_dir}: made with other params or data")
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_fingerprint)
    for path in sorted(set(checkpoint_dir.glob("checkpoint-*")) - set(complete_checkpoints(checkpoint_dir))):
        print(f"removing incomplete checkpoint {path} (the run was killed while saving it)")
        shutil.rmtree(path)


def resumable_checkpoint(trainer: Seq2SeqTrainer, checkpoint_dir: Path, run_fingerprint: str) -> str | None:
    """The newest usable checkpoint of an interrupted run with the same fingerprint, else None."""
    if trainer.is_world_process_zero():  # under torchrun, one process cleans up, the others wait
        discard_unusable_checkpoints(checkpoint_dir, run_fingerprint)
    trainer.accelerator.wait_for_everyone()
    complete = complete_checkpoints(checkpoint_dir)
    if complete and trainer.is_world_process_zero():
        print(f"resuming from {complete[-1]}")
    return str(complete[-1]) if complete else None


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """After a finished run: a forced rerun must train from scratch, not 'resume' a finished one."""
    for path in checkpoint_dir.glob("checkpoint-*"):
        shutil.rmtree(path)


def training_arguments(
    params: TrainParams, seed: int, output_dir: Path, device: torch.device, section: str
) -> Seq2SeqTrainingArguments:
    cuda = device.type == "cuda"
    args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=params.epochs,
        learning_rate=params.learning_rate,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.eval_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        weight_decay=params.weight_decay,
        warmup_steps=params.warmup_ratio,  # a float in [0, 1) is a ratio of total steps in 5.x
        lr_scheduler_type=params.lr_scheduler,
        max_grad_norm=params.max_grad_norm,
        bf16=use_bf16(params.precision, device),
        # TF32 matmuls on Ampere and newer GPUs; the flag raises on CPU and older GPUs
        tf32=True if cuda and torch.cuda.get_device_capability(device)[0] >= 8 else None,
        optim="adamw_torch_fused",  # one fused kernel per step (transformers' default with torch >= 2.8)
        train_sampling_strategy="group_by_length" if params.group_by_length else "random",
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,  # resuming needs only the newest (plus the best, kept by select_by); full-FT checkpoints of base are ~3 GB
        auto_find_batch_size=params.auto_find_batch_size,  # halves the batch on CUDA out-of-memory
        logging_strategy="steps",
        logging_steps=params.logging_steps,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=params.dataloader_workers,
        use_cpu=not cuda,
        disable_tqdm=True,  # TrainerProgress draws the bar (terminal) or periodic lines (logs) instead
        **validation_arguments(params),  # validate at every checkpoint; keep the best (stages/validation.py)
    )
    check_one_device_per_process(args.n_gpu, section)
    return args


def check_one_device_per_process(visible_gpus: int, section: str) -> None:
    """Refuse nn.DataParallel: the Trainer silently wraps the model in it when one process sees
    several GPUs, which multiplies the batch per step by the GPU count and shortens the LR
    schedule while the metrics still say one process. `stages.launch` pins a single-process run
    to one GPU; this catches a stage started some other way."""
    if visible_gpus > 1:
        raise StageError(
            f"{visible_gpus} GPUs are visible to one training process; set "
            f"{section}.processes={visible_gpus} for data-parallel training (DDP), or run on one GPU "
            "with CUDA_VISIBLE_DEVICES=0 (dvc repro does this for processes: 1)"
        )


class OptimizerStepCurves(DVCLiveCallback):
    """transformers' DVCLive callback with optimizer steps on the step axis.

    The stock callback counts log events (train and eval logs of one step become two "steps"),
    and restarts at 0 after a resume; here each row carries the Trainer's global step.
    """

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if state.is_world_process_zero and self.live is not None:
            self.live.step = state.global_step
        super().on_log(args, state, control, model=model, logs=logs, **kwargs)


def attach_curves(trainer: Seq2SeqTrainer, curves_dir: Path, resume: str | None) -> None:
    """Log loss/learning-rate curves to curves_dir/plots, continued across a resume.

    dvcyaml=None: DVCLive must not rewrite the project's dvc.yaml (the plots are declared there);
    save_dvc_exp=False: the stage runs inside `dvc repro`/`dvc exp run`, which own experiments.
    On a resume, rows logged after the resumed checkpoint (work the kill threw away, about to be
    redone) are dropped first. Only the first process logs under torchrun.
    """
    if trainer.args.process_index != 0:
        return
    from dvclive import Live  # imported here: only the training stages log curves

    if resume is not None:
        drop_rows_after(curves_dir / "plots" / "metrics", checkpoint_step(resume))
    live = Live(dir=str(curves_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=resume is not None)
    trainer.add_callback(OptimizerStepCurves(live=live))


def checkpoint_step(checkpoint: str) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


def drop_rows_after(metrics_dir: Path, step: int) -> None:
    """Keep only the rows of DVCLive's TSV files (timestamp, step, value) up to `step`."""
    for path in metrics_dir.rglob("*.tsv"):
        header, *rows = path.read_text().splitlines()
        column = header.split("\t").index("step")
        kept = [row for row in rows if int(row.split("\t")[column]) <= step]
        path.write_text("\n".join([header, *kept]) + "\n")


class RunLedger(TrainerCallback, ExportableState):
    """Whole-run figures that survive a resume: wall time and peak memory, saved in every
    checkpoint's trainer_state.json (as this callback's state) and read back on resume.

    It also makes the Trainer log the loss at every checkpoint and at the last step, so the
    loss history in trainer_state.json covers every step and the whole-run mean loss can be
    computed from it exactly (see `whole_run_loss`).
    """

    def __init__(self, device: torch.device):
        self.device, self.prior_runtime_s, self.prior_peak_mb, self.started = device, 0.0, 0.0, None

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__, {})  # a resumed run's saved state
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        self.prior_runtime_s = attributes.get("runtime_s", 0.0)
        self.prior_peak_mb = attributes.get("peak_memory_mb", 0.0)
        self.started = time.perf_counter()

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True

    def runtime_s(self) -> float:
        return self.prior_runtime_s + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def peak_memory_mb(self) -> float:
        return max(self.prior_peak_mb, peak_memory_mb(self.device))

    def state(self) -> dict:
        return {"args": {}, "attributes": {"runtime_s": self.runtime_s(), "peak_memory_mb": self.peak_memory_mb()}}


class PipelineTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose out-of-memory retry keeps the batch per optimizer step.

    auto_find_batch_size halves the per-device batch on CUDA out-of-memory; alone, that halves
    the batch per step and doubles the step count, so the run would silently train with another
    recipe. Here gradient accumulation grows by the same factor (32 x 1 -> 16 x 2 = 32 per step).
    Under several processes each one finds its batch alone: this keeps each process's share.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples_per_device_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    def _update_auto_batch_size(self, batch_size):
        # accelerate retries with ~0.9x the batch; take the largest batch that divides the samples
        # per step (32 x 1: 32 -> 28 becomes 16 x 2), so the batch per step stays exactly the same
        batch_size = max(b for b in range(1, batch_size + 1) if self.samples_per_device_step % b == 0)
        accumulation = self.samples_per_device_step // batch_size
        if accumulation != self.args.gradient_accumulation_steps:
            print(
                f"per-device batch {batch_size}: gradient accumulation {self.args.gradient_accumulation_steps} -> "
                f"{accumulation}, keeping {self.samples_per_device_step} samples per device per optimizer step"
            )
            self.args.gradient_accumulation_steps = accumulation
        super()._update_auto_batch_size(batch_size)


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    validation: Dataset,
    args: Seq2SeqTrainingArguments,
) -> PipelineTrainer:
    # pad per batch (not to max length); -100 labels are ignored by the loss; multiples of 8
    # keep tensor-core shapes on GPU
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=8)
    trainer = PipelineTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collator,
        processing_class=tokenizer,
        # RunLedger first: it asks for the log lines TrainerProgress shows
        callbacks=[RunLedger(args.device), TrainerProgress()],
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts; TrainerProgress prints step/total, rate, ETA, loss
    # T5's forward takes **kwargs, so the Trainer assumes it divides the loss by
    # num_items_in_batch; it does not (plain mean), so with 4 accumulation steps the loss and
    # gradients would be 4x too large (and clipping 4x too tight). Let the Trainer divide.
    trainer.model_accepts_loss_kwargs = False
    return trainer


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    # parameters() de-duplicates shared tensors, so a tied head would not be counted twice
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4),
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def whole_run_loss(log_history: list[dict]) -> float:
    """Mean training loss over every optimizer step of the run, across resumes.

    Each logged `loss` is the mean over the steps since the previous log; RunLedger makes the
    Trainer log at every checkpoint and at the last step, and a resume restores the history up
    to its checkpoint, so weighting each entry by its window covers each step exactly once.
    (The Trainer's own train_loss covers only the steps run since the last resume.)
    """
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total / max(previous, 1)


def training_metrics(trainer: PipelineTrainer) -> dict[str, float]:
    """Flat, deterministic metrics of the whole run (across resumes): losses, counts, the recipe
    actually used. Bit-identical for the same params and data on the same machine (CPU)."""
    history = trainer.state.log_history
    return {
        "train_loss": round([entry["loss"] for entry in history if "loss" in entry][-1], 6),
        "train_loss_mean": round(whole_run_loss(history), 6),
        "eval_loss": round([entry["eval_loss"] for entry in history if "eval_loss" in entry][-1], 6),
        "train_steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
        # what one optimizer step averaged over, after any out-of-memory retry:
        # per-device batch x accumulation x processes
        "batch_per_step": trainer.get_total_train_batch_size(trainer.args),
        "per_device_batch_size": trainer._train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        **count_parameters(trainer.model),
    }


def saved_mb(model_dir: Path) -> float:
    """Size on disk of the saved weights (model.safetensors or adapter_model.safetensors), MiB."""
    return round(sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20, 3)


def training_costs(trainer: PipelineTrainer) -> dict[str, float]:
    """Whole-run wall time, throughput and peak memory (noisy by nature: kept apart from the
    deterministic metrics and out of the model folder). Peak memory is the accelerator's
    max_memory_allocated on CUDA and the process's peak RSS on CPU, named accordingly."""
    ledger = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RunLedger))
    runtime = ledger.runtime_s()
    samples = len(trainer.train_dataset) * trainer.args.num_train_epochs
    memory_key = "peak_gpu_memory_mb" if trainer.args.device.type == "cuda" else "peak_rss_mb"
    return {
        "train_runtime_s": round(runtime, 2),
        "train_samples_per_second": round(samples / runtime, 3),
        memory_key: round(ledger.peak_memory_mb(), 1),
    }


def model_card(pin_file: Path, library: str, params: dict, metrics: dict) -> str:
    """A Hugging Face Hub model card (README.md): YAML metadata, then what was trained and how.

    Only deterministic content: the card sits in the cached model folder, so a run time in it
    would give identical weights a new hash and rerun every evaluation. Where the data came from
    is in metrics/data.json and the report (a renamed copy of the same data must not retrain).
    The base model is named with the exact commit the baselines stage pinned (`pin_file`).
    """
    pin = read_json(pin_file)
    base_model = pin["name"]
    front_matter = {
        "base_model": base_model,
        "library_name": library,
        "pipeline_tag": "summarization",
        "tags": ["dialogue-summarization", "dvc", "flan-t5"],
    }
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in metrics.items())
    return (
        f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n"
        f"# {base_model} fine-tuned for dialogue summarization ({'PEFT adapter' if library == 'peft' else 'full fine-tuning'})\n\n"
        "Trained by this repository's DVC pipeline (`dvc repro`) on its DialogSum snapshot (`data/raw`; "
        "source and revision in `metrics/data.json`); ROUGE on the test split is in "
        "`metrics/evaluate/*.json` and `metrics/report.md`. The data (DialogSum) is licensed CC BY-NC-SA 4.0.\n\n"
        f"Base model: `{base_model}` at revision `{pin['revision']}`, resolved commit `{pin['resolved_revision']}`.\n\n"
        f"## Params\n\n```yaml\n{yaml.safe_dump(params, sort_keys=False)}```\n\n"
        f"## Training metrics\n\n| metric | value |\n|---|---|\n{rows}\n"
    )
