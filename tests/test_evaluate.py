"""Evaluation: the lead baseline, and batched generation equal to one-at-a-time generation."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from stages.evaluate import generate_summaries, lead_summary
from stages.params import EvaluateParams, load_params
from tests.conftest import REPO, dialogsum_rows, write_jsonl


def evaluate_params(**overrides) -> EvaluateParams:
    """The committed evaluate params with `overrides` (the defaults are what users run)."""
    return dataclasses.replace(load_params(REPO / "params.yaml").evaluate, **overrides)


def test_lead_summary_takes_first_turns_without_speaker_tags():
    dialogue = "#Person1#: Hello there.\n#Person2#: Hi! How are you?\n\n#Person1#: Fine."
    assert lead_summary(dialogue, 2) == "Hello there. Hi! How are you?"
    assert lead_summary(dialogue, 10) == "Hello there. Hi! How are you? Fine."


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_sorted_generation_matches_per_example(tiny_model_dir, num_beams):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).eval()
    texts = ["hello", "how are you today my friend", "see you at the station tomorrow morning at nine",
             "thanks", "I would like to book a table for two people please"]
    input_ids = tokenizer(texts)["input_ids"]
    params = evaluate_params(batch_size=4, precision="fp32", num_beams=num_beams, max_new_tokens=8)
    batched = generate_summaries(model, tokenizer, input_ids, params)
    one_by_one = [generate_summaries(model, tokenizer, [ids], dataclasses.replace(params, batch_size=1))
                  for ids in input_ids]
    assert batched[0] == [s[0][0] for s in one_by_one]  # same summaries, in input order
    assert batched[1] == [s[1][0] for s in one_by_one]  # same generated lengths
    assert all(0 < n <= 8 for n in batched[1])


def run_stage_module(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir) -> Path:
    """A directory where the data and prepare stages have run on small local data."""
    root = tmp_path_factory.mktemp("evaluate")
    for split in ("train", "validation", "test"):
        write_jsonl(root / "source" / f"{split}.jsonl", dialogsum_rows(split, 6, references=3 if split == "test" else 1))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = str(tiny_model_dir)
    params["data"]["source"] = str(root / "source")
    params["evaluate"].update(num_beams=2, max_new_tokens=6, bootstrap_resamples=500)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage_module("stages.data", cwd=root)
    run_stage_module("stages.prepare", cwd=root)
    return root


@pytest.mark.parametrize("variant", ["base", "lead"])
def test_metrics_and_predictions_are_bit_identical_across_runs(workdir, variant):
    outputs = [workdir / "metrics" / "evaluate" / f"{variant}.json", workdir / "data" / "predictions" / f"{variant}.jsonl"]
    run_stage_module("stages.evaluate", variant, cwd=workdir)
    first = [p.read_bytes() for p in outputs]
    run_stage_module("stages.evaluate", variant, cwd=workdir)
    assert [p.read_bytes() for p in outputs] == first
    metrics = json.loads(first[0])
    assert metrics["dialogues"] == 6 and metrics["references"] == 18  # 18 rows, each dialogue generated once
    assert metrics["rougeL_ci_low"] <= metrics["rougeL"] <= metrics["rougeL_ci_high"]
    assert "generation_runtime_s" not in metrics  # timings live in metrics/timing/, apart from scores
    assert (workdir / "metrics" / "timing" / f"evaluate_{variant}.json").is_file()


def test_lead_baseline_scores_its_own_text(workdir):
    run_stage_module("stages.evaluate", "lead", cwd=workdir)
    first = json.loads((workdir / "data" / "predictions" / "lead.jsonl").read_text().splitlines()[0])
    assert first["prediction"] == "Hello, I would like to book table 0 for dinner. Sure, for how many people?"
    assert first["references"] == [f"Person1 books table 0 for dinner (version {r})." for r in range(3)]
    assert first["rouge1"] >= first["rouge1_mean_ref"] > 0


def test_unknown_variant_is_refused(workdir):
    result = subprocess.run([sys.executable, "-m", "stages.evaluate", "fulll"], cwd=workdir, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr == "error: unknown variant 'fulll'; expected one of base, full, lora, lead\n"


class OutOfMemoryAbove:
    """Stands in for a model on a small GPU: generate() raises CUDA OOM for batches above `limit`."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.device, self.batch_sizes = model, limit, model.device, []

    def generate(self, **inputs):
        self.batch_sizes.append(len(inputs["input_ids"]))
        if len(inputs["input_ids"]) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model.generate(**inputs)


def test_generation_halves_the_batch_on_out_of_memory(tiny_model_dir, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir).eval()
    input_ids = tokenizer(["hello", "how are you", "see you", "thanks", "a table for two"])["input_ids"]
    params = evaluate_params(batch_size=8, precision="fp32", num_beams=1, max_new_tokens=5)
    flaky = OutOfMemoryAbove(model, limit=2)
    summaries = generate_summaries(flaky, tokenizer, input_ids, params)
    assert summaries == generate_summaries(model, tokenizer, input_ids, params)
    assert flaky.batch_sizes == [5, 4, 2, 2, 1]  # 8 -> 4 -> 2, then the remaining dialogue
    assert "CUDA out of memory: retrying with evaluate.batch_size=2" in capsys.readouterr().err
