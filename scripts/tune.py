"""Pick each method's settings by validation ROUGE-L from DVC experiments, never by test.

    dvc exp run --queue -S 'lora.learning_rate=3.0e-4,1.0e-3,3.0e-3' -S 'lora.r=8,16,32' train@lora-42
    dvc queue start --jobs 1          # one at a time on one GPU; wait for `dvc queue status`
    python scripts/tune.py            # writes metrics/tuning.json, prints the winners
    python scripts/tune.py --run      # then runs the whole pipeline (test generation, report) with them

It reads `dvc exp show --json` (the committed baseline and its experiments) and, per method, takes
the experiment whose metrics/train/<method>/seed<seed>.json (the trial seed: the first of `seeds`)
has the highest `selected_val_rougeL`: the
validation ROUGE-L of the checkpoint that stage saved (stages/validation.py). Only
metrics/train/* files are read: test scores (metrics/evaluate/*) never enter the choice. The
settings reported as tuned are the method's params (its section, <method>.*) that differ
between the experiments, with every value tried (the grid). `--run` runs `dvc exp run -S` with
every method's winning settings in the workspace: the training stages come back from DVC's run
cache when an experiment already trained them, then generation, scoring and the report run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

TUNING_FILE = Path("metrics/tuning.json")
METRIC = "selected_val_rougeL"  # validation ROUGE-L (x100) of the checkpoint the stage saved
PARAMS_FILE = Path("params.yaml")
# what every training stage reads besides its own section: runs that differ here were trained on other
# data, another model, another shared recipe or scored on another validation subset, so their
# validation scores do not compare
SHARED = ("seed", "deterministic", "model", "data", "prepare", "train", "validate")


def declared_methods(params_file: Path = PARAMS_FILE) -> list[str]:
    """The trained methods, as params.yaml declares them (`methods`)."""
    return list(yaml.safe_load(params_file.read_text())["methods"])


def trial_seed(params_file: Path = PARAMS_FILE) -> int:
    """The seed trials train under: the first training seed params.yaml declares (`seeds`)."""
    return int(yaml.safe_load(params_file.read_text())["seeds"][0])


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


def flat(section: dict, prefix: str) -> dict:
    return {f"{prefix}.{key}": value for key, value in section.items()}


def method_settings(params: dict, method: str) -> dict:
    """Every param of one method as it trained: its section over the shared recipe, so a recipe key one
    run sets in the section and another inherits from `train` compares by its value, never as None."""
    section = params.get(method, {})
    inherited = {k: v for k, v in (params.get("train") or {}).items() if k not in section}
    return flat({**inherited, **section}, method)


def shared_differences(rows: list[dict]) -> dict[str, list]:
    """The shared params (SHARED) that differ between rows, with their values."""
    settings = [
        {k: v for section in SHARED for k, v in flat_any(r["params"].get(section), section).items()} for r in rows
    ]
    keys = sorted({k for s in settings for k in s})
    return {
        k: distinct([s.get(k) for s in settings]) for k in keys if len({json.dumps(s.get(k)) for s in settings}) > 1
    }


def flat_any(value, prefix: str) -> dict:
    """A section as dotted keys (`seed` is a scalar, `validate` a mapping)."""
    return flat(value, prefix) if isinstance(value, dict) else {prefix: value}


def trials(rows: list[dict], method: str) -> list[dict]:
    """One row per distinct training of `method`: an experiment that changed another method's params
    carries this method's metrics unchanged (its training stage did not rerun), so it is not a trial of
    this method. Runs are the same training when the method's section and every shared param match;
    the first such row stands for them (the baseline commit, then experiments as DVC lists them)."""
    seen, kept = set(), []
    for row in rows:
        key = json.dumps(
            [method_settings(row["params"], method), [row["params"].get(section) for section in SHARED]], sort_keys=True
        )
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def train_metrics(method: str, seed: int) -> str:
    """A method's training metrics under one seed (stages/runs.py names the run <method>/seed<seed>)."""
    return f"metrics/train/{method}/seed{seed}.json"


