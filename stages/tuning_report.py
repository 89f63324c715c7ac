"""How each method was chosen on validation: the kept checkpoint, the tuning picks, and a check that
the reported models ran with the picks (scripts/tune.py writes metrics/tuning.json)."""

from __future__ import annotations

from tabulate import tabulate

from stages.labels import label

SELECTED_BY = {"rougeL": "best validation ROUGE-L", "loss": "lowest validation loss", "last": "the last"}


def kept_checkpoint(c: dict) -> str:
    """Which checkpoint a method's saved model is, from its cost row (stages/validation.py's keys)."""
    kept = f"step {c['selected_step']} of {c['planned_steps']} ({SELECTED_BY[c['select_by']]})"
    return kept + (f"; stopped early at step {c['last_step']}" if c["last_step"] < c["planned_steps"] else "")


def tuning_mismatches(tuning: dict, ran: dict[str, list[dict]]) -> dict[str, list[tuple[str, object, object]]]:
    """Per tuned method, the tuned settings its reported runs did not all run with: (key, tuned, ran),
    `ran` being the value every run had, or the list of each run's when they differ.
    `ran`: each variant's runs' params as their training recorded them (metrics/curves/<run>.json)."""
    found = {}
    for method, chosen in tuning["methods"].items():
        runs = ran.get(method) or []
        differ = []
        for key, tuned in chosen["settings"].items():
            values = [r.get(key) for r in runs]
            if any(v != tuned for v in values):
                differ.append((key, tuned, values[0] if all(v == values[0] for v in values) else values))
        if differ:
            found[method] = differ
    return found


def tuned_cell(chosen: dict | None, mismatch: list[tuple[str, object, object]] | None = None) -> str:
    if not chosen:
        return "no: params.yaml's recipe"
    if mismatch:
        ran = ", ".join(f"{k} {r} (tuned: {t})" for k, t, r in mismatch)
        return f"no: the model ran with {ran}; rerun with the picks (python scripts/tune.py)"
    tried = "; ".join(f"{k} in {space_text(chosen['space'].get(k))} -> {v}" for k, v in chosen["settings"].items())
    return f"{tried or 'nothing varied'} ({chosen['runs_compared']} trials)"


def space_text(spec) -> str:
    """A tuned param's search space as params.yaml's tune.space writes it: [8, 16] or log 0.0002..0.003."""
    if isinstance(spec, dict):
        ((kind, (low, high)),) = spec.items()
        return f"{kind} {low:g}..{high:g}"
    return str(spec)


def selection_table(
    variants: list[str],
    cost: dict[str, dict],
    tuning: dict,
    labels: dict[str, str] | None = None,
    mismatches: dict[str, list] | None = None,
) -> str:
    """Per trained variant: the checkpoint kept, its validation ROUGE-L and what was tuned over which grid."""
    rows = [
        [
            label(v, labels),
            kept_checkpoint(cost[v]),
            f"{cost[v]['selected_val_rougeL']:.2f} ({cost[v]['validation_dialogues']} dialogues)",
            tuned_cell(tuning["methods"].get(v), (mismatches or {}).get(v)),
        ]
        for v in variants
        if "select_by" in cost[v]
    ]
    headers = ["model", "checkpoint kept", "validation ROUGE-L", "tuned on validation (space -> picked)"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def mismatch_sentences(mismatches: dict[str, list], labels: dict[str, str] | None = None) -> list[str]:
    """One warning per method whose reported model did not run with the settings tuning picked."""
    return [
        f"**Warning: {label(m, labels)} did not run with its tuned settings** ("
        + ", ".join(f"`{k}` tuned {t!r}, ran {r!r}" for k, t, r in differ)
        + "): the tuning above is not what this report's numbers come from."
        for m, differ in mismatches.items()
    ]


def tuning_sentence(tuning: dict) -> str:
    test = "was not" if tuning["test_used"] is False else "WAS"
    untuned = (
        "Nothing was tuned: each method ran at its params.yaml recipe, and a recipe taken from a paper can favour "
        "one method over another (`python scripts/tune.py` runs the equal-budget protocol). "
        if not tuning["methods"]
        else ""
    )
    return (
        f"{untuned}The test split {test} used to choose anything: checkpoints, early stopping and the tuned "
        f"settings were chosen on the validation split. Tuning compares runs by {tuning['selected_by']}: see "
        f"`metrics/tuning.json`, written by `scripts/tune.py`."
    )
