"""Stages `generate@<method>-<seed>` and `generate_baseline@<baseline>`: one summary per unique test
dialogue, from the run's folder in models/ (stages/runs.py names runs: `lora/seed42`, `base`).

Every run is a folder: models/base (the original model, pinned by the base stage), models/lead
(the lead-N rule, written by the lead stage), models/full/seed<seed> (a full model) and one adapter
folder per PEFT method and seed, evaluated unmerged; an adapter folder carries the pin of the base
it was trained on (pin.json), so this stage reads nothing outside models/<run>. Generation
depends only on the model, the test prompts (not the references) and the `generate` params;
scoring is the evaluate stage's, so a statistics or reference change never regenerates summaries.

Outputs: data/predictions/<run>.jsonl (one line per dialogue), metrics/generate/<run>.json
(the generation settings and precision used, length diagnostics: deterministic) and
metrics/timing/generate/<run>.json (load and generation wall clock apart, the device and the
batch size that ran after any out-of-memory halving).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

from transformers import GenerationConfig  # a settings object: importing it loads no torch

from stages.errors import StageError, run_stage
from stages.jsonio import read_json, write_json, write_jsonl
from stages.params import GenerateParams, ModelParams, Params, load_params
from stages.runs import checked_run, stage_args
from stages.splits import read_split

if TYPE_CHECKING:  # the model path imports torch where it runs: generate@lead (a rule) never loads it
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TEST_DIR = Path("data/prepared/test")  # only the test split: a training-only prepare change reruns no generation
MODELS_DIR = Path("models")
PIN_FILE = "pin.json"  # in models/base and every adapter folder: the base model's name, revision and resolved commit
LEAD_FILE = "lead.json"  # models/lead/lead.json: the lead rule's settings
QUANTIZATION_FILE = "quantization.json"  # beside every adapter: how its base loads (QLoRA: quantized, as in training)
PREDICTIONS_DIR = Path("data/predictions")
METRICS_DIR = Path("metrics/generate")
TIMING_DIR = Path("metrics/timing/generate")
# A turn's speaker tag: DialogSum's "#Person1#: ", or a name of up to three words before a colon
# and a space ("Alice: ", "A: ", "Dr. Smith: ", "[Bob]: ")
SPEAKER_TAG = re.compile(
    r"^\s*(?:(?P<dialogsum>#[^#]+#)\s*:\s*|(?P<name>\w[\w.'-]*(?: [\w.'-]+){0,2}|\[[^\]\n]{1,30}\])\s*:(?:\s+|$))"
)


def lead_summary(dialogue: str, turns: int) -> str:
    """The first `turns` turns of the dialogue, speaker tags removed, as one paragraph.

    A turn is a non-empty line; a dialogue in one paragraph (no line breaks) has its sentences as
    turns. A dialogue with DialogSum's tags is read as DialogSum always was (its "#PersonN#: " tags
    removed, every other line kept whole). Otherwise name tags ("Alice: ") are removed where more
    than half the turns carry one, or where a one-paragraph dialogue starts with one and has at least
    two (a flattened chat), so a colon in plain prose ("The plan: ...") stays."""
    lines = dialogue.splitlines()
    if any((tag := SPEAKER_TAG.match(line)) and tag["dialogsum"] for line in lines):
        lines = [line[tag.end() :] if (tag := SPEAKER_TAG.match(line)) and tag["dialogsum"] else line for line in lines]
        return " ".join([line.strip() for line in lines if line.strip()][:turns])
    units = [line.strip() for line in lines if line.strip()]
    paragraph = len(units) == 1
    if paragraph:  # sentence ends, not after Mr. Mrs. Ms. Dr.
        units = re.split(r"(?<=[.!?])(?<!\bMr\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bMrs\.)\s+", units[0])
    tags = [SPEAKER_TAG.match(unit) for unit in units]
    tagged = sum(tag is not None for tag in tags)
    if 2 * tagged > len(units) or (paragraph and tags[0] is not None and tagged >= 2):
        units = [unit[tag.end() :] if tag else unit for unit, tag in zip(units, tags)]
    return " ".join([unit.strip() for unit in units if unit.strip()][:turns])


def load_variant(
    model_dir: Path, model_params: ModelParams, dtype: torch.dtype
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The model a variant folder describes: a full model (config.json), a PEFT adapter on the
    base model it was trained on (adapter_config.json, pin.json) or the pinned base model itself
    (pin.json)."""
    from stages.modeling import load_base, load_model, load_tokenizer, read_pin

    if (model_dir / "adapter_config.json").is_file():
        pin = read_pin(model_dir / PIN_FILE, model_params)
        tokenizer, model = load_base(pin, dtype, base_quantization(model_dir))
        return tokenizer, load_adapter(model, model_dir)
    if (model_dir / "config.json").is_file():
        model = load_model(str(model_dir), dtype=dtype, attn_implementation=model_params.attn_implementation)
        return load_tokenizer(str(model_dir)), model
    return load_base(read_pin(model_dir / PIN_FILE, model_params), dtype)


