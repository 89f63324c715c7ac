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
import gc
import hashlib
import json
import os
import resource
import shutil
import threading
import time
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import yaml
from datasets import Dataset, load_from_disk
from transformers import (
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

from stages import family
from stages.errors import StageError
from stages.jsonio import read_json, write_json
from stages.modeling import load_model, load_tokenizer, pick_device, read_pin, set_determinism, use_bf16
from stages.params import ModelParams, Params, TrainParams
from stages.progress import TrainerProgress
from stages.validation import (
    attach_validation,
    selection_metrics,
    validation_arguments,
    validation_record,
    validation_runtime_s,
)

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
) -> Seq2SeqTrainingArguments:
    """The Trainer's arguments for a recipe; `batch` = (per-device batch, accumulation) overrides the
    recipe's after an out-of-memory retry (see `train`)."""
    cuda = device.type == "cuda"
    per_device, accumulation = batch or (params.batch_size, params.gradient_accumulation_steps)
    bf16 = use_bf16(params.precision, device)
    args = Seq2SeqTrainingArguments(
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
        optim="adamw_torch_fused",  # one fused kernel per step (transformers' default with torch >= 2.8)
        train_sampling_strategy="group_by_length" if params.group_by_length else "random",
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,  # resuming needs only the newest (plus the best, kept by select_by); full-FT checkpoints of base are ~3 GB
        # not the Trainer's auto_find_batch_size: it retries at 0.9x the batch on the same model and
        # optimizer; `train` halves it and starts each attempt clean
        logging_strategy="steps",
        logging_steps=params.logging_steps,
        # transformers' default filter tests every micro-batch's loss with bool(isnan(loss)): on a GPU a host
        # sync per step, so the host cannot queue the next step while this one runs (issue 19: the Trainer
        # path ran 40 samples/s where a plain loop ran 99). Off, a non-finite loss shows in the logged loss
        # instead of being replaced by the running mean: a diverged run is seen, not hidden
        logging_nan_inf_filter=False,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=params.dataloader_workers,
        use_cpu=not cuda,
        # recompute each layer's activations in backward (train_*.gradient_checkpointing); non-reentrant:
        # gradients reach adapters on a frozen base without the inputs requiring grad
        activation_checkpointing=params.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if params.gradient_checkpointing else None,
        torch_compile=params.compile,  # inductor, through accelerate's dynamo plugin
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
        if self.device.type == "cuda":  # this attempt's peak, not an earlier out-of-memory attempt's
            torch.cuda.reset_peak_memory_stats(self.device)
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
    args: Seq2SeqTrainingArguments,
    pad_to_multiple_of: int = family.PAD_TO_MULTIPLE_OF,
) -> Seq2SeqTrainer:
    # the family's collator pads per batch (not to max length) to multiples of `pad_to_multiple_of`
    # (8: tensor-core shapes on GPU; 64: few shapes for torch.compile), labels with -100, which the loss ignores
    model_family = family.family(family.unwrap(model).config)
    collator = family.data_collator(model_family, tokenizer, model, pad_to_multiple_of)
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
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


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def base_dtype(model: torch.nn.Module) -> str:
    """The dtype the frozen base's weights are held in ("bf16" for a PEFT method's base under bf16
    training, "4bit"/"8bit" for QLoRA's quantized base), or the weights' own for full fine-tuning
    (nothing frozen): read from the model's parameters, so it records what was, not what was asked."""
    inner = family.unwrap(model)
    if family.is_quantized(inner):
        return "4bit" if getattr(inner, "is_loaded_in_4bit", False) else "8bit"
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    weights = frozen or [p for p in model.parameters() if p.is_floating_point()]
    counts: dict[torch.dtype, int] = {}
    for p in weights:
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    dtype = max(counts, key=counts.get)
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def frozen_base_dtype(precision: str, device: torch.device, quantization: str = "none") -> torch.dtype:
    """The dtype a PEFT method loads its frozen base in: bf16 when training runs in bf16 (precision
    auto on a bf16-native device, or bf16), so the frozen weights take half the memory and no fp32
    copy; the adapter weights stay fp32 (peft's autocast_adapter_dtype), and only they have
    gradients and optimizer state. fp32 training keeps an fp32 base; a quantized base (QLoRA)
    loads as family.load_model decides."""
    if quantization != "none" or not use_bf16(precision, device):
        return torch.float32
    return torch.bfloat16


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


