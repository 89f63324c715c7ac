"""How a training run spreads over its processes: a whole model per process (none: one process, or
DDP), or full fine-tuning sharded with torch's FSDP2 (fsdp), through the Trainer's own `fsdp` /
`fsdp_config` and accelerate; no wrapper of this project's own. And the collective final save.

FSDP is CUDA only here. On CPU, accelerate drops an FSDP request and runs DDP without a word, which
would put a whole model on every process while the params and metrics said sharded: the run is
refused instead, naming CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.errors import StageError
from stages.method_params import TrainParams

if TYPE_CHECKING:  # torch loads lazily: stages/launch.py refuses FSDP without paying its import
    import torch


def require_cuda_for_fsdp(sharding: str, cuda: bool, section: str) -> None:
    """Refuse `sharding: fsdp` where no CUDA GPU is visible, before accelerate silently runs DDP."""
    if sharding == "fsdp" and not cuda:
        raise StageError(
            f"{section}.sharding: fsdp needs CUDA GPUs and none is visible; on CPU accelerate would silently "
            f"run DDP (a whole model per process) instead; set {section}.sharding=none (-S {section}.sharding=none) "
            "to train with DDP on CPU, or run on a machine with CUDA GPUs"
        )


def sharding_arguments(params: TrainParams, device: torch.device, section: str) -> dict:
    """TrainingArguments settings for the recipe's sharding, and activation checkpointing, which is
    FSDP's own under sharding (the Trainer refuses both at once, and the training argument would add a
    redundant all-gather to every backward)."""
    require_cuda_for_fsdp(params.sharding, device.type == "cuda", section)
    recompute = params.gradient_checkpointing
    if params.sharding == "none":
        return {
            # recompute each layer's activations in backward (train.gradient_checkpointing); non-reentrant:
            # gradients reach adapters on a frozen base without the inputs requiring grad
            "activation_checkpointing": recompute,
            "activation_checkpointing_kwargs": {"use_reentrant": False} if recompute else None,
        }
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,  # torch's fully_shard: parameters as DTensors sharded on dim 0
            "reshard_after_forward": True,  # full sharding (ZeRO-3): layers re-gather in backward
            # one shard unit per transformer block (the model's _no_split_modules: T5Block, LlamaDecoderLayer)
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # checkpoints as one file per rank, resumed sharded; the final save gathers (full_state_dict)
            "state_dict_type": "SHARDED_STATE_DICT",
            "activation_checkpointing": recompute,
        },
        "activation_checkpointing": False,
        "activation_checkpointing_kwargs": None,
    }


def is_sharded(model) -> bool:
    """Whether any parameter is a DTensor shard (FSDP2), so saving it needs every rank."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (on CPU), gathered from FSDP2 shards; every rank must call
    it (an all-gather per tensor), and the other ranks get None. None too for a model that is not
    sharded: its own state dict is whole already."""
    if not is_sharded(model):
        return None
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if torch.distributed.get_rank() == 0 else None
