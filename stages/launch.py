"""Start a method's training stage: in this process, or under torchrun (DDP) when its recipe's
`processes` > 1 (train.processes, or the method section's own).

`python -m stages.launch lora 42` replaces itself (exec) with `python -m stages.train lora 42`,
so killing `dvc repro` kills the training too; torchrun is used only when asked for, because it
starts its workers in their own session, where a SIGKILL to DVC does not reach them (the
workers watch for that themselves: see stages/training.py exit_with_launcher).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys

from stages.errors import run_stage
from stages.params import load_params
from stages.runs import stage_args
from stages.sharding import require_cuda_for_fsdp


def command(method: str, seed: int, processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "stages.train", method, str(seed)]
    torchrun = shutil.which("torchrun") or "torchrun"
    return [torchrun, "--standalone", f"--nproc_per_node={processes}", "-m", "stages.train", method, str(seed)]


def one_gpu_env(environ: dict[str, str], visible_gpus: int, method: str) -> dict[str, str]:
    """For a one-process run, the environment restricted to the first visible GPU.

    With several GPUs visible, the Trainer would wrap the model in nn.DataParallel: the batch
    per step would grow by the GPU count and the LR schedule shrink, while the params and metrics
    still said one process. Data parallelism is asked for with `processes`, and then uses DDP.
    """
    if visible_gpus <= 1:
        return environ
    first = environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    print(
        f"{visible_gpus} GPUs visible and {method}'s processes is 1: training on one GPU "
        f"(CUDA_VISIBLE_DEVICES={first}); set train.processes={visible_gpus} (or {method}.processes) to use "
        "all of them (DDP)"
    )
    return {**environ, "CUDA_VISIBLE_DEVICES": first}


def visible_gpus() -> int:
    """How many CUDA devices the stage would see, asked of the NVIDIA driver (libcuda) directly:
    importing torch to count them costs ~2 s per training stage on 2 cores, and the exec that
    follows imports it again. The driver honours CUDA_VISIBLE_DEVICES as torch does, and the
    exec discards the driver state. Where libcuda cannot be asked (not Linux), torch counts."""
    if not sys.platform.startswith("linux"):
        import torch

        return torch.cuda.device_count()
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver: torch would see no GPU either
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0  # e.g. CUDA_ERROR_NO_DEVICE: torch.cuda.device_count() is 0 then too
    return count.value


def main(method: str, seed: int) -> None:
    params = load_params()
    recipe = params.recipe(method)  # an unknown method fails here, naming the ones there are
    processes = recipe.processes
    require_cuda_for_fsdp(recipe.sharding, visible_gpus() > 0, method)  # before torchrun starts anything
    argv = command(method, seed, processes)
    environ = dict(os.environ)
    if processes == 1:
        environ = one_gpu_env(environ, visible_gpus(), method)
    sys.stdout.flush()
    os.execve(argv[0], argv, environ)


if __name__ == "__main__":
    run_stage(lambda: main(*stage_args(sys.argv[1:], "launch", seeded=True)))