def training_metrics(trainer: Seq2SeqTrainer) -> dict[str, float]:
    """Flat, deterministic metrics of the whole run (across resumes): losses, counts, the recipe
    actually used. Bit-identical for the same params and data on the same machine (CPU)."""
    history = trainer.state.log_history
    return {
        "train_loss": round([entry["loss"] for entry in history if "loss" in entry][-1], 6),
        "train_loss_mean": round(whole_run_loss(history), 6),
        "eval_loss": round([entry["eval_loss"] for entry in history if "eval_loss" in entry][-1], 6),
        "train_steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
        "train_precision": "bf16" if trainer.args.bf16 else "fp32",
        "train_base_dtype": base_dtype(trainer.model),  # a PEFT method's frozen base (bf16 under bf16)
        "train_attn_implementation": family.resolved_attn_implementation(trainer.model),
        "train_gradient_checkpointing": int(bool(trainer.args.activation_checkpointing)),
        "train_compile": int(bool(trainer.args.torch_compile)),
        "train_tf32": int(bool(trainer.args.tf32)),
        # what one optimizer step averaged over, after any out-of-memory retry:
        # per-device batch x accumulation x processes
        "batch_per_step": trainer.get_total_train_batch_size(trainer.args),
        "per_device_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        **count_parameters(trainer.model),
    }


def saved_mb(model_dir: Path) -> float:
    """Size on disk of the saved weights (model.safetensors or adapter_model.safetensors), MiB."""
    return round(sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20, 3)


def training_costs(trainer: Seq2SeqTrainer) -> dict[str, float]:
    """Whole-run wall time, throughput and peak memory (noisy by nature: kept apart from the
    deterministic metrics and out of the model folder). Peak memory is the accelerator's
    max_memory_allocated on CUDA and the process's peak RSS on CPU, named accordingly."""
    ledger = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RunLedger))
    runtime = ledger.runtime_s()
    # the samples the steps that ran consumed: an early stop at step 150 of 180 ran 150/180 of the epochs
    samples = (
        len(trainer.train_dataset) * trainer.args.num_train_epochs * trainer.state.global_step / trainer.state.max_steps
    )
    memory_key = "peak_gpu_memory_mb" if trainer.args.device.type == "cuda" else "peak_rss_mb"
    device = trainer.args.device
    return {
        "train_runtime_s": round(runtime, 2),
        "train_samples_per_second": round(samples / runtime, 3),
        memory_key: round(ledger.peak_memory_mb(), 1),
        "train_device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
    }


def model_card(pin_file: Path, library: str, params: dict, metrics: dict, model_config) -> str:
    """A Hugging Face Hub model card (README.md): YAML metadata, then what was trained and how.

    Only deterministic content: the card sits in the cached model folder, so a run time in it
    would give identical weights a new hash and rerun every evaluation. Where the data came from
    is in metrics/data.json and the report (a renamed copy of the same data must not retrain).
    The base model is named with the exact commit the baselines stage pinned (`pin_file`), its
    family and architecture (`model_config`) as tags.
    """
    pin = read_json(pin_file)
    base_model = pin["name"]
    model_family = family.family(model_config)
    front_matter = {
        "base_model": base_model,
        "library_name": library,
        "pipeline_tag": "summarization",
        "tags": ["dialogue-summarization", "dvc", model_config.model_type, model_family],
    }
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in metrics.items())
    return (
        f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n"
        f"# {base_model} fine-tuned for dialogue summarization ({'PEFT adapter' if library == 'peft' else 'full fine-tuning'})\n\n"
        "Trained by this repository's DVC pipeline (`dvc repro`) on its data snapshot (`data/raw`; "
        "source and revision in `metrics/data.json`, whose license applies); ROUGE on the test split is in "
        "`metrics/evaluate/*.json` and `metrics/report.md`.\n\n"
        f"Base model: `{base_model}` at revision `{pin['revision']}`, resolved commit `{pin['resolved_revision']}`; "
        f"family `{model_family}`, architecture `{model_config.model_type}`.\n\n"
        f"## Params\n\n```yaml\n{yaml.safe_dump(params, sort_keys=False)}```\n\n"
        f"## Training metrics\n\n| metric | value |\n|---|---|\n{rows}\n"
    )


