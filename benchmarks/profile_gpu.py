"""Why is a step slow? Host overhead vs GPU work, per batch size, for flan-t5-base training and generation.

The first GPU run (BENCHMARKS.md, H200) measured 2% MFU for full fine-tuning, ~0.18 s per forward+backward at
both batch 8 and batch 16, and GPU utilisation near 30%: the signature of a step bound by the host (one
Python/dispatcher/launch cost per kernel), not by the GPU. This script checks that in one short run:

1. launch overhead: seconds per tiny CUDA op (and per tiny CPU op, the dispatcher alone);
2. a plain training loop (bf16 autocast, fused AdamW, the model's own loss) at several batch sizes on fixed
   shapes: seconds per step, samples/s, MFU from FLOPs counted by torch, kernels launched per step, and the
   share of the step the GPU was busy (sum of kernel times / wall time, from torch.profiler);
3. the same for LoRA (params.yaml's lora section): peak memory vs full at each batch size;
4. greedy generation with forced lengths at eval batch 32 and 128.

    python benchmarks/profile_gpu.py --json $OUT/profile.json            # on the GPU machine
    python benchmarks/profile_gpu.py --config flan-t5-small-config --batches 2 4 --steps 2   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (also puts the repo root on sys.path)

from stages.params import load_params  # noqa: E402
from stages.train_lora import lora_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="flan-t5-base-config", help="folder under ../shared/models")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64], help="training batch sizes")
    parser.add_argument("--source", type=int, default=384, help="source tokens per row (fixed shapes)")
    parser.add_argument("--target", type=int, default=64, help="target tokens per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size (after 2 warm-up steps)")
    parser.add_argument("--eval-batches", type=int, nargs="+", default=[32, 128], help="generation batch sizes")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def op_overhead_us(device: torch.device, ops: int = 3000) -> float:
    """Wall microseconds per tiny elementwise op (no real work: the cost is dispatch + launch)."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    sync(device)
    started = time.perf_counter()
    for _ in range(ops):
        x.add_(1)
    sync(device)
    return (time.perf_counter() - started) / ops * 1e6


def batch_of(vocab: int, batch: int, source: int, target: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, source), generator=generator)
    labels = torch.randint(3, vocab, (batch, target), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def train_step(model, optimizer, batch, bf16: bool) -> None:
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_training(model, batch, steps: int, device: torch.device, bf16: bool) -> dict[str, float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1.0e-5, fused=device.type == "cuda")
    model.train()
    for _ in range(2):  # warm-up: kernels load, allocator grows, optimizer state appears
        train_step(model, optimizer, batch, bf16)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch, bf16)
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    kernels, share = profiled_kernels(model, optimizer, batch, device, bf16)
    return {
        "seconds_per_step": seconds,
        "samples_per_second": batch["input_ids"].shape[0] / seconds,
        "flops_per_step": counter.get_total_flops(),
        "kernels_per_step": kernels,
        "gpu_busy_share": share,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def profiled_kernels(model, optimizer, batch, device: torch.device, bf16: bool) -> tuple[int | None, float | None]:
    """Kernels launched in one step, and the share of the step's wall time the GPU spent in them."""
    if device.type != "cuda":
        return None, None
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync(device)
            started = time.perf_counter()
            train_step(model, optimizer, batch, bf16)
            sync(device)
            wall_us = (time.perf_counter() - started) * 1e6
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(kernels), sum(e.time_range.elapsed_us() for e in kernels) / wall_us
    except Exception as error:  # noqa: BLE001 - a profiler problem must not cost the other numbers
        print("profiler failed:", type(error).__name__, error, flush=True)
        return None, None


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = speed.SHARED / "models" / args.config
    bf16 = speed.use_bf16("auto", device)
    peak = speed.peak_bf16(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict = {"device": name, "torch": torch.__version__, "bf16": bf16, "config": args.config}
    results["op_overhead_us"] = {"cpu": op_overhead_us(torch.device("cpu"))}
    if device.type == "cuda":
        results["op_overhead_us"]["cuda"] = op_overhead_us(device)
    print("op overhead (us per tiny op):", {k: round(v, 1) for k, v in results["op_overhead_us"].items()}, flush=True)

    lora = load_params(speed.REPO / "params.yaml").lora
    rows, results["training"] = [], []
    for batch_size in args.batches:
        for method in ("full", "lora"):
            torch.manual_seed(0)
            model = speed.random_model(config, device)
            if method == "lora":
                from peft import get_peft_model

                model = get_peft_model(model, lora_config(lora, ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]))
            batch = batch_of(model.config.vocab_size, batch_size, args.source, args.target, device)
            try:
                r = measure_training(model, batch, args.steps, device, bf16)
            except torch.OutOfMemoryError:
                r = {"out_of_memory": True}
            r.update(method=method, batch=batch_size)
            if peak and "flops_per_step" in r:
                r["mfu"] = r["flops_per_step"] / r["seconds_per_step"] / peak[1]
            results["training"].append(r)
            rows.append(
                [
                    method,
                    batch_size,
                    *(
                        r.get(k)
                        for k in (
                            "seconds_per_step",
                            "samples_per_second",
                            "mfu",
                            "kernels_per_step",
                            "gpu_busy_share",
                            "peak_memory_mb",
                        )
                    ),
                ]
            )
            print(rows[-1], flush=True)
            del model, batch
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(
        tabulate(
            rows,
            ["method", "batch", "s/step", "samples/s", "MFU", "kernels/step", "GPU busy", "peak MiB"],
            floatfmt=".3g",
        )
    )

    tokenizer = AutoTokenizer.from_pretrained(config)
    dialogues = speed.load_dialogues("test", max(args.eval_batches))
    model = speed.random_model(config, device)
    if bf16:
        model = model.to(torch.bfloat16)  # as the generate stage (the first GPU run measured fp32 here)
    speed.pipeline_generation(model, tokenizer, dialogues[:8], 8, 8)  # warm-up
    results["generation"] = []
    for eval_batch in args.eval_batches:
        seconds = speed.pipeline_generation(model, tokenizer, dialogues, 32, eval_batch)
        results["generation"].append(
            {
                "eval_batch": eval_batch,
                "dialogues": len(dialogues),
                "new_tokens": 32,
                "dialogues_per_second": len(dialogues) / seconds,
            }
        )
        print("generation", results["generation"][-1], flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
