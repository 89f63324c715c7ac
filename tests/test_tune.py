"""The equal-budget tuning protocol (scripts/tune.py): its `tune` params, the trials it draws, the picks
by validation and never by test, and the one command run end to end on the tiny model in a temp repo:
trials as DVC experiments of the train stages alone, picks, then every seed through the report."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.search import draw
from stages.tune_params import Dimension
from tests.conftest import REPO, copy_project, dialogsum_rows, load_script, problems, write_jsonl
from tests.test_training import env, git_commit, run

# --- the tune section -------------------------------------------------------------------------------


def test_every_committed_variant_has_a_search_space_with_its_learning_rate(raw):
    """The committed protocol tunes each method it compares, the learning rate first, LoRA's rank too,
    with the same number of trials for every method."""
    from stages.params import parse_params

    params = parse_params(raw)
    assert set(params.variants) <= set(params.tune.space)
    assert all("learning_rate" in params.tune.space[m] for m in params.sections)
    assert params.tune.space["lora"]["r"] == Dimension("values", (8, 16, 32))
    assert params.tune.trials >= 2


def test_bad_search_spaces_are_listed_with_the_key_and_the_fix(raw):
    raw["tune"]["space"]["lora"]["r"] = [0, 8]
    raw["tune"]["space"]["lora"]["dropout"] = {"log": [0.0, 0.1]}
    raw["tune"]["space"]["ia3"]["learning_rate"] = {"exp": [1.0e-3, 1.0e-2]}
    raw["tune"]["space"]["full"] = {"learning_rate": [1.0e-4, 2.0e-4]}
    raw["tune"]["space"]["dora"] = {"learning_rate": {"log": [1.0e-4, 1.0e-2]}}
    raw["tune"]["space"]["prompt"]["type"] = ["lora"]
    message = problems(raw)
    assert message.splitlines()[1:] == [
        "  - tune.space.full: only 2 distinct settings, fewer than tune.trials (6): identical trials would train the "
        "same model twice; add values or a {log: [low, high]} range, or lower tune.trials",
        "  - tune.space.lora.r: 0 cannot train: lora.r: must be >= 1, got 0",
        "  - tune.space.lora.dropout: log bounds must satisfy 0 < low < high, got [0, 0.1]",
        "  - tune.space.ia3.learning_rate: expected a list of values, {log: [low, high]} or {range: [low, high]}, "
        "got {'exp': [0.001, 0.01]}",
        "  - tune.space.prompt.type: a method's type is what is compared, not a setting to tune",
        "  - tune.space.dora: dora is not a method section of params.yaml; tune one that is",
    ]


def test_fewer_than_two_trials_is_refused(raw):
    raw["tune"]["trials"] = 1
    assert "tune.trials: must be an integer >= 2 (a pick needs something to choose from), got 1" in problems(raw)


# --- the trials -------------------------------------------------------------------------------------


def test_one_log_range_is_an_evenly_spaced_grid_one_trial_per_stratum():
    trials = draw({"learning_rate": Dimension("log", low=1.0e-4, high=1.0e-2)}, 4, seed=42)
    exponents = [math.log10(t["learning_rate"]) for t in trials]
    # strata of half a decade each, trials at their centres: 10^-3.75, 10^-3.25, 10^-2.75, 10^-2.25
    assert exponents == pytest.approx([-3.75, -3.25, -2.75, -2.25], abs=2e-3)
    assert trials[0] == {"learning_rate": 1.78e-4}  # 3 significant digits


def test_a_list_beside_a_range_is_tried_equally_often_and_the_draw_repeats_by_seed():
    space = {"learning_rate": Dimension("log", low=2.0e-4, high=3.0e-3), "r": Dimension("values", (8, 16, 32))}
    trials = draw(space, 6, seed=42)
    assert sorted(t["r"] for t in trials) == [8, 8, 16, 16, 32, 32]
    assert len({t["learning_rate"] for t in trials}) == 6
    assert all(2.0e-4 <= t["learning_rate"] <= 3.0e-3 for t in trials)
    assert draw(space, 6, seed=42) == trials and draw(space, 6, seed=7) != trials


def test_lists_alone_draw_distinct_settings():
    space = {"r": Dimension("values", (8, 16)), "alpha": Dimension("values", (8, 16, 32))}
    for seed in range(20):
        trials = draw(space, 5, seed)
        assert len({json.dumps(t, sort_keys=True) for t in trials}) == 5


def test_a_compared_method_without_a_space_is_refused_with_an_example(raw):
    from stages.params import parse_params

    tune = load_script("tune")
    del raw["tune"]["space"]["ia3"]
    with pytest.raises(SystemExit) as refused:
        tune.plan(parse_params(raw), raw)
    assert str(refused.value) == (
        "tune.space: no search space for ia3; every compared method needs one for an equal budget, "
        "e.g. tune.space.ia3: {learning_rate: {log: [1.0e-4, 1.0e-2]}}"
    )


# --- picks by validation, never by test -------------------------------------------------------------


def shown_experiments(baseline: dict, experiments: list[tuple[str, dict, dict]]) -> list[dict]:
    """`dvc exp show --json` as DVC 3 writes it: the baseline commit and its experiments, each with its
    params and metrics files."""

    def data(rev: str, params: dict, metrics: dict) -> dict:
        return {
            "rev": rev,
            "params": {"params.yaml": {"data": params}},
            "metrics": {path: {"data": values} for path, values in metrics.items()},
        }

    return [
        {"rev": "workspace", "data": data("workspace", baseline, {})},
        {
            "rev": "abc123",
            "data": data("abc123", baseline, {}),
            "experiments": [
                {"revs": [{"rev": f"e{i}", "name": name, "data": data(f"e{i}", params, metrics)}]}
                for i, (name, params, metrics) in enumerate(experiments)
            ],
        },
    ]


def two_trial_plan(raw: dict):
    from stages.params import parse_params

    tune = load_script("tune")
    raw["tune"]["trials"] = 2
    raw["variants"] = raw["methods"] = ["lora"]
    params = parse_params(raw)
    return tune, params, tune.plan(params, raw)


def test_the_pick_follows_validation_when_planted_test_scores_disagree(raw):
    tune, params, plans = two_trial_plan(raw)
    first, second = plans["lora"]
    train, test = "metrics/train/lora/seed42.json", "metrics/evaluate/lora/seed42.json"
    shown = shown_experiments(
        raw,
        [
            # validation prefers the second trial; the planted test scores prefer the first
            (first["name"], first["params"], {train: {tune.METRIC: 30.0}, test: {"rougeL": 99.0}}),
            (second["name"], second["params"], {train: {tune.METRIC: 35.0}, test: {"rougeL": 1.0}}),
        ],
    )
    rows = tune.experiment_rows(shown)
    assert all(not path.startswith("metrics/evaluate/") for r in rows for path in r["metrics"])
    result = tune.tuning(params, plans, rows, 42)
    lora = result["methods"]["lora"]
    assert result["test_used"] is False and result["trials_per_method"] == 2
    assert lora["experiment"] == second["name"] and lora["validation_rougeL"] == 35.0
    assert lora["settings"] == {f"lora.{k}": v for k, v in second["settings"].items()}
    assert [t["validation_rougeL"] for t in lora["trials"]] == [30.0, 35.0]
    assert lora["space"] == {"lora.learning_rate": {"log": [2.0e-4, 3.0e-3]}, "lora.r": [8, 16, 32]}
    assert tune.final_command(result) == [
        "dvc",
        "exp",
        "run",
        *[a for k, v in second["settings"].items() for a in ("-S", f"++lora.{k}={tune.yaml_value(v)}")],
    ]


def test_only_a_training_of_the_trial_itself_is_its_record(raw):
    """An experiment that changed another method carries LoRA's metrics unchanged, and a run validated
    on another subset does not compare: neither is a recorded LoRA trial, so the trial still runs."""
    tune, _, plans = two_trial_plan(raw)
    trial = plans["lora"][0]
    train = {"metrics/train/lora/seed42.json": {tune.METRIC: 31.0}}
    other_method = json.loads(json.dumps(raw))
    other_method["ia3"]["learning_rate"] = 1.0e-2
    other_subset = json.loads(json.dumps(trial["params"]))
    other_subset["validate"]["dialogues"] = 10
    rows = tune.experiment_rows(
        shown_experiments(raw, [("ia3-lr", other_method, train), ("subset", other_subset, train)])
    )
    assert tune.recorded(rows, trial, "lora", 42) is None
    rows = tune.experiment_rows(shown_experiments(raw, [(trial["name"], trial["params"], train)]))
    assert tune.recorded(rows, trial, "lora", 42)["name"] == trial["name"]


def test_a_small_learning_rate_set_by_dvc_loads_as_a_number(tmp_path):
    # `dvc exp run -S` writes params.yaml through ruamel (YAML 1.2): 1.0e-5 becomes `1e-05`, which
    # PyYAML alone reads as a string; a learning-rate trial must not fail on it
    from dvc.utils.hydra import apply_overrides

    from stages.params import load_params

    params_file = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", params_file)
    apply_overrides(str(params_file), ["lora.learning_rate=1.0e-5"])
    assert "learning_rate: 1e-05" in params_file.read_text()
    assert load_params(params_file).recipe("lora").learning_rate == 1.0e-5


def test_picked_values_are_written_as_yaml_reads_them_back():
    tune = load_script("tune")
    for value in (1.0e-8, 3.0e-4, 3.63e-05, 0.3, 16, ["q", "v"], "all-linear"):
        assert yaml.safe_load(f"x: {tune.yaml_value(value)}")["x"] == value


# --- the one command, end to end ----------------------------------------------------------------------

# the tiny model: 30 rows x 10 epochs / 8 per step = 40 steps per trial, validated twice on 4 dialogues
RECIPE = {
    "epochs": 10,
    "batch_size": 8,
    "eval_batch_size": 8,
    "save_steps": 20,
    "logging_steps": 20,
    "warmup_ratio": 0.0,
}
SPACE = {
    "full": {"learning_rate": {"log": [1.0e-6, 1.0e-1]}},  # trials at 1.78e-5 and 5.62e-3
    "lora": {"learning_rate": {"log": [1.0e-5, 1.0e-1]}, "r": [4, 8]},
}


def tune_script(repo: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(repo / "scripts" / "tune.py"), *args],
        cwd=repo,
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir) -> tuple[Path, str, float]:
    """A temp repo where `python scripts/tune.py` ran the whole protocol for full fine-tuning and LoRA:
    2 trials each, then seeds 42 and 43 through the report. Returns the repo, the script's output and
    its wall time."""
    tmp = tmp_path_factory.mktemp("tune")
    for split in ("train", "validation", "test"):
        write_jsonl(tmp / "source" / f"{split}.jsonl", dialogsum_rows(split, 30 if split == "train" else 4))
    repo = copy_project(tmp / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params.update(methods=["full", "lora"], variants=["full", "lora"], seeds=[42, 43])
    params["model"]["name"] = str(tiny_model_dir)
    params["data"]["source"] = str(tmp / "source")
    params["train"].update(RECIPE)
    params["validate"].update(dialogues=4, max_new_tokens=16, batch_size=4)
    params["generate"].update(num_beams=1, max_new_tokens=16, batch_size=4)
    params["evaluate"]["bootstrap_resamples"] = 100
    params["tune"] = {"trials": 2, "space": SPACE}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "repro", "prepare"], repo)
    git_commit(repo, "prepared")
    started = time.monotonic()
    result = tune_script(repo)
    return repo, result.stdout, time.monotonic() - started


def trial_experiments(repo: Path) -> dict[str, dict]:
    """The recorded experiments of HEAD by name: their params and metrics files."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    head = next(c for c in shown if c["rev"] != "workspace")
    return {e["revs"][0]["name"]: e["revs"][0]["data"] for e in head.get("experiments") or []}


