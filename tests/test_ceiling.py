"""The ceiling: a model that memorized its data must reach the top score through the real train ->
evaluate -> report stages under the DEFAULT generation params.

Random tiny models cannot show whether a generation default biases ROUGE; a memorized model can.
The data are real DialogSum training dialogues whose summaries name the speakers three or more
times ("#Person1# thanks #Person2# for #Person2#'s help."), the case that the old default
no_repeat_ngram_size: 3 made unwritable (FLAN-T5 splits "#Person1#" into 5 tokens): under it,
full fine-tuning scores about 52 ROUGE-L here instead of about 98.

How the overlap guard is bypassed, plainly: the test writes the data snapshot data/raw/ itself,
with the same 4 dialogues as train, validation and test, and runs the stages after `data`. The
data stage would (rightly) drop train rows that appear in test; memorization needs exactly that.
Needs ../shared (real DialogSum and the FLAN-T5 tokenizer): runs in CI, skips elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from stages.generate import generation_config, recorded_generation
from stages.modeling import use_bf16
from stages.params import load_params
from tests.conftest import (
    DIALOGSUM,
    FLAN_SMALL,
    MEMORIZATION_LORA_TARGETS,
    REPO,
    copy_project,
    make_tiny_model,
    memorization_rows,
    require_shared,
)

# Memorizing costs a tiny model capacity: width 128 (d_ff 256, 8 heads, 2+2 layers) memorizes 4
# dialogues in 150 epochs (~25 s); width 32 stalls near 96 for full fine-tuning.
WIDTH = 128
VARIANTS = ("base", "full", "lora", "lead")
OVERFIT = {
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "eval_batch_size": 4,
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "logging_steps": 50,
    "save_steps": 100000,
}
FULL = {**OVERFIT, "epochs": 150, "learning_rate": 3.0e-3}  # 4 rows / 4 per step = 150 optimizer steps
# LoRA on every linear layer and the output head (the embedding stays frozen and random), with
# rank 32 and no dropout: enough capacity to memorize. 5e-3 reaches 100 in 200 epochs; 1e-2
# diverges late (gradient norm ~10) and ends near 82
LORA_TRAIN = {**OVERFIT, "epochs": 200, "learning_rate": 5.0e-3}
LORA = {"r": 32, "alpha": 32, "dropout": 0.0, "target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo", "lm_head"]}


def speaker_heavy_dialogues(count: int) -> list[dict]:
    """The `count` shortest training rows whose summary has 3+ speaker tags (deterministic)."""
    with open(DIALOGSUM / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    heavy = [r for r in rows if r["summary"].count("#Person") >= 3]
    return sorted(heavy, key=lambda r: (len(r["dialogue"]) + 3 * len(r["summary"]), r["id"]))[:count]


SEED = str(load_params(REPO / "params.yaml").seeds[0])  # the default training seed


def run_args(variant: str) -> tuple[str, ...]:
    """A generate/evaluate stage's arguments: a trained method's seed, none for a baseline."""
    return (variant,) if variant in ("base", "lead") else (variant, SEED)


def run_path(variant: str) -> str:
    return variant if variant in ("base", "lead") else f"{variant}/seed{SEED}"


def run_stage(module: str, *args: str, cwd: Path) -> None:
    """Run a stage as DVC would (one torch thread: tests/conftest.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{module} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def memorized(tmp_path_factory) -> Path:
    require_shared()
    root = tmp_path_factory.mktemp("ceiling")
    model_dir = make_tiny_model(root / "tiny", "--tokenizer", str(FLAN_SMALL), "--width", str(WIDTH))
    work = root / "work"
    copy_project(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["model"]["name"] = str(model_dir)
    params["variants"] = [v for v in VARIANTS if v not in ("base", "lead")]  # against the untrained references
    params["baselines"] = [v for v in VARIANTS if v in ("base", "lead")]
    params["full"].update(FULL)  # each method's own section: its recipe, and LoRA's arguments
    params["lora"].update(LORA_TRAIN)
    params["lora"].update(LORA)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rows = speaker_heavy_dialogues(4)
    for split in ("train", "validation", "test"):  # the snapshot the data stage would write, overlap kept
        (work / "data" / "raw").mkdir(parents=True, exist_ok=True)
        (work / "data" / "raw" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for module, *args in (
        ("stages.base",),
        ("stages.lead",),
        ("stages.prepare",),
        ("stages.train", "full", SEED),
        ("stages.train", "lora", SEED),
        *(("stages.generate", *run_args(v)) for v in VARIANTS),
        *(("stages.evaluate", *run_args(v)) for v in VARIANTS),
        ("stages.report",),
    ):
        run_stage(module, *args, cwd=work)
    return work


def test_the_ceiling_test_uses_the_default_generation_params(memorized):
    # what the generate stage recorded it used, against what the committed params.yaml asks for
    committed = recorded_generation(generation_config(load_params(REPO / "params.yaml").generate))
    for variant in VARIANTS:
        used = json.loads((memorized / "metrics" / "generate" / f"{run_path(variant)}.json").read_text())
        assert {k: used[k] for k in committed} == committed, variant
    # the premise: some memorized summary repeats a 3-gram (FLAN-T5 splits "#Person1#" into 5
    # tokens), so a no_repeat_ngram_size of 3 could not write it back
    tokenizer = AutoTokenizer.from_pretrained(FLAN_SMALL)
    repeats = []
    for row in speaker_heavy_dialogues(4):
        ids = tokenizer(row["summary"])["input_ids"]
        trigrams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
        repeats.append(len(set(trigrams)) < len(trigrams))
    assert any(repeats)


def test_full_fine_tuning_reaches_the_ceiling(memorized):
    metrics = json.loads((memorized / "metrics" / "evaluate" / "full" / f"seed{SEED}.json").read_text())
    assert metrics["rougeL"] >= 90, metrics
    assert "| full fine-tuning" in (memorized / "metrics" / "report.md").read_text()


def test_lora_reaches_the_ceiling(memorized):
    metrics = json.loads((memorized / "metrics" / "evaluate" / "lora" / f"seed{SEED}.json").read_text())
    assert metrics["rougeL"] >= 90, metrics
    # under bf16 training (a GPU's default, and this CPU's where it runs bf16 natively) the frozen base
    # was bf16 (stages/training.py frozen_base_dtype): the ceiling covers that default where it can
    bf16 = use_bf16("auto", torch.device("cpu"))
    trained = json.loads((memorized / "metrics" / "train" / "lora" / f"seed{SEED}.json").read_text())
    assert trained["train_base_dtype"] == ("bf16" if bf16 else "fp32"), trained
    # the LoRA that reached it is the one LORA asks for: every linear layer and the head
    assert (trained["method_type"], trained["resolved_target_modules"]) == (
        "lora",
        ",".join(sorted(LORA["target_modules"])),
    )


def test_the_untrained_model_is_far_below_it(memorized):
    # the premise: the score comes from training, not from the data being easy to score
    assert json.loads((memorized / "metrics" / "evaluate" / "base.json").read_text())["rougeL"] < 30


# --------------------------------------------------------------------------- decoder-only

# A Llama-style tiny model (make_tiny_model.py, its own byte-level tokenizer: BOS, no pad token) at
# width 64 memorizes 8 short DialogSum-style pairs in 200 full-batch steps (tests/test_family.py
# measured full 98.9, LoRA 100 ROUGE-L in-process; here, through the real stages and the Trainer,
# both scored 100), at a constant rate (a linear decay to 0 would stop short of memorizing).
LLAMA_VARIANTS = ("full", "lora")
LLAMA_OVERFIT = {**OVERFIT, "batch_size": 8, "eval_batch_size": 8, "lr_scheduler": "constant"}
LLAMA_FULL = {**LLAMA_OVERFIT, "epochs": 200, "learning_rate": 3.0e-3}
LLAMA_LORA_TRAIN = {**LLAMA_OVERFIT, "epochs": 200, "learning_rate": 5.0e-3}
LLAMA_LORA = {
    "r": 32,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": MEMORIZATION_LORA_TARGETS,
}


@pytest.fixture(scope="module")
def memorized_llama(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ceiling_llama")
    model_dir = make_tiny_model(root / "tiny", "--family", "llama", "--width", "64")
    work = root / "work"
    copy_project(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["model"]["name"] = str(model_dir)
    params["variants"], params["baselines"] = list(LLAMA_VARIANTS), []
    params["full"].update(LLAMA_FULL)  # each method's own section: its recipe, and LoRA's arguments
    params["lora"].update(LLAMA_LORA_TRAIN)
    params["lora"].update(LLAMA_LORA)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rows = memorization_rows()
    # the snapshot the data stage would write, overlap kept; one validation row: the Trainer
    # evaluates every epoch, and 200 validation passes over all 8 would cost more than they show
    for split, split_rows in (("train", rows), ("validation", rows[:1]), ("test", rows)):
        (work / "data" / "raw").mkdir(parents=True, exist_ok=True)
        (work / "data" / "raw" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    for module, *args in (
        ("stages.base",),
        ("stages.prepare",),
        ("stages.train", "full", SEED),
        ("stages.train", "lora", SEED),
        *(("stages.generate", *run_args(v)) for v in LLAMA_VARIANTS),
        *(("stages.evaluate", *run_args(v)) for v in LLAMA_VARIANTS),
    ):
        run_stage(module, *args, cwd=work)
    return work


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_a_memorized_decoder_only_model_reaches_the_ceiling(memorized_llama, variant):
    committed = recorded_generation(generation_config(load_params(REPO / "params.yaml").generate))
    used = json.loads((memorized_llama / "metrics" / "generate" / f"{run_path(variant)}.json").read_text())
    assert {k: used[k] for k in committed} == committed  # the default generation params
    assert json.loads((memorized_llama / "metrics" / "base_model.json").read_text())["base_model_family"] == "causal"
    metrics = json.loads((memorized_llama / "metrics" / "evaluate" / f"{run_path(variant)}.json").read_text())
    assert metrics["rougeL"] >= 90, metrics
    predictions = (memorized_llama / "data" / "predictions" / f"{run_path(variant)}.jsonl").read_text().splitlines()
    assert not any("Summary:" in json.loads(row)["prediction"] for row in predictions)  # no prompt echoed
