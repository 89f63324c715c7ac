"""Each variant's runs as one row: every trained method under every seed, each baseline once.

The report compares variants, but trains, generates and scores runs (stages/runs.py). Here the runs'
files come together per variant: ROUGE as the mean over seeds with the seed-to-seed standard
deviation and an interval from the two-level bootstrap (seeds, then dialogues:
stages/seed_stats.py), and the paired tests between variants with each method's seeds resampled
on their own (seed 42 of LoRA and seed 42 of full fine-tuning share nothing but the data order).
With one seed every number is the single run's, as evaluate@ wrote it: the interval resamples
dialogues only, and the report says that seed variance was not measured.

Pure functions of the loaded files; the report stage reads them (stages/report.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stages.rouge import ROUGE_TYPES, holm_adjust
from stages.seed_stats import seed_interval, seed_paired_test

SCALED = ("diff", "ci_low", "ci_high", "se")  # a paired test's keys in ROUGE points


@dataclass(frozen=True)
class Variant:
    """One compared variant: its runs in `seeds` order (one for a baseline) and their loaded files."""

    name: str
    runs: list[str]
    seeds: list[int | None]
    evaluation: list[dict]  # metrics/evaluate/<run>.json
    generation: list[dict]  # metrics/generate/<run>.json
    cost: list[dict]  # metrics/cost/<run>.json
    scores: list[list[dict]]  # data/scores/<run>.jsonl (per dialogue, 0..1)
    curves: list[dict]  # metrics/curves/<run>.json

    @property
    def trained(self) -> bool:
        return self.seeds[0] is not None


def score_matrix(variant: Variant, rouge_type: str = "rougeL") -> np.ndarray:
    """[seeds, dialogues] of one ROUGE type (0..1, as scored), dialogues in the order every run shares."""
    ids = [row["id"] for row in variant.scores[0]]
    for run, rows in zip(variant.runs, variant.scores):
        if [row["id"] for row in rows] != ids:
            raise ValueError(f"{run} was scored on other dialogues than {variant.runs[0]}: regenerate it")
    return np.array([[row[rouge_type] for row in rows] for rows in variant.scores])


def evaluation_row(variant: Variant, resamples: int, seed: int) -> dict:
    """ROUGE per type: the mean over seeds and its 95% interval (seeds x dialogues with two or more
    seeds; the run's own dialogue-bootstrap interval with one), the seed SD, and the counts."""
    first = variant.evaluation[0]
    count = len(variant.runs)
    row = {"seeds": count, "dialogues": first["dialogues"], "references": first["references"]}
    for key in first:
        if key.endswith("_mean_ref"):  # shown as means only
            row[key] = round(math.fsum(e[key] for e in variant.evaluation) / count, 4)
    for rouge_type in ROUGE_TYPES:
        if count == 1:
            row.update({k: first[k] for k in (rouge_type, f"{rouge_type}_ci_low", f"{rouge_type}_ci_high")})
            row[f"{rouge_type}_seed_sd"] = None
            continue
        interval = seed_interval(score_matrix(variant, rouge_type), resamples, seed)
        row[rouge_type] = round(100 * interval["mean"], 4)
        row[f"{rouge_type}_ci_low"] = round(100 * interval["ci_low"], 4)
        row[f"{rouge_type}_ci_high"] = round(100 * interval["ci_high"], 4)
        row[f"{rouge_type}_seed_sd"] = round(100 * interval["seed_sd"], 4)
        if rouge_type == "rougeL":
            row["rougeL_se"], row["rougeL_df"] = 100 * interval["se"], interval["df"]
    row["seed_rougeL"] = [e["rougeL"] for e in variant.evaluation]  # each seed's own score
    return row


def mean_row(rows: list[dict]) -> dict:
    """Numbers averaged over the runs (wall clock, memory: each run measured its own), everything else
    as the first run recorded it (settings, devices: the same for every seed)."""
    merged = dict(rows[0])
    for key, value in rows[0].items():
        values = [r.get(key) for r in rows]
        if isinstance(value, bool) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        mean = math.fsum(values) / len(values)
        merged[key] = round(mean) if all(isinstance(v, int) for v in values) else round(mean, 4)
    return merged


def comparisons(variants: dict[str, Variant], pairs: list[tuple[str, str]], resamples: int, seed: int) -> list[dict]:
    """Paired tests on per-dialogue multi-reference ROUGE-L (x100) for each (a, b) in `pairs`, with the
    seeds of each side resampled on their own; `p_holm` is Holm-adjusted over all pairs."""
    results = []
    for a, b in pairs:
        test = seed_paired_test(score_matrix(variants[a]), score_matrix(variants[b]), resamples, seed)
        # scored 0..1, reported x100 (as the evaluate metrics); p-values and counts as they are
        scaled = {k: (100 * v if k in SCALED and v is not None else v) for k, v in test.items()}
        results.append({"a": a, "b": b, **scaled})
    # Several tests at 0.05 each would call a difference significant by chance far more often than
    # 5% of the time; Holm's adjustment keeps that chance at the level for the whole family.
    for result, p_holm in zip(results, holm_adjust([r["p_value"] for r in results]) if results else []):
        result["p_holm"] = p_holm
    return results
