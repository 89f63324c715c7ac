"""QLoRA through the real stages: `lora.quantization: 4bit` trains the adapter on a 4-bit NF4 base
(bitsandbytes runs it on CPU too), the adapter folder records the quantization, and generate@lora
evaluates it on the same quantized base; the report says that variant's base differs.

A tiny Llama-style model 128 wide: bitsandbytes' CPU 4-bit kernel needs every quantized layer's
input width to be a multiple of 64 (see tests/test_family.py). No ../shared needed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

from stages import family
from stages.generate import generate_summaries, load_variant
from stages.params import ModelParams, load_params
from stages.report import quantization_notes
from tests.conftest import copy_project, dialogsum_rows, make_tiny_model, tiny_train_params
from tests.test_ceiling import run_stage


@pytest.fixture(scope="module")
def qlora(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    model_dir = make_tiny_model(root / "tiny", "--family", "llama", "--width", "128")
    work = root / "work"
    copy_project(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["model"]["name"] = str(model_dir)
    params["variants"] = ["lora"]
    params["train_lora"].update(dataclasses.asdict(tiny_train_params(batch_size=4, eval_batch_size=4, epochs=2)))
    params["train_lora"].update(learning_rate=5.0e-2)
    params["lora"].update(quantization="4bit", r=8)
    params["generate"].update(batch_size=4, num_beams=2, max_new_tokens=8, precision="fp32")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    splits = {"train": dialogsum_rows("train", 8), "validation": dialogsum_rows("validation", 4)}
    splits["test"] = dialogsum_rows("test", 3, references=2)
    for split, rows in splits.items():
        (work / "data" / "raw").mkdir(parents=True, exist_ok=True)
        (work / "data" / "raw" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for module, *args in (
        ("stages.base",),
        ("stages.prepare",),
        ("stages.train_lora",),
        ("stages.generate", "lora"),
    ):
        run_stage(module, *args, cwd=work)
    return work


def test_qlora_trains_on_a_4bit_base_and_records_it(qlora):
    assert json.loads((qlora / "models" / "lora" / "quantization.json").read_text()) == {"quantization": "4bit"}
    train = json.loads((qlora / "metrics" / "train" / "lora.json").read_text())
    assert 0 < train["trainable_params"] < train["total_params"] and train["train_loss"] > 0
    assert json.loads((qlora / "metrics" / "generate" / "lora.json").read_text())["base_quantization"] == "4bit"
    assert "quantization: 4bit" in (qlora / "models" / "lora" / "README.md").read_text()


def test_qlora_adapter_reloads_onto_the_same_quantized_base(qlora):
    """What the generate stage wrote is what the adapter gives on a freshly loaded 4-bit base, and
    the adapter is not a no-op: the base alone says something else."""
    params = load_params(qlora / "params.yaml")
    pin = json.loads((qlora / "models" / "base" / "pin.json").read_text())
    tokenizer, model = load_variant(qlora / "models" / "lora", ModelParams(pin["name"], pin["revision"]), torch.float32)
    assert family.is_quantized(model)
    test = Dataset.load_from_disk(str(qlora / "data" / "prepared" / "test"))
    generated = generate_summaries(model.eval(), tokenizer, test["input_ids"], params.generate)
    written = [
        json.loads(r)["prediction"] for r in (qlora / "data" / "predictions" / "lora.jsonl").read_text().splitlines()
    ]
    assert generated.summaries == written
    with model.disable_adapter():
        assert generate_summaries(model, tokenizer, test["input_ids"], params.generate).summaries != written


def test_the_report_notes_a_quantized_base():
    generation = {"lora": {"base_quantization": "4bit"}, "full": {"base_quantization": "none"}, "base": {}}
    notes = quantization_notes(["base", "full", "lora"], generation)
    assert notes == [
        "Note: **LoRA** was trained and evaluated on a 4bit-quantized base (QLoRA), not the base the other "
        "variants use; its training memory in the cost table is what quantization saves."
    ]
