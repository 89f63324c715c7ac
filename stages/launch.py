"""Start a training stage: in this process, or under torchrun (DDP) when train_*.processes > 1.

`python -m stages.launch train_full` replaces itself (exec) with `python -m stages.train_full`,
so killing `dvc repro` kills the training too; torchrun is used only when asked for, because it
starts its workers in their own session, where a SIGKILL to DVC does not reach them (the
workers watch for that themselves: see training.exit_with_launcher).
"""

from __future__ import annotations

import os
import shutil
import sys

from stages.errors import StageError, run_stage
from stages.params import load_params

STAGES = ("train_full", "train_lora")


def command(stage: str, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", f"stages.{stage}"]
    torchrun = shutil.which("torchrun") or "torchrun"
    return [torchrun, "--standalone", f"--nproc_per_node={processes}", "-m", f"stages.{stage}"]


def main(stage: str) -> None:
    if stage not in STAGES:
        raise StageError(f"unknown training stage {stage!r}; expected one of {', '.join(STAGES)}")
    argv = command(stage, getattr(load_params(), stage).processes)
    sys.stdout.flush()
    os.execv(argv[0], argv)


if __name__ == "__main__":
    run_stage(lambda: main(sys.argv[1] if len(sys.argv) > 1 else ""))
