"""The GPU measurements, in parts that benchmarks/gpu.sh runs one by one under a time budget each.

Every part measures the pipeline's own code path (stages/recipe.py's training_arguments and
build_trainer, the stages' build_model, generate_summaries) on a random-weight model of the real
shape and real DialogSum rows, and rewrites its JSON file after every measurement, so a part cut by
its budget keeps what it finished.

Parts (`python benchmarks/gpu_parts.py PART --model DIR --out DIR`):

- attention: which SDPA kernel T5's attention runs (its relative position bias goes in as an additive
  float mask) for a trainable and a frozen bias, by torch's own dispatch choice, and the attention ops a
  profiled training step really ran;
- train: full fine-tuning at the default batch and real lengths through the Trainer: compile off at
  pad 8 and 64, compile on at pad 64 (time to the first step = compile time), s/step, samples/s, MFU
  (FLOPs counted by torch on the steps' own batches, as benchmarks/speed.py counts them), peak memory;
- memory: every method's peak memory and s/step at the same batch (a PEFT method's frozen base in bf16
  under bf16 training), gradient checkpointing off and on;
- stages: per-stage scaled measurements at the defaults: part of an epoch of each training stage,
  one validation by generation, generation of all test dialogues (generate params: bf16, 4 beams),
  generate.batch_size candidates, the seed recipe's generation on a few dialogues; and the projection of
  the default `dvc repro` from the exact row counts;
- decoder: a decoder-only model of Llama-3.2-1B's dimensions (random weights), LoRA on a bf16 base and
  QLoRA on a 4-bit base: s/step and peak memory.

`--dry-run` shrinks everything (tiny models, a few rows and steps) so the whole script runs on a CPU
in about a minute; tests/test_gpu_script.py runs it so the script cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (also puts the repo root on sys.path)

from stages import family, methods, training  # noqa: E402
from stages.generate import generate_summaries  # noqa: E402
from stages.input_format import resolve  # noqa: E402
from stages.ledger import base_dtype, count_parameters  # noqa: E402
from stages.modeling import load_model, load_tokenizer, use_bf16  # noqa: E402
from stages.params import ModelParams, load_params  # noqa: E402
from stages.prepare import fit_prompts, prepare_training_split  # noqa: E402
from stages.recipe import build_trainer, training_arguments  # noqa: E402

PARAMS = load_params(speed.REPO / "params.yaml")
METHODS = tuple(PARAMS.methods)
TRAIN_ROWS, TEST_DIALOGUES, VALIDATION_DIALOGUES = 12460, 500, 500  # DialogSum's exact counts (data.limit: null)
# Llama-3.2-1B's dimensions (its config.json), random weights
LLAMA_1B = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_theta=500000.0,
)
LLAMA_TINY = dict(LLAMA_1B, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, vocab_size=32128)  # fmt: skip


class Results:
    """A part's results, rewritten to its JSON file after every measurement."""

    def __init__(self, path: Path, **header):
        self.path, self.data = path, {**header, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.save()

    def add(self, key: str, value) -> None:
        self.data[key] = value
        self.save()
        print(f"{self.path.stem}.{key}: {json.dumps(value)}", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def card_peak(device: torch.device) -> float | None:
    found = speed.peak_bf16(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return found[1] if found else None


def prompt_layout(tokenizer):
    """The prepare params with the template as the prepare stage lays it out for this tokenizer (its
    trailing whitespace moved onto the summary where it would merge: stages/input_format.py; no chat
    template, as the benchmark models are base models), and the whitespace moved."""
    layout = resolve(dataclasses.replace(PARAMS.prepare, chat_template="none"), tokenizer, set())
    return dataclasses.replace(PARAMS.prepare, chat_template="none", prompt_template=layout.template), layout.gap


def training_rows(tokenizer, count: int, model_family: str = family.SEQ2SEQ):
    """`count` real DialogSum training rows, tokenized as the prepare stage does."""
    prepare, gap = prompt_layout(tokenizer)
    rows = speed.load_dialogues("train", count)
    return prepare_training_split(rows, tokenizer, prepare, model_family, gap)[0]


class StepClock(TrainerCallback):
    """Wall time at the start of training and at each optimizer step's end (the device drained)."""

    def __init__(self, device: torch.device):
        self.device, self.begin, self.ends = device, None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.ends.append(time.perf_counter())


def plan(method: str, model_dir: Path):
    """The training stage's own Plan for `method` (stages/methods), with the committed params."""
    return methods.plan(PARAMS.method(method), ModelParams(name=str(model_dir), revision="main"), PARAMS.seed)


def step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> int:
    """FLOPs of forward + backward on a collated batch, counted by torch as speed.step_flops does (on the
    eager model: a compiled step does the same matmuls)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with speed.FlopCounterMode(display=False, custom_mapping=speed.CPU_ATTENTION_FLOPS) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_steps(
    model_dir: Path, method: str, data, steps: int, device: torch.device, count_flops: bool = False, **changes
) -> dict:
    """`steps` optimizer steps of `method` through the pipeline's Trainer setup, with the committed
    recipe of `method` changed by `changes` (batch, compile, padding, checkpointing)."""
    recipe = dataclasses.replace(PARAMS.recipe(method), logging_steps=10**6, save_steps=10**6, **changes)
    tokenizer = load_tokenizer(str(model_dir))
    family.ensure_pad_token(tokenizer)
    free(device)
    method_plan = plan(method, model_dir)
    dtype = training.frozen_base_dtype(recipe.precision, device) if method_plan.frozen_base else torch.float32
    model = method_plan.build(load_model(str(model_dir), dtype=dtype)).to(device)
    with tempfile.TemporaryDirectory() as out:
        args = training_arguments(recipe, PARAMS.seed, Path(out), device, method)
        args.max_steps, args.eval_strategy, args.save_strategy = steps, "no", "no"
        args.load_best_model_at_end = False
        trainer = build_trainer(model, tokenizer, data, data, args, recipe.pad_to_multiple_of)
        clock = StepClock(device)
        trainer.add_callback(clock)
        # the batches as the collator made them (not a forward hook: that would be traced into a compiled model)
        batches, collate = [], trainer.data_collator
        trainer.data_collator = lambda features: batches.append(collate(features)) or batches[-1]
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    timed = clock.ends[-1] - clock.ends[0] if len(clock.ends) > 1 else float("nan")
    result = {
        "batch": recipe.batch_size,
        "steps": steps,
        "first_step_s": round(clock.ends[0] - clock.begin, 3),  # includes compiling, with compile on
        "s_per_step": round(timed / (steps - 1), 4) if steps > 1 else None,
        "samples_per_s": round((steps - 1) * recipe.batch_size / timed, 2) if steps > 1 else None,
        "wall_s": round(wall, 2),
        "peak_mb": peak_mb(device),
        "base_dtype": base_dtype(trainer.model),
        "attn_implementation": family.resolved_attn_implementation(trainer.model),
        **{k: getattr(recipe, k) for k in ("compile", "pad_to_multiple_of", "gradient_checkpointing", "precision")},
    }
    if count_flops:
        timed_batches = batches[1:steps]  # the timed steps' own batches (one micro-batch per step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(recipe.precision, device)):
            flops = sum(step_flops(family.unwrap(trainer.model), b, device) for b in timed_batches)
        result["gflops_per_step"] = round(flops / max(len(timed_batches), 1) / 1e9, 2)
        peak = card_peak(device)
        result["mfu"] = round(flops / timed / peak, 4) if peak and steps > 1 else None
    del trainer, model
    free(device)
    return result


# --------------------------------------------------------------------------------------------- parts


def part_attention(args, device: torch.device, results: Results) -> None:
    from torch.nn.attention import SDPBackend

    config = family.load_config(str(args.model))
    heads, d_kv = config.num_heads, config.d_kv
    batch, length = (2, 16) if args.dry_run else (32, 512)
    dtype = torch.bfloat16 if use_bf16("auto", device) else torch.float32
    q, k, v = (torch.randn(batch, heads, length, d_kv, device=device, dtype=dtype) for _ in range(3))
    choices = {}
    for case, trains in (("trainable bias (full fine-tuning)", True), ("frozen bias (PEFT, generation)", False)):
        bias = torch.randn(batch, heads, length, length, device=device, dtype=dtype, requires_grad=trains)
        choice = torch._fused_sdp_choice(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False, scale=1.0)
        choices[case] = SDPBackend(choice).name
    results.add("sdpa_choice", {"dtype": str(dtype), "shape": [batch, heads, length, d_kv], **choices})

    from torch.profiler import ProfilerActivity, profile

    tokenizer = load_tokenizer(str(args.model))
    data = training_rows(tokenizer, 4 if args.dry_run else 32)
    for method in ("full", "lora"):
        model = plan(method, args.model).build(load_model(str(args.model))).to(device).train()
        collated = family.data_collator(family.SEQ2SEQ, tokenizer, model)([dict(r) for r in data])
        batch_on = {key: value.to(device) for key, value in collated.items()}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(**batch_on).loss.backward()  # warm-up
            with profile(activities=activities) as prof:
                model(**batch_on).loss.backward()
                sync(device)
        ops: dict[str, int] = {}
        for event in prof.events():
            name = event.name
            if any(word in name.lower() for word in ("attention", "fmha", "flash", "cudnn", "sdp")):
                ops[name] = ops.get(name, 0) + 1
        results.add(f"profiled_attention_ops_{method}", dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12]))
        del model
        free(device)


def part_train(args, device: torch.device, results: Results) -> None:
    tokenizer = load_tokenizer(str(args.model))
    batch = args.batch
    steps = args.steps
    data = training_rows(tokenizer, batch * (steps + 1))
    for name, changes in (
        ("eager_pad8", dict(compile=False, pad_to_multiple_of=8)),  # the defaults
        ("compiled_pad64", dict(compile=True, pad_to_multiple_of=64)),  # before eager_pad64: a cut loses the lesser
        ("eager_pad64", dict(compile=False, pad_to_multiple_of=64)),
    ):
        if args.dry_run and changes["compile"]:  # minutes of inductor on a CPU; tests/test_speed_levers.py runs it
            results.add(name, {"skipped": "dry run"})
            continue
        try:
            result = run_steps(args.model, "full", data, steps, device, count_flops=True, batch_size=batch, **changes)
        except Exception as error:  # noqa: BLE001 - record it, keep the other measurements
            result = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        results.add(name, result)


def part_memory(args, device: torch.device, results: Results) -> None:
    tokenizer = load_tokenizer(str(args.model))
    data = training_rows(tokenizer, args.batch * args.memory_steps)
    full = None
    for checkpointing in (False, True):
        for method in METHODS[:2] if args.dry_run else METHODS:
            key = f"{method}_gc{int(checkpointing)}"
            try:
                result = run_steps(
                    args.model, method, data, args.memory_steps, device, batch_size=args.batch,
                    gradient_checkpointing=checkpointing,
                )  # fmt: skip
            except Exception as error:  # noqa: BLE001 - an OOM or a failure: recorded, the next runs
                result = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            if method == "full" and not checkpointing:
                full = result.get("peak_mb")
            if full and result.get("peak_mb"):
                result["peak_over_full_gc0"] = round(result["peak_mb"] / full, 3)
            results.add(key, result)


def generation_rate(model, tokenizer, prompts: list[list[int]], device: torch.device, **changes) -> dict:
    params = dataclasses.replace(PARAMS.generate, **changes)
    sync(device)
    started = time.perf_counter()
    generated = generate_summaries(model, tokenizer, prompts, params)
    sync(device)
    seconds = time.perf_counter() - started
    return {
        "dialogues": len(prompts),
        "seconds": round(seconds, 2),
        "dialogues_per_s": round(len(prompts) / seconds, 3),
        "batch_size": generated.batch_size,
        "mean_new_tokens": round(sum(generated.lengths) / len(generated.lengths), 1),
        **{k: getattr(params, k) for k in ("num_beams", "max_new_tokens")},
    }


def part_stages(args, device: torch.device, results: Results) -> None:
    tokenizer = load_tokenizer(str(args.model))
    steps = args.steps
    batch = PARAMS.recipe("full").batch_size if not args.dry_run else args.batch
    data = training_rows(tokenizer, batch * (steps + 1))
    training_s = {}
    for method in METHODS:
        try:
            result = run_steps(args.model, method, data, steps, device, batch_size=batch)
        except Exception as error:  # noqa: BLE001
            result = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        results.add(f"train_{method}", result)
        if result.get("s_per_step"):
            recipe = PARAMS.recipe(method)
            total_steps = math.ceil(TRAIN_ROWS / recipe.batch_size) * recipe.epochs
            training_s[method] = round(result["s_per_step"] * total_steps + result["first_step_s"], 1)

    bf16 = use_bf16(PARAMS.generate.precision, device)
    model = load_model(str(args.model), dtype=torch.bfloat16 if bf16 else torch.float32).to(device).eval()
    template, max_source = prompt_layout(tokenizer)[0].prompt_template, PARAMS.prepare.max_source_length
    test = speed.load_dialogues("test", args.test_dialogues)
    test_prompts, _ = fit_prompts(template, [r["dialogue"] for r in test], tokenizer, max_source)
    generation = generation_rate(model, tokenizer, test_prompts, device)  # the generate stage's params
    results.add("generate_test_set", generation)

    dialogues = speed.load_dialogues("validation", args.validation_dialogues)
    prompts, _ = fit_prompts(template, [r["dialogue"] for r in dialogues], tokenizer, max_source)
    validation = generation_rate(
        model, tokenizer, prompts, device, num_beams=PARAMS.validate.num_beams,
        max_new_tokens=PARAMS.validate.max_new_tokens, batch_size=PARAMS.validate.batch_size,
    )  # fmt: skip
    results.add("validation_by_generation", validation)
    project(results, training_s, generation, validation)

    candidates = {}
    for size in args.generate_batches:
        try:
            candidates[size] = generation_rate(model, tokenizer, test_prompts[: args.candidate_dialogues], device,
                                               batch_size=size)  # fmt: skip
        except Exception as error:  # noqa: BLE001
            candidates[size] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        results.add("generate_batch_size_candidates", candidates)

    # the seed recipe: one dialogue at a time, fp32, the same beams and lengths (last: the slowest per dialogue)
    seed = generation_rate(model.float(), tokenizer, test_prompts[: args.seed_dialogues], device, batch_size=1)
    results.add("seed_generation_fp32_one_at_a_time", seed)
    results.add(
        "generation_over_seed",
        round(generation["dialogues_per_s"] / seed["dialogues_per_s"], 1) if seed["dialogues_per_s"] else None,
    )


def project(results: Results, training_s: dict, generation: dict, validation: dict) -> None:
    """The default dvc repro from the exact row counts: every variant, 3 epochs with their validations,
    the 500 test dialogues at 4 beams per model variant."""
    validations = math.ceil(
        math.ceil(TRAIN_ROWS / PARAMS.recipe("full").batch_size) * 3 / PARAMS.recipe("full").save_steps
    )
    validation_s = validation["seconds"] * PARAMS.validate.dialogues / max(validation["dialogues"], 1)
    models = [v for v in PARAMS.variants if v != "lead"]
    generate_s = TEST_DIALOGUES / generation["dialogues_per_s"]
    projection = {
        "training_s": training_s,
        "validations_per_run": validations,
        "validation_s_each": round(validation_s, 1),
        "generate_s_per_variant": round(generate_s, 1),
        "model_variants": models,
    }
    trained = [m for m in METHODS if m in PARAMS.variants]
    projection["total_min"] = round(
        (sum(training_s.get(m, 0) for m in trained) + validations * validation_s * len(trained)
         + generate_s * len(models)) / 60, 1,
    )  # fmt: skip
    projection["note"] = (
        "random weights never emit EOS, so generation runs to max_new_tokens (128) where a trained model stops "
        "at ~40: an upper bound; evaluate (CPU ROUGE + bootstrap) and report are not included"
    )
    results.add("projection_default_repro", projection)


def part_decoder(args, device: torch.device, results: Results) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = LLAMA_TINY if args.dry_run else LLAMA_1B
    tokenizer = load_tokenizer(str(args.model))  # the FLAN-T5 tokenizer: its ids fit the vocabulary
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = LlamaConfig(**dims, bos_token_id=1, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        del model
        results.add("config", {k: dims[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")})
        data = training_rows(tokenizer, args.decoder_batch * args.decoder_steps, family.CAUSAL)
        for name, quantization in (("lora_bf16_base", "none"), ("qlora_4bit", "4bit")):
            if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
                results.add(
                    name,
                    {"skipped": "bitsandbytes is not installed (gpu.sh prepare carries it with GPU_SH_WITH_BNB=1)"},
                )
                continue
            try:
                result = decoder_steps(Path(folder), quantization, data, args, device)
            except Exception as error:  # noqa: BLE001
                result = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            results.add(name, result)


def decoder_steps(model_dir: Path, quantization: str, data, args, device: torch.device) -> dict:
    recipe = dataclasses.replace(PARAMS.recipe("lora"), batch_size=args.decoder_batch, logging_steps=10**6,
                                 save_steps=10**6)  # fmt: skip
    tokenizer = load_tokenizer(str(model_dir))
    free(device)
    dtype = training.frozen_base_dtype(recipe.precision, device, quantization)
    base = load_model(str(model_dir), dtype=dtype, quantization=quantization)
    model = plan("lora", model_dir).build(base)
    if quantization == "none":
        model = model.to(device)
    with tempfile.TemporaryDirectory() as out:
        targs = training_arguments(recipe, PARAMS.seed, Path(out), device, "lora")
        targs.max_steps, targs.eval_strategy, targs.save_strategy = args.decoder_steps, "no", "no"
        targs.load_best_model_at_end = False
        trainer = build_trainer(model, tokenizer, data, data, targs, recipe.pad_to_multiple_of)
        clock = StepClock(device)
        trainer.add_callback(clock)
        trainer.train()
    timed = clock.ends[-1] - clock.ends[0]
    steps = args.decoder_steps
    result = {
        "batch": recipe.batch_size,
        "s_per_step": round(timed / (steps - 1), 4),
        "samples_per_s": round((steps - 1) * recipe.batch_size / timed, 2),
        "peak_mb": peak_mb(device),
        "base_dtype": base_dtype(trainer.model),
        **count_parameters(trainer.model),
    }
    del trainer, model, base
    free(device)
    return result


PARTS = {
    "attention": part_attention,
    "train": part_train,
    "memory": part_memory,
    "stages": part_stages,
    "decoder": part_decoder,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--model", type=Path, required=True, help="a model folder (scripts/make_random_model.py)")
    parser.add_argument("--out", type=Path, required=True, help="folder for <part>.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes: the plumbing on a CPU in seconds")
    parser.add_argument("--batch", type=int, default=32, help="training batch (params.yaml's default: 32)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per measurement (the first is warm-up)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--validation-dialogues", type=int, default=100, help="= validate.dialogues")
    parser.add_argument("--test-dialogues", type=int, default=TEST_DIALOGUES)
    parser.add_argument("--generate-batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--candidate-dialogues", type=int, default=64)
    parser.add_argument("--seed-dialogues", type=int, default=4)
    parser.add_argument("--decoder-batch", type=int, default=8)
    parser.add_argument("--decoder-steps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.dry_run:  # a minute on a CPU for all parts together
        args.batch, args.steps, args.memory_steps = 2, 2, 2
        args.validation_dialogues, args.test_dialogues, args.candidate_dialogues, args.seed_dialogues = 2, 3, 3, 1
        args.generate_batches, args.decoder_batch, args.decoder_steps = [2], 2, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = Results(
        args.out / f"{args.part}.json",
        part=args.part,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        dry_run=args.dry_run,
    )
    if args.dry_run:  # no generation runs to 128 tokens on a CPU
        global PARAMS
        PARAMS = dataclasses.replace(
            PARAMS,
            generate=dataclasses.replace(PARAMS.generate, max_new_tokens=4, batch_size=2),
            validate=dataclasses.replace(PARAMS.validate, max_new_tokens=4, dialogues=2),
        )
    PARTS[args.part](args, device, results)
    results.add("finished", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


if __name__ == "__main__":
    main()
