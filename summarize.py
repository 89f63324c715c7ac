"""Summarize new dialogues with any trained variant: the base model, models/full/seed42 or models/lora/seed42.

    python -m summarize --model models/lora/seed42 dialogue.txt more.jsonl "#Person1#: Hi! ..." [--output out.jsonl]

Each input is a `.txt` file (one dialogue), a `.jsonl` file (one object per line with a
`dialogue` field and optionally an `id`), `-` (one dialogue from stdin) or literal dialogue
text. Prompts, truncation and generation settings come from params.yaml, through the same
code the prepare and generate stages use, so a summary here is what evaluation would produce.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages import family
from stages.errors import StageError, run_stage
from stages.generate import base_quantization, generate_summaries
from stages.generate import load_adapter as attach_adapter
from stages.input_format import PromptFormat, resolve, stop_ids
from stages.modeling import (
    ModelLoadError,
    load_base,
    load_model,
    load_tokenizer,
    pick_device,
    pinned_base,
    read_pin,
    use_bf16,
)
from stages.params import GenerateParams, ModelParams, Params, PrepareParams, load_params
from stages.prepare import fit_prompts

BASE = "base"  # --model base: the original model at the commit models/base/pin.json pins, not fine-tuned
BASE_PIN = Path("models/base/pin.json")
PIN_FILE = "pin.json"  # beside a trained adapter: the exact base it was trained on
FILE_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Dialogue:
    id: Any  # a .jsonl row's own id is kept as written (string or number)
    text: str


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m summarize",
        description="Summarize dialogues with the base model, a full model or a PEFT adapter (LoRA, IA3, prompt "
        "tuning) of params.yaml's model.name, encoder-decoder or decoder-only.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="FILE_OR_TEXT",
        help="a .txt file (one dialogue), a .jsonl file (a 'dialogue' field per line, "
        "optional 'id'), - for stdin, or the dialogue text itself",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR|base",
        help="a full model directory (config.json, e.g. models/full/seed42), a PEFT adapter "
        "directory (adapter_config.json, e.g. models/lora/seed42), or 'base' for "
        "params.yaml's model.name (write ./base for a directory named base)",
    )
    parser.add_argument(
        "--base-model",
        metavar="NAME_OR_DIR",
        help="base model for a PEFT adapter, instead of the base_model_name_or_path in its adapter_config.json",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        metavar="PATH",
        help="params file with the prompt template and generation defaults (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE.jsonl",
        help="write {id, summary} JSON lines here instead of printing one summary per line",
    )
    for option in ("batch-size", "num-beams", "max-new-tokens"):  # the generate stage's settings by default
        parser.add_argument(
            f"--{option}",
            type=positive_int,
            metavar="N",
            help=f"default: params.yaml generate.{option.replace('-', '_')}",
        )
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def read_params_file(path: Path) -> Params:
    if not path.is_file():
        raise StageError(f"params file {str(path)!r} not found; run from the repo root or pass --params PATH")
    return load_params(path)


def read_dialogues(inputs: list[str], stdin: TextIO) -> list[Dialogue]:
    dialogues = [d for position, arg in enumerate(inputs, 1) for d in read_input(arg, position, stdin)]
    if not dialogues:
        raise StageError("no dialogues to summarize: the .jsonl inputs have no rows")
    for dialogue in dialogues:
        if not dialogue.text.strip():
            raise StageError(f"dialogue {dialogue.id!r} is empty")
    return dialogues


def read_input(arg: str, position: int, stdin: TextIO) -> list[Dialogue]:
    """The dialogues one positional argument stands for."""
    if arg == "-":
        return [Dialogue("stdin", stdin.read())]
    # os.path, not pathlib: Path.is_file raises on literal text longer than a file name may be
    if os.path.isfile(arg):
        suffix = Path(arg).suffix.lower()
        if suffix == ".txt":
            return [Dialogue(arg, Path(arg).read_text(encoding="utf-8"))]
        if suffix == ".jsonl":
            return read_jsonl(Path(arg))
        raise StageError(
            f"{arg}: unsupported file type {suffix or '(none)'!r}; "
            "use .txt (one dialogue) or .jsonl (a 'dialogue' field per line)"
        )
    if os.path.isdir(arg):
        raise StageError(f"{arg}: is a directory; pass .txt or .jsonl files")
    # a mistyped file name would otherwise be summarized as if it were the dialogue
    if Path(arg).suffix.lower() in FILE_SUFFIXES and not any(c.isspace() for c in arg):
        raise StageError(f"{arg}: no such file")
    return [Dialogue(f"arg{position}", arg)]


def read_jsonl(path: Path) -> list[Dialogue]:
    dialogues = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise StageError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("dialogue"), str):
                raise StageError(f"{path}:{number}: expected an object with a string 'dialogue' field")
            dialogues.append(Dialogue(row.get("id", f"{path}:{number}"), row["dialogue"]))
    return dialogues


def generation_params(defaults: GenerateParams, args: argparse.Namespace) -> GenerateParams:
    overrides = {"batch_size": args.batch_size, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    return dataclasses.replace(defaults, **{k: v for k, v in overrides.items() if v is not None})


def load_summarizer(
    model: str, base_model: str | None, defaults: ModelParams, precision: str, device: torch.device
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and eval-mode model on `device` for --model; any load failure is one StageError line."""
    dtype = torch.bfloat16 if use_bf16(precision, device) else torch.float32
    try:
        if model == BASE:
            reject_base_model(base_model, "--model base")
            # the pinned commit, as the generate stage scores it; params.yaml's revision before a first run
            tokenizer, loaded = load_base(read_pin(BASE_PIN, defaults) if BASE_PIN.is_file() else defaults, dtype)
        else:
            tokenizer, loaded = load_directory(Path(model), base_model, defaults, dtype)
    except ModelLoadError as error:
        # its second line is advice about params.yaml's model.name, which is beside the point here
        raise StageError(first_line(error)) from None
    except StageError:  # already says what to fix (StageError is a RuntimeError: keep it out of the next clause)
        raise
    except (SafetensorError, RuntimeError) as error:  # a truncated or mismatched weights file
        raise StageError(f"could not load model {model!r}: {type(error).__name__}: {first_line(error)}") from None
    # a quantized (QLoRA) base was placed on its device while it loaded; 8-bit cannot move
    return tokenizer, (loaded if family.is_quantized(loaded) else loaded.to(device)).eval()


