"""One lever at a time: how much each speed choice of the pipeline pays on this machine.

Companion to speed.py (which compares the whole path with the seed recipe). Each row changes one
setting of the pipeline path and reports the ratio to the pipeline's choice, measured in this run:

    python benchmarks/levers.py            # flan-t5-small architecture, random weights
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (also puts the repo root on sys.path)

from stages.recipe import build_trainer, training_arguments  # noqa: E402

CONFIG = speed.SHARED / "models" / "flan-t5-small-config"


def generation_seconds(tokenizer, dialogues, dtype: torch.dtype, batch_size: int) -> float:
    model = speed.random_model(CONFIG, torch.device("cpu")).to(dtype)
    return speed.pipeline_generation(model, tokenizer, dialogues, 32, batch_size)


def training_samples_per_second(tokenizer, data, **changes) -> float:
    optim = changes.pop("optim", None)
    params = dataclasses.replace(speed.pipeline_train_params(8), **changes)
    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(params, seed=0, output_dir=Path(out), device=torch.device("cpu"), section="full")
        if optim:
            args.optim = optim
        trainer = build_trainer(speed.random_model(CONFIG, torch.device("cpu")).train(), tokenizer, data, data, args)
        seconds, samples = speed.timed_training(trainer, 10)
    return samples / seconds


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(CONFIG)
    dialogues = speed.load_dialogues("test", 64)
    data = speed.pipeline_dataset(tokenizer, speed.load_dialogues("train", 80))
    rows = []
    bf16_16 = generation_seconds(tokenizer, dialogues, torch.bfloat16, 16)
    for label, dtype, batch in (
        ("generation fp32 (vs bf16), batch 16", torch.float32, 16),
        ("generation bf16, batch 32 (vs 16)", torch.bfloat16, 32),
        ("generation bf16, batch 64 (vs 16)", torch.bfloat16, 64),
    ):
        rows.append([label, f"{generation_seconds(tokenizer, dialogues, dtype, batch) / bf16_16:.2f}x the time"])
    ours = training_samples_per_second(tokenizer, data)
    for label, changes in (
        ("training fp32 (vs bf16)", {"precision": "fp32"}),
        ("training 2 dataloader workers (vs 0)", {"dataloader_workers": 2}),
        ("training random batches (vs length-grouped)", {"group_by_length": False}),
        ("training unfused AdamW (vs fused)", {"optim": "adamw_torch"}),
    ):
        rows.append([label, f"{ours / training_samples_per_second(tokenizer, data, **changes):.2f}x the time"])
    print(
        f"flan-t5-small architecture, random weights, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"pipeline choices: bf16 where native ({speed.use_bf16('auto', torch.device('cpu'))}), eval batch 16, "
        "no workers, length-grouped batches, fused AdamW"
    )
    print(tabulate(rows, headers=["lever changed", "cost against the pipeline's choice"], tablefmt="github"))


if __name__ == "__main__":
    main()
