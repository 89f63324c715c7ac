"""Out-of-memory retries: the next attempt's batch, and throwing a failed attempt away whole."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import torch
from transformers import Trainer

from stages.curves import OptimizerStepCurves
from stages.errors import StageError


def halved(batch: tuple[int, int]) -> tuple[int, int]:
    """(per-device batch, accumulation) after an out-of-memory error: half the batch, twice the
    accumulation, the same samples per optimizer step (32 x 1 -> 16 x 2 -> 8 x 4). An odd batch
    cannot be halved exactly: then accumulation takes the whole step one sample at a time."""
    per_device, accumulation = batch
    if per_device % 2:
        return 1, per_device * accumulation
    return per_device // 2, accumulation * 2


def discard_attempt(trainer: Trainer, checkpoint_dir: Path, curves_dir: Path) -> None:
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
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    shutil.rmtree(curves_dir / "plots", ignore_errors=True)


def out_of_memory(
    stage: str, method: str, batch: tuple[int, int], processes: int, full: bool, variants: list[str]
) -> StageError:
    """The one line a run that does not fit ends with: where it stopped, the memory levers, and how to
    compare the other methods without it.

    Under several processes it is raised at the first out-of-memory error, never retried: the rank that
    failed would rebuild its model while the others wait in the step's all-reduce for ever. Raised, it
    ends its process, and torchrun stops the others."""
    why = (
        f"under {processes} processes, where one cannot retry alone (the others would wait in a collective)"
        if processes > 1
        else "with nothing left to halve"
        if batch[0] == 1
        else "with auto_find_batch_size off"
    )
    levers = [f"{method}.gradient_checkpointing=true", f"{method}.optimizer=adamw_8bit (or adafactor)"]
    if full:
        levers.append(f"{method}.sharding=fsdp with {method}.processes=<GPUs>")
    else:
        levers.append(f"{method}.quantization=4bit (LoRA)")
    others = [v for v in variants if v != method]
    subset = f"; compare the others without it: dvc exp run -S 'variants=[{','.join(others)}]' report" if others else ""
    return StageError(
        f"{stage} ran out of CUDA memory at per-device batch {batch[0]} x {batch[1]} accumulation {why}; "
        f"memory levers: -S {', -S '.join(levers)} (docs/scaling-out.md){subset}"
    )