def test_the_protocol_gives_every_method_equal_trials_on_validation_and_picks_the_best(tuned):
    repo, _, _ = tuned
    tuning = json.loads((repo / "metrics" / "tuning.json").read_text())
    experiments = trial_experiments(repo)
    for method in ("full", "lora"):
        chosen = tuning["methods"][method]
        assert chosen["runs_compared"] == len(chosen["trials"]) == 2
        scores = {}
        for trial in chosen["trials"]:
            data = experiments[trial["experiment"]]  # each trial a recorded DVC experiment
            assert trial["experiment"].startswith(f"{method}-trial")
            # its train stage alone ran: no test generation, no scores, no report
            written = [p for p, entry in data["metrics"].items() if (entry or {}).get("data")]
            assert not [p for p in written if p.startswith(("metrics/evaluate/", "metrics/generate/"))]
            recorded = data["metrics"][f"metrics/train/{method}/seed42.json"]["data"]["selected_val_rougeL"]
            assert recorded == trial["validation_rougeL"]
            scores[trial["experiment"]] = recorded
        # the best validation score, ties to the earlier trial
        assert chosen["experiment"] == next(name for name, score in scores.items() if score == max(scores.values()))
        assert chosen["validation_rougeL"] == max(scores.values())
    assert tuning["test_used"] is False and tuning["trial_seed"] == 42


