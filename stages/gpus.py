"""Which GPUs a training stage runs on: its own free ones, claimed with a lock held for the stage's life.

`dvc queue start --jobs 4` on a 4-GPU machine runs four stages at once, and DVC gives its workers no
GPU of their own: without a claim every one would train on GPU 0. So a stage claims `processes` GPUs
that no other stage holds, by an exclusive flock on one file per GPU in a machine-wide folder
(GPU_LOCK_DIR, default /tmp/dvc-gpu-locks), and runs with CUDA_VISIBLE_DEVICES set to them.

The locks are open file descriptors that survive the exec into the training process (and torchrun,
which outlives its workers), so they are held exactly as long as the stage runs. A killed stage's
descriptors close with it: the kernel frees its GPUs, with no stale file to clean up.

A CUDA_VISIBLE_DEVICES that is already set (by SLURM, a scheduler, or by hand) is honoured: nothing is
claimed, the stage uses what it was given.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Mapping
from pathlib import Path

DEFAULT_LOCK_DIR = "/tmp/dvc-gpu-locks"
WAIT_MESSAGE_EVERY_S = 60.0


def lock_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("GPU_LOCK_DIR", DEFAULT_LOCK_DIR))


def try_claim(index: int, folder: Path) -> int | None:
    """An inheritable descriptor holding GPU `index`'s lock, or None if another stage holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"gpu{index}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.set_inheritable(fd, True)  # kept across the exec into stages.train or torchrun
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for a person looking: which process holds it
    return fd


def claim_gpus(count: int, visible: int, folder: Path, poll_s: float = 2.0) -> list[int]:
    """`count` GPU indices of the `visible` ones that no other stage holds, lowest first; waits while
    fewer are free (a queue with more jobs than GPUs), saying so once a minute."""
    if count > visible:
        from stages.errors import StageError

        raise StageError(f"{count} processes need {count} GPUs and {visible} are visible; lower processes")
    waited = None
    while True:
        held = {}
        for index in range(visible):
            fd = try_claim(index, folder)
            if fd is not None:
                held[index] = fd
            if len(held) == count:
                return list(held)
        for fd in held.values():  # not enough: give back what this try took, so others can proceed
            os.close(fd)
        if waited is None or time.monotonic() - waited >= WAIT_MESSAGE_EVERY_S:
            print(f"waiting for {count} free GPU(s) of {visible}: other stages hold them ({folder})", flush=True)
            waited = time.monotonic()
        time.sleep(poll_s)


def gpu_environment(environ: dict[str, str], processes: int, visible: int) -> dict[str, str]:
    """The stage's environment: CUDA_VISIBLE_DEVICES as given, or set to the GPUs it claimed."""
    if visible == 0 or "CUDA_VISIBLE_DEVICES" in environ:
        return environ
    claimed = claim_gpus(processes, visible, lock_dir(environ))
    return {**environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, claimed))}
