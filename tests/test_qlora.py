"""QLoRA through the real stages: `lora.quantization: 4bit` trains the adapter on a 4-bit NF4 base
(bitsandbytes runs it on CPU too), the adapter folder records the quantization, and generate@lora
evaluates it on the same quantized base; the report says that variant's base differs.

A tiny Llama-style model 128 wide: bitsandbytes' CPU 4-bit kernel needs every quantized layer's
input width to be a multiple of 64 (see tests/test_family.py). No ../shared needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

import stages
from stages import family
from stages.generate import generate_summaries, load_variant
from stages.params import ModelParams, load_params
from stages.report import quantization_notes
from tests.conftest import REPO, copy_project, dialogsum_rows, make_tiny_model, tiny_train_params
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
    # LoRA's own section: its recipe (what differs from `train`) and its arguments
    params["lora"].update(dataclasses.asdict(tiny_train_params(batch_size=4, eval_batch_size=4, epochs=2)))
    params["lora"].update(learning_rate=5.0e-2)
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
        ("stages.train", "lora", "42"),
        ("stages.generate", "lora", "42"),
    ):
        run_stage(module, *args, cwd=work)
    return work


def test_qlora_trains_on_a_4bit_base_and_records_it(qlora):
    assert json.loads((qlora / "models" / "lora" / "seed42" / "quantization.json").read_text()) == {
        "quantization": "4bit"
    }
    train = json.loads((qlora / "metrics" / "train" / "lora" / "seed42.json").read_text())
    assert 0 < train["trainable_params"] < train["total_params"] and train["train_loss"] > 0
    assert train["method_type"] == "lora"
    assert (
        json.loads((qlora / "metrics" / "generate" / "lora" / "seed42.json").read_text())["base_quantization"] == "4bit"
    )
    assert "quantization: 4bit" in (qlora / "models" / "lora" / "seed42" / "README.md").read_text()


def test_qlora_adapter_reloads_onto_the_same_quantized_base(qlora):
    """What the generate stage wrote is what the adapter gives on a freshly loaded 4-bit base, and
    the adapter is not a no-op: the base alone says something else."""
    params = load_params(qlora / "params.yaml")
    pin = json.loads((qlora / "models" / "base" / "pin.json").read_text())
    tokenizer, model = load_variant(
        qlora / "models" / "lora" / "seed42", ModelParams(pin["name"], pin["revision"]), torch.float32
    )
    assert family.is_quantized(model)
    test = Dataset.load_from_disk(str(qlora / "data" / "prepared" / "test"))
    generated = generate_summaries(model.eval(), tokenizer, test["input_ids"], params.generate)
    written = [
        json.loads(r)["prediction"]
        for r in (qlora / "data" / "predictions" / "lora" / "seed42.jsonl").read_text().splitlines()
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


def imported_modules(module: str, *args: str, cwd: Path) -> tuple[set[str], subprocess.CompletedProcess]:
    """The modules a stage process imported (python -X importtime lists each on stderr) and its result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    names = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return names, result


def test_a_stage_imports_bitsandbytes_only_where_params_quantize(qlora, tmp_path):
    """bitsandbytes' import compiles kernels (~3.5 s per stage on 2 cores), and peft imports it
    whenever installed: a stage process loads it only when a params section quantizes, and a
    quantized load asked for anyway says why it cannot run instead of "pip install bitsandbytes"."""
    quantized, result = imported_modules("stages.generate", "lora", "42", cwd=qlora)
    assert result.returncode == 0, result.stderr
    assert {"peft", "bitsandbytes.nn"} <= quantized

    work = tmp_path / "work"
    shutil.copytree(qlora, work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["lora"]["quantization"] = "none"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    plain, result = imported_modules("stages.train", "lora", "42", cwd=work)  # trains on the unquantized base
    assert result.returncode == 0, result.stderr
    assert "peft" in plain and "bitsandbytes.nn" not in plain
    (work / "models" / "lora" / "seed42" / "quantization.json").write_text(
        '{"quantization": "4bit"}'
    )  # a 4-bit adapter
    _, result = imported_modules("stages.generate", "lora", "42", cwd=work)
    assert result.returncode == 2  # a StageError (stages/errors.py)
    assert [line for line in result.stderr.splitlines() if not line.startswith("import time:")] == [
        "error: a 4bit load needs bitsandbytes, which this stage keeps unimported because no params.yaml "
        "section sets quantization (stages/__init__.py); set it where the variant was trained (e.g. "
        "lora.quantization: 4bit) and rerun with dvc repro"
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["python", "-m", "stages.generate", "lora", "42"], True),
        (["python", "-X", "importtime", "-m", "stages.train", "lora", "42"], True),
        (["/venv/bin/python", "-u", "-m", "stages.train", "full", "42"], True),  # a torchrun worker
        (["python", "-m", "stages.launch", "lora", "42"], True),  # dvc.yaml's train@lora-42
        (["python", "-m", "pytest", "tests"], False),
        (["python", "-c", "import stages.generate"], False),
    ],
)
def test_only_a_stage_run_as_a_program_counts_as_a_stage_process(argv, expected):
    assert stages.is_stage_process(argv) is expected


