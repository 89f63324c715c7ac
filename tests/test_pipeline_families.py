"""End to end for every tested family but T5 (tests/test_pipeline.py has T5): BART, a Llama-style and
a GPT-2-style decoder-only model each run the whole pipeline (every variant in params.yaml) with a
real `dvc repro` in a temp git repo, with nothing but model.name changed from the smoke params.

One module fixture per family, kept small: 12 rows per split (4 test dialogues x 3 references),
1 epoch, 2 beams, 8 new tokens. The tiny models come from scripts/make_tiny_model.py with the
tokenizers it trains (the Llama and GPT-2 ones have no pad token, Llama's adds BOS).
Data: the smoke run's sample (scripts/make_sample_data.py), so it runs on any clone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_project, make_tiny_model
from tests.test_pipeline import (
    check_export_round_trip,
    git_commit,
    run,
    scoring_stages,
    smoke_params,
    stages_run,
    trained_stages,
)

COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text())
VARIANTS, TRAINED = tuple(COMMITTED["variants"]), tuple(COMMITTED["methods"])  # the committed lists
BASELINES, SEEDS = tuple(COMMITTED["baselines"]), tuple(COMMITTED["seeds"])  # one seed: the one-seed report
RUNS = (*(f"{v}/seed{s}" for v in VARIANTS for s in SEEDS), *BASELINES)
# family -> (make_tiny_model.py args, family recorded in metrics/base_model.json, LoRA's auto targets)
FAMILIES = {
    "bart": (["--family", "bart"], "seq2seq", "q_proj,v_proj"),
    "llama": (["--family", "llama"], "causal", "q_proj,v_proj"),
    "gpt2": (["--family", "gpt2"], "causal", "c_attn"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def reproduced(request, tmp_path_factory) -> tuple[str, Path]:
    """(family, repo) after a full `dvc repro` with model.name set to that family's tiny model."""
    name = request.param
    root = tmp_path_factory.mktemp(f"pipeline_{name}")
    model_dir = make_tiny_model(root / "tiny", *FAMILIES[name][0])
    repo = root / "repo"
    copy_project(repo)
    params = smoke_params(yaml.safe_load((repo / "params.yaml").read_text()), model_dir)
    # the smoke run's own sample (scripts/make_sample_data.py): no ../shared needed
    sample = root / "sample-data"
    run([sys.executable, str(REPO / "scripts" / "make_sample_data.py"), str(sample)], root)
    params["data"].update(source=str(sample), limit=12)
    # the committed methods (the curated peft methods run once, on T5, in tests/test_pipeline.py, and a
    # step, save and reload on Llama in tests/test_curated_methods.py)
    params["methods"], params["variants"], params["seeds"] = list(TRAINED), list(VARIANTS), list(SEEDS)
    params["generate"].update(max_new_tokens=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    git_commit(repo, "baseline")
    output = run(["dvc", "repro"], repo)
    assert stages_run(output) == {
        "data",
        "prepare",
        "base",
        "lead",
        "report",
        *trained_stages("train", TRAINED, SEEDS),
        *scoring_stages(VARIANTS, SEEDS, BASELINES),
    }
    return name, repo


def test_every_variant_generates_and_scores(reproduced):
    _, repo = reproduced
    for run_name in RUNS:
        rows = [
            json.loads(line) for line in (repo / "data" / "predictions" / f"{run_name}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 4  # one per unique test dialogue
        scores = json.loads((repo / "metrics" / "evaluate" / f"{run_name}.json").read_text())
        assert scores["dialogues"] == 4 and 0 <= scores["rougeL"] <= 100
    for variant in TRAINED:
        train = json.loads((repo / "metrics" / "train" / variant / f"seed{SEEDS[0]}.json").read_text())
        assert 0 < train["trainable_params"] <= train["total_params"]


def test_the_family_and_its_defaults_are_recorded(reproduced):
    name, repo = reproduced
    _, model_family, lora_targets = FAMILIES[name]
    base = json.loads((repo / "metrics" / "base_model.json").read_text())
    assert base["base_model_family"] == model_family
    trained = json.loads(
        (repo / "metrics" / "train" / "lora" / f"seed{SEEDS[0]}.json").read_text()
    )  # what `auto` resolved to
    assert (trained["resolved_target_modules"], trained["resolved_fan_in_fan_out"]) == (
        lora_targets,
        int(name == "gpt2"),
    )
    lora = json.loads((repo / "models" / "lora" / f"seed{SEEDS[0]}" / "adapter_config.json").read_text())
    assert sorted(lora["target_modules"]) == lora_targets.split(",")
    assert lora["fan_in_fan_out"] is (name == "gpt2")  # GPT-2's Conv1D stores weights transposed
    assert lora["task_type"] == ("SEQ_2_SEQ_LM" if model_family == "seq2seq" else "CAUSAL_LM")
    card = (repo / "models" / "lora" / f"seed{SEEDS[0]}" / "README.md").read_text()
    assert f"base_model: {repo.parent / 'tiny'}" in card and f"- {model_family}" in card and f"- {name}" in card
    assert "flan-t5" not in card.lower() and f"target_modules:\n  - {lora_targets.split(',')[0]}" in card


def test_the_report_names_the_model_that_ran(reproduced):
    _, repo = reproduced
    report = (repo / "metrics" / "report.md").read_text()
    assert report.startswith(f"# {repo.parent / 'tiny'} on ") and "FLAN-T5" not in report.splitlines()[0]
    # one seed (the default): the report says seed variance was not measured and how to measure it
    assert "**Seed variance was not measured**" in report and "dvc exp run -S 'seeds=[42,43,44]'" in report


def test_a_causal_prediction_never_contains_its_prompt(reproduced):
    name, repo = reproduced
    if FAMILIES[name][1] != "causal":
        pytest.skip("a seq2seq model's output never includes its input")
    for run_name in (*(f"{m}/seed{SEEDS[0]}" for m in TRAINED), "base"):
        for row in (repo / "data" / "predictions" / f"{run_name}.jsonl").read_text().splitlines():
            assert "Summarize the following conversation" not in json.loads(row)["prediction"]


def test_an_exported_lora_gives_generate_s_summaries_in_plain_transformers(reproduced, tmp_path):
    """The export round trip on this family (left padding and the prompt sliced off for decoder-only)."""
    _, repo = reproduced
    check_export_round_trip(repo, f"lora/seed{SEEDS[0]}", tmp_path)


def test_summarize_py_gives_generate_s_summaries(reproduced, tmp_path):
    """summarize.py on the test dialogues builds the prompts prepare built for this family (the template's
    boundary, the chat rule) and decodes as generate@ did: the same summaries."""
    _, repo = reproduced
    predictions = repo / "data" / "predictions" / "lora" / f"seed{SEEDS[0]}.jsonl"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("".join(json.dumps({"id": r["id"], "dialogue": r["dialogue"]}) + "\n" for r in rows))
    out = tmp_path / "summaries.jsonl"
    run(
        [
            sys.executable,
            "-m",
            "summarize",
            "--model",
            f"models/lora/seed{SEEDS[0]}",
            str(dialogues),
            "--output",
            str(out),
        ],
        repo,
    )
    summaries = {json.loads(line)["id"]: json.loads(line)["summary"] for line in out.read_text().splitlines()}
    assert summaries == {r["id"]: r["prediction"] for r in rows}
