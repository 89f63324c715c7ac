"""Live training curves through DVCLive (dvclive/<method>/plots), continued across a resume."""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer
from transformers.integrations import DVCLiveCallback

from stages.checkpoints import checkpoint_step


class OptimizerStepCurves(DVCLiveCallback):
    """transformers' DVCLive callback with optimizer steps on the step axis.

    The stock callback counts log events (train and eval logs of one step become two "steps"),
    and restarts at 0 after a resume; here each row carries the Trainer's global step.
    """

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if state.is_world_process_zero and self.live is not None:
            self.live.step = state.global_step
        super().on_log(args, state, control, model=model, logs=logs, **kwargs)


def attach_curves(trainer: Trainer, curves_dir: Path, resume: str | None) -> None:
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


def drop_rows_after(metrics_dir: Path, step: int) -> None:
    """Keep only the rows of DVCLive's TSV files (timestamp, step, value) up to `step`."""
    for path in metrics_dir.rglob("*.tsv"):
        header, *rows = path.read_text().splitlines()
        column = header.split("\t").index("step")
        kept = [row for row in rows if int(row.split("\t")[column]) <= step]
        path.write_text("\n".join([header, *kept]) + "\n")