def test_any_section_that_quantizes_keeps_bitsandbytes_importable(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("lora:\n  quantization: none\nqlora:\n  quantization: 4bit\n")
    assert stages.quantizes(params)
    params.write_text("lora:\n  quantization: none\nvariants: [base, lora]\n")
    assert not stages.quantizes(params)
    params.write_text("lora: [unclosed\n")  # unreadable: import as usual, the stage reports the file
    assert stages.quantizes(params)
    assert stages.quantizes(tmp_path / "missing.yaml")


# --- counts, placement and what the CPU kernel cannot run --------------------------------------------


def test_qlora_counts_params_at_their_real_element_count(qlora):
    """bitsandbytes stores two 4-bit weights per byte: counted as stored, a tiny Llama's 4-bit base
    looked a third smaller and its adapter's share half again larger. Counted as weights, the total is
    the unquantized base's plus the adapter's, and peft's own count agrees."""
    from peft import PeftModel

    from stages.ledger import count_parameters

    train = json.loads((qlora / "metrics" / "train" / "lora" / "seed42.json").read_text())
    pin = json.loads((qlora / "models" / "base" / "pin.json").read_text())
    unquantized = sum(p.numel() for p in family.load_model(pin["name"]).parameters())
    assert train["total_params"] == unquantized + train["trainable_params"]
    quantized = PeftModel.from_pretrained(family.load_model(pin["name"], quantization="4bit"),
                                          str(qlora / "models" / "lora" / "seed42"), is_trainable=True)  # fmt: skip
    trainable, total = quantized.get_nb_trainable_parameters()
    counted = count_parameters(quantized)
    assert (
        (counted["trainable_params"], counted["total_params"])
        == (trainable, total)
        == (
            train["trainable_params"],
            train["total_params"],
        )
    )


def test_a_quantized_base_loads_on_each_process_s_own_gpu():
    from stages.quantization import quantized_device

    assert quantized_device({"LOCAL_RANK": "3", "WORLD_SIZE": "4"}, cuda=True) == "cuda:3"  # torchrun rank 3
    assert quantized_device({}, cuda=True) == "cuda:0"  # one process: its (pinned) first GPU
    assert quantized_device({"LOCAL_RANK": "1"}, cuda=False) == "cpu"


def test_layers_narrower_than_the_cpu_4bit_block_are_refused_before_training(tmp_path, monkeypatch):
    """On an AVX512-BF16 CPU bitsandbytes repacks 4-bit weights at the first generation, which fails
    with a raw reshape error for layers narrower than its block: the load is refused first, naming them."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from stages import quantization
    from stages.errors import StageError

    narrow = make_tiny_model(tmp_path / "narrow", "--family", "llama")  # 32 wide: k/v project to 16
    wide = make_tiny_model(tmp_path / "wide", "--family", "llama", "--width", "128")
    # the premise, without the refusal (on whatever CPU runs this): bitsandbytes' own packing of a narrow
    # layer fails, a wide one packs
    monkeypatch.setattr(quantization, "cpu_packs_4bit", lambda: False)
    layer = family.load_model(str(narrow), quantization="4bit").model.layers[0].self_attn.k_proj
    with pytest.raises((AssertionError, RuntimeError)):
        _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    wide_layer = family.load_model(str(wide), quantization="4bit").model.layers[0].self_attn.k_proj
    _convert_weight_packed_for_cpu(wide_layer.weight.data, wide_layer.weight.quant_state)

    monkeypatch.setattr(quantization, "cpu_packs_4bit", lambda: True)  # an AVX512-BF16 CPU
    with pytest.raises(StageError) as refused:
        family.load_model(str(narrow), quantization="4bit")
    assert str(refused.value) == (
        f"4-bit quantization of {narrow} on this CPU: bitsandbytes' CPU kernel (AVX512-BF16) needs every quantized "
        "layer's inputs to be a multiple of 64 and its outputs of 32, and q_proj (32 -> 32), k_proj (32 -> 16), "
        "v_proj (32 -> 16), o_proj (32 -> 32), gate_proj (32 -> 128), up_proj (32 -> 128) are not; use "
        "quantization: none, a wider model, or a GPU"
    )
    assert family.is_quantized(family.load_model(str(wide), quantization="4bit"))


def test_a_qlora_export_merges_into_the_dequantized_4bit_weights_it_was_trained_on(qlora, tmp_path):
    """scripts/export.py on a QLoRA run: a plain (unquantized) model whose adapted layers are the 4-bit
    weights it trained and was scored on, dequantized to fp32, plus the adapter's update."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "scripts/export.py", "lora/seed42", str(out), "--dtype", "fp32"],
        cwd=qlora,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(out)
    pin = json.loads((qlora / "models" / "base" / "pin.json").read_text())
    quantized = family.load_model(pin["name"], quantization="4bit")
    dequantized = quantized.dequantize(dtype=torch.float32)
    original = family.load_model(pin["name"])
    adapter = PeftModel.from_pretrained(family.load_model(pin["name"]), str(qlora / "models" / "lora" / "seed42"))
    layer = adapter.base_model.model.model.layers[0].self_attn.q_proj
    update = layer.get_delta_weight("default")
    expected = dequantized.model.layers[0].self_attn.q_proj.weight + update
    got = exported.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the premise: 4-bit rounding is far larger than the check's tolerance
    assert (
        original.model.layers[0].self_attn.q_proj.weight - dequantized.model.layers[0].self_attn.q_proj.weight
    ).abs().max() > 1e-3
