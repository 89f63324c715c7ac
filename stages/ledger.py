"""What a run cost and what it trained: wall time and peak memory across resumes (RunLedger), the
parameter counts, the whole-run loss, and the flat metrics and costs files a training stage writes."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ExportableState
from transformers.training_args import OptimizerNames

from stages import family
from stages.quantization import stored_numel


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


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    # parameters() de-duplicates shared tensors, so a tied head would not be counted twice; a 4-bit
    # base's packed weights count at their real number (stored_numel), as peft counts them
    total = sum(stored_numel(p) for p in model.parameters())
    trainable = sum(stored_numel(p) for p in model.parameters() if p.requires_grad)
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


def training_metrics(trainer: Trainer) -> dict[str, float]:
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
        "train_optimizer": OptimizerNames(trainer.args.optim).value,  # the one that ran (train.optimizer)
        # what accelerate actually ran: on CPU an FSDP request would have become DDP (refused before that)
        "train_sharding": "fsdp" if trainer.is_fsdp_enabled else "none",
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


def validation_runtime_s(log_history: list[dict]) -> float:
    """Seconds spent validating over the whole run, across resumes: the Trainer's validation-loss
    passes (eval_runtime) and the summaries generated for the validation subset (stages/validation.py)."""
    return round(sum(e.get("eval_runtime", 0.0) + e.get("eval_generation_runtime", 0.0) for e in log_history), 2)


def training_costs(trainer: Trainer) -> dict[str, float]:
    """Whole-run wall time, throughput and peak memory (noisy by nature: kept apart from the
    deterministic metrics and out of the model folder). Peak memory is the accelerator's
    max_memory_allocated on CUDA and the process's peak RSS on CPU, named accordingly.

    train_runtime_s is the training loop without its validations: the whole train() call (run_runtime_s,
    across resumes; its checkpoint saves and the best checkpoint's reload stay in it)
    less its validations (validation_runtime_s), which differ by method for reasons that are not
    training (generation speed, early stopping); train_samples_per_second counts the samples of the
    steps that ran over that loop time."""
    ledger = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RunLedger))
    run_runtime = ledger.runtime_s()
    validation = validation_runtime_s(trainer.state.log_history)
    loop = max(run_runtime - validation, 1e-9)
    # the samples the steps that ran consumed: an early stop at step 150 of 180 ran 150/180 of the epochs
    samples = (
        len(trainer.train_dataset) * trainer.args.num_train_epochs * trainer.state.global_step / trainer.state.max_steps
    )
    memory_key = "peak_gpu_memory_mb" if trainer.args.device.type == "cuda" else "peak_rss_mb"
    device = trainer.args.device
    return {
        "train_runtime_s": round(loop, 2),
        "validation_runtime_s": validation,
        "run_runtime_s": round(run_runtime, 2),
        "train_samples_per_second": round(samples / loop, 3),
        memory_key: round(ledger.peak_memory_mb(), 1),
        "train_device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
    }
