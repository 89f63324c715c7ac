"""One rank of the sharded save test (tests/test_scaling.py), run as
`torchrun --standalone --nproc_per_node=2 -m tests.fsdp_worker MODEL_DIR OUT_DIR` on CPU with gloo.

Every rank shards the model with torch's fully_shard (FSDP2) as accelerate does for the Trainer (each
transformer block, then the root), takes one AdamW step on the same batch, and joins the project's
collective save: stages/sharding.py full_state_dict gathers the whole weights, and rank 0 alone writes
them with stages/modeling.py save_model. OUT_DIR/shards.json records what each rank held.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from stages.modeling import load_model, load_tokenizer, save_model
from stages.sharding import full_state_dict, is_sharded

LEARNING_RATE = 1.0e-3


def batch(tokenizer) -> dict[str, torch.Tensor]:
    """The same two rows on every rank (and in the single-process reference)."""
    inputs = tokenizer(
        ["Person1: Hello, table for two?", "Person2: Sure, this way."], return_tensors="pt", padding=True
    )
    labels = tokenizer(["Person1 books a table.", "Person2 seats them."], return_tensors="pt", padding=True)
    return {**inputs, "labels": labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)}


def one_step(model, tokenizer) -> None:
    """One AdamW step; eval mode so that dropout draws nothing (the gradients are the same either way)."""
    model.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    model(**batch(tokenizer)).loss.backward()
    optimizer.step()


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    blocks = tuple({type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules})
    for module in list(model.modules()):
        if isinstance(module, blocks):
            fully_shard(module)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
    one_step(model, tokenizer)  # gradients reduce-scattered (averaged) over the ranks, each its shard's step
    whole = full_state_dict(model)  # every rank joins the gather
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, {"rank": rank, "sharded": is_sharded(model), "local_numel": local,
                                  "got_whole": whole is not None})  # fmt: skip
    if rank == 0:
        save_model(model, tokenizer, Path(out_dir), state_dict=whole)
        (Path(out_dir) / "shards.json").write_text(json.dumps(held))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