def base_quantization(model_dir: Path) -> str:
    """How the variant's base was quantized in training (QLoRA: 4bit), "none" for every other variant."""
    file = model_dir / QUANTIZATION_FILE
    return read_json(file)["quantization"] if file.is_file() else "none"


def load_adapter(base: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """The base model with its PEFT adapter (LoRA, IA3, prompt tuning) applied unmerged, as in training.

    For LoRA, not merge_and_unload(): merging adds B @ A onto the base weights in their dtype, and in bf16
    that rounds a small update onto the coarse bf16 grid of the (much larger) base weights (a
    1%-norm update came out 16.5% wrong), which full fine-tuning never suffers: the comparison
    would be biased against LoRA. Unmerged, peft keeps the adapter weights in fp32
    (autocast_adapter_dtype) and adds their output to the base output, as training did.
    It costs two small extra matmuls per adapted layer.
    """
    from peft import PeftModel  # imported here: only adapters need peft

    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def generation_config(params: GenerateParams) -> GenerationConfig:
    """Every decoding setting generate() uses, from params alone; the special tokens come from the
    model (stages/family.py install_generation_config)."""
    return GenerationConfig(
        num_beams=params.num_beams,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        length_penalty=params.length_penalty,
        no_repeat_ngram_size=params.no_repeat_ngram_size,
        repetition_penalty=params.repetition_penalty,
        early_stopping=params.early_stopping and params.num_beams > 1,  # greedy has no beams to stop
        do_sample=False,
    )


def recorded_generation(config: GenerationConfig) -> dict[str, float]:
    """The settings that shape a summary, as flat metrics (bools as 0/1), so `dvc metrics diff`
    shows when two evaluations generated differently."""
    keys = (
        "num_beams",
        "max_new_tokens",
        "min_new_tokens",
        "length_penalty",
        "no_repeat_ngram_size",
        "repetition_penalty",
        "early_stopping",
        "do_sample",
    )
    return {
        f"generation_{k}": float(getattr(config, k))
        if isinstance(getattr(config, k), float)
        else int(getattr(config, k))
        for k in keys
    }


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_ids: list[list[int]],
    config: GenerationConfig,
    synced_gpus: bool = False,
) -> tuple[list[str], list[int], list[bool]]:
    """Summaries, generated token counts and whether each hit max_new_tokens without EOS.

    The family decides how (stages/family.py generate_continuations: left padding and the
    prompt sliced off for causal models); each continuation ends at its first EOS, so its
    length counts only tokens generated for this dialogue (not padding, nor the repeated EOS
    beam search with early stopping leaves).
    """
    from stages import family

    continuations = family.generate_continuations(model, tokenizer, batch_ids, config, synced_gpus)
    stops = family.eos_ids(config)
    texts = tokenizer.batch_decode(continuations, skip_special_tokens=True)
    hit_max = [not row or row[-1] not in stops for row in continuations]
    return [t.strip() for t in texts], [len(row) for row in continuations], hit_max


