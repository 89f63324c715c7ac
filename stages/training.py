"""The training skeleton shared by train_full and train_lora: data, Trainer, checkpoints, metrics.

Both stages fine-tune with the same Seq2SeqTrainer recipe; only what is trainable (all weights
or LoRA adapters) and what is saved differs, so everything else lives here once.

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
    TrainerCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)
from transformers.integrations import DVCLiveCallback
from transformers.trainer_utils import TrainOutput

from stages.modeling import use_bf16
from stages.params import TrainParams


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
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p
                                        for p in params], sort_keys=True).encode())
    for path in sorted((prepared_dir / "train").glob("*.arrow")) + sorted((prepared_dir / "validation").glob("*.arrow")):
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


def training_arguments(params: TrainParams, seed: int, output_dir: Path,
                       device: torch.device) -> Seq2SeqTrainingArguments:
    cuda = device.type == "cuda"
    return Seq2SeqTrainingArguments(
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
        eval_strategy="epoch",
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,  # resuming needs only the newest; full-FT checkpoints of base are ~3 GB
        auto_find_batch_size=params.auto_find_batch_size,  # halves the batch on CUDA out-of-memory
        logging_strategy="steps",
        logging_steps=params.logging_steps,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=params.dataloader_workers,
        use_cpu=not cuda,
        disable_tqdm=True,  # DVC captures stdout; per-step bars would flood it
    )


def curve_loggers(curves_dir: Path, args: Seq2SeqTrainingArguments) -> list[TrainerCallback]:
    """transformers' built-in DVCLive callback writing loss/learning-rate curves to curves_dir.

    dvcyaml=None: DVCLive must not rewrite the project's dvc.yaml (the plots are declared there);
    save_dvc_exp=False: the stage runs inside `dvc repro`/`dvc exp run`, which own experiments.
    Only the first process logs under torchrun.
    """
    if args.process_index != 0:
        return []
    from dvclive import Live  # imported here: only the training stages log curves

    return [DVCLiveCallback(live=Live(dir=str(curves_dir), dvcyaml=None, save_dvc_exp=False, report=None))]


def build_trainer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: Dataset,
                  validation: Dataset, args: Seq2SeqTrainingArguments,
                  curves_dir: Path | None = None) -> Seq2SeqTrainer:
    # pad per batch (not to max length); -100 labels are ignored by the loss; multiples of 8
    # keep tensor-core shapes on GPU
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=8)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             data_collator=collator, processing_class=tokenizer,
                             callbacks=curve_loggers(curves_dir, args) if curves_dir else None)
    # T5's forward takes **kwargs, so the Trainer assumes it divides the loss by
    # num_items_in_batch; it does not (plain mean), so with 4 accumulation steps the loss and
    # gradients would be 4x too large (and clipping 4x too tight). Let the Trainer divide.
    trainer.model_accepts_loss_kwargs = False
    return trainer


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    # parameters() de-duplicates shared tensors, so a tied head would not be counted twice
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def training_metrics(trainer: Seq2SeqTrainer, result: TrainOutput) -> dict[str, float]:
    """Flat metrics: losses (deterministic on CPU) apart from noisy figures named as such
    (`*_s`, `*_per_second`, `peak_memory_mb`)."""
    history = trainer.state.log_history
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    return {
        "train_loss": round(train_losses[-1] if train_losses else result.training_loss, 6),
        "train_loss_mean": round(result.training_loss, 6),
        "eval_loss": round(eval_losses[-1], 6),
        "train_steps": result.global_step,
        "processes": trainer.args.world_size,
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "train_samples_per_second": round(result.metrics["train_samples_per_second"], 3),
        "peak_memory_mb": round(peak_memory_mb(trainer.args.device), 1),
        **count_parameters(trainer.model),
    }


def model_card(base_model: str, source: str, library: str, params: dict, metrics: dict) -> str:
    """A Hugging Face Hub model card (README.md): YAML metadata, then what was trained and how."""
    front_matter = {"base_model": base_model, "library_name": library, "pipeline_tag": "summarization",
                    "datasets": [source], "tags": ["dialogue-summarization", "dvc", "flan-t5"]}
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in metrics.items())
    return (f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n"
            f"# {base_model} fine-tuned on {source} ({'LoRA adapter' if library == 'peft' else 'full fine-tuning'})\n\n"
            "Trained by this repository's DVC pipeline (`dvc repro`); ROUGE on the test split is in "
            "`metrics/evaluate/*.json` and `metrics/report.md`. The data (DialogSum) is licensed CC BY-NC-SA 4.0.\n\n"
            f"## Params\n\n```yaml\n{yaml.safe_dump(params, sort_keys=False)}```\n\n"
            f"## Training metrics\n\n| metric | value |\n|---|---|\n{rows}\n")


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