def test_the_picks_run_under_every_seed_and_the_trial_seed_s_model_comes_back_from_the_run_cache(tuned):
    repo, output, _ = tuned
    tuning = json.loads((repo / "metrics" / "tuning.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    experiments = trial_experiments(repo)
    for method, chosen in tuning["methods"].items():
        for key, value in chosen["settings"].items():  # params.yaml took the picks
            section, name = key.split(".")
            assert params[section][name] == value
        for seed in (42, 43):
            assert (repo / "metrics" / "evaluate" / method / f"seed{seed}.json").is_file()
        # seed 42 did not train again: the picked trial came back from DVC's run cache, seed 43 trained
        assert f"Stage 'train@{method}-42' is cached - skipping run, checking out outputs" in output
        assert f"Running stage 'train@{method}-43'" in output
        train = f"metrics/train/{method}/seed42.json"
        assert json.loads((repo / train).read_text()) == experiments[chosen["experiment"]]["metrics"][train]["data"]
    report = (repo / "metrics" / "report.md").read_text()
    verdict = report.split("## Verdict")[1].split("\n## ")[0]
    assert (
        "Protocol: each method had the same budget, 2 trials, trained under seed 42 and compared by validation "
        "ROUGE-L on 4 validation dialogues." in verdict
    )
    assert "The picks then ran under every seed (42, 43) through test generation to this report." in verdict
    assert "The test split chose nothing." in verdict
    full = tuning["methods"]["full"]
    assert (
        f"full fine-tuning full.learning_rate={full['settings']['full.learning_rate']} (validation ROUGE-L " in verdict
    )


def test_an_interrupted_protocol_continues_where_it_stopped(tuned):
    repo, first, _ = tuned
    assert first.count(": running") == 4
    before = json.loads((repo / "metrics" / "tuning.json").read_text())
    again = tune_script(repo, "--no-final")
    assert ": running" not in again.stdout  # every trial is recorded: none runs again
    assert json.loads((repo / "metrics" / "tuning.json").read_text()) == before


def test_a_removed_trial_comes_back_from_the_run_cache_without_training(tuned):
    repo, _, _ = tuned
    tuning = json.loads((repo / "metrics" / "tuning.json").read_text())
    removed = tuning["methods"]["lora"]["trials"][0]["experiment"]
    run(["dvc", "exp", "remove", removed], repo)
    again = tune_script(repo, "--no-final")
    assert again.stdout.count(": running") == 1  # only the removed one is not recorded
    assert "lora trial 1/2: restored from DVC's run cache, not trained" in again.stdout
    after = json.loads((repo / "metrics" / "tuning.json").read_text())["methods"]
    for method, chosen in tuning["methods"].items():  # the same trials, scores and picks (a new commit, maybe)
        assert {k: v for k, v in after[method].items() if k != "rev"} == {k: v for k, v in chosen.items() if k != "rev"}


def test_params_edited_after_tuning_make_the_report_say_so(tuned):
    """LoRA moved to its other trial's learning rate after tuning: the report names the setting that
    ran and does not claim the picks."""
    repo, _, _ = tuned
    tuning = json.loads((repo / "metrics" / "tuning.json").read_text())
    lora = tuning["methods"]["lora"]
    other = next(t for t in lora["trials"] if t["experiment"] != lora["experiment"])
    edits = [a for k, v in other["settings"].items() for a in ("-S", f"{k}={load_script('tune').yaml_value(v)}")]
    run(["dvc", "exp", "run", *edits], repo)
    report = (repo / "metrics" / "report.md").read_text()
    verdict = report.split("## Verdict")[1].split("\n## ")[0]
    assert "**LoRA did not run with the picks** (below)." in verdict
    assert "**Warning: LoRA did not run with its tuned settings** (" in verdict
    assert "The picks then ran under every seed" not in verdict