class Generated(NamedTuple):
    """What generation returns: per-dialogue summaries, generated token counts and whether each hit
    max_new_tokens without </s>, and the batch size that ran after any out-of-memory halving."""

    summaries: list[str]
    lengths: list[int]
    hit_max: list[bool]
    batch_size: int


def generate_summaries(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[list[int]],
    params: GenerateParams,
    progress: Callable[[int, int], None] | None = None,
    synced_gpus: bool = False,
    stop_ids: Sequence[int] = (),
) -> Generated:
    """Batched generation, longest inputs first, halving the batch on CUDA out-of-memory.

    Sorting by length keeps padding (wasted compute) small; longest-first makes an
    out-of-memory error happen on the first batch, not after an hour.
    `progress(done, total)`, if given, is called after each batch. `synced_gpus`: a sharded (FSDP)
    model, which every rank runs in step (stages/family.py generate_continuations). `stop_ids`:
    tokens that end a summary besides the model's EOS (a chat template's end of turn).
    """
    import torch

    from stages import family

    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    # the params' settings plus the model's special tokens (BART's forced <s> among them), made
    # the model's own, so a checkpoint's generation_config.json cannot change what is scored
    config = family.install_generation_config(model, generation_config(params), stop_ids)
    results: dict[int, tuple[str, int, bool]] = {}
    batch_size, start = params.batch_size, 0
    while start < len(order):
        chunk = order[start : start + batch_size]
        try:
            texts, lengths, hit_max = generate_batch(
                model, tokenizer, [input_ids[i] for i in chunk], config, synced_gpus
            )
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            print(f"CUDA out of memory: retrying with generate.batch_size={batch_size}", file=sys.stderr)
            continue
        results.update(zip(chunk, zip(texts, lengths, hit_max)))
        start += len(chunk)
        if progress is not None:
            progress(start, len(order))
    summaries, lengths, hit_max = zip(*(results[i] for i in range(len(input_ids)))) if results else ((), (), ())
    return Generated(list(summaries), list(lengths), list(hit_max), batch_size)


def lead_summaries(rule_file: Path, test: dict[str, list]) -> Generated:
    turns = read_json(rule_file)["turns"]
    summaries = [lead_summary(d, turns) for d in test["dialogue"]]
    return Generated(summaries, [0] * len(summaries), [False] * len(summaries), 0)


def load_for_generation(
    model_dir: Path, model_params: ModelParams, precision: str
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, dict[str, float | str]]:
    """The variant's model on the device in the precision `precision` resolves to, and how long
    that took with what it resolved to (load time is kept apart from generation time: a Hub
    download, CUDA start-up and the cast are not generation work)."""
    import torch

    from stages import family
    from stages.modeling import pick_device, use_bf16

    started = time.perf_counter()
    device = pick_device()
    bf16 = use_bf16(precision, device)
    tokenizer, model = load_variant(model_dir, model_params, torch.bfloat16 if bf16 else torch.float32)
    if not family.is_quantized(model):  # a quantized model was placed while it loaded (8-bit cannot move)
        model.to(device)
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (
        tokenizer,
        model,
        {
            "load_runtime_s": round(time.perf_counter() - started, 2),
            "device": device_name(device),
            "attn_implementation": family.resolved_attn_implementation(
                model
            ),  # what model.attn_implementation resolved to
        },
    )


def device_name(device: torch.device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def timed_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test: dict[str, list],
    params: GenerateParams,
    name: str,
    stop_ids: Sequence[int] = (),
) -> tuple[Generated, float]:
    """Generated summaries and the wall clock of generation alone (the GPU's queue drained)."""
    import torch

    from stages.progress import Progress  # it imports the Trainer's callbacks (torch)

    with Progress(len(test["id"]), f"generate@{name}", unit="dialogues") as progress:
        started = time.perf_counter()
        generated = generate_summaries(
            model, tokenizer, test["input_ids"], params, progress.as_callback(), stop_ids=stop_ids
        )
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return generated, time.perf_counter() - started