def pick(rows: list[dict], method: str, seed: int) -> dict | None:
    """The row with the best validation ROUGE-L for `method` under `seed`, what varied and over which values."""
    path = train_metrics(method, seed)
    scored = trials([r for r in rows if METRIC in r["metrics"].get(path, {})], method)
    if not scored:
        return None
    if differing := shared_differences(scored):
        raise SystemExit(
            f"{method}: the runs differ in params every method shares, so their validation ROUGE-L does not "
            "compare: "
            + "; ".join(f"{k} in {v}" for k, v in differing.items())
            + f". Compare runs that differ only in {method}.* "
            "(`dvc exp remove` the others, or pass --methods without this one)."
        )
    settings = [method_settings(r["params"], method) for r in scored]
    keys = sorted({k for s in settings for k in s})
    tuned = [k for k in keys if len({json.dumps(s.get(k)) for s in settings}) > 1]
    # highest score first; ties go to the first row (the baseline commit, then experiments as DVC lists them)
    best = max(range(len(scored)), key=lambda i: (scored[i]["metrics"][path][METRIC], -i))
    return {
        "experiment": scored[best]["name"],
        "rev": scored[best]["rev"],
        "validation_rougeL": scored[best]["metrics"][path][METRIC],
        "validation_dialogues": scored[best]["metrics"][path].get("validation_dialogues"),
        "runs_compared": len(scored),
        "settings": {k: settings[best].get(k) for k in tuned},
        "grid": {k: distinct([s.get(k) for s in settings]) for k in tuned},
    }


def distinct(values: list) -> list:
    """Each value once, numbers in increasing order, others in first-seen order."""
    unique = list({json.dumps(v): v for v in values}.values())
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in unique)
    return sorted(unique) if numbers else unique


def tuning(rows: list[dict], methods: list[str], seed: int) -> dict:
    picked = {m: pick(rows, m, seed) for m in methods}
    return {
        "selected_by": f"validation ROUGE-L of the saved checkpoint ({METRIC} in metrics/train/<method>/seed<seed>.json)",
        "test_used": False,  # only metrics/train/* are read (experiment_rows)
        "trial_seed": seed,  # every trial trained under this seed; the picks then run under every seed
        "methods": {m: p for m, p in picked.items() if p is not None},
    }


def yaml_value(value) -> str:
    """A -S value YAML reads back as the same type: floats keep a dot (1e-05 would be a string)."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        return text if "." in mantissa or not exponent else f"{mantissa}.0e{exponent}"
    return json.dumps(value).replace('"', "") if isinstance(value, list) else str(value)


def run_command(result: dict) -> list[str]:
    """`dvc exp run` with every method's winning settings."""
    # ++: set the key in the method's section even where the workspace inherits it from `train`
    sets = [f"++{k}={yaml_value(v)}" for m in result["methods"].values() for k, v in m["settings"].items()]
    return ["dvc", "exp", "run", *[arg for s in sets for arg in ("-S", s)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    methods = declared_methods()
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--run", action="store_true", help="then run the pipeline with the picked settings")
    args = parser.parse_args()
    shown = json.loads(
        subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True).stdout
    )
    result = tuning(experiment_rows(shown), args.methods, trial_seed())
    if not result["methods"]:
        sys.exit(
            "no experiment has metrics/train/<method>/seed<seed>.json with "
            + METRIC
            + ": run a grid first (see --help)"
        )
    TUNING_FILE.parent.mkdir(parents=True, exist_ok=True)
    TUNING_FILE.write_text(json.dumps(result, indent=2) + "\n")
    for method, chosen in result["methods"].items():
        print(
            f"{method}: {chosen['settings'] or 'nothing varied'} -> validation ROUGE-L {chosen['validation_rougeL']} ({chosen['experiment']}, {chosen['runs_compared']} runs)"
        )
    command = run_command(result)
    print(" ".join(command))
    if args.run:
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
