#!/usr/bin/env python
"""Export a trained variant as a standalone Hugging Face model: plain transformers loads it, with no
peft and nothing from this repository.

    python scripts/export.py lora/seed42 exported/lora            # a run of models/, to a new folder
    python scripts/export.py full/seed42 exported/full --dtype bf16

A LoRA-family adapter (LoRA, DoRA, PiSSA, LoKr, ..., IA3) is merged into its base loaded in fp32, and
only then cast to `--dtype`: merging in bf16 adds the small update B @ A onto the coarse bf16 grid of
the much larger base weights and rounds it away (stages/generate.py load_adapter), so a bf16 merge
is never done. A QLoRA adapter learned its update against the 4-bit weights, and was scored on them:
it merges into exactly those, dequantized to fp32 (the original weights would be another model). A
full fine-tuning run is copied as it is, cast to `--dtype`. Prompt tuning adds virtual tokens in front of
the input instead of changing weights: it has nothing to merge and is refused (serve its adapter
folder with peft instead).

The export holds the weights (safetensors), the tokenizer, the generation settings this pipeline
scored with (generation_config.json: params.yaml's `generate` section, the model's special tokens
and a chat template's end of turn), prompt.json (the exact prompt template the model was trained
and scored with) and a model card (README.md). `--dtype auto` casts to bf16 where the base
checkpoint was published in bf16 (its config.json), else to fp32. Run it from the repository
root, after `dvc repro` (it reads params.yaml, data/prepared/input_format.json and the run's
metrics/evaluate file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # stages/ from the repo root

from stages import family  # noqa: E402
from stages.errors import StageError, run_stage  # noqa: E402
from stages.generate import PIN_FILE, base_quantization, generation_config  # noqa: E402
from stages.input_format import FORMAT_FILE, stop_ids  # noqa: E402
from stages.jsonio import read_json  # noqa: E402
from stages.modeling import load_base, load_model, load_tokenizer, pinned_base, save_model  # noqa: E402
from stages.params import ModelParams, Params, load_params  # noqa: E402

MODELS_DIR, PREPARED_DIR, EVALUATE_DIR = Path("models"), Path("data/prepared"), Path("metrics/evaluate")
BASE_PIN = MODELS_DIR / "base" / PIN_FILE  # the base full fine-tuning started from
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run: <method>/seed<seed> (a folder of models/), e.g. lora/seed42")
    parser.add_argument("out_dir", type=Path, help="the folder to write the standalone model into")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="the exported weights' dtype, cast after any merge (auto: the base checkpoint's own; default %(default)s)",
    )
    return parser.parse_args(argv)


def is_trained(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() or (model_dir / "adapter_config.json").is_file()


def run_dir(run: str) -> Path:
    model_dir = MODELS_DIR / run.removeprefix("models/").strip("/")
    if not is_trained(model_dir):
        trained = [str(p.relative_to(MODELS_DIR)) for p in sorted(MODELS_DIR.glob("*/seed*")) if is_trained(p)]
        raise StageError(
            f"{model_dir}: no trained model here (the baselines are the original model and a rule: nothing to "
            f"export); trained runs: {', '.join(sorted(set(trained))) or 'none yet (run dvc repro)'}"
        )
    return model_dir


def pin_of(pin_file: Path) -> ModelParams:
    """The base a pin names at its resolved commit (the run's own record, whatever params.yaml says now)."""
    if not pin_file.is_file():
        raise StageError(f"{pin_file} not found: the run's base is unknown; rerun its stages (dvc repro)")
    return pinned_base(read_json(pin_file))


def merged(model_dir: Path) -> tuple:
    """(tokenizer, fp32 model with any adapter merged in, its base model, the dtype the base checkpoint
    was published in: a full run's own config says fp32, the master weights it trained in)."""
    if (model_dir / "config.json").is_file():  # full fine-tuning: the whole model already
        base = pin_of(BASE_PIN)
        model = load_model(str(model_dir), dtype=torch.float32)
        return load_tokenizer(str(model_dir)), model, base.name, family.load_config(base.name, base.revision).dtype
    adapter = read_json(model_dir / "adapter_config.json")
    if adapter.get("peft_type") == "PROMPT_TUNING":
        raise StageError(
            f"{model_dir}: prompt tuning learns virtual input tokens, not weights, so there is nothing to merge; "
            "serve the adapter folder with peft (PeftModel.from_pretrained) instead"
        )
    from peft import PeftModel  # imported here: only adapters need peft

    base = pin_of(model_dir / PIN_FILE)
    quantization = base_quantization(model_dir)
    _, model = load_base(base, torch.float32, quantization)
    if quantization != "none":
        # QLoRA learned its update against the quantized weights, and was scored on them: merge into
        # exactly those, dequantized to fp32 (the original weights would give another model)
        model = model.dequantize(dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    return load_tokenizer(str(model_dir)), model, base.name, family.load_config(base.name, base.revision).dtype


def export_dtype(choice: str, published) -> torch.dtype:
    """--dtype's choice; auto: bf16 for a checkpoint published in bf16, else fp32 (an fp16 checkpoint
    too: T5 overflows in fp16, and an export must not lose range the scored run had)."""
    if choice != "auto":
        return DTYPES[choice]
    return torch.bfloat16 if str(published).removeprefix("torch.") == "bfloat16" else torch.float32


def input_format(path: Path) -> dict:
    if not path.is_file():
        raise StageError(f"{path} not found: the prompt the run was scored with is unknown; run dvc repro prepare")
    return read_json(path)


def install_generation(model, params: Params, prompt_format: dict) -> None:
    """generation_config.json as generate@ decoded: params' settings, the model's special tokens, and a
    chat template's end-of-turn token as one more EOS; settings transformers would refuse to save
    (it validates them) are a params error here, not a traceback after the merge."""
    config = family.install_generation_config(model, generation_config(params.generate), stop_ids(prompt_format))
    try:
        config.validate(strict=True)
    except ValueError as error:
        raise StageError(f"generate: transformers refuses these generation settings: {error}") from None


def model_card(run: str, base_name: str, model, prompt_format: dict, scores: dict) -> str:
    model_family = family.family(model.config)
    front_matter = {
        "base_model": base_name,
        "library_name": "transformers",
        "pipeline_tag": "summarization" if model_family == family.SEQ2SEQ else "text-generation",
        "tags": ["dialogue-summarization", "dvc", model.config.model_type, model_family],
    }
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in scores.items() if k.startswith("rouge")) or "| - | - |"
    auto = "AutoModelForSeq2SeqLM" if model_family == family.SEQ2SEQ else "AutoModelForCausalLM"
    return (
        f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n"
        f"# {run}: {base_name} fine-tuned for dialogue summarization\n\n"
        f"Exported from this repository's DVC pipeline run `models/{run}` as a standalone model "
        f"({model.dtype}); any adapter merged into fp32 base weights before the cast.\n\n"
        "## Use\n\n```python\nimport json\nfrom transformers import AutoTokenizer, " + auto + "\n\n"
        'tokenizer = AutoTokenizer.from_pretrained("PATH")\n'
        f'model = {auto}.from_pretrained("PATH")\n'
        'template = json.load(open("PATH/prompt.json"))["prompt_template"]\n'
        'inputs = tokenizer(template.replace("{dialogue}", dialogue), return_tensors="pt")\n'
        "output = model.generate(**inputs)  # generation_config.json: the settings it was scored with\n"
        "```\n\n"
        + (
            "Decoder-only: the summary is the continuation after the prompt, "
            "`tokenizer.decode(output[0][inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()`.\n\n"
            if model_family == family.CAUSAL
            else "`tokenizer.decode(output[0], skip_special_tokens=True).strip()` is the summary.\n\n"
        )
        + f"Prompt format: `{prompt_format.get('prompt_format', 'prompt_template')}`.\n\n"
        f"## Test ROUGE (this run)\n\n| metric | value |\n|---|---|\n{rows}\n"
    )


def write_export(out_dir: Path, tokenizer, model, card: str, prompt_format: dict) -> None:
    save_model(model, tokenizer, out_dir)  # safetensors, tokenizer, generation_config.json
    (out_dir / "prompt.json").write_text(json.dumps(prompt_format, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params()
    model_dir = run_dir(args.run)
    run = str(model_dir.relative_to(MODELS_DIR))
    prompt_format = input_format(PREPARED_DIR / FORMAT_FILE)
    tokenizer, model, base_name, published = merged(model_dir)
    model = model.to(export_dtype(args.dtype, published))  # the cast, after the merge in fp32
    install_generation(model, params, prompt_format)
    evaluated = EVALUATE_DIR / f"{run}.json"
    scores = read_json(evaluated) if evaluated.is_file() else {}
    write_export(
        args.out_dir, tokenizer, model, model_card(run, base_name, model, prompt_format, scores), prompt_format
    )
    print(f"exported models/{run} ({model.dtype}) to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(lambda: main(sys.argv[1:]))
