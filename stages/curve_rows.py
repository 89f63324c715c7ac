"""The curated training-curve plots' data: every reported method's train and validation loss,
learning rate and validation ROUGE-L per optimizer step, as the rows `dvc plots show` draws
(templates .dvc/plots/training_curves.json and learning_rate.json; dvc.yaml's `plots:`).

The rows come from each variant's metrics/curves/<variant>.json (evaluate@ carries its training
stage's record there); each row names its method by its report label and its place among the
reported methods, which colours it, so no plot definition names a method.
"""

from __future__ import annotations

from pathlib import Path

from stages.jsonio import write_json

PLOT_FILES = {
    "training_loss": Path("metrics/plots/training_loss.json"),
    "learning_rate": Path("metrics/plots/learning_rate.json"),
    "validation_rougeL": Path("metrics/plots/validation_rougeL.json"),
}


def curve_rows(curves: dict[str, dict], labels: dict[str, str]) -> dict[str, list[dict]]:
    """Rows per plot from {variant: its curves file}, in report order; a variant that trained nothing
    (empty curves) has none."""
    trained = [v for v, c in curves.items() if c["training"] or c["validation"]]
    rows: dict[str, list[dict]] = {name: [] for name in PLOT_FILES}
    for place, variant in enumerate(trained):
        method = {"method": labels[variant], "place": place}
        training, validation = curves[variant]["training"], curves[variant]["validation"]
        rows["training_loss"] += [{**method, "curve": "train", "step": e["step"], "loss": e["loss"]} for e in training]
        rows["training_loss"] += [
            {**method, "curve": "validation", "step": e["step"], "loss": e["loss"]}
            for e in validation
            if e["loss"] is not None
        ]
        rows["learning_rate"] += [
            {**method, "curve": "train", "step": e["step"], "learning_rate": e["learning_rate"]}
            for e in training
            if e["learning_rate"] is not None
        ]
        rows["validation_rougeL"] += [
            {**method, "curve": "validation", "step": e["step"], "rougeL": e["rougeL"]} for e in validation
        ]
    return rows


def write_curve_rows(rows: dict[str, list[dict]]) -> None:
    for name, path in PLOT_FILES.items():
        write_json(rows[name], path)
