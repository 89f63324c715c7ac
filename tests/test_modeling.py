"""FLAN-T5's separate output head survives loading, training (full and LoRA), saving, reloading and
merging; weights load from safetensors only; unloadable models give one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file

from stages import hub
from stages.errors import StageError
from stages.modeling import (
    ModelLoadError,
    head_is_tied,
    linear_layer_names,
    load_model,
    load_tokenizer,
    meta_model,
    native_bf16,
    save_model,
    use_bf16,
)
from stages.params import ModelParams
from stages.recipe import build_trainer, training_arguments
from tests.conftest import REPO, tiny_train_params

TRAIN = tiny_train_params(learning_rate=1.0e-2, save_steps=100)


@pytest.fixture(scope="module")
def saved_head(tiny_model_dir) -> torch.Tensor:
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(tensors["lm_head.weight"], tensors["shared.weight"])  # the premise of these tests
    return tensors["lm_head.weight"]


def tiny_dataset(tokenizer) -> Dataset:
    source = tokenizer(["hello how are you", "see you at the station", "book a table for two", "thanks a lot"])
    labels = tokenizer(["greeting", "meeting", "booking", "thanks"])["input_ids"]
    return Dataset.from_dict(
        {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"], "labels": labels}
    )


def train(model, tokenizer, output_dir) -> None:
    data = tiny_dataset(tokenizer)
    args = training_arguments(TRAIN, seed=0, output_dir=output_dir, device=torch.device("cpu"), section="full")
    build_trainer(model, tokenizer, data, data, args).train()


def test_loading_keeps_the_head_apart(tiny_model_dir, saved_head):
    model = load_model(str(tiny_model_dir))
    assert not head_is_tied(model)
    assert torch.equal(model.lm_head.weight, saved_head)


def test_full_training_save_and_reload_keep_the_trained_head(tiny_model_dir, saved_head, tmp_path):
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    train(model, tokenizer, tmp_path / "checkpoints")
    assert not head_is_tied(model)
    trained_head = model.lm_head.weight.detach().clone()
    assert not torch.equal(trained_head, saved_head)  # the head trained on its own
    save_model(model, tokenizer, tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = load_model(str(tmp_path / "full"))
    assert not head_is_tied(reloaded)
    assert torch.equal(reloaded.lm_head.weight, trained_head)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.shared.weight)


def test_lora_training_saving_and_merging_keep_the_original_head(tiny_model_dir, saved_head, tmp_path):
    tokenizer, base = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    model = get_peft_model(
        base, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=8, target_modules=["q", "v"])
    )
    train(model, tokenizer, tmp_path / "checkpoints")
    model.save_pretrained(tmp_path / "lora")
    merged = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(tmp_path / "lora")).merge_and_unload()
    assert not head_is_tied(merged)
    assert torch.equal(merged.lm_head.weight, saved_head)  # LoRA on q, v never touches the head


def test_only_safetensors_weights_load(tiny_model_dir, tmp_path):
    # a checkpoint in the pickle format only (pickle can run code when loaded)
    torch.save(load_model(str(tiny_model_dir)).state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"could not load '.*' \(revision 'main'\): OSError: .*safetensors"):
        load_model(str(tmp_path))


def test_model_load_error_is_the_hubs_and_a_stage_error():
    # stages/hub.py owns it (family.py and modeling.py both raise it); modeling re-exports it
    assert ModelLoadError is hub.ModelLoadError and issubclass(ModelLoadError, StageError)


def test_lora_targets_come_from_the_config_alone(tiny_model_dir):
    assert linear_layer_names(meta_model(ModelParams(name=str(tiny_model_dir), revision="main"))) == [
        "k",
        "lm_head",
        "o",
        "q",
        "v",
        "wi_0",
        "wi_1",
        "wo",
    ]


def test_unreachable_model_is_one_clear_line(tmp_path):
    params = (REPO / "params.yaml").read_text().replace("name: google/flan-t5-base", "name: no-such-org/no-such-model")
    (tmp_path / "params.yaml").write_text(params)
    result = subprocess.run(  # the base stage is the first to load the model (its pin)
        [sys.executable, "-m", "stages.base"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    first, hint = result.stderr.splitlines()[:2]
    assert first.startswith("error: could not load 'no-such-org/no-such-model' (revision 'main'): ")
    assert hint.startswith("If the Hugging Face Hub is unreachable or the id is wrong, point model.name at a local")
    assert "Traceback" not in result.stderr


def test_a_stage_run_before_the_pin_says_so(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "stages.prepare"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: models/base/pin.json not found: the base stage pins the model first; run dvc repro base\n"
    )


def test_no_code_path_enables_remote_code():
    sources = [*REPO.glob("stages/**/*.py"), REPO / "summarize.py", *REPO.glob("scripts/*.py")]  # stages/methods/ too
    assert REPO / "stages" / "methods" / "lora.py" in sources
    offenders = [str(p) for p in sources if "trust_remote_code=True" in p.read_text()]
    assert offenders == []
    # every loader: the tokenizer (modeling.py), the config and the model (family.py)
    loaders = [REPO / "stages" / "modeling.py", REPO / "stages" / "family.py"]
    assert sum(p.read_text().count("trust_remote_code=False") for p in loaders) == 3


def test_truncated_weights_file_is_one_clear_error(tiny_model_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download or copy cut short
    with pytest.raises(ModelLoadError, match=r"could not load '.*' \(revision 'main'\): SafetensorError: "):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("capability", "emulated_bf16", "expected"),
    [
        ((7, 5), True, False),  # T4: torch 2.13 reports bf16 "supported" through slow emulation
        ((7, 0), True, False),  # V100
        ((8, 0), True, True),  # A100
        ((9, 0), True, True),  # H100
    ],
)
def test_auto_precision_picks_only_native_bf16_on_gpus(monkeypatch, capability, emulated_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: emulated_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    cuda = torch.device("cuda")
    assert native_bf16(cuda) is expected
    assert use_bf16("auto", cuda) is expected
    assert use_bf16("fp32", cuda) is False
    assert use_bf16("bf16", cuda) is True  # asked for explicitly: allowed where torch supports it at all


def test_strict_determinism_turns_on_deterministic_kernels():
    code = (
        "import torch, os; from stages.modeling import set_determinism; set_determinism(0, {strict}); "
        "print(torch.are_deterministic_algorithms_enabled(), os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code.format(strict=strict)], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        for strict in (False, True)
    ]
    assert outputs == [["False", "None"], ["True", ":4096:8"]]


def test_explicit_bf16_on_a_gpu_without_bf16_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a P100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (6, 0))
    cuda = torch.device("cuda")
    assert use_bf16("auto", cuda) is False
    with pytest.raises(ModelLoadError, match=r"^precision bf16 needs a GPU with bf16 support \(Ampere or newer\)"):
        use_bf16("bf16", cuda)
