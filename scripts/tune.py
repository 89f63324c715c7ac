"""The equal-budget tuning protocol, in one command: trials on validation, picks, then every seed through the report.

    python scripts/tune.py            # the whole protocol; run it again after an interruption
    python scripts/tune.py --plan     # print each method's trials and stop
    python scripts/tune.py --no-final # stop after the picks (metrics/tuning.json)

1. Trials. Every method in `variants` gets `tune.trials` settings drawn from its `tune.space`
   (stages/search.py: a seeded Latin hypercube), each trained under the trial seed (the first of
   `seeds`) as a DVC experiment of its train stage alone, outside the workspace:
   `dvc exp run --temp --name <method>-trial<i>-<digest> -S <settings> train@<method>-<seed>`.
   No test generation runs. A trial already recorded (an experiment of this commit under the trial's
   name, with its params and training metrics) does not run again: an interrupted protocol continues where it
   stopped. A trial whose experiment was removed comes back from DVC's run cache without training.
2. Picks. Per method, the trial whose saved checkpoint has the highest validation ROUGE-L
   (selected_val_rougeL in metrics/train/<method>/seed<seed>.json, on validate.dialogues dialogues).
   Only metrics/train/* are read: test scores (metrics/evaluate/*) never enter the choice. The trials,
   their scores and the picks go to metrics/tuning.json.
3. Final. `dvc exp run -S <picks>` in the workspace: params.yaml takes the picks, the trial seed's
   picked model comes back from DVC's run cache (the trials ran with the workspace's cache), the other
   seeds train with the picks, and generation, scoring and the report run. Commit params.yaml,
   dvc.lock and metrics/ to keep the result.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # stages/ from the repo root

from stages.params import PARAMS_FILE, Params, ParamsLoader, parse_params  # noqa: E402
from stages.search import draw  # noqa: E402

TUNING_FILE = Path("metrics/tuning.json")
METRIC = "selected_val_rougeL"  # validation ROUGE-L (x100) of the checkpoint the stage saved
# what every training stage reads besides its own section: a recorded run that differs here was trained
# on other data, another model, another shared recipe or scored on another validation subset, so it is
# no trial of this protocol
SHARED = ("seed", "deterministic", "model", "data", "prepare", "train", "validate")


def experiment_rows(shown: list[dict]) -> list[dict]:
    """Name, rev, params and the training metrics files of the baseline commit and each finished
    experiment. Test metrics are dropped here, before anything looks at a score."""
    rows = []
    for commit in shown:
        if commit["rev"] == "workspace":  # uncommitted: not an experiment
            continue
        candidates = [commit] + [e["revs"][0] for e in commit.get("experiments") or [] if e.get("revs")]
        for row in candidates:
            data = row.get("data") or {}
            if not data or row.get("error") or data.get("status") == "Failed":
                continue
            metrics = {
                path: (entry or {}).get("data", {})
                for path, entry in (data.get("metrics") or {}).items()
                if path.startswith("metrics/train/")
            }
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})
            rows.append(
                {
                    "name": row.get("name") or data.get("name") or row["rev"],
                    "rev": data.get("rev", row["rev"]),
                    "params": params,
                    "metrics": metrics,
                }
            )
    return rows


def method_settings(params: dict, method: str) -> dict:
    """Every param of one method as it trained: its section over the shared recipe, so a recipe key one
    run sets in the section and another inherits from `train` compares by its value, never as None."""
    section = params.get(method, {})
    inherited = {k: v for k, v in (params.get("train") or {}).items() if k not in section}
    return {f"{method}.{k}": v for k, v in {**inherited, **section}.items()}


def with_settings(params: dict, method: str, settings: dict) -> dict:
    """The params a trial trains with: the workspace's, with the trial's settings in the method's section."""
    trial = copy.deepcopy(params)
    trial[method] = {**trial[method], **settings}
    return trial


