"""The curated peft methods by name (prefix tuning, LoHa, VeRA: params.yaml sections with their sourced
defaults) on both families: one training step, an adapter-only save, and the same summaries before and
after a reload onto a fresh base. And what a bad type or argument does: one clear error, exit 2, before
any weights load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GenerationConfig

from stages import family, methods, training
from stages.errors import StageError
from stages.generate import load_adapter
from stages.modeling import load_model, load_tokenizer
from stages.params import ModelParams, load_params, parse_params
from tests.conftest import REPO, make_tiny_model

CURATED = ("prefix", "loha", "vera")
PROMPTS = [
    "Summarize: #Person1#: Are we meeting at the bank? #Person2#: Yes, at three.",
    "Summarize: #Person1#: Is the library open? #Person2#: Until nine.",
]


@pytest.fixture(scope="module", params=["t5", "llama"])
def tiny(request, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "model", "--family", request.param)


def summaries(model, tokenizer) -> list[list[int]]:
    model_family = family.family(family.unwrap(model).config)
    ids = [
        family.encode_prompt(model_family, tokenizer, tokenizer(p, add_special_tokens=False)["input_ids"])
        for p in PROMPTS
    ]
    return family.generate_continuations(model, tokenizer, ids, GenerationConfig(max_new_tokens=6, do_sample=False))


def training_batch(model, tokenizer) -> dict[str, torch.Tensor]:
    """A batch the family builds from PROMPTS, as the Trainer would get it."""
    model_family = family.family(family.unwrap(model).config)
    rows = [
        family.training_example(model_family, tokenizer(p, add_special_tokens=False)["input_ids"], [5, 6, 7], tokenizer)
        for p in PROMPTS
    ]
    return family.data_collator(model_family, tokenizer, model)(rows)


@torch.no_grad()
def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float()


def one_step(model, batch: dict[str, torch.Tensor]) -> None:
    """One AdamW step, as the Trainer takes it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.0e-1)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("method", CURATED)
def test_curated_method_trains_saves_and_reloads_to_the_same_summaries(tiny, method, tmp_path):
    torch.manual_seed(0)
    section = load_params(REPO / "params.yaml").sections[method]
    plan = methods.plan(section, ModelParams(str(tiny), "main"), seed=0)
    assert (plan.library, plan.frozen_base) == ("peft", True)
    tokenizer = load_tokenizer(str(tiny))
    family.ensure_pad_token(tokenizer)
    model = plan.build(load_model(str(tiny)))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and sum(p.numel() for p in trainable.values()) < 0.2 * sum(p.numel() for p in frozen.values())
    batch = training_batch(model, tokenizer)
    untrained = logits(model, batch)
    one_step(model, batch)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert moved, f"{method}: no trainable weight moved in a step"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    before, trained_logits = summaries(model, tokenizer), logits(model, batch)
    assert not torch.allclose(trained_logits, untrained), f"{method}: the step changed nothing the model computes"
    plan.save(model, tokenizer, tmp_path / method)
    saved = {p.name for p in (tmp_path / method).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    config = json.loads((tmp_path / method / "adapter_config.json").read_text())
    assert config["peft_type"] == section.type.upper()
    reloaded = load_adapter(load_model(str(tiny)), tmp_path / method)
    assert summaries(reloaded, tokenizer) == before
    torch.testing.assert_close(logits(reloaded, batch), trained_logits)  # the trained adapter, not a fresh one
    if "target_modules" in plan.resolved:  # peft's own default for the architecture, as recorded
        expected = {"t5": ["q", "v"], "llama": ["q_proj", "v_proj"]}[family.unwrap(model).config.model_type]
        assert plan.resolved["target_modules"] == expected


@pytest.fixture()
def stage_dir(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """A directory whose params name the tiny T5 and a method `bad`, with the base stage's pin."""
    pin = {"name": str(tiny_model_dir), "revision": "main", "resolved_revision": "sha256:0"}
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "pin.json").write_text(json.dumps(pin))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(directory: Path, model_dir: Path, bad: dict) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["name"] = str(model_dir)
    raw["bad"] = {"learning_rate": 1.0e-3, "weight_decay": 0.0, **bad}  # every method sets its own
    raw["methods"] = [*raw["methods"], "bad"]
    parse_params(yaml.safe_load(yaml.safe_dump(raw)))  # the params themselves are valid: peft decides
    (directory / "params.yaml").write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (
            {"type": "lorra", "r": 8},
            "bad.type: 'lorra' is not a method type; use full or one of peft 0.21.2's: adalora, ",
        ),
        (
            {"type": "loha", "learning_rate": 1.0e-3, "rank": 8},
            "bad.rank: not an argument of peft's LoHaConfig (rank unknown); it accepts: alpha, alpha_pattern, "
            "exclude_modules, init_weights, layers_pattern, layers_to_transform, module_dropout, modules_to_save, r, "
            "rank_dropout, rank_pattern, target_modules, use_effective_conv2d (besides type and the train.* recipe keys)",
        ),
        (
            {"type": "vera", "target_modules": ["q", "query"]},
            "bad.target_modules: query not found in the model; linear layers available: k, lm_head, o, q, v, wi_0, wi_1, wo",
        ),
        (
            {"type": "adalora", "total_step": 10},  # its rank schedule needs a step the shared recipe does not take
            "bad.type: adalora reallocates its ranks by calling update_and_allocate(step) after every optimizer step",
        ),
        (
            {"type": "cpt"},  # peft's CPT is for decoder-only models
            "bad: peft's cpt does not support seq2seq models (t5): CPTConfig only supports task_type = CAUSAL_LM.",
        ),
        (
            {"type": "adaption_prompt", "adapter_len": 4, "adapter_layers": 1},
            "bad: peft cannot build adaption_prompt for seq2seq models like 't5': "
            "Unsupported model type for adaption prompt: 't5'.",
        ),
    ],
)
def test_a_bad_method_is_one_clear_error_before_any_weights_load(stage_dir, tiny_model_dir, monkeypatch, bad, expected):
    from stages import train

    write_params(stage_dir, tiny_model_dir, bad)
    monkeypatch.setattr(training, "load_model", lambda *args: pytest.fail("loaded the weights before checking"))
    with pytest.raises(StageError) as info:
        train.main("bad", 42)
    assert str(info.value).startswith(expected)
    assert not (stage_dir / "models" / "bad").exists() and not (stage_dir / "checkpoints").exists()


def test_the_stage_process_exits_2_with_the_one_line(stage_dir, tiny_model_dir):
    write_params(stage_dir, tiny_model_dir, {"type": "loha", "rank": 8})
    result = subprocess.run(
        [sys.executable, "-m", "stages.launch", "bad", "42"],
        cwd=stage_dir,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: bad.rank: not an argument of peft's LoHaConfig (rank unknown); it accepts: ")
    assert "Traceback" not in result.stderr