def generation_metrics(
    params: GenerateParams, generated: Generated, precision: str, quantization: str = "none"
) -> dict[str, float | str]:
    """Deterministic for the same model, prompts and params on the same kind of hardware: the
    settings, the precision generation ran in (bf16 or fp32: it changes the summaries), the base's
    quantization (QLoRA's differs from every other variant's base) and lengths."""
    metrics: dict[str, float | str] = {
        **recorded_generation(generation_config(params)),
        "generation_precision": precision,
        "base_quantization": quantization,
    }
    metrics["gen_mean_tokens"] = round(sum(generated.lengths) / max(len(generated.lengths), 1), 4)
    metrics["gen_hit_max_share"] = round(sum(generated.hit_max) / max(len(generated.hit_max), 1), 4)
    return metrics


def generation_timing(load: dict, generated: Generated, runtime_s: float, dialogues: int) -> dict[str, float | str]:
    """Noisy figures: load and generation wall clock apart; throughput counts generation only."""
    return {
        **load,
        "generation_runtime_s": round(runtime_s, 2),
        "generation_dialogues_per_second": round(dialogues / runtime_s, 3) if runtime_s > 0 else 0.0,
        "generation_batch_size": generated.batch_size,  # after any out-of-memory halving
    }


def write_predictions(path: Path, test: dict[str, list], generated: Generated) -> None:
    # no references: they live in data/prepared/references.jsonl, read by the evaluate stage
    rows = [
        {
            "id": row_id,
            "dialogue": dialogue,
            "prediction": summary,
            "generated_tokens": length,
            "hit_max_new_tokens": hit,
        }
        for row_id, dialogue, summary, length, hit in zip(
            test["id"], test["dialogue"], generated.summaries, generated.lengths, generated.hit_max
        )
    ]
    write_jsonl(rows, path)


def model_generation(
    model_dir: Path, test: dict[str, list], params: Params, variant: str
) -> tuple[Generated, float, dict[str, float | str], str]:
    """A model variant's summaries, generation time, load record and the precision it ran in."""
    import torch

    from stages.input_format import read_stop_ids  # it imports the family code (torch)
    from stages.modeling import deterministic_kernels

    if params.deterministic:
        deterministic_kernels()
    tokenizer, model, load = load_for_generation(model_dir, params.model, params.generate.precision)
    precision = "bf16" if model.dtype == torch.bfloat16 else "fp32"
    stop_ids = read_stop_ids(TEST_DIR.parent)  # a chat-wrapped prompt's end-of-turn token
    generated, runtime = timed_generation(model, tokenizer, test, params.generate, variant, stop_ids)
    return generated, runtime, load, precision


def main(variant: str, seed: int | None) -> None:
    params = load_params()
    try:
        run = checked_run(variant, seed, params.variants, params.seeds, params.baselines)
    except ValueError as error:
        raise StageError(str(error)) from None
    test = read_split(TEST_DIR)  # columns id, dialogue, input_ids
    model_dir = MODELS_DIR / run
    if (model_dir / LEAD_FILE).is_file():  # a rule, not a model: nothing to load, no precision, no torch
        started, load, precision = time.perf_counter(), {"load_runtime_s": 0.0, "device": "none"}, "none"
        generated, runtime = lead_summaries(model_dir / LEAD_FILE, test), time.perf_counter() - started
    else:
        generated, runtime, load, precision = model_generation(model_dir, test, params, run)
    write_predictions(PREDICTIONS_DIR / f"{run}.jsonl", test, generated)
    metrics = generation_metrics(params.generate, generated, precision, base_quantization(model_dir))
    write_json(metrics, METRICS_DIR / f"{run}.json")
    write_json(generation_timing(load, generated, runtime, len(test["id"])), TIMING_DIR / f"{run}.json")


if __name__ == "__main__":
    run_stage(lambda: main(*stage_args(sys.argv[1:], "generate")))