def identity(params: dict, method: str) -> str:
    """What makes two trainings of `method` the same: its settings and every shared param."""
    return json.dumps([method_settings(params, method), [params.get(s) for s in SHARED]], sort_keys=True)


def train_metrics(method: str, seed: int) -> str:
    """A method's training metrics under one seed (stages/runs.py names the run <method>/seed<seed>)."""
    return f"metrics/train/{method}/seed{seed}.json"


def plan(params: Params, raw: dict) -> dict[str, list[dict]]:
    """Per tuned method (the trained `variants`), its trials: settings, the params they train with, a name."""
    missing = [m for m in params.variants if m not in params.tune.space]
    if missing:
        raise SystemExit(
            f"tune.space: no search space for {', '.join(missing)}; every compared method needs one for an equal "
            f"budget, e.g. tune.space.{missing[0]}: {{learning_rate: {{log: [1.0e-4, 1.0e-2]}}}}"
        )
    plans = {}
    for method in params.variants:
        trials = []
        for i, settings in enumerate(draw(params.tune.space[method], params.tune.trials, params.seed), 1):
            trained = with_settings(raw, method, settings)
            digest = hashlib.sha256(identity(trained, method).encode()).hexdigest()[:6]
            trials.append({"name": f"{method}-trial{i}-{digest}", "settings": settings, "params": trained})
        plans[method] = trials
    return plans


def recorded(rows: list[dict], trial: dict, method: str, seed: int) -> dict | None:
    """This trial's own experiment (by its name) with its training's validation score, if recorded.

    By name, not by params alone: the final run (the picks under every seed) has every picked trial's
    params and, its trial seed restored from DVC's run cache, the very same training metrics; it is no
    trial, and counting it would give a method a run more."""
    path, key = train_metrics(method, seed), identity(trial["params"], method)
    return next(
        (
            r
            for r in rows
            if r["name"] == trial["name"]
            and METRIC in r["metrics"].get(path, {})
            and identity(r["params"], method) == key
        ),
        None,
    )


def yaml_value(value) -> str:
    """A -S value YAML reads back as the same type: floats keep a dot (1e-05 would be a string)."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        return text if "." in mantissa or not exponent else f"{mantissa}.0e{exponent}"
    return json.dumps(value).replace('"', "") if isinstance(value, list) else str(value)


def overrides(method: str, settings: dict) -> list[str]:
    # ++: set the key in the method's section even where the workspace inherits it from `train`
    return [arg for k, v in settings.items() for arg in ("-S", f"++{method}.{k}={yaml_value(v)}")]


def trial_command(trial: dict, method: str, seed: int) -> list[str]:
    """One trial: the method's train stage alone, in a temporary copy, recorded as a named experiment."""
    return ["dvc", "exp", "run", "--temp", "--name", trial["name"], *overrides(method, trial["settings"]),
            f"train@{method}-{seed}"]  # fmt: skip


def picked(method: str, trials: list[dict], rows: list[dict], seed: int, space: dict) -> dict:
    """The trial with the best validation ROUGE-L (ties: the earlier trial), with every trial's score."""
    path = train_metrics(method, seed)
    scored = [(t, recorded(rows, t, method, seed)) for t in trials]
    lost = [t["name"] for t, row in scored if row is None]
    if lost:
        raise SystemExit(
            f"{method}: trials {', '.join(lost)} have no recorded validation score; run the protocol again"
        )
    best = max(range(len(scored)), key=lambda i: (scored[i][1]["metrics"][path][METRIC], -i))
    trial, row = scored[best]
    return {
        "experiment": row["name"],
        "rev": row["rev"],
        "validation_rougeL": row["metrics"][path][METRIC],
        "validation_dialogues": row["metrics"][path].get("validation_dialogues"),
        "runs_compared": len(scored),
        "settings": {f"{method}.{k}": v for k, v in trial["settings"].items()},
        "space": {f"{method}.{k}": dim.as_data() for k, dim in space.items()},
        "trials": [
            {
                "experiment": r["name"],
                "settings": {f"{method}.{k}": v for k, v in t["settings"].items()},
                "validation_rougeL": r["metrics"][path][METRIC],
            }
            for t, r in scored
        ],
    }


