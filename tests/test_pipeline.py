"""End to end: the real DVC pipeline on a tiny model and a slice of the real DialogSum.

Copies the repo into a temp git repo, runs `dvc repro`, checks every declared output, commits,
runs `dvc exp run -S lora.r=16` and asserts from DVC's own output which stages ran.
Needs ../shared (real data and the FLAN-T5 tokenizer): runs in CI, skips elsewhere.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import DIALOGSUM, FLAN_SMALL, REPO, copy_project, make_tiny_model, require_shared

COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text())
# The smoke pipeline trains the committed methods and the curated peft methods by name: seven methods,
# six distinct peft types besides full fine-tuning (LoRA, IA3, prompt tuning, prefix tuning, LoHa, VeRA)
CURATED = ("prefix", "loha", "vera")
TRAINED = (*COMMITTED["methods"], *CURATED)
BASELINES = ("base", "lead")
SEEDS = (42, 43)  # two training seeds: every trained method runs twice, the report aggregates them
RUNS = (*(f"{m}/seed{s}" for m in TRAINED for s in SEEDS), *BASELINES)  # stages/runs.py's names
ROUGE_KEYS = {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def run(args: list[str], cwd: Path) -> str:
    """Run a command with this interpreter's bin dir first on PATH (DVC's `python` is ours)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def run_json(args: list[str], cwd: Path):
    """A DVC command's --json output (stdout only: DVC writes notes to stderr)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty"], repo)


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def trained_stages(stage: str, methods=TRAINED, seeds=SEEDS) -> set[str]:
    """`train@lora-42` ...: a matrix stage per method and seed."""
    return {f"{stage}@{m}-{s}" for m in methods for s in seeds}


def scoring_stages(methods=TRAINED, seeds=SEEDS, baselines=BASELINES, stages=("generate", "evaluate")) -> set[str]:
    return {
        *(n for stage in stages for n in trained_stages(stage, methods, seeds)),
        *(f"{stage}_baseline@{b}" for stage in stages for b in baselines),
    }


def smoke_params(raw: dict, model_dir: Path) -> dict:
    """The documented offline smoke run: tiny model, a slice of DialogSum, 1 short epoch."""
    raw["model"]["name"] = str(model_dir)
    raw["data"].update(source=str(DIALOGSUM), limit=24)  # 24 rows per split; test = 8 dialogues x 3
    raw["methods"], raw["variants"], raw["seeds"] = list(TRAINED), list(TRAINED), list(SEEDS)
    # the shared recipe, so every method: 24 rows / (4 x 2 per step) = 3 steps
    raw["train"].update(epochs=1, batch_size=4, gradient_accumulation_steps=2, eval_batch_size=8, dataloader_workers=0)
    # logging_steps stays 50: a run shorter than that must still write its curves
    raw["generate"].update(batch_size=8, num_beams=2, max_new_tokens=12)
    raw["validate"].update(dialogues=4, max_new_tokens=12)  # validation by generation on a few dialogues
    raw["evaluate"].update(bootstrap_resamples=200)
    return raw


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    require_shared()
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = make_tiny_model(root / "tiny", "--tokenizer", str(FLAN_SMALL))
    repo = root / "repo"
    copy_project(repo)
    params = smoke_params(yaml.safe_load((repo / "params.yaml").read_text()), model_dir)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    git_commit(repo, "baseline")
    return repo


@pytest.fixture(scope="module")
def reproduced(pipeline_repo) -> str:
    return run(["dvc", "repro"], pipeline_repo)


def test_repro_runs_every_stage(reproduced):
    # a first `dvc repro` in a fresh repo (the README's smoke run) does not open with DVC's 25
    # "No file hash info found" warnings (`dvc exp run` in a fresh clone does)
    assert "No file hash info found" not in reproduced
    assert stages_run(reproduced) == {
        "data",
        "prepare",
        "base",
        "lead",
        "report",
        *trained_stages("train"),
        *scoring_stages(),
    }


def test_declared_outputs_exist(pipeline_repo, reproduced):
    repo = pipeline_repo
    for split in ("train", "validation", "test"):
        assert (repo / "data" / "raw" / f"{split}.jsonl").is_file()
    assert (repo / "data" / "prepared" / "dataset_dict.json").is_file()
    assert {p.name for p in (repo / "models" / "full" / "seed42").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert json.loads((repo / "models" / "full" / "seed43" / "config.json").read_text())["tie_word_embeddings"] is False
    assert {p.name for p in (repo / "models" / "lora" / "seed43").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert not (repo / "models" / "lora" / "seed42" / "model.safetensors").exists()  # adapter only
    for run_name in RUNS:
        lines = (repo / "data" / "predictions" / f"{run_name}.jsonl").read_text().splitlines()
        assert len(lines) == 8  # one per unique test dialogue, not per reference row
        assert "generation_runtime_s" in json.loads(
            (repo / "metrics" / "timing" / "generate" / f"{run_name}.json").read_text()
        )
    # the title names the model and data that ran (here the tiny model and the local DialogSum copy)
    assert (repo / "metrics" / "report.md").read_text().startswith(f"# {repo.parent / 'tiny'} on {DIALOGSUM}: ")
    assert len((repo / "data" / "per_dialogue.jsonl").read_text().splitlines()) == 8


def test_metric_files_have_the_expected_keys(pipeline_repo, reproduced):
    metrics = pipeline_repo / "metrics"
    assert json.loads((metrics / "data.json").read_text())["test_rows"] == 24
    prepared = json.loads((metrics / "prepare.json").read_text())
    assert prepared["test_dialogues"] == 8 and prepared["test_references"] == 24
    assert {"train_dialogue_cut", "train_target_truncated", "test_dialogue_cut"} <= set(prepared)
    for method in ("full/seed42", "lora/seed43"):
        train = json.loads((metrics / "train" / f"{method}.json").read_text())
        assert {"trainable_params", "total_params", "train_loss", "eval_loss", "batch_per_step"} <= set(train)
        # validated by generation on 4 dialogues at the run's one evaluation (its last step), which is the one kept
        assert train["validation_dialogues"] == 4 and train["evaluations"] == 1
        assert train["selected_step"] == train["train_steps"] and 0 <= train["selected_val_rougeL"] <= 100
        costs = json.loads((metrics / "timing" / "train" / f"{method}.json").read_text())
        assert {"train_runtime_s", "train_samples_per_second", "peak_rss_mb"} <= set(costs)
        # train time is the optimizer loop: the whole train() call less its validations; the save apart
        assert costs["validation_runtime_s"] > 0 and costs["save_runtime_s"] > 0
        assert costs["train_runtime_s"] + costs["validation_runtime_s"] == pytest.approx(
            costs["run_runtime_s"], abs=0.02
        )
        # the logged train loss is per token like eval_loss, not multiplied by accumulation steps
        assert train["train_loss_mean"] < 1.3 * train["eval_loss"]
    full, lora = (json.loads((metrics / "train" / m / "seed42.json").read_text()) for m in ("full", "lora"))
    assert full["trainable_params"] == full["total_params"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 10
    for run_name in RUNS:
        scores = json.loads((metrics / "evaluate" / f"{run_name}.json").read_text())
        assert ROUGE_KEYS <= set(scores) and {f"{k}_mean_ref" for k in ROUGE_KEYS} <= set(scores)
        assert scores["dialogues"] == 8 and scores["references"] == 24
        assert all(0 <= scores[k] <= 100 for k in ROUGE_KEYS)


def test_report_states_significance_in_words(pipeline_repo, reproduced):
    report = (pipeline_repo / "metrics" / "report.md").read_text()
    for heading in (
        "## Multi-reference ROUGE",
        "## Mean over references",
        "## Verdict",
        "## 95% confidence intervals",
        "## Paired tests on ROUGE-L",
        "## Generation diagnostics",
        "## Examples",
    ):
        assert heading in report
    assert re.search(r"- \*\*full fine-tuning\*\* (is significantly (better|worse) than|vs) \*\*original", report)
    assert "| lead baseline" in report
    # the verdict comes first, one sentence per trained method, over both seeds
    assert report.index("## Verdict") < report.index("## Quality and cost")
    verdict = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "- **LoRA**: " in verdict and "ROUGE-L vs full fine-tuning (95% CI " in verdict
    assert "2 seeds x 8 dialogues" in verdict and "of full fine-tuning's trainable params" in verdict
    assert "Every trained method ran under 2 training seeds (42, 43)" in verdict
    # per method: the mean over seeds, each seed's score and their standard deviation
    intervals = report.split("## 95% confidence intervals", 1)[1].split("\n## ", 1)[0]
    lora = next(line for line in intervals.splitlines() if line.startswith("| LoRA "))
    cells = [c.strip() for c in lora.strip("|").split("|")]
    assert cells[5] == "2" and len(cells[6].split(", ")) == 2 and re.fullmatch(r"\d+\.\d\d", cells[7])
    per_seed = [
        json.loads((pipeline_repo / "metrics" / "evaluate" / "lora" / f"seed{s}.json").read_text()) for s in SEEDS
    ]
    assert float(cells[3].split(" [")[0]) == pytest.approx(sum(e["rougeL"] for e in per_seed) / 2, abs=0.006)


def test_dvc_plots_render_rouge_by_variant(pipeline_repo, reproduced):
    shown = run_json(["dvc", "plots", "show", "--json"], pipeline_repo)["data"]
    values = shown["rouge_by_variant"][0]["content"]["data"]["values"]
    assert [v["variant"] for v in values] == [*BASELINES, *TRAINED] and all("rougeL" in v for v in values)
    # validation ROUGE-L per step, one series per trained method and seed, named as the report names it
    validation = shown["metrics/plots/validation_rougeL.json"][0]["content"]["data"]["values"]
    methods = ["full fine-tuning", "LoRA", "IA3", "prompt tuning", "prefix tuning", "LoHa", "VeRA"]
    labels = [f"{m} seed {s}" for m in methods for s in SEEDS]
    assert list(dict.fromkeys(v["method"] for v in validation)) == labels
    assert [v["place"] for v in validation] == list(range(len(labels)))  # one validation each: the last step
    assert all(v["step"] == 3 and 0 <= v["rougeL"] <= 100 for v in validation)
    losses = shown["metrics/plots/training_loss.json"][0]["content"]["data"]["values"]
    assert {(v["method"], v["curve"]) for v in losses} == {(m, c) for m in labels for c in ("train", "validation")}
    rates = shown["metrics/plots/learning_rate.json"][0]["content"]["data"]["values"]
    assert [v["method"] for v in rates] == labels


def test_editing_local_data_reruns_the_data_stage_and_only_what_the_snapshot_changes(pipeline_repo, reproduced):
    repo, source = pipeline_repo, pipeline_repo / "data" / "source"
    for split in ("train", "validation", "test"):
        shutil.copy2(DIALOGSUM / f"{split}.jsonl", source / f"{split}.jsonl")
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["data"]["source"] = "data/source"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        # the same rows from another path: the data stage reruns (its param changed) and writes the
        # same snapshot, so nothing downstream but the report, whose title names the source
        assert stages_run(run(["dvc", "repro"], repo)) == {"data", "report"}
        # an edit outside the snapshot (a test dialogue past data.limit): the data stage only
        test_file = source / "test.jsonl"
        lines = test_file.read_text().splitlines(keepends=True)
        test_file.write_text("".join(lines[:-1]) + lines[-1].replace('"summary": "', '"summary": "Edited: ', 1))
        assert stages_run(run(["dvc", "repro"], repo)) == {"data"}
        # an edit inside the snapshot, to a test reference: prepare rewrites the references only, so
        # everything is rescored and nothing retrained or regenerated (generation never reads references)
        test_file.write_text(lines[0].replace('"summary": "', '"summary": "Edited: ', 1) + "".join(lines[1:]))
        assert stages_run(run(["dvc", "repro"], repo)) == {
            "data",
            "prepare",
            *scoring_stages(stages=("evaluate",)),
            "report",
        }
    finally:
        params_file.write_text(original)
        for split in ("train", "validation", "test"):
            (source / f"{split}.jsonl").unlink()
    run(["dvc", "repro"], repo)  # back to the committed snapshot (the rescoring comes from DVC's run cache)
    assert stages_run(run(["dvc", "repro", "--dry"], repo)) == set()


def test_frontier_plot_renders_every_trained_variant(pipeline_repo, reproduced):
    shown = run_json(["dvc", "plots", "show", "--json"], pipeline_repo)
    assert not shown.get("errors"), shown["errors"]  # every declared plot loads after a full run
    values = shown["data"]["frontier"][0]["content"]["data"]["values"]
    # the zero-cost variants take part too (reference lines in the plot, points in the dominance check)
    assert {v["variant"] for v in values if not v["zero_cost"]} == set(TRAINED)
    assert {v["variant"] for v in values if v["zero_cost"]} == set(BASELINES)
    assert all(v["rougeL_ci_low"] <= v["rougeL"] <= v["rougeL_ci_high"] for v in values)
    # each seed's own point rides along with the trained variants' means
    assert all(len(v["seed_rougeL"]) == (1 if v["zero_cost"] else 2) for v in values)
    assert {v["pareto"] for v in values} <= {"Pareto-optimal", "dominated"} and "Pareto-optimal" in {
        v["pareto"] for v in values
    }
    report = (pipeline_repo / "metrics" / "report.md").read_text()
    assert "## Quality and cost" in report and all(f"| {label} " in report for label in ("LoRA", "full fine-tuning"))
    # the cost rows carry the dtype each trained method's base weights were held in (the runs table shows it)
    for method in TRAINED:
        trained = json.loads((pipeline_repo / "metrics" / "train" / method / "seed42.json").read_text())
        cost = json.loads((pipeline_repo / "metrics" / "cost" / method / "seed42.json").read_text())
        assert cost["train_base_dtype"] == trained["train_base_dtype"]
    assert "base weights held in" in report


def test_noop_repro_runs_nothing(pipeline_repo, reproduced):
    assert stages_run(run(["dvc", "repro"], pipeline_repo)) == set()


def test_a_subset_of_variants_runs_only_what_it_needs(pipeline_repo, reproduced):
    # `-S 'variants=[lora]' report`: forced, the report's upstream is exactly LoRA's runs and the baselines
    params_file = pipeline_repo / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["variants"] = ["lora"]
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        planned = stages_run(run(["dvc", "repro", "--dry", "--force", "report"], pipeline_repo))
    finally:
        params_file.write_text(original)
    assert planned == {
        "data",
        "prepare",
        "base",
        "lead",
        "report",
        *trained_stages("train", ["lora"]),
        *scoring_stages(["lora"]),
    }


@contextlib.contextmanager
def edited_params(repo: Path, key: str, value):
    """params.yaml with `key` (dotted: section.key, or a top-level key) set to `value`, then as it was."""
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        *sections, name = key.split(".")
        functools.reduce(lambda node, section: node[section], sections, params)[name] = value
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        yield
    finally:
        params_file.write_text(original)


def dry_run_with(repo: Path, section: str, key: str, value) -> set[str]:
    """Stages `dvc repro --dry` would run after setting params.yaml's section.key = value."""
    with edited_params(repo, f"{section}.{key}", value):
        return stages_run(run(["dvc", "repro", "--dry"], repo))


