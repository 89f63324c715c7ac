"""Start a method's training stage: in this process, or under torchrun (DDP, or FSDP with
`sharding: fsdp`) when its recipe's `processes` > 1 (train.processes, or the method section's own), on
one node or `nodes` of them, on GPUs it claims for itself (stages/gpus.py).

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
from collections.abc import Mapping

from stages.errors import StageError, run_stage
from stages.gpus import gpu_environment
from stages.params import load_params
from stages.runs import stage_args
from stages.sharding import require_cuda_for_fsdp


def command(
    method: str, seed: int, processes: int, nodes: int = 1, environ: Mapping[str, str] | None = None
) -> list[str]:
    """The training process: itself (one process), torchrun on this node alone (--standalone), or one
    node of a multi-node torchrun whose rank and rendezvous come from the environment (rendezvous)."""
    stage = ["-m", "stages.train", method, str(seed)]
    if processes == 1 and nodes == 1:
        return [sys.executable, *stage]
    torchrun = shutil.which("torchrun") or "torchrun"
    if nodes == 1:
        return [torchrun, "--standalone", f"--nproc_per_node={processes}", *stage]
    node_rank, endpoint = rendezvous(environ or {}, method)
    return [torchrun, f"--nnodes={nodes}", f"--node_rank={node_rank}", f"--nproc_per_node={processes}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id=train-{method}-{seed}", *stage]  # fmt: skip


def rendezvous(environ: Mapping[str, str], method: str) -> tuple[str, str]:
    """This node's rank and the rendezvous host:port of a multi-node run, from torchrun's own variables
    (NODE_RANK, MASTER_ADDR, MASTER_PORT) or SLURM's (SLURM_NODEID; the first host of the job is the
    usual MASTER_ADDR). They differ per node and per job, so they are not params."""
    node_rank = environ.get("NODE_RANK", environ.get("SLURM_NODEID"))
    host, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT", "29500")
    if node_rank is None or not host:
        raise StageError(
            f"{method}.nodes > 1 needs this node's rank and the rendezvous host: set NODE_RANK (or run under "
            "SLURM, which sets SLURM_NODEID) and MASTER_ADDR (and MASTER_PORT, default 29500) on every node "
            "(docs/scaling-out.md)"
        )
    return node_rank, f"{host}:{port}"


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
    processes, gpus = recipe.processes, visible_gpus()
    require_cuda_for_fsdp(recipe.sharding, gpus > 0, method)  # before torchrun starts anything
    argv = command(method, seed, processes, recipe.nodes, os.environ)
    if processes == 1 and "CUDA_VISIBLE_DEVICES" in os.environ:  # given GPUs: the first of them
        environ = one_gpu_env(dict(os.environ), gpus, method)
    else:  # this stage's own free GPUs (stages/gpus.py), held until it ends
        environ = gpu_environment(dict(os.environ), processes, gpus)
    sys.stdout.flush()
    os.execve(argv[0], argv, environ)


if __name__ == "__main__":
    run_stage(lambda: main(*stage_args(sys.argv[1:], "launch", seeded=True)))
