"""scripts/tune.py on real queued DVC experiments in a temp repo: it picks by validation ROUGE-L and
never by test, even when the test scores point the other way."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_project, dialogsum_rows, load_script, write_jsonl
from tests.test_training import env, git_commit, run, set_params

# full fine-tuning of the tiny model, 30 rows x 10 epochs / 8 per step = 40 steps, validated twice
RECIPE = {
    "epochs": 10,
    "batch_size": 8,
    "eval_batch_size": 8,
    "save_steps": 20,
    "logging_steps": 20,
    "warmup_ratio": 0.0,
}
LEARNS, STALLS = (
    1.0e-2,
    1.0e-8,
)  # learning rates: one learns the summaries' template, one leaves the random model as it is


def plant_test_score(repo: Path, rouge_l: float) -> None:
    (repo / "metrics" / "evaluate" / "full").mkdir(parents=True, exist_ok=True)
    (repo / "metrics" / "evaluate" / "full" / "seed42.json").write_text(json.dumps({"rougeL": rouge_l}))


def queue(repo: Path, learning_rate: float, planted_test_rougeL: float) -> None:
    """Queue a train@full experiment whose test score is planted: the queue takes the workspace's
    edit of the committed metrics/evaluate/full/seed42.json along, and evaluate@full-42 does not run."""
    plant_test_score(repo, planted_test_rougeL)
    run(["dvc", "exp", "run", "--queue", "-S", f"full.learning_rate={learning_rate}", "train@full-42"], repo)


def test_tune_picks_by_validation_never_by_test(tmp_path, tiny_model_dir):
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / "source" / f"{split}.jsonl", dialogsum_rows(split, 30 if split == "train" else 4))
    repo = tmp_path / "repo"
    copy_project(repo)
    set_params(
        repo,
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {"source": str(tmp_path / "source")},
            "train": RECIPE,  # the shared recipe, which full fine-tuning runs as is...
            # ...but for the rate the grid varies in full's own section (`-S full.learning_rate=` needs the key)
            "full": {"learning_rate": 1.0e-4},
            "validate": {"dialogues": 4, "max_new_tokens": 16, "batch_size": 4},
        },
    )
    run(["git", "init", "-q"], repo)
    run(["dvc", "repro", "prepare"], repo)  # and base, which pins the model
    plant_test_score(repo, 50.0)  # committed, so each queued experiment takes its edited copy along
    git_commit(repo, "prepared")

    # test scores planted to disagree with what validation will say
    queue(repo, LEARNS, planted_test_rougeL=1.0)
    queue(repo, STALLS, planted_test_rougeL=99.0)
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "queue", "start", "--jobs", "1"], repo)
    deadline = time.monotonic() + 600
    while re.search(r"\b(Queued|Running)\b", run(["dvc", "queue", "status"], repo).stdout):
        assert time.monotonic() < deadline, "queued experiments did not finish in 600 s"
        time.sleep(2)
    assert run(["dvc", "queue", "status"], repo).stdout.count("Success") == 2

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    runs = {}
    for experiment in next(r for r in shown if r["rev"] != "workspace")["experiments"]:
        data = experiment["revs"][0]["data"]
        lr = data["params"]["params.yaml"]["data"]["full"]["learning_rate"]
        runs[lr] = (
            data["metrics"]["metrics/train/full/seed42.json"]["data"]["selected_val_rougeL"],
            data["metrics"]["metrics/evaluate/full/seed42.json"]["data"]["rougeL"],
        )
    # the premises: validation prefers the rate that learns, the planted test scores the other one
    assert runs[LEARNS][0] > runs[STALLS][0] and runs[LEARNS][1] < runs[STALLS][1]

    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "tune.py"), "--methods", "full"],
        cwd=repo,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    tuning = json.loads((repo / "metrics" / "tuning.json").read_text())
    assert tuning["test_used"] is False
    full = tuning["methods"]["full"]
    assert full["settings"] == {"full.learning_rate": LEARNS}
    assert full["grid"] == {"full.learning_rate": [STALLS, LEARNS]}
    assert full["validation_rougeL"] == runs[LEARNS][0] and full["runs_compared"] == 2
    # the pipeline run it proposes sets the picked value so that YAML reads it back as a float
    command = result.stdout.strip().splitlines()[-1]
    assert command == "dvc exp run -S ++full.learning_rate=0.01"


def test_a_small_learning_rate_set_by_dvc_loads_as_a_number(tmp_path):
    # `dvc exp run -S` writes params.yaml through ruamel (YAML 1.2): 1.0e-5 becomes `1e-05`, which
    # PyYAML alone reads as a string; a learning-rate grid must not fail on it
    from dvc.utils.hydra import apply_overrides

    from stages.params import load_params

    params_file = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", params_file)
    apply_overrides(str(params_file), ["lora.learning_rate=1.0e-5"])
    assert "learning_rate: 1e-05" in params_file.read_text()
    assert load_params(params_file).recipe("lora").learning_rate == 1.0e-5


def test_picked_values_are_written_as_yaml_reads_them_back():
    tune = load_script("tune")
    for value in (1.0e-8, 3.0e-4, 0.3, 16, ["q", "v"], "all-linear"):
        assert yaml.safe_load(f"x: {tune.yaml_value(value)}")["x"] == value


def test_runs_that_differ_in_a_shared_param_are_refused_with_what_differs():
    """A grid whose runs validated on different subsets (or other data, model, seed) cannot be ranked
    by validation ROUGE-L: tune.py names the differing params instead of picking."""
    tune = load_script("tune")
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def row(name: str, rouge_l: float, **changes) -> dict:
        changed = json.loads(json.dumps(params))
        for key, value in changes.items():
            section, field = key.split("__")
            changed[section][field] = value
        return {
            "name": name,
            "rev": name,
            "params": changed,
            "metrics": {"metrics/train/lora/seed42.json": {tune.METRIC: rouge_l}},
        }

    comparable = [row("a", 30.0), row("b", 35.0, lora__learning_rate=3.0e-3)]
    assert tune.pick(comparable, "lora", 42)["settings"] == {"lora.learning_rate": 3.0e-3}
    mixed = [*comparable, row("c", 40.0, validate__dialogues=10)]
    with pytest.raises(SystemExit) as refused:
        tune.pick(mixed, "lora", 42)
    assert str(refused.value) == (
        f"lora: the runs differ in params every method shares, so their validation ROUGE-L does not compare: "
        f"validate.dialogues in [10, {params['validate']['dialogues']}]. Compare runs that differ only in "
        "lora.* (`dvc exp remove` the others, or pass --methods without this one)."
    )


def test_an_experiment_that_did_not_retrain_a_method_is_not_its_trial():
    """Every experiment carries a copy of every method's metrics; one that changed only LoRA did not
    train full fine-tuning again, so full fine-tuning counts one run, LoRA two."""
    tune = load_script("tune")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    lora_grid = json.loads(json.dumps(params))
    lora_grid["lora"]["learning_rate"] = 3.0e-3
    metrics = {
        "metrics/train/full/seed42.json": {tune.METRIC: 30.0},
        "metrics/train/lora/seed42.json": {tune.METRIC: 31.0},
    }
    rows = [
        {"name": "baseline", "rev": "a", "params": params, "metrics": metrics},
        {
            "name": "lora-lr",
            "rev": "b",
            "params": lora_grid,
            "metrics": {**metrics, "metrics/train/lora/seed42.json": {tune.METRIC: 33.0}},
        },
        {"name": "rerun", "rev": "c", "params": params, "metrics": metrics},  # the baseline's settings again
    ]
    assert tune.pick(rows, "full", 42)["runs_compared"] == 1
    lora = tune.pick(rows, "lora", 42)
    assert (lora["runs_compared"], lora["experiment"], lora["settings"]) == (
        2,
        "lora-lr",
        {"lora.learning_rate": 3.0e-3},
    )


def test_a_recipe_key_one_run_inherits_compares_by_its_value():
    """One run sets lora.warmup_ratio in LoRA's section, the other inherits train.warmup_ratio: the grid
    shows both values (never None), and a pick of the inheriting run sets the inherited value."""
    tune = load_script("tune")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    warm = json.loads(json.dumps(params))
    warm["lora"]["warmup_ratio"] = 0.1
    rows = [
        {
            "name": "baseline",
            "rev": "a",
            "params": params,
            "metrics": {"metrics/train/lora/seed42.json": {tune.METRIC: 35.0}},
        },
        {
            "name": "warm",
            "rev": "b",
            "params": warm,
            "metrics": {"metrics/train/lora/seed42.json": {tune.METRIC: 30.0}},
        },
    ]
    picked = tune.pick(rows, "lora", 42)
    inherited = params["train"]["warmup_ratio"]
    assert picked["grid"] == {"lora.warmup_ratio": sorted([inherited, 0.1])}
    assert picked["settings"] == {"lora.warmup_ratio": inherited}
    assert tune.run_command({"methods": {"lora": picked}}) == [
        "dvc",
        "exp",
        "run",
        "-S",
        f"++lora.warmup_ratio={inherited}",
    ]