@dataclass(frozen=True)
class Run:
    """One training stage's run: its method, the params, the device and the pinned base model.

    The paths follow from the method alone (one name per concept): models/<method>,
    checkpoints/train_<method>, dvclive/train_<method>, metrics/train/<method>.json and
    metrics/timing/train_<method>.json.
    """

    method: str
    params: Params
    device: torch.device
    base: ModelParams  # params.model at the commit the base stage pinned

    @property
    def section(self) -> str:
        return f"train_{self.method}"

    @property
    def recipe(self) -> TrainParams:
        return getattr(self.params, self.section)

    @property
    def model_dir(self) -> Path:
        return Path("models") / self.method

    @property
    def checkpoint_dir(self) -> Path:
        return Path("checkpoints") / self.section

    @property
    def curves_dir(self) -> Path:
        return Path("dvclive") / self.section


def start_run(method: str, params: Params) -> Run:
    """Before anything heavy: watch the launcher, seed, pick the device, read the base's pin."""
    exit_with_launcher()
    set_determinism(params.seed, params.deterministic)
    return Run(method, params, pick_device(), read_pin(BASE_PIN, params.model))


class Trained(typing.NamedTuple):
    trainer: Seq2SeqTrainer
    tokenizer: PreTrainedTokenizerBase
    validation_subset: Dataset  # the seeded validation dialogues scored by generation (stages/validation.py)
    oom_retries: int  # attempts that ran out of memory before the one that finished
    oom_lost_s: float  # their wall clock: spent, but not part of the recipe's train time


def halved(batch: tuple[int, int]) -> tuple[int, int]:
    """(per-device batch, accumulation) after an out-of-memory error: half the batch, twice the
    accumulation, the same samples per optimizer step (32 x 1 -> 16 x 2 -> 8 x 4). An odd batch
    cannot be halved exactly: then accumulation takes the whole step one sample at a time."""
    per_device, accumulation = batch
    if per_device % 2:
        return 1, per_device * accumulation
    return per_device // 2, accumulation * 2


def checkpoint_batch(checkpoint_dir: Path, run_fingerprint: str) -> int | None:
    """The per-device batch a resumable checkpoint of this run trained with (smaller than the
    recipe's after an out-of-memory retry), or None: a resume continues at that batch."""
    marker = checkpoint_dir / "fingerprint.txt"
    complete = complete_checkpoints(checkpoint_dir) if checkpoint_dir.is_dir() else []
    if not complete or not marker.is_file() or marker.read_text() != run_fingerprint:
        return None
    return json.loads((complete[-1] / "trainer_state.json").read_text()).get("train_batch_size")


def train(
    run: Run,
    build: Callable[[PreTrainedModel], PreTrainedModel],
    *method_params: object,
    prepared_dir: Path = PREPARED_DIR,
    quantization: str = "none",
    frozen_base: bool = False,
) -> Trained:
    """Train the model `build` makes from freshly loaded base weights, with the run's recipe.

    On a CUDA out-of-memory error (with the recipe's auto_find_batch_size), the attempt is thrown
    away whole (model, optimizer, checkpoints, curves) and the next starts clean with half the
    per-device batch and twice the accumulation, so every optimizer step still averages the same
    samples (token_mean_loss makes the loss equal too). The result is the run the smaller batch
    would have given from the start. Every attempt validates by generation at each checkpoint and
    keeps the best (stages/validation.py). `method_params` (the method's params section) go into the
    checkpoints' fingerprint beside the recipe, the validation settings, the seed and the pin.
    `quantization` (LoRA's QLoRA) loads the frozen base through bitsandbytes; `build` then prepares
    it for training. `frozen_base` (PEFT methods): the base only runs forward, so under bf16 training
    it loads in bf16 (see frozen_base_dtype); full fine-tuning trains fp32 master weights.
    """
    recipe, validate = run.recipe, run.params.validate
    tokenizer = load_tokenizer(run.base.name, run.base.revision)
    family.ensure_pad_token(tokenizer)  # GPT-2, Llama 3: pad = EOS (masks come from lengths, never from ids)
    train_split, validation = load_training_splits(prepared_dir)
    run_fingerprint = fingerprint(prepared_dir, run.params.seed, read_json(BASE_PIN), recipe, validate, *method_params)
    batch = (recipe.batch_size, recipe.gradient_accumulation_steps)
    resumed = checkpoint_batch(run.checkpoint_dir, run_fingerprint)
    while resumed is not None and batch[0] > resumed:  # a resume continues at the batch that fit
        batch = halved(batch)
    dtype = frozen_base_dtype(recipe.precision, run.device, quantization) if frozen_base else torch.float32
    retries, lost = 0, 0.0
    while True:
        started = time.perf_counter()
        base = load_model(run.base.name, run.base.revision, dtype, quantization, run.base.attn_implementation)
        model = build(base)
        args = training_arguments(recipe, run.params.seed, run.checkpoint_dir, run.device, run.section, batch)
        trainer = build_trainer(model, tokenizer, train_split, validation, args, recipe.pad_to_multiple_of)
        subset = attach_validation(trainer, tokenizer, validation, recipe, validate, run.params.seed)
        resume = resumable_checkpoint(trainer, run.checkpoint_dir, run_fingerprint)
        attach_curves(trainer, run.curves_dir, resume)
        try:
            trainer.train(resume_from_checkpoint=resume)
            return Trained(trainer, tokenizer, subset, retries, round(lost, 2))
        except torch.cuda.OutOfMemoryError:
            if not recipe.auto_find_batch_size or batch[0] == 1:
                raise
            retries, lost = retries + 1, lost + time.perf_counter() - started
            discard_attempt(trainer, run)
            batch = halved(batch)
            print(
                f"CUDA out of memory: restarting {run.section} clean with per-device batch {batch[0]} x "
                f"{batch[1]} accumulation (= {batch[0] * batch[1]} per device per optimizer step)"
            )


