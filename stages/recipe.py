"""The Trainer recipe every method trains with: its arguments from a recipe, the loss, the Trainer.

One recipe for every method and both model families (transformers' Trainer; validation by
generation is stages/validation.py's), so what differs between methods is only what trains.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, Trainer, TrainingArguments

from stages import family
from stages.errors import StageError
from stages.ledger import RunLedger
from stages.method_params import TrainParams
from stages.modeling import use_bf16
from stages.progress import TrainerProgress
from stages.sharding import sharding_arguments
from stages.validation import validation_arguments


def use_tf32(bf16: bool, device: torch.device) -> bool | None:
    """TF32 matmuls only alongside bf16 on an Ampere-or-newer GPU: there they speed up what stays
    in fp32 (the optimizer's master math, fp32 adapter weights), at a precision bf16 has lost
    already. `precision: fp32` means fp32: TF32 off (False). None leaves torch's setting alone
    (the Trainer's flag raises on a CPU or an older GPU)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return None
    return bf16


def training_arguments(
    params: TrainParams,
    seed: int,
    output_dir: Path,
    device: torch.device,
    section: str,
    batch: tuple[int, int] | None = None,
) -> TrainingArguments:
    """The Trainer's arguments for a recipe; `batch` = (per-device batch, accumulation) overrides the
    recipe's after an out-of-memory retry (see `train`)."""
    args = TrainingArguments(**trainer_settings(params, seed, output_dir, device, section, batch))
    check_one_device_per_process(args.n_gpu, section)
    return args


def trainer_settings(
    params: TrainParams,
    seed: int,
    output_dir: Path,
    device: torch.device,
    section: str,
    batch: tuple[int, int] | None = None,
) -> dict:
    """TrainingArguments' keyword arguments for a recipe on `device` (the Trainer finds the device
    itself; this only decides what the recipe asks of it)."""
    cuda = device.type == "cuda"
    per_device, accumulation = batch or (params.batch_size, params.gradient_accumulation_steps)
    bf16 = use_bf16(params.precision, device)
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=params.epochs,
        learning_rate=params.learning_rate,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=params.eval_batch_size,
        gradient_accumulation_steps=accumulation,
        weight_decay=params.weight_decay,
        warmup_steps=params.warmup_ratio,  # a float in [0, 1) is a ratio of total steps in 5.x
        lr_scheduler_type=params.lr_scheduler,
        max_grad_norm=params.max_grad_norm,
        bf16=bf16,
        tf32=use_tf32(bf16, device),
        optim=params.optimizer,  # train.optimizer: fused AdamW unless a memory lever is chosen
        train_sampling_strategy="group_by_length" if params.group_by_length else "random",
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,  # resuming needs only the newest (plus the best, kept by select_by); full-FT checkpoints of base are ~3 GB
        # not the Trainer's auto_find_batch_size: it retries at 0.9x the batch on the same model and
        # optimizer; `train` halves it and starts each attempt clean
        logging_strategy="steps",
        logging_steps=params.logging_steps,
        # transformers' default filter tests every micro-batch's loss with bool(isnan(loss)): on a GPU a host
        # sync per step, so the host cannot queue the next step while this one runs (BENCHMARKS.md: the
        # Trainer path ran 40 samples/s where a plain loop ran 99). Off, a non-finite loss shows in the logged loss
        # instead of being replaced by the running mean: a diverged run is seen, not hidden
        logging_nan_inf_filter=False,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=params.dataloader_workers,
        use_cpu=not cuda,
        # FSDP2 sharding or none, and activation checkpointing (FSDP's own when sharded)
        **sharding_arguments(params, device, section),
        torch_compile=params.compile,  # inductor, through accelerate's dynamo plugin
        disable_tqdm=True,  # TrainerProgress draws the bar (terminal) or periodic lines (logs) instead
        **validation_arguments(params),  # validate at every checkpoint; keep the best (stages/validation.py)
    )


def check_one_device_per_process(visible_gpus: int, section: str) -> None:
    """Refuse nn.DataParallel: the Trainer silently wraps the model in it when one process sees
    several GPUs, which multiplies the batch per step by the GPU count and shortens the LR
    schedule while the metrics still say one process. `stages.launch` pins a single-process run
    to one GPU; this catches a stage started some other way."""
    if visible_gpus > 1:
        raise StageError(
            f"{visible_gpus} GPUs are visible to one training process; set "
            f"{section}.processes={visible_gpus} (or train.processes for every method) for data-parallel "
            "training (DDP), or run on one GPU "
            "with CUDA_VISIBLE_DEVICES=0 (dvc repro does this for processes: 1)"
        )


def token_mean_loss(
    outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None, shift_labels: bool = False
) -> torch.Tensor:
    """Cross-entropy summed over this micro-batch's label tokens, divided by the label tokens of
    the whole optimizer step (`num_items_in_batch`, which the Trainer counts over every
    accumulation step, and every process when average_tokens_across_devices).

    So 16 x 2 after an out-of-memory retry trains on exactly the loss of 32 x 1: the token mean
    over the 32 rows, where averaging two micro-batch means would weight a short batch's tokens
    more. Evaluation passes no count: then it is this batch's own token mean (T5's loss).

    `shift_labels` (causal models): position t predicts token t + 1, so logits[:, :-1] are scored
    against labels[:, 1:], as the model's own loss does. The Trainer counts a causal step's
    items over labels[..., 1:] too; the first label is always a prompt token (-100), so either
    count is the same. A prompt-tuned causal model returns logits for its virtual tokens first:
    they get -100 labels (no loss), as peft gives them when it computes the loss itself.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if shift_labels:
        virtual = logits.size(1) - labels.size(1)
        labels = torch.nn.functional.pad(labels, (virtual, 0), value=-100)[:, 1:]
        logits = logits[:, :-1]
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.to(logits.device).reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    count = num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    validation: Dataset,
    args: TrainingArguments,
    pad_to_multiple_of: int = family.PAD_TO_MULTIPLE_OF,
) -> Trainer:
    # the family's collator pads per batch (not to max length) to multiples of `pad_to_multiple_of`
    # (8: tensor-core shapes on GPU; 64: few shapes for torch.compile), labels with -100, which the loss ignores
    model_family = family.family(family.unwrap(model).config)
    collator = family.data_collator(model_family, tokenizer, model, pad_to_multiple_of)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,  # the validation loss; validation by generation is attach_validation's
        data_collator=collator,
        processing_class=tokenizer,
        # the step's token mean, however the batch is split
        compute_loss_func=partial(token_mean_loss, shift_labels=model_family == family.CAUSAL),
        # RunLedger first: it asks for the log lines TrainerProgress shows
        callbacks=[RunLedger(args.device), TrainerProgress()],
    )
    trainer.remove_callback(PrinterCallback)  # raw log dicts; TrainerProgress prints step/total, rate, ETA, loss
    # T5's forward takes **kwargs, so the Trainer would pass num_items_in_batch into it, which T5
    # ignores; the loss is token_mean_loss's alone
    trainer.model_accepts_loss_kwargs = False
    return trainer