def test_prompt_change_does_not_refetch_but_data_change_does(pipeline_repo, reproduced):
    prompt_change = dry_run_with(pipeline_repo, "prepare", "prompt_template", "Summarize: {dialogue}")
    assert "prepare" in prompt_change and "data" not in prompt_change
    assert "data" in dry_run_with(pipeline_repo, "data", "limit", 12)
    assert dry_run_with(pipeline_repo, "report", "examples", 1) == {"report"}


def test_attention_implementation_reruns_what_runs_the_model_not_the_pin_or_tokenization(pipeline_repo, reproduced):
    planned = dry_run_with(pipeline_repo, "model", "attn_implementation", "eager")
    assert planned == {*trained_stages("train"), *scoring_stages(stages=("generate",))}


def test_training_curves_and_model_cards(pipeline_repo, reproduced):
    repo = pipeline_repo
    for method in (f"{m}/seed{s}" for m in TRAINED for s in SEEDS):
        rows = (repo / "dvclive" / method / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
        # 24 rows / (4 x 2 per step) = 3 steps, fewer than logging_steps: the last step is logged anyway
        step = rows[0].split("\t").index("step")
        assert "loss" in rows[0].split("\t") and [r.split("\t")[step] for r in rows[1:]] == ["3"]
        assert (repo / "dvclive" / method / "plots" / "metrics" / "eval" / "loss.tsv").is_file()
    shown = run_json(["dvc", "plots", "show", "--json"], repo)
    assert set(shown["data"]) == {
        "metrics/plots/training_loss.json",
        "metrics/plots/learning_rate.json",
        "metrics/plots/validation_rougeL.json",
        "rouge_by_variant",
        "frontier",
    }
    assert not shown.get("errors"), shown["errors"]  # every declared curve file exists
    assert (repo / "dvc.yaml").read_text() == (REPO / "dvc.yaml").read_text()  # DVCLive left it alone
    full_card, lora_card = ((repo / "models" / v / "seed42" / "README.md").read_text() for v in ("full", "lora"))
    assert full_card.startswith("---\nbase_model: ") and "library_name: transformers" in full_card
    pin = json.loads((repo / "models" / "base" / "pin.json").read_text())
    assert pin["resolved_revision"].startswith("sha256:")  # a local model directory: a content hash
    assert f"resolved commit `{pin['resolved_revision']}`" in full_card and pin["resolved_revision"] in lora_card
    assert "library_name: peft" in lora_card and "r: 32" in lora_card and "| `eval_loss` |" in lora_card


def test_remote_push_clone_pull_is_clean(pipeline_repo, reproduced, tmp_path):
    repo = pipeline_repo
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    git_commit(repo, "reproduced, with a remote")
    run(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert (clone / "models" / "full" / "seed43" / "model.safetensors").is_file()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone)
    assert stages_run(run(["dvc", "repro"], clone)) == set()


def test_lora_experiment_reruns_exactly_its_stages(pipeline_repo, reproduced):
    repo = pipeline_repo
    git_commit(repo, "reproduced")
    output = run(["dvc", "exp", "run", "-S", "lora.r=16"], repo)
    lora = {"lora"}
    assert stages_run(output) == {*trained_stages("train", lora), *scoring_stages(lora, baselines=()), "report"}

    diff = run_json(["dvc", "metrics", "diff", "--json"], repo)
    trainable = diff["metrics/train/lora/seed42.json"]["trainable_params"]
    assert trainable["new"] * 2 == trainable["old"]  # rank 32 -> 16 halves the adapter
    assert "metrics/evaluate/full/seed42.json" not in diff  # untouched variants show no change
    # a random tiny model may score the same after the change, so ask for unchanged rows too
    rouge = run_json(["dvc", "metrics", "diff", "--all", "--json"], repo)["metrics/evaluate/lora/seed43.json"]
    assert ROUGE_KEYS <= set(rouge) and {"old", "new"} <= set(rouge["rougeL"])
    params_diff = run_json(["dvc", "params", "diff", "--json"], repo)
    assert params_diff["params.yaml"]["lora.r"] == {"old": 32, "new": 16, "diff": -16}

    shown = run_json(["dvc", "exp", "show", "--json"], repo)
    text = json.dumps(shown)
    assert "metrics/evaluate/lora/seed42.json" in text and '"rougeL"' in text


def test_adding_a_seed_runs_only_that_seed_and_dropping_one_only_the_report(pipeline_repo, reproduced):
    for seeds, expected in (
        ([*SEEDS, 44], {*trained_stages("train", seeds=[44]), *scoring_stages(seeds=[44], baselines=()), "report"}),
        ([SEEDS[0]], {"report"}),  # the dropped seed's stages leave dvc.yaml; the report re-aggregates
    ):
        with edited_params(pipeline_repo, "seeds", seeds):
            # `dvc status` (a dry run would stop at generate@*-44, whose model does not exist yet) names
            # every stage that would run: new, with changed deps, or with changed params
            assert set(run_json(["dvc", "status", "--json"], pipeline_repo)) == expected, seeds


def test_statistics_change_reruns_no_generation_and_no_training(pipeline_repo, reproduced):
    # what a statistics param reaches: the scoring stages and the report read it, nothing upstream;
    # evaluate@'s outs feed only the report, so `dvc status` names everything that would rerun
    with edited_params(pipeline_repo, "evaluate.bootstrap_resamples", 300):
        changed = set(run_json(["dvc", "status", "--json"], pipeline_repo))
    assert scoring_stages(stages=("evaluate",)) <= changed <= {"report", *scoring_stages(stages=("evaluate",))}


@pytest.mark.parametrize(
    ("method", "key", "value"),
    [
        ("ia3", "target_modules", ["k", "v", "o", "wo"]),
        ("prompt", "num_virtual_tokens", 10),
        ("loha", "r", 4),  # a peft method by name: its arguments are its section's too
        ("full", "learning_rate", 3.0e-4),  # a recipe difference in a method's section: that method only
    ],
)
def test_each_method_change_touches_its_own_training_stage_only(pipeline_repo, reproduced, method, key, value):
    # a dry run lists the stages whose own dependencies changed; what follows them (generate@, evaluate@
    # and the report for that method) is the graph, run for real in test_lora_experiment_reruns_exactly_its_stages
    assert dry_run_with(pipeline_repo, method, key, value) == trained_stages("train", [method])


def test_lead_turns_change_reruns_the_lead_variant_only(pipeline_repo, reproduced):
    # the lead rule has its own stage: the base model's pin is not re-resolved (a moved Hub branch
    # would otherwise re-pin and retrain everything)
    git_commit(pipeline_repo, "before a lead change")
    output = run(["dvc", "exp", "run", "-S", "lead.turns=3"], pipeline_repo)
    assert stages_run(output) == {"lead", "generate_baseline@lead", "evaluate_baseline@lead", "report"}


def test_training_only_prepare_change_regenerates_no_untrained_variant(pipeline_repo, reproduced):
    # max_target_length truncates training labels only: prepare reruns and writes a byte-identical
    # test split, so the original model and the lead rule are not regenerated (hours on a GPU);
    # every training stage reruns. prepare runs for real (the test split's hash is its output), then
    # `dvc status` names the stages whose own dependencies changed: what `dvc repro` would run next
    # (downstream of those, generate@<trained>, evaluate@ and the report follow from the graph)
    params_file = pipeline_repo / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["prepare"]["max_target_length"] = 8
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert stages_run(run(["dvc", "repro", "prepare"], pipeline_repo)) == {"prepare"}
        changed = set(run_json(["dvc", "status", "--json"], pipeline_repo))
    finally:
        params_file.write_text(original)
        run(["dvc", "repro", "prepare"], pipeline_repo)  # the reproduced state back (DVC's run cache)
    assert changed == trained_stages("train")
    assert "Data and pipelines are up to date" in run(["dvc", "status"], pipeline_repo)


def module_file(name: str) -> Path | None:
    """stages/<name>.py, or a package's __init__.py (name dotted below stages: methods.plan)."""
    path = REPO / "stages" / name.replace(".", "/")
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.is_file()), None)


