"""Speed benchmark: this pipeline's training and evaluation paths vs the seed recipe, as ratios.

The seed recipe (the tutorials this project replaces) pads every example to the maximum length,
trains in fp32 and generates one dialogue at a time. Both paths run here, in one process, on the
same model architecture (random weights from ../shared/models/<config>) and the same DialogSum
dialogues, so the ratios are measured, not quoted.

    python benchmarks/speed.py                                   # CPU: flan-t5-small architecture
    python benchmarks/speed.py --config flan-t5-base-config      # GPU: adds MFU and bf16

Measures (a) generation, with the number of new tokens forced (min = max) so random weights
compare fairly; (b) training samples/s and real tokens/s; (c) peak memory of full vs LoRA
training at the same batch size; (d) on CUDA, model FLOPs utilisation of full fine-tuning: the FLOPs
torch counts for the timed steps' actual padded batches (forward + backward), per second, over the
card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from datasets import Dataset
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from stages.generate import generate_summaries  # noqa: E402
from stages.method_params import TrainParams  # noqa: E402
from stages.modeling import use_bf16  # noqa: E402
from stages.params import PrepareParams, load_params  # noqa: E402
from stages.prepare import fit_prompts, format_prompt, prepare_training_split  # noqa: E402
from stages.recipe import build_trainer, training_arguments  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
MAX_SOURCE, MAX_TARGET = 512, 128  # the seed pads to these; the pipeline truncates to them
# Dense bf16 peak FLOP/s (no sparsity), for MFU, matched against torch.cuda.get_device_name() in this
# order: the form factor first, because "NVIDIA H100 PCIe" and "NVIDIA H100 80GB HBM3" (SXM) share "H100"
# but not their peak. Whole words only, so "A10G", "L40S" and "GH200" (other peaks) match nothing.
PEAK_BF16 = (
    (("H100", "NVL"), "H100 NVL", 835e12),
    (("H100", "PCIe"), "H100 PCIe", 756e12),
    (("H100",), "H100 SXM", 989e12),
    (("H200", "NVL"), "H200 NVL", 835e12),
    (("H200",), "H200", 989e12),
    (("A100",), "A100", 312e12),
    (("L4",), "L4", 121e12),
    (("A10",), "A10", 125e12),
)


# torch's FLOP counter has formulas for the CUDA attention kernels but not for the CPU flash kernel, which
# SDPA picks for unmasked attention (T5's cross-attention): without these, that attention counts as free.
# Same formulas as torch's for the CUDA kernels (backward includes their recompute of the scores).
def _cpu_flash_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_cpu_flash_flops._get_raw = _cpu_flash_backward_flops._get_raw = True  # called with tensors, not shapes
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="flan-t5-small-config", help="folder under ../shared/models")
    parser.add_argument("--dialogues", type=int, default=64, help="test dialogues to generate for")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per dialogue (forced)")
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=16,
        help="the generate stage's batch size (16 is fastest on CPU; params' generate.batch_size, 32, is for a GPU)",
    )
    parser.add_argument("--train-steps", type=int, default=12, help="optimizer steps per training run")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size (both paths)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-probe", choices=["full", "lora"], help=argparse.SUPPRESS)
    return parser.parse_args()


def load_dialogues(split: str, count: int) -> list[dict]:
    path = SHARED / "data" / "dialogsum" / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; the benchmark reads real DialogSum from ../shared")
    rows, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["dialogue"] not in seen:  # the test split repeats each dialogue per reference
                seen.add(row["dialogue"])
                rows.append(row)
            if len(rows) == count:
                break
    return rows


def random_model(config_dir: Path, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(config_dir)).to(device).eval()


def seed_generation(model, tokenizer, dialogues: list[dict], new_tokens: int) -> float:
    """The seed: one dialogue at a time, greedy, fp32, no inference_mode. Returns seconds."""
    started = time.perf_counter()
    for row in dialogues:
        ids = tokenizer(format_prompt(PROMPT, row["dialogue"]), return_tensors="pt").input_ids.to(model.device)
        model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return time.perf_counter() - started


def pipeline_generation(model, tokenizer, dialogues: list[dict], new_tokens: int, batch_size: int) -> float:
    """The generate stage's path: pre-tokenized, sorted batches, inference_mode, bf16 on GPU."""
    input_ids, _ = fit_prompts(PROMPT, [r["dialogue"] for r in dialogues], tokenizer, MAX_SOURCE)
    # greedy like the seed, and min = max new tokens so random-weight models compare fairly
    params = dataclasses.replace(
        load_params(REPO / "params.yaml").generate,
        batch_size=batch_size,
        precision="auto",
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
    )
    started = time.perf_counter()
    generate_summaries(model, tokenizer, input_ids, params)
    return time.perf_counter() - started


def seed_dataset(tokenizer, rows: list[dict]) -> Dataset:
    """The seed's tokenization: everything padded to the maximum length."""
    source = tokenizer(
        [format_prompt(PROMPT, r["dialogue"]) for r in rows],
        padding="max_length",
        truncation=True,
        max_length=MAX_SOURCE,
    )
    labels = tokenizer(
        [r["summary"] for r in rows], padding="max_length", truncation=True, max_length=MAX_TARGET
    ).input_ids
    labels = [[t if t != tokenizer.pad_token_id else -100 for t in x] for x in labels]
    return Dataset.from_dict({"input_ids": source.input_ids, "attention_mask": source.attention_mask, "labels": labels})