def tuning(params: Params, plans: dict[str, list[dict]], rows: list[dict], seed: int) -> dict:
    methods = {m: picked(m, trials, rows, seed, params.tune.space[m]) for m, trials in plans.items()}
    return {
        "selected_by": f"validation ROUGE-L of the saved checkpoint ({METRIC} in metrics/train/<method>/seed<seed>.json)",
        "test_used": False,  # only metrics/train/* are read (experiment_rows)
        "trial_seed": seed,  # every trial trained under this seed; the picks then run under every seed
        "trials_per_method": params.tune.trials,
        "search": "centred Latin hypercube over tune.space (stages/search.py), seeded by `seed`",
        "methods": methods,
    }


def final_command(result: dict) -> list[str]:
    """`dvc exp run` in the workspace with every method's picks: every seed, through test, to the report."""
    sets = [f"++{k}={yaml_value(v)}" for m in result["methods"].values() for k, v in m["settings"].items()]
    return ["dvc", "exp", "run", *[arg for s in sets for arg in ("-S", s)]]


def exp_rows() -> list[dict]:
    shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True).stdout
    return experiment_rows(json.loads(shown))


def run_trials(plans: dict[str, list[dict]], seed: int) -> None:
    """Each trial not yet recorded, one at a time (a grid across GPUs is `dvc queue start --jobs N`)."""
    rows = exp_rows()
    for method, trials in plans.items():
        for i, trial in enumerate(trials, 1):
            described = ", ".join(f"{k}={v}" for k, v in trial["settings"].items())
            done = recorded(rows, trial, method, seed)
            if done is None:
                print(f"{method} trial {i}/{len(trials)} ({described}): running", flush=True)
                ran = subprocess.run(trial_command(trial, method, seed), capture_output=True, text=True)
                if ran.returncode != 0:
                    raise SystemExit(
                        f"{method} trial {i} failed ({' '.join(trial_command(trial, method, seed))}):\n"
                        + (ran.stderr or ran.stdout)[-3000:]
                    )
                if "is cached - skipping run" in ran.stdout + ran.stderr:  # DVC's words for a run-cache hit
                    print(f"{method} trial {i}/{len(trials)}: restored from DVC's run cache, not trained", flush=True)
                rows = exp_rows()
                done = recorded(rows, trial, method, seed)
            score = done["metrics"][train_metrics(method, seed)][METRIC] if done else "not recorded"
            print(f"{method} trial {i}/{len(trials)} ({described}): validation ROUGE-L {score}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print each method's trials and stop")
    parser.add_argument("--no-final", action="store_true", help="stop after the picks (metrics/tuning.json)")
    args = parser.parse_args()
    raw = yaml.load(PARAMS_FILE.read_text(), Loader=ParamsLoader)  # noqa: S506 (a SafeLoader subclass)
    params = parse_params(raw)
    seed = params.seeds[0]
    plans = plan(params, raw)
    if args.plan:
        for method, trials in plans.items():
            print("\n".join(f"{t['name']}: {' '.join(trial_command(t, method, seed)[6:-1])}" for t in trials))
        return
    run_trials(plans, seed)
    result = tuning(params, plans, exp_rows(), seed)
    TUNING_FILE.parent.mkdir(parents=True, exist_ok=True)
    TUNING_FILE.write_text(json.dumps(result, indent=2) + "\n")
    for method, chosen in result["methods"].items():
        print(f"{method}: picked {chosen['settings']} (validation ROUGE-L {chosen['validation_rougeL']}, "
              f"best of {chosen['runs_compared']} trials)")  # fmt: skip
    command = final_command(result)
    print(" ".join(command), flush=True)
    if not args.no_final:
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