def stage_imports(module: str) -> set[Path]:
    """The stages/ files `module` imports, at the top or inside a function, and theirs in turn."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stages":
                package = node.module.removeprefix("stages").removeprefix(".")
                # `from stages import family` / `from stages.methods import lora`: submodules, or names in a module
                todo += [
                    f"{package}.{a.name}".lstrip(".")
                    for a in node.names
                    if module_file(f"{package}.{a.name}".lstrip("."))
                ]
                todo.append(package)
            elif isinstance(node, ast.Import):
                todo += [a.name.removeprefix("stages.") for a in node.names if a.name.startswith("stages.")]
    return seen


def test_every_stage_lists_the_modules_it_imports_as_deps():
    """Editing a module must rerun every stage that runs it: dvc.yaml lists each stages/ module a
    stage's command imports, directly or through another module (a training stage's launcher execs
    stages.train), or a folder holding it, and the package's __init__.py that every stage imports first."""
    missing = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        modules = set().union(*(stage_imports(m) for m in re.findall(r"stages\.(\w+)", body["cmd"])))
        if REPO / "stages" / "launch.py" in modules:
            modules |= stage_imports("train")
        needed = {str(m.relative_to(REPO)) for m in modules} | {"stages/__init__.py"}
        deps = {dep if isinstance(dep, str) else next(iter(dep)) for dep in body["deps"]}
        uncovered = {n for n in needed if not any(n == d or n.startswith(d.rstrip("/") + "/") for d in deps)}
        if uncovered:
            missing[name] = sorted(uncovered)
    assert missing == {}
    assert "stages/methods/peft_any.py" in {str(m.relative_to(REPO)) for m in stage_imports("train")}