def discard_attempt(trainer: Seq2SeqTrainer, run: Run) -> None:
    """Free a failed attempt's memory and remove what it wrote (checkpoints, curve rows), so the
    next attempt starts as a fresh run would."""
    live = next((cb.live for cb in trainer.callback_handler.callbacks if isinstance(cb, OptimizerStepCurves)), None)
    if live is not None:
        live.end()
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shutil.rmtree(run.checkpoint_dir, ignore_errors=True)
    shutil.rmtree(run.curves_dir / "plots", ignore_errors=True)


def save_adapter(model, tokenizer, out_dir: Path, initial_adapter: Path | None = None) -> None:
    """A PEFT method's output: only the adapter weights (kB to MB) and the tokenizer; the base
    model comes from its pin (finish_run writes pin.json beside them).

    `initial_adapter` (LoRA's PiSSA/OLoRA only): peft then saves the trained adapter minus the
    initial one as a plain LoRA adapter of rank 2r ([B | -B0] [A ; A0]) that applies to the
    untouched base model.
    """
    model.save_pretrained(
        out_dir,
        safe_serialization=True,
        path_initial_model_for_weight_conversion=None if initial_adapter is None else str(initial_adapter),
    )
    tokenizer.save_pretrained(out_dir)


def finish_run(
    run: Run,
    trained: Trained,
    save: Callable[[PreTrainedModel, PreTrainedTokenizerBase, Path], None],
    card_params: dict,
) -> None:
    """On the first process: save the model (`save`), its metrics, costs and model card; remove
    the checkpoints of the finished run. The same for every method."""
    trainer = trained.trainer
    if not trainer.is_world_process_zero():  # under torchrun, one process writes the outputs
        return
    save(trainer.model, trained.tokenizer, run.model_dir)
    library = "peft" if (run.model_dir / "adapter_config.json").is_file() else "transformers"
    if library == "peft":  # an adapter names the exact base it applies to: generate@<method> reads it
        shutil.copy2(BASE_PIN, run.model_dir / "pin.json")
    subset = trained.validation_subset
    metrics = {
        **training_metrics(trainer),
        **selection_metrics(trainer, run.recipe, subset),  # which checkpoint select_by kept, its scores
        "saved_mb": saved_mb(run.model_dir),
    }
    write_json(metrics, Path("metrics/train") / f"{run.method}.json")
    validation = validation_record(trainer, subset, run.recipe, run.params.seed)
    write_json(validation, Path("metrics/validation") / f"{run.method}.json")
    costs = {
        **training_costs(trainer),
        "validation_runtime_s": validation_runtime_s(trainer.state.log_history),  # inside train_runtime_s
        "train_oom_retries": trained.oom_retries,
        "train_oom_lost_s": trained.oom_lost_s,
    }
    write_json(costs, Path("metrics/timing") / f"{run.section}.json")
    card = model_card(
        BASE_PIN,
        library,
        {
            "seed": run.params.seed,
            "model": dataclasses.asdict(run.params.model),
            "validate": dataclasses.asdict(run.params.validate),
            **card_params,
        },
        metrics,
        family.unwrap(trainer.model).config,
    )
    (run.model_dir / "README.md").write_text(card)
    remove_checkpoints(run.checkpoint_dir)
