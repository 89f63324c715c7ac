"""Stages `evaluate@<method>-<seed>` and `evaluate_baseline@<baseline>`: score one run's summaries
with multi-reference ROUGE (stages/runs.py names runs: `lora/seed42`, `base`; <run> below).

Reads only files: data/predictions/<run>.jsonl (from its generate stage), the test references
(data/prepared/references.jsonl, matched by dialogue id) and the run's training metrics. Scoring is separate from generation, so changing a statistics param reruns
this and the report in seconds, never the hours of generation.

Outputs: metrics/evaluate/<run>.json (flat ROUGE means with 95% bootstrap intervals: a pure,
seeded function of the predictions, bit-identical for the same predictions),
data/scores/<run>.jsonl (per-dialogue ROUGE, for paired tests and worst-case reading) and
metrics/cost/<run>.json (what the variant cost: trainable params, size, train time, peak
memory, generation throughput; noisy by nature, kept apart) and metrics/curves/<run>.json (its
training curves, from metrics/validation/<run>.json). The last two only carry what training
recorded to the report, so the report depends on the listed runs' stages alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stages.errors import StageError, run_stage
from stages.jsonio import read_json, read_jsonl, write_json
from stages.params import load_params
from stages.rouge import ROUGE_TYPES, bootstrap_ci, mean_scores, score_corpus
from stages.runs import checked_run, stage_args

PREDICTIONS_DIR = Path("data/predictions")
REFERENCES_FILE = Path("data/prepared/references.jsonl")
SCORES_DIR = Path("data/scores")
METRICS_DIR = Path("metrics/evaluate")
TRAIN_DIR = Path("metrics/train")
# metrics/train/<method>.json keys saying which checkpoint was kept and why (stages/validation.py)
SELECTION_KEYS = (
    "select_by",
    "selected_step",
    "last_step",
    "planned_steps",
    "selected_val_rougeL",
    "validation_dialogues",
)
TIMING_DIR = Path("metrics/timing")
COST_DIR = Path("metrics/cost")
VALIDATION_DIR = Path("metrics/validation")  # every variant's (empty for base and lead)
CURVES_DIR = Path("metrics/curves")


def with_references(predictions: list[dict], references: list[dict]) -> list[dict]:
    """Each prediction row with its dialogue's references, matched by id (generation never sees
    references, so a reference edit rescores without regenerating)."""
    by_id = {row["id"]: row["references"] for row in references}
    missing = [p["id"] for p in predictions if p["id"] not in by_id]
    if missing or len(by_id) != len(predictions):
        raise StageError(
            f"predictions and {REFERENCES_FILE} do not match ({len(predictions)} predictions, {len(by_id)} "
            f"dialogues with references, missing e.g. {missing[:3]}); run dvc repro to regenerate them together"
        )
    return [{**p, "references": by_id[p["id"]]} for p in predictions]


def score(predictions: list[dict]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Corpus ROUGE (x100) and per-dialogue ROUGE (0..1) with the project's scorer (stages/rouge.py).

    The same numbers as its `evaluate` module (stages/rouge_multiref, for notebooks and a Trainer's
    compute_metrics: tests/test_evaluate.py checks they are equal), without importing the `evaluate`
    package: its evaluation suites import `datasets` and more, 1.9 s per evaluate@ stage on 2 cores.
    """
    per_dialogue = score_corpus([p["prediction"] for p in predictions], [p["references"] for p in predictions])
    return mean_scores(per_dialogue), per_dialogue


def evaluation_metrics(
    means: dict[str, float], per_dialogue: list[dict[str, float]], predictions: list[dict], resamples: int, seed: int
) -> dict[str, float]:
    metrics = dict(means)
    for rouge_type in ROUGE_TYPES:  # intervals for the multi-reference scores, resampling dialogues
        low, high = bootstrap_ci([s[rouge_type] for s in per_dialogue], resamples, seed)
        metrics[f"{rouge_type}_ci_low"], metrics[f"{rouge_type}_ci_high"] = round(100 * low, 4), round(100 * high, 4)
    metrics["dialogues"] = len(per_dialogue)
    metrics["references"] = sum(len(p["references"]) for p in predictions)
    return metrics


def cost_row(train: dict, train_timing: dict, generate_timing: dict) -> dict[str, float | str]:
    """One variant's cost, flat: deterministic counts beside the noisy wall-clock figures, and what
    each run resolved to (precision, device, batch after out-of-memory retries)."""
    # peak_gpu_memory_mb or peak_rss_mb, the attempts that ran out of memory, device, precision and
    # the dtype the base's weights were held in (a PEFT method's frozen base: bf16 under bf16, QLoRA 4bit)
    training = {
        k: v
        for k, v in {**train, **train_timing}.items()
        if k.startswith("peak_")
        or k
        in (
            "train_oom_retries",
            "train_device",
            "train_precision",
            "train_tf32",
            "train_base_dtype",
            "validation_runtime_s",  # apart from train_runtime_s (training without its validations), as is the final save
            "save_runtime_s",
        )
    }
    # how the kept checkpoint was chosen on validation (trained variants only), for the report
    selection = {k: v for k, v in train.items() if k in SELECTION_KEYS}
    return {
        **({"method_type": train["method_type"]} if "method_type" in train else {}),  # what the report calls it
        "trainable_params": train["trainable_params"],
        "trainable_percent": train["trainable_percent"],
        "total_params": train["total_params"],
        "saved_mb": train["saved_mb"],
        "train_runtime_s": train_timing["train_runtime_s"],
        **training,
        **selection,
        "load_runtime_s": generate_timing["load_runtime_s"],
        "generation_runtime_s": generate_timing["generation_runtime_s"],
        "generation_dialogues_per_second": generate_timing["generation_dialogues_per_second"],
        "generation_device": generate_timing["device"],
        "generation_batch_size": generate_timing["generation_batch_size"],
    }


def write_scores(path: Path, predictions: list[dict], per_dialogue: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row, scores in zip(predictions, per_dialogue):
            f.write(json.dumps({"id": row["id"], **{k: round(v, 6) for k, v in scores.items()}}) + "\n")


def main(variant: str, seed: int | None) -> None:
    params = load_params()
    try:
        run = checked_run(variant, seed, params.variants, params.seeds, params.baselines)
    except ValueError as error:
        raise StageError(str(error)) from None
    predictions = with_references(read_jsonl(PREDICTIONS_DIR / f"{run}.jsonl"), read_jsonl(REFERENCES_FILE))
    means, per_dialogue = score(predictions)
    metrics = evaluation_metrics(means, per_dialogue, predictions, params.evaluate.bootstrap_resamples, params.seed)
    write_scores(SCORES_DIR / f"{run}.jsonl", predictions, per_dialogue)
    write_json(metrics, METRICS_DIR / f"{run}.json")
    write_json(
        cost_row(
            read_json(TRAIN_DIR / f"{run}.json"),
            read_json(TIMING_DIR / "train" / f"{run}.json"),
            read_json(TIMING_DIR / "generate" / f"{run}.json"),
        ),
        COST_DIR / f"{run}.json",
    )
    record = read_json(VALIDATION_DIR / f"{run}.json")
    # the curves, and the params its training ran with (the report checks tuned settings against them)
    carried = {"validation": record["history"], "training": record["training"], "params": record.get("params", {})}
    write_json(carried, CURVES_DIR / f"{run}.json")


if __name__ == "__main__":
    run_stage(lambda: main(*stage_args(sys.argv[1:], "evaluate")))