@pytest.mark.parametrize(("family", "heading"), [("t5", "## Offline smoke run"), ("llama", "decoder-only smoke run")])
def test_the_smoke_benchmark_runs_the_readme_s_commands(family, heading):
    """The README's smoke-run timings come from benchmarks/smoke_run.sh: it must run what the README
    tells a new user to run (each command line of the README's block, with its model directory)."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(heading) :].split("```bash\n", 1)[1].split("```", 1)[0]
    model = f"/tmp/tiny-{family}"
    script = (REPO / "benchmarks" / "smoke_run.sh").read_text().replace("model.name=$model", f"model.name={model}")
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert "dvc repro" in lines and "dvc repro" in script
    commands = [line for line in lines if line not in ("dvc repro", "git checkout params.yaml")]
    assert len(commands) == 5 and all(command in script for command in commands), commands


def test_adding_a_method_by_the_readme_s_steps_gets_its_row_in_the_report(pipeline_repo, reproduced):
    """README "Adding a method", followed as written: its params section, then its command block."""
    repo, readme = pipeline_repo, (REPO / "README.md").read_text()
    steps = readme[readme.index("### Adding a method") :].split("\n## ", 1)[0]
    section = steps.split("```yaml\n", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in steps.split("```bash\n", 1)[1].split("```", 1)[0].splitlines() if line.strip()]
    name = next(iter(yaml.safe_load(textwrap.dedent(section))))
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    try:
        params_file.write_text(original + "\n" + textwrap.dedent(section))
        output = "".join(run(shlex.split(command), repo) for command in commands)
        # only the new method's stages and the report run (the other methods come as they were)
        assert {s for s in stages_run(output) if s != "report"} == {
            *trained_stages("train", [name]),
            *scoring_stages([name], baselines=()),
        }
        label = "LoKr"
        report = (repo / "metrics" / "report.md").read_text()
        assert report.count(f"| {label} ") >= 5  # a row in the cost, ROUGE, interval, diagnostics and runs tables
        assert f"**{label}** vs **full fine-tuning**" in report or f"**{label}** is significantly" in report
        frontier = json.loads((repo / "metrics" / "frontier.json").read_text())
        assert {row["variant"]: row["label"] for row in frontier}[name] == label
        train = json.loads((repo / "metrics" / "train" / name / "seed42.json").read_text())
        assert train["method_type"] == "lokr" and train["resolved_target_modules"] == "q,v"
        assert (repo / "models" / name / "seed43" / "adapter_config.json").is_file()
    finally:
        params_file.write_text(original)
    run(["dvc", "repro"], repo)  # the committed state back, from DVC's run cache


def test_a_shared_recipe_change_retrains_every_method(pipeline_repo, reproduced):
    assert dry_run_with(pipeline_repo, "train", "epochs", 2) == trained_stages("train")


def test_the_report_flags_tuned_settings_the_reported_model_did_not_run_with(pipeline_repo, reproduced):
    """Tuned on validation, then params edited: the report must not claim the picks for LoRA's row."""
    repo = pipeline_repo
    ran_r = yaml.safe_load((repo / "params.yaml").read_text())["lora"]["r"]
    tuning_file = repo / "metrics" / "tuning.json"
    original = tuning_file.read_text()
    tuning = json.loads(original)
    tuning["methods"]["lora"] = {
        "experiment": "exp-lora",
        "rev": "0" * 40,
        "validation_rougeL": 10.0,
        "validation_dialogues": 4,
        "runs_compared": 2,
        "settings": {"lora.r": ran_r * 2},
        "space": {"lora.r": [ran_r, ran_r * 2]},
    }
    try:
        tuning_file.write_text(json.dumps(tuning, indent=2) + "\n")
        assert stages_run(run(["dvc", "repro"], repo)) == {"report"}
        report = (repo / "metrics" / "report.md").read_text()
        assert (
            f"**Warning: LoRA did not run with its tuned settings** (`lora.r` tuned {ran_r * 2}, ran {ran_r})" in report
        )
        assert f"no: the model ran with lora.r {ran_r} (tuned: {ran_r * 2})" in report
    finally:
        tuning_file.write_text(original)
    run(["dvc", "repro"], repo)


