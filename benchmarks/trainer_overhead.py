"""What the Trainer path costs against a plain torch loop, and what each of its parts costs when switched off.

Target: the pipeline's training path (stages/recipe.py: training_arguments, build_trainer, its
callbacks, DVCLive curves, progress, logging, grad-norm clipping, token_mean_loss) at >= 0.9x the samples/s
of a plain loop at the same batch and data order. Both run here in one process on the same random-weight
model (a fresh copy of the same initial weights each run) and the same batches: the Trainer's own batches
(its length-grouped sampler and collator), replayed by the plain loop, which does forward, the model's own
loss, backward, a fused AdamW step and nothing else.

    python benchmarks/trainer_overhead.py                                  # CPU: flan-t5-small architecture
    python benchmarks/trainer_overhead.py --config flan-t5-base-config --batch 32 --steps 12 --json out.json

Each row switches one candidate off in the pipeline path; "cost" is the pipeline's time over that row's
(> 1: the part costs). Steps after the first (warm-up) are timed; the device is drained at each step's end.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from transformers import AutoTokenizer, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (also puts the repo root on sys.path)

from stages.curves import attach_curves  # noqa: E402
from stages.ledger import RunLedger  # noqa: E402
from stages.modeling import use_bf16  # noqa: E402
from stages.params import load_params  # noqa: E402
from stages.progress import TrainerProgress  # noqa: E402
from stages.recipe import build_trainer, training_arguments  # noqa: E402


class StepClock(TrainerCallback):
    def __init__(self, device: torch.device):
        self.device, self.ends = device, []

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())


# the candidates, each a change to the pipeline path: (row name, recipe changes, what to do to the trainer)
def no_callbacks(trainer) -> None:
    for callback in [c for c in trainer.callback_handler.callbacks if isinstance(c, (RunLedger, TrainerProgress))]:
        trainer.remove_callback(callback)


def no_progress(trainer) -> None:
    trainer.remove_callback(TrainerProgress)


def no_grad_norm(trainer) -> None:
    trainer._get_grad_norm = lambda model, grad_norm=None: grad_norm  # max_grad_norm 0 still computes the norm


def nan_inf_filter(trainer) -> None:
    trainer.args.logging_nan_inf_filter = True  # transformers' default; the pipeline turns it off


CANDIDATES = (
    ("pipeline (as dvc repro trains)", {}, None, True),
    ("NaN/inf loss filter on (transformers' default: a host sync per step)", {}, nan_inf_filter, True),
    ("callbacks off (RunLedger, progress)", {}, no_callbacks, True),
    ("DVCLive curves off", {}, None, False),
    ("progress off", {}, no_progress, True),
    ("logging off (logging_steps 10^6)", {"logging_steps": 10**6}, None, True),
    ("grad-norm and clipping off", {"max_grad_norm": 1.0e-12}, no_grad_norm, True),
    ("random sampler (vs length-grouped)", {"group_by_length": False}, None, True),
)


def pipeline_run(model, tokenizer, data, recipe, device, change, curves: bool, steps: int, out: Path):
    """`steps` optimizer steps of the pipeline's Trainer path; returns (seconds for steps 2.., the batches)."""
    args = training_arguments(recipe, 0, out / "ckpt", device, "full")
    args.max_steps, args.eval_strategy, args.save_strategy, args.load_best_model_at_end = steps, "no", "no", False
    trainer = build_trainer(model, tokenizer, data, data, args, recipe.pad_to_multiple_of)
    if curves:
        attach_curves(trainer, out / "curves", resume=None)
    if change is not None:
        change(trainer)
    if recipe.max_grad_norm < 1.0e-6:  # "off": a norm that clips nothing is still computed; skip the clip too
        trainer.args.max_grad_norm = 0.0
    clock = StepClock(device)
    trainer.add_callback(clock)
    batches, collate = [], trainer.data_collator

    def recording_collator(features):  # the batches exactly as the Trainer trained on them, for the plain loop
        batches.append(collate(features))
        return batches[-1]

    trainer.data_collator = recording_collator
    trainer.train()
    return clock.ends[-1] - clock.ends[0], batches[:steps]


def plain_loop(model, batches, recipe, device) -> float:
    """Forward, the model's own loss, backward, fused AdamW: seconds for steps 2.. ."""
    bf16 = use_bf16(recipe.precision, device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        fused=True,
    )
    model.train()
    ends = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter())
    return ends[-1] - ends[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="flan-t5-small-config", help="folder under ../shared/models")
    parser.add_argument("--config-dir", type=Path, help="any folder with config.json and a tokenizer (over --config)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (both paths)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--candidates", action="store_true", help="also time each candidate switched off")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after each run)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(torch.get_num_threads(), 1))
    config_dir = args.config_dir or speed.SHARED / "models" / args.config
    tokenizer = AutoTokenizer.from_pretrained(config_dir)
    initial = speed.random_model(config_dir, torch.device("cpu")).state_dict()
    recipe = dataclasses.replace(
        load_params(speed.REPO / "params.yaml").recipe("full"),
        batch_size=args.batch,
        gradient_accumulation_steps=1,
        auto_find_batch_size=False,
        processes=1,
    )
    data = speed.pipeline_dataset(tokenizer, speed.load_dialogues("train", args.batch * args.steps * 2))
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "config": args.config, "batch": args.batch, "steps": args.steps}  # fmt: skip

    def fresh_model():
        model = speed.random_model(config_dir, device)
        model.load_state_dict(copy.deepcopy(initial))
        return model

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    timed_samples = (args.steps - 1) * args.batch
    # an untimed pass first: the first run to meet each padded shape pays for it beyond its first step
    # (oneDNN primitives on a CPU, cuBLAS/cuDNN plans and the allocator on a GPU); measured 5x on this CPU
    with tempfile.TemporaryDirectory() as out:
        pipeline_run(fresh_model(), tokenizer, data, recipe, device, None, False, args.steps, Path(out))
    rows = []
    candidates = CANDIDATES if args.candidates else CANDIDATES[:1]
    for name, changes, change, curves in candidates:
        with tempfile.TemporaryDirectory() as out:
            seconds, batches = pipeline_run(
                fresh_model(), tokenizer, data, dataclasses.replace(recipe, **changes), device, change, curves,
                args.steps, Path(out),
            )  # fmt: skip
        rows.append((name, timed_samples / seconds))
        if name.startswith("pipeline"):
            plain = plain_loop(fresh_model(), batches, recipe, device)
            results["plain_loop_samples_per_s"] = round(timed_samples / plain, 3)
            results["pipeline_samples_per_s"] = round(timed_samples / seconds, 3)
            results["trainer_over_plain_loop"] = round(plain / seconds, 3)
        else:
            results.setdefault("candidates_samples_per_s", {})[name] = round(timed_samples / seconds, 3)
        save()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    table = [("plain loop (same batches)", results["plain_loop_samples_per_s"], "")]
    pipeline = rows[0][1]
    table += [(name, round(rate, 3), f"{rate / pipeline:.2f}x") for name, rate in rows]
    print(f"{results['device']}, torch {torch.__version__}, {args.config} random weights, batch {args.batch}, "
          f"{args.steps} steps (first is warm-up), real DialogSum rows")  # fmt: skip
    print(tabulate(table, headers=["path", "samples/s", "vs pipeline"], tablefmt="github"))
    print(f"Trainer path / plain loop: {results['trainer_over_plain_loop']:.2f}x")


if __name__ == "__main__":
    main()
