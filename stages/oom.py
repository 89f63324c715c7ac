"""Out-of-memory retries: the next attempt's batch, and throwing a failed attempt away whole."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import torch
from transformers import Trainer

from stages.curves import OptimizerStepCurves


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