def pipeline_dataset(tokenizer, rows: list[dict]) -> Dataset:
    """The prepare stage's tokenization: truncated, unpadded (the collator pads per batch)."""
    params = PrepareParams(
        prompt_template=PROMPT, max_source_length=MAX_SOURCE, max_target_length=MAX_TARGET, chat_template="none"
    )
    return prepare_training_split(rows, tokenizer, params)[0]


def real_tokens(dataset: Dataset, pad_id: int) -> list[int]:
    return [
        sum(t != pad_id for t in source) + sum(t != -100 for t in target)
        for source, target in zip(dataset["input_ids"], dataset["labels"])
    ]


def pipeline_train_params(batch_size: int) -> TrainParams:
    """params.yaml's recipe for full fine-tuning (precision, grouping, workers...), at the benchmark's batch size."""
    recipe = load_params(REPO / "params.yaml").recipe("full")
    return dataclasses.replace(
        recipe,
        batch_size=batch_size,
        gradient_accumulation_steps=1,
        logging_steps=10**6,
        save_steps=10**6,
        auto_find_batch_size=False,
        processes=1,
    )


class StepTimer(TrainerCallback):
    """Time at the end of each optimizer step (synchronized on CUDA), to skip the warm-up step."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def timed_training(trainer, steps: int) -> tuple[float, int]:
    """Seconds for steps 2..`steps` (the first pays for warm-up) and the samples they consumed."""
    trainer.args.max_steps, trainer.args.eval_strategy, trainer.args.save_strategy = steps, "no", "no"
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.ends[-1] - timer.ends[0], (steps - 1) * trainer.args.per_device_train_batch_size


def seed_trainer(model, tokenizer, data: Dataset, batch_size: int, out: Path) -> Seq2SeqTrainer:
    args = Seq2SeqTrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch_size,
        learning_rate=1.0e-4,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        logging_steps=1000,
        seed=0,
    )
    return Seq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer))


def pipeline_trainer(model, tokenizer, data: Dataset, batch_size: int, out: Path, device) -> Seq2SeqTrainer:
    args = training_arguments(pipeline_train_params(batch_size), seed=0, output_dir=out, device=device, section="full")
    return build_trainer(model, tokenizer, data, data, args)


def lora(model):
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(
        model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=32, lora_alpha=32, target_modules=["q", "v"])
    )


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: train a few steps of full or LoRA fine-tuning, print peak memory in MiB."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config_dir = SHARED / "models" / args.config
    tokenizer = AutoTokenizer.from_pretrained(config_dir)
    model = random_model(config_dir, device).train()
    model = lora(model) if args.memory_probe == "lora" else model
    data = pipeline_dataset(tokenizer, load_dialogues("train", args.batch_size * 3))
    with tempfile.TemporaryDirectory() as out:
        timed_training(pipeline_trainer(model, tokenizer, data, args.batch_size, Path(out), device), 3)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
        peak_mb = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    print(json.dumps({"peak_mb": peak_mb}))


def peak_memory_mb(args: argparse.Namespace, kind: str) -> float:
    # a fresh process per measurement: peak RSS / allocator peaks never go back down
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--config",
            args.config,
            "--batch-size",
            str(args.batch_size),
            "--memory-probe",
            kind,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mb"]


def peak_bf16(device_name: str) -> tuple[str, float] | None:
    """(card, dense bf16 peak FLOP/s) for a CUDA device name, or None for a card not in PEAK_BF16."""
    words = set(re.split(r"[\s\-_/]+", device_name.upper()))
    return next(((card, flops) for keys, card, flops in PEAK_BF16 if words.issuperset(k.upper() for k in keys)), None)


def step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], backward: bool = True) -> int:
    """FLOPs of one training step (forward, and backward unless told not) on `batch`, as torch counts them.

    6 x all parameters x all tokens overstates a seq2seq model: source tokens only pass the encoder,
    target tokens the decoder and the LM head, cross-attention scales with source x target, and the
    embeddings do no matmuls at all. Counting the matmuls actually dispatched on the padded batch gets
    all of that right. Runs on any device (meta too); clears the model's gradients afterwards.
    """
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss = model(**batch).loss
        if backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class BatchRecorder:
    """Keeps every batch the model is called on during training, to count those steps' FLOPs afterwards."""

    def __init__(self, model: torch.nn.Module):
        self.batches: list[dict[str, torch.Tensor]] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.batches.append({k: v.detach() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def remove(self) -> list[dict[str, torch.Tensor]]:
        self.handle.remove()
        return self.batches


def main() -> None:
    args = parse_args()
    if args.memory_probe:
        return memory_probe(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config_dir = SHARED / "models" / args.config
    tokenizer = AutoTokenizer.from_pretrained(config_dir)
    rows, results = [], {}

    # (a) generation
    model = random_model(config_dir, device)
    test = load_dialogues("test", args.dialogues)
    # each path warms up first (kernel loading, allocator growth, cuBLAS handles): on an H200 the cold
    # first bf16 call made the pipeline look 3x slower than it is (BENCHMARKS.md)
    seed_generation(model, tokenizer, test[:2], 4)
    seed_s = seed_generation(model, tokenizer, test, args.new_tokens)
    if use_bf16("auto", device):
        model = model.to(torch.bfloat16)  # as the generate stage: bf16 where the hardware has it
    pipeline_generation(model, tokenizer, test[: args.eval_batch_size], 4, args.eval_batch_size)
    ours_s = pipeline_generation(model, tokenizer, test, args.new_tokens, args.eval_batch_size)
    results["generation_speedup"] = seed_s / ours_s
    rows.append(
        [
            "generation (dialogues/s)",
            f"{len(test) / seed_s:.2f}",
            f"{len(test) / ours_s:.2f}",
            f"{seed_s / ours_s:.1f}x",
        ]
    )

    # (b) training throughput, full fine-tuning
    train_rows = load_dialogues("train", args.train_steps * args.batch_size)
    seed_data, ours_data = seed_dataset(tokenizer, train_rows), pipeline_dataset(tokenizer, train_rows)
    with tempfile.TemporaryDirectory() as out:
        seed_time, samples = timed_training(
            seed_trainer(random_model(config_dir, device).train(), tokenizer, seed_data, args.batch_size, Path(out)),
            args.train_steps,
        )
        ours_model = random_model(config_dir, device).train()
        recorder = BatchRecorder(ours_model)
        ours_time, _ = timed_training(
            pipeline_trainer(ours_model, tokenizer, ours_data, args.batch_size, Path(out), device), args.train_steps
        )
        step_batches = recorder.remove()
    # both paths consume the same rows; steps 2..N carry (N-1)/N of their real tokens on average
    tokens = sum(real_tokens(ours_data, tokenizer.pad_token_id)) * (args.train_steps - 1) / args.train_steps
    results["training_speedup"] = seed_time / ours_time
    rows.append(
        [
            "training (samples/s)",
            f"{samples / seed_time:.2f}",
            f"{samples / ours_time:.2f}",
            f"{seed_time / ours_time:.1f}x",
        ]
    )
    rows.append(
        [
            "training (real tokens/s)",
            f"{tokens / seed_time:.0f}",
            f"{tokens / ours_time:.0f}",
            f"{seed_time / ours_time:.1f}x",
        ]
    )

    # (c) peak memory, full vs LoRA, same batch size, ours path
    full_mb, lora_mb = peak_memory_mb(args, "full"), peak_memory_mb(args, "lora")
    results["lora_over_full_memory"] = lora_mb / full_mb
    rows.append(["peak memory MiB (full -> LoRA)", f"{full_mb:.0f}", f"{lora_mb:.0f}", f"{lora_mb / full_mb:.2f}x"])

    # (d) model FLOPs utilisation of full fine-tuning on CUDA: counted FLOPs of the timed steps / time / peak
    peak_line = ""
    if device.type == "cuda":
        peak = peak_bf16(torch.cuda.get_device_name(device))
        if peak is None:
            peak_line = f"unknown card: MFU not computed ({torch.cuda.get_device_name(device)} is not in PEAK_BF16)"
        else:
            # one forward per optimizer step (no gradient accumulation): the timed steps 2..N are calls 2..N
            if len(step_batches) != args.train_steps:
                raise SystemExit(
                    f"error: expected one forward per step, saw {len(step_batches)} for "
                    f"{args.train_steps} steps; the MFU would count the wrong batches"
                )
            flops = sum(step_flops(ours_model, batch) for batch in step_batches[1:])
            mfu = flops / ours_time / peak[1]
            results.update(mfu=mfu, model_flops_per_s=flops / ours_time, mfu_peak_card=peak[0])
            rows.append(["MFU, full fine-tuning bf16", "", f"{100 * mfu:.1f}%", ""])
            peak_line = (
                f"MFU: FLOPs counted by torch on the timed steps' padded batches (forward + backward) per "
                f"second / {peak[0]} dense bf16 peak {peak[1] / 1e12:.0f} TFLOP/s"
            )

    header = (
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
        f" ({torch.get_num_threads()} threads), torch {torch.__version__}, {date.today()}, "
        f"pipeline precision: {'bf16' if use_bf16('auto', device) else 'fp32'} (seed: fp32)\n"
        f"model: {args.config} architecture, random weights; generation: {args.dialogues} test dialogues x "
        f"{args.new_tokens} forced new tokens, greedy, eval batch {args.eval_batch_size}; training: "
        f"{args.train_steps} steps x batch {args.batch_size}, seed pads to {MAX_SOURCE}/{MAX_TARGET}"
    )
    print(header)
    print(tabulate(rows, headers=["measure", "seed recipe", "this pipeline", "ratio"], tablefmt="github"))
    if peak_line:
        print(peak_line)
        results["mfu_note"] = peak_line
    if args.json:
        args.json.write_text(json.dumps({"header": header, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