# generate@'s own code path (stages/generate.py model_generation) at generate.precision fp32, the
# precision the export is written in: {dialogue: summary}
GENERATE_FP32 = """
import dataclasses, json, sys
from stages.generate import MODELS_DIR, TEST_DIR, model_generation
from stages.params import load_params
from stages.splits import read_split
params = load_params()
params = dataclasses.replace(params, generate=dataclasses.replace(params.generate, precision="fp32"))
test = read_split(TEST_DIR)
generated = model_generation(MODELS_DIR / sys.argv[1], test, params, sys.argv[1])[0]
print(json.dumps(dict(zip(test["dialogue"], generated.summaries))))
"""
# the export alone, in a process that has never seen this repository: plain transformers
PLAIN_TRANSFORMERS = """
import json, sys
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
out, dialogues = sys.argv[1], json.load(open(sys.argv[2]))
seq2seq = AutoConfig.from_pretrained(out).is_encoder_decoder
model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(out).eval()
tokenizer = AutoTokenizer.from_pretrained(out)
template = json.load(open(out + "/prompt.json"))["prompt_template"]
summaries = {}
for dialogue in dialogues:
    inputs = tokenizer(template.replace("{dialogue}", dialogue), return_tensors="pt")
    output = model.generate(**inputs)[0]  # generation_config.json: the settings generate@ scored with
    summary = tokenizer.decode(output if seq2seq else output[inputs.input_ids.shape[1]:], skip_special_tokens=True)
    summaries[dialogue] = summary.strip()
print(json.dumps(summaries))
"""