def load_directory(
    directory: Path, base_model: str | None, defaults: ModelParams, dtype: torch.dtype
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    if not directory.is_dir():
        raise StageError(
            f"model directory {str(directory)!r} not found; pass a trained model "
            "(models/full/seed42, models/lora/seed42) or --model base"
        )
    if (directory / "adapter_config.json").is_file():
        return load_adapter(directory, base_model, defaults, dtype)
    if (directory / "config.json").is_file():
        reject_base_model(base_model, f"full model {str(directory)!r}")
        return load_tokenizer(str(directory)), load_model(str(directory), dtype=dtype)
    raise StageError(
        f"{str(directory)!r} has neither config.json (a full model) nor adapter_config.json (a LoRA adapter)"
    )


def reject_base_model(base_model: str | None, model: str) -> None:
    # silently ignoring --base-model would summarize with a model the user did not ask for
    if base_model is not None:
        raise StageError(f"--base-model only applies to a LoRA adapter directory, not to {model}")


def load_adapter(
    directory: Path, base_model: str | None, defaults: ModelParams, dtype: torch.dtype
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The base model with the PEFT adapter (LoRA, IA3, prompt tuning) applied unmerged, exactly as the generate stage applies it
    (a merge in bf16 would round the update away: see stages.generate.load_adapter)."""
    config = read_adapter_config(directory / "adapter_config.json")
    pin = pinned_base(json.loads((directory / PIN_FILE).read_text())) if (directory / PIN_FILE).is_file() else None
    base_name = base_model or (pin.name if pin else config.get("base_model_name_or_path"))
    if not base_name:
        raise StageError(f"{directory / 'adapter_config.json'} names no base_model_name_or_path; pass --base-model")
    # an adapter only fits the exact base weights it was trained on: the commit its pin.json
    # records (the training stages write it), else the revision the adapter config records, else
    # params.yaml's when the adapter was trained from params.yaml's model
    if pin is not None and base_name == pin.name:
        revision = pin.revision
    else:
        revision = config.get("revision") or (defaults.revision if base_name == defaults.name else "main")
    # train@<method> saves the tokenizer beside the adapter; adapters from elsewhere may not have one
    has_tokenizer = (directory / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(directory) if has_tokenizer else base_name, revision)
    model = load_model(base_name, revision, dtype, base_quantization(directory))  # QLoRA: the same 4-bit base
    try:
        model = attach_adapter(model, directory)
    except RuntimeError as error:  # torch's load_state_dict: "Error(s) in loading ...", then one line per tensor
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise StageError(
            f"LoRA adapter {str(directory)!r} does not fit base model {base_name!r} ({detail}); "
            "pass the base it was trained on with --base-model"
        ) from None
    except (OSError, ValueError, KeyError) as error:
        raise StageError(
            f"could not attach LoRA adapter {str(directory)!r} to {base_name!r}: "
            f"{type(error).__name__}: {first_line(error)}"
        ) from None
    return tokenizer, model


def first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def read_adapter_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise StageError(f"could not read {path}: {error}") from None
    if not isinstance(config, dict):
        raise StageError(f"{path}: expected a JSON object")
    return config


def encode(
    dialogues: list[Dialogue], tokenizer: PreTrainedTokenizerBase, params: PrepareParams, model_family: str
) -> list[list[int]]:
    """Prompt ids exactly as the prepare stage builds them for training and evaluation."""
    input_ids, cut = fit_prompts(
        params.prompt_template, [d.text for d in dialogues], tokenizer, params.max_source_length, model_family
    )
    if cut:
        print(
            f"note: {cut} of {len(dialogues)} dialogue(s) exceed prepare.max_source_length="
            f"{params.max_source_length} tokens with the prompt; their ends are cut off (the prompt's end is kept)",
            file=sys.stderr,
        )
    return input_ids


def print_progress(done: int, total: int) -> None:
    print(f"summarized {done}/{total} dialogues", file=sys.stderr, flush=True)


def prompt_layout(params: PrepareParams, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> PromptFormat:
    """The prompt format prepare builds for this model (stages/input_format.py): the chat rule
    reads the EOS ids the model generates with."""
    eos = family.generation_special_tokens(model)["eos_token_id"]
    return resolve(params, tokenizer, set(eos if isinstance(eos, list) else [eos]))


def summarize(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[list[int]],
    params: GenerateParams,
    stops: Sequence[int] = (),
) -> list[str]:
    progress = print_progress if len(input_ids) > 1 else None  # one dialogue needs no progress
    return generate_summaries(model, tokenizer, input_ids, params, progress=progress, stop_ids=stops).summaries


def write_summaries(dialogues: list[Dialogue], summaries: list[str], output: Path | None, stdout: TextIO) -> None:
    if output is None:
        for summary in summaries:  # one line per dialogue, so line N is input N's summary
            print(" ".join(summary.splitlines()), file=stdout)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        for dialogue, summary in zip(dialogues, summaries):
            f.write(json.dumps({"id": dialogue.id, "summary": summary}, ensure_ascii=False) + "\n")
    print(f"wrote {len(summaries)} summaries to {output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = read_params_file(args.params)
    dialogues = read_dialogues(args.inputs, sys.stdin)  # before loading: a bad input fails in seconds
    tokenizer, model = load_summarizer(
        args.model, args.base_model, params.model, params.generate.precision, pick_device()
    )
    layout = prompt_layout(params.prepare, tokenizer, model)  # the prompt format the prepare stage used
    prepare = dataclasses.replace(params.prepare, prompt_template=layout.template)
    input_ids = encode(dialogues, tokenizer, prepare, family.family(family.unwrap(model).config))
    stops = stop_ids(layout.record())
    summaries = summarize(model, tokenizer, input_ids, generation_params(params.generate, args), stops)
    write_summaries(dialogues, summaries, args.output, sys.stdout)


if __name__ == "__main__":
    run_stage(lambda: main(sys.argv[1:]))
