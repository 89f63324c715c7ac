"""A training run's checkpoints: where a killed run resumes, and which checkpoints may not be resumed.

Checkpoints go to checkpoints/<method>/seed<seed>/, which is git-ignored and no output of the train
stage: DVC neither deletes it before a run nor caches it, so a run killed overnight resumes from its
last checkpoint on the next `dvc repro`. (As a `persist: true` output it would also resume, but DVC's
run cache refuses stages with persistent outputs, and tuning trials could not come back from it.)
A fingerprint of the params and the prepared data sits beside them: checkpoints made with anything
else are discarded, never resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

from transformers import Trainer


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


def resumable_checkpoint(trainer: Trainer, checkpoint_dir: Path, run_fingerprint: str) -> str | None:
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


def checkpoint_step(checkpoint: str) -> int:
    return int(Path(checkpoint).name.split("-")[-1])


def checkpoint_batch(checkpoint_dir: Path, run_fingerprint: str) -> int | None:
    """The per-device batch a resumable checkpoint of this run trained with (smaller than the
    recipe's after an out-of-memory retry), or None: a resume continues at that batch."""
    marker = checkpoint_dir / "fingerprint.txt"
    complete = complete_checkpoints(checkpoint_dir) if checkpoint_dir.is_dir() else []
    if not complete or not marker.is_file() or marker.read_text() != run_fingerprint:
        return None
    return json.loads((complete[-1] / "trainer_state.json").read_text()).get("train_batch_size")