def check_export_round_trip(repo: Path, run_name: str, tmp_path: Path) -> None:
    """scripts/export.py's standalone model, loaded by plain transformers outside the repo (no peft, no
    stages/), gives generate@'s summaries: generate@ at the export's precision, fp32 (bf16 rounds
    differently from fp32, and a random tiny model's near-tied logits flip on it)."""
    out = tmp_path / "exported"
    run([sys.executable, "scripts/export.py", run_name, str(out), "--dtype", "fp32"], repo)
    assert {"config.json", "model.safetensors", "generation_config.json", "prompt.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "adapter_config.json").exists()  # merged: a plain model
    ours = subprocess.run(
        [sys.executable, "-c", GENERATE_FP32, run_name], cwd=repo, capture_output=True, text=True, timeout=600
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    expected = json.loads(ours.stdout.splitlines()[-1])
    dialogues = tmp_path / "dialogues.json"
    dialogues.write_text(json.dumps(list(expected)))
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(out), str(dialogues)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == expected
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and f"models/{run_name}" in card


def test_an_exported_lora_gives_generate_s_summaries_in_plain_transformers(pipeline_repo, reproduced, tmp_path):
    check_export_round_trip(pipeline_repo, f"lora/seed{SEEDS[0]}", tmp_path)


def test_export_refuses_what_has_nothing_to_merge(pipeline_repo, reproduced, tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/export.py", f"prompt/seed{SEEDS[0]}", str(tmp_path / "x")],
        cwd=pipeline_repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "prompt tuning learns virtual input tokens" in result.stderr
    result = subprocess.run(
        [sys.executable, "scripts/export.py", "base", str(tmp_path / "x")],
        cwd=pipeline_repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "models/base: no trained model here" in result.stderr
    assert f"lora/seed{SEEDS[0]}" in result.stderr  # the runs it could export
