"""Tests for stages.report: direction, pairing and Holm correction of the paired comparisons."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from stages import aggregate
from stages.aggregate import Variant
from stages.report import (
    SIGNIFICANCE,
    comparison_pairs,
    comparison_sentence,
    frontier_rows,
    pareto_cell,
    pareto_optimal,
    render,
    runs_table,
    selection_table,
    tuning_sentence,
    variant_labels,
)
from stages.rouge import ROUGE_TYPES, paired_test
from tests.conftest import REPO, load_script

RESAMPLES = 4000
VARIANTS = ["base", "full", "lora", "lead"]
COMPARISONS = comparison_pairs(VARIANTS)


def as_predictions(**scores: np.ndarray) -> dict[str, list[dict]]:
    """Per-dialogue rows as the evaluate stage writes them (only ROUGE-L matters here)."""
    return {
        variant: [{"id": f"d{i}", "rougeL": float(x)} for i, x in enumerate(values)]
        for variant, values in scores.items()
    }


def comparisons(scores: dict[str, list[dict]], pairs, resamples: int, seed: int) -> list[dict]:
    """The report's paired tests on one seed per variant (each variant one run's per-dialogue rows)."""
    loaded = {v: Variant(v, [v], [None], [{}], [{}], [{}], [rows], [{}]) for v, rows in scores.items()}
    return aggregate.comparisons(loaded, pairs, resamples, seed)


def by_pair(results: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["a"], r["b"]): r for r in results}


def verdict(sentence: str) -> str:
    """The sentence up to its numbers: who, and better / worse / no significant difference."""
    return sentence.split("(")[0]


def clear_effects() -> dict[str, list[dict]]:
    """full and lead clearly above base; lora identical to base."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.5, size=150)
    return as_predictions(
        base=base,
        lora=base.copy(),
        full=base + 0.1 + rng.normal(0.0, 0.02, size=150),
        lead=base + 0.1 + rng.normal(0.0, 0.02, size=150),
    )


# --- direction ----------------------------------------------------------------


def test_better_and_worse_follow_the_sign_of_a_minus_b() -> None:
    results = by_pair(comparisons(clear_effects(), COMPARISONS, RESAMPLES, seed=0))
    assert set(results) == set(COMPARISONS)
    assert results[("full", "base")]["diff"] == pytest.approx(10.0, abs=0.5)  # x100: ROUGE-L points
    assert "**full fine-tuning** is significantly better than **original" in comparison_sentence(
        results[("full", "base")]
    )
    assert "**LoRA** is significantly worse than **full fine-tuning**" in comparison_sentence(results[("lora", "full")])
    # base is the `a` side of (base, lead): lead is better, so base is worse
    assert results[("base", "lead")]["diff"] < 0
    assert "**original (zero-shot)** is significantly worse than **lead baseline**" in comparison_sentence(
        results[("base", "lead")]
    )
    assert "no significant difference" in comparison_sentence(results[("lora", "base")])
    assert results[("lora", "base")]["p_holm"] == 1.0


def test_sentence_direction_from_hand_built_results() -> None:
    common = {"a": "full", "b": "lora", "ci_low": 0.5, "ci_high": 1.5, "p_value": 0.001, "p_holm": 0.004}
    assert "full fine-tuning** is significantly better than **LoRA" in comparison_sentence({**common, "diff": 1.0})
    assert "full fine-tuning** is significantly worse than **LoRA" in comparison_sentence(
        {**common, "diff": -1.0, "ci_low": -1.5, "ci_high": -0.5}
    )


def test_significant_raw_but_not_after_holm_is_no_significant_difference() -> None:
    sentence = comparison_sentence(
        {"a": "full", "b": "base", "diff": 1.2, "ci_low": 0.2, "ci_high": 2.2, "p_value": 0.02, "p_holm": 0.08}
    )
    assert "**full fine-tuning** vs **original (zero-shot)**: no significant difference" in sentence
    assert "p = 0.0200" in sentence and "Holm-adjusted p = 0.0800" in sentence


def test_comparisons_decide_on_the_holm_adjusted_p() -> None:
    # full - base: a small effect, t = 2.3 on 100 dialogues (raw p ~ 0.025); lora and lead equal base,
    # so (full, base) and (lora, full) share that p and the other two have p = 1.
    # Holm: both small ones x4 (tie, step-down) ~ 0.1 > 0.05.
    n, spread = 100, 0.05
    z = np.random.default_rng(1).normal(size=n)
    d = spread * (z - z.mean()) / z.std(ddof=1) + 2.3 * spread / np.sqrt(n)
    base = np.random.default_rng(2).uniform(0.2, 0.6, size=n)
    results = by_pair(
        comparisons(
            as_predictions(base=base, full=base + d, lora=base.copy(), lead=base.copy()), COMPARISONS, RESAMPLES, seed=0
        )
    )
    small = results[("full", "base")]
    assert SIGNIFICANCE / 4 < small["p_value"] < SIGNIFICANCE  # significant alone...
    assert small["p_holm"] == pytest.approx(4 * small["p_value"])
    assert small["p_holm"] > SIGNIFICANCE  # ...but not as one of four
    for pair in (("full", "base"), ("lora", "full")):
        assert "no significant difference" in comparison_sentence(results[pair])


def test_report_says_p_values_are_holm_adjusted() -> None:
    tests = comparisons(clear_effects(), COMPARISONS, RESAMPLES, seed=0)
    evaluation = {
        v: {
            **{f"{t}{s}": 40.0 for t in ROUGE_TYPES for s in ("", "_mean_ref", "_ci_low", "_ci_high")},
            "dialogues": 150,
            "references": 450,
        }
        for v in VARIANTS
    }
    generation = {v: {"gen_mean_tokens": 20.0, "gen_hit_max_share": 0.0} for v in VARIANTS}
    cost = {
        v: {
            "trainable_params": 1000 if v in ("full", "lora") else 0,
            "trainable_percent": 1.0,
            "total_params": 10**5,
            "saved_mb": 1.0,
            "train_runtime_s": 60.0,
            "peak_rss_mb": 900.0,
            "generation_dialogues_per_second": 2.0,
        }
        for v in VARIANTS
    }
    for v in ("full", "lora"):
        cost[v].update(SELECTION)
    base_model = {"base_model_name": "tiny", "base_model_revision": "main", "base_model_resolved_revision": "abc"}
    report = render(
        VARIANTS,
        evaluation,
        generation,
        cost,
        tests,
        frontier_rows(VARIANTS, evaluation, cost),
        base_model,
        "",
        "knkarthick/dialogsum",
        NOTHING_TUNED,
    )
    assert report.startswith("# tiny on knkarthick/dialogsum: ")  # the real model and data, never a fixed name
    row = next(line for line in report.splitlines() if line.startswith("| full fine-tuning ") and "RSS" in line)
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "full fine-tuning",
        "40.00 [40.00, 40.00]",
        "1,000 (1.00%)",
        "1.0",
        "1.0 min",
        "900 (RSS)",
        "2.00",
        "no",  # the original model and lead score as much at 0 trainable params: full is dominated
    ]
    lead = next(line for line in report.splitlines() if line.startswith("| lead baseline ") and "RSS" in line)
    assert lead.strip("|").split("|")[-1].strip() == "yes"  # zero-cost variants take part in the dominance check
    assert "## Paired tests on ROUGE-L (Holm-adjusted over 4 comparisons, family-wise error rate 0.05)" in report
    assert "Holm-adjusted p = " in report


# --- how each method was chosen ---------------------------------------------

SELECTION = {  # a trained variant's cost row carries its metrics/train/<method>.json selection keys
    "select_by": "rougeL",
    "selected_step": 120,
    "last_step": 180,
    "planned_steps": 180,
    "selected_val_rougeL": 31.25,
    "validation_dialogues": 100,
}
NOTHING_TUNED = {"selected_by": "validation ROUGE-L of the saved checkpoint", "test_used": False, "methods": {}}


def table_cells(table: str, first_cell: str) -> list[str]:
    row = next(line for line in table.splitlines() if line.startswith(f"| {first_cell} "))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_report_states_the_kept_checkpoint_the_grid_and_that_test_was_not_used() -> None:
    cost = {
        "base": {"trainable_params": 0},
        "full": {**SELECTION, "select_by": "loss", "last_step": 150},  # early stopping ended it at 150 of 180
        "lora": SELECTION,
    }
    tuning = {
        **NOTHING_TUNED,
        "methods": {
            "lora": {
                "settings": {"lora.learning_rate": 0.001, "lora.r": 16},
                "space": {"lora.learning_rate": {"log": [0.0003, 0.003]}, "lora.r": [8, 16, 32]},
                "runs_compared": 6,
            }
        },
    }
    table = selection_table(["base", "full", "lora"], cost, tuning)
    assert "original" not in table  # nothing trained, nothing chosen
    assert table_cells(table, "full fine-tuning") == [
        "full fine-tuning",
        "step 120 of 180 (lowest validation loss); stopped early at step 150",
        "31.25 (100 dialogues)",
        "no: params.yaml's recipe",
    ]
    assert table_cells(table, "LoRA") == [
        "LoRA",
        "step 120 of 180 (best validation ROUGE-L)",
        "31.25 (100 dialogues)",
        "lora.learning_rate in log 0.0003..0.003 -> 0.001; lora.r in [8, 16, 32] -> 16 (6 trials)",
    ]
    assert tuning_sentence(tuning).startswith("The test split was not used to choose anything")
    assert tuning_sentence(NOTHING_TUNED).startswith("Nothing was tuned: each method ran at its params.yaml recipe")
    assert "WAS used" in tuning_sentence({**NOTHING_TUNED, "test_used": True})


def test_the_committed_tuning_file_says_nothing_was_tuned_in_tune_py_s_format() -> None:
    """metrics/tuning.json is the report's dep: committed as tune.py writes it for an empty grid."""
    from stages.params import load_params

    tune = load_script("tune")
    params = load_params(REPO / "params.yaml")
    committed = json.loads((REPO / "metrics" / "tuning.json").read_text())
    written = tune.tuning(params, {}, [], params.seeds[0])
    assert committed["methods"] == {} and committed == {k: written[k] for k in committed}


# --- pairing ------------------------------------------------------------------


def test_shuffling_dialogues_in_all_systems_alike_keeps_the_result() -> None:
    predictions = clear_effects()
    order = np.random.default_rng(3).permutation(len(predictions["base"]))
    shuffled = {v: [rows[i] for i in order] for v, rows in predictions.items()}
    before = by_pair(comparisons(predictions, COMPARISONS, RESAMPLES, seed=0))
    after = by_pair(comparisons(shuffled, COMPARISONS, RESAMPLES, seed=0))
    for pair in COMPARISONS:
        assert after[pair]["diff"] == pytest.approx(before[pair]["diff"], abs=1e-9)
        # clear effects sit at the floor 1 / (resamples + 1) and ties at 1 in any order
        assert after[pair]["p_value"] == before[pair]["p_value"]
        assert after[pair]["p_holm"] == before[pair]["p_holm"]
        assert verdict(comparison_sentence(after[pair])) == verdict(comparison_sentence(before[pair]))


def test_consistent_small_gain_is_found_only_because_the_test_is_paired() -> None:
    # Every dialogue gains exactly 1 ROUGE-L point, but dialogues differ by up to 80 points, so the
    # two systems' score distributions overlap almost entirely.
    n = 200
    base = np.random.default_rng(4).uniform(0.05, 0.85, size=n)
    full = base + 0.01
    results = by_pair(
        comparisons(
            as_predictions(base=base, full=full, lora=base.copy(), lead=base.copy()), COMPARISONS, RESAMPLES, seed=0
        )
    )
    assert results[("full", "base")]["p_holm"] < 0.01
    assert "**full fine-tuning** is significantly better than **original" in comparison_sentence(
        results[("full", "base")]
    )

    # An unpaired look at the same numbers finds nothing: Welch's z is far below 1.96 ...
    welch_z = (full.mean() - base.mean()) / np.sqrt(full.var(ddof=1) / n + base.var(ddof=1) / n)
    assert abs(welch_z) < 1.0
    # ... and so does the paired test once the pairing is broken (same marginals, shuffled partner).
    unpaired = paired_test(np.random.default_rng(5).permutation(full), base, RESAMPLES, seed=0)
    assert unpaired["p_value"] > 0.2


# --- variants, cost and the frontier ------------------------------------------


def test_every_trained_variant_is_compared_with_the_original_and_with_full_fine_tuning() -> None:
    assert comparison_pairs(["base", "full", "lora", "ia3", "prompt", "lead"]) == [
        ("full", "base"),
        ("lora", "base"),
        ("ia3", "base"),
        ("prompt", "base"),
        ("lora", "full"),
        ("ia3", "full"),
        ("prompt", "full"),
        ("base", "lead"),
    ]
    # a subset run compares what it ran
    assert comparison_pairs(["base", "lora", "lead"]) == [("lora", "base"), ("base", "lead")]
    assert comparison_pairs(["lora"]) == []


def test_pareto_optimal_variants_are_not_beaten_on_both_cost_and_quality() -> None:
    points = {
        "full": (250e6, 40.0),
        "lora": (3.5e6, 39.0),
        "ia3": (0.1e6, 35.0),
        "worse_lora": (7e6, 38.0),
        "tie": (3.5e6, 39.0),
    }
    assert pareto_optimal(points) == {"full", "lora", "ia3", "tie"}  # worse_lora costs more and scores less


def frontier_inputs(points: dict[str, tuple[int, float, float]]) -> tuple[list[str], dict, dict]:
    """variants, evaluation and cost from {variant: (trainable params, ROUGE-L, interval half-width)}."""
    evaluation = {v: {"rougeL": r, "rougeL_ci_low": r - w, "rougeL_ci_high": r + w} for v, (_, r, w) in points.items()}
    cost = {v: {"trainable_params": p} for v, (p, _, _) in points.items()}
    return list(points), evaluation, cost


def test_zero_cost_variants_take_part_in_the_dominance_check() -> None:
    # the offline smoke run: lead at 16.5, the trained variants below 1
    variants, evaluation, cost = frontier_inputs(
        {"base": (0, 3.2, 1.0), "full": (10**8, 0.60, 0.3), "ia3": (10**5, 0.46, 0.3), "lead": (0, 16.5, 1.0)}
    )
    rows = {r["variant"]: r for r in frontier_rows(variants, evaluation, cost)}
    assert [r["variant"] for r in rows.values()] == variants  # every variant, zero-cost ones included
    assert {v: r["pareto"] for v, r in rows.items()} == {
        "base": "dominated",  # lead scores more at the same (zero) cost
        "full": "dominated",
        "ia3": "dominated",
        "lead": "Pareto-optimal",
    }
    assert rows["lead"]["zero_cost"] and rows["lead"]["trainable_params"] == 0 and not rows["ia3"]["zero_cost"]
    assert {v: r["status"] for v, r in rows.items()} == {
        "base": "zero-cost",
        "full": "dominated",
        "ia3": "dominated",
        "lead": "zero-cost",
    }


def test_a_trained_variant_at_the_best_zero_cost_score_is_dominated() -> None:
    variants, evaluation, cost = frontier_inputs(
        {"base": (0, 24.0, 1.0), "lora": (10**6, 24.0, 1.0), "full": (10**8, 24.01, 1.0), "lead": (0, 16.5, 1.0)}
    )
    rows = {r["variant"]: r for r in frontier_rows(variants, evaluation, cost)}
    assert rows["lora"]["pareto"] == "dominated"  # at, not above, the original model
    assert rows["full"]["pareto"] == "Pareto-optimal"  # above it on the point estimate...
    # ...but within the noise of the cheapest variant whose interval reaches it: not presented as better
    assert rows["full"]["overlaps"] == "base"
    assert rows["full"]["status"] == "Pareto-optimal, but its 95% CI overlaps a cheaper variant's"
    assert pareto_cell(rows["full"]) == "yes, but its 95% CI overlaps original (zero-shot)'s"


def test_a_clear_gain_over_every_cheaper_variant_is_plainly_pareto_optimal() -> None:
    variants, evaluation, cost = frontier_inputs(
        {"base": (0, 24.0, 1.0), "full": (10**8, 40.0, 1.0), "lora": (10**6, 35.0, 1.0), "lead": (0, 16.5, 1.0)}
    )
    rows = {r["variant"]: r for r in frontier_rows(variants, evaluation, cost)}
    assert (rows["lora"]["status"], rows["full"]["status"]) == ("Pareto-optimal", "Pareto-optimal")
    assert rows["lora"]["overlaps"] is None and pareto_cell(rows["lora"]) == "yes"
    assert rows["lora"]["rougeL_ci_low"] == 34.0 and rows["lora"]["label"] == "LoRA"


def test_the_report_shows_what_each_variant_ran_with():
    cost = {
        "base": {"generation_device": "NVIDIA H100 80GB HBM3", "generation_batch_size": 16},
        "lora": {
            "train_precision": "bf16",
            "train_tf32": 1,
            "train_base_dtype": "bf16",
            "train_device": "NVIDIA H100 80GB HBM3",
            "train_oom_retries": 1,
            "validation_runtime_s": 90.0,
            "save_runtime_s": 6.0,
            "generation_device": "NVIDIA H100 80GB HBM3",
            "generation_batch_size": 32,
        },
        "lead": {"generation_device": "none", "generation_batch_size": 0},
    }
    generation = {"base": {"generation_precision": "bf16"}, "lora": {"generation_precision": "bf16"}, "lead": {}}
    table = runs_table(["base", "lora", "lead"], generation, cost).splitlines()
    assert [cell.strip() for cell in table[2].strip("|").split("|")] == [
        "original (zero-shot)",
        "-",
        "-",
        "-",
        "-",
        "-",
        "bf16",
        "NVIDIA H100 80GB HBM3",
        "16",
    ]
    assert [cell.strip() for cell in table[3].strip("|").split("|")] == [
        "LoRA",
        "bf16 + TF32",
        "bf16",
        "NVIDIA H100 80GB HBM3",
        "1",
        "1.5 + 0.1 min",
        "bf16",
        "NVIDIA H100 80GB HBM3",
        "32",
    ]
    assert [cell.strip() for cell in table[4].strip("|").split("|")] == [
        "lead baseline",
        "-",
        "-",
        "-",
        "-",
        "-",
        "-",
        "none",
        "-",
    ]


def test_methods_are_labelled_by_their_recorded_type_and_baselines_by_role() -> None:
    """variant_labels: a method by the method_type its cost row carries (the type's name for the type's
    usual section name, else the section's name with it); every table and sentence uses those labels."""
    types = {
        "full": "full",
        "lora": "lora",
        "lora_r8": "lora",
        "ia3": "ia3",
        "prompt": "prompt_tuning",
        "prefix": "prefix_tuning",
        "loha": "loha",
    }
    variants = ["base", *types, "lead"]
    cost = {
        "base": {"trainable_params": 0},
        **{v: {"method_type": t, "trainable_params": 10**6, **SELECTION} for v, t in types.items()},
        "lead": {"trainable_params": 0},
    }
    labels = variant_labels(variants, cost)
    assert labels == {
        "base": "original (zero-shot)",
        "full": "full fine-tuning",
        "lora": "LoRA",
        "lora_r8": "lora_r8 (LoRA)",
        "ia3": "IA3",
        "prompt": "prompt tuning",
        "prefix": "prefix tuning",
        "loha": "LoHa",
        "lead": "lead baseline",
    }
    sentence = comparison_sentence(
        {"a": "lora_r8", "b": "full", "diff": 0.1, "ci_low": -1.0, "ci_high": 1.2, "p_value": 0.8, "p_holm": 1.0},
        labels,
    )
    assert "**lora_r8 (LoRA)** vs **full fine-tuning**: no significant difference" in sentence
    assert table_cells(selection_table(variants, cost, NOTHING_TUNED, labels), "lora_r8 (LoRA)")[0] == "lora_r8 (LoRA)"
    _, evaluation, _ = frontier_inputs({v: (0, 30.0, 1.0) for v in variants})
    assert [r["label"] for r in frontier_rows(variants, evaluation, cost, labels)] == [labels[v] for v in variants]


def test_the_report_stage_imports_no_torch() -> None:
    """The report reads files only: its process (a stage of every run) never pays torch's import."""
    code = "import sys, stages.report, stages.plots; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_tuned_settings_the_reported_model_did_not_run_with_are_flagged_not_claimed():
    from stages.tuning_report import mismatch_sentences, selection_table, tuning_mismatches

    tuning = {
        "selected_by": "validation ROUGE-L",
        "test_used": False,
        "methods": {
            "lora": {
                "experiment": "exp-1",
                "validation_rougeL": 40.0,
                "runs_compared": 3,
                "settings": {"lora.r": 16, "lora.learning_rate": 0.001},
                "space": {"lora.r": [8, 16, 32], "lora.learning_rate": {"log": [0.0003, 0.003]}},
            }
        },
    }
    # LoRA ran at r 32 after an edit; its learning rate is the tuned one
    ran = {"lora": [{"lora.r": 32, "lora.learning_rate": 0.001, "train.epochs": 3}] * 2, "base": [{}]}
    mismatches = tuning_mismatches(tuning, ran)
    assert mismatches == {"lora": [("lora.r", 16, 32)]}
    assert tuning_mismatches(tuning, {"lora": [{"lora.r": 16, "lora.learning_rate": 0.001}]}) == {}
    # one seed of two ran with the pick: still flagged, with each seed's value
    split = {"lora": [{"lora.r": 16, "lora.learning_rate": 0.001}, {"lora.r": 32, "lora.learning_rate": 0.001}]}
    assert tuning_mismatches(tuning, split) == {"lora": [("lora.r", 16, [16, 32])]}
    cost = {
        "lora": {
            "select_by": "rougeL",
            "selected_step": 3,
            "planned_steps": 3,
            "last_step": 3,
            "selected_val_rougeL": 40.0,
            "validation_dialogues": 4,
        }
    }
    table = selection_table(["lora"], cost, tuning, None, mismatches)
    assert "no: the model ran with lora.r 32 (tuned: 16); rerun with the picks (python scripts/tune.py)" in table
    assert "lora.r in [8, 16, 32] -> 16" not in table  # the picks are not claimed for a model that did not run them
    assert mismatch_sentences(mismatches) == [
        "**Warning: LoRA did not run with its tuned settings** (`lora.r` tuned 16, ran 32): the tuning above is not "
        "what this report's numbers come from."
    ]


def test_peft_methods_are_tested_against_the_method_of_type_full_whatever_its_name():
    from stages.report import comparison_pairs, full_fine_tuning

    variants = ["base", "full_ft", "lora", "lead"]
    cost = {"base": {}, "full_ft": {"method_type": "full"}, "lora": {"method_type": "lora"}, "lead": {}}
    assert full_fine_tuning(variants, cost) == "full_ft"
    assert comparison_pairs(variants, "full_ft") == [
        ("full_ft", "base"),
        ("lora", "base"),
        ("lora", "full_ft"),
        ("base", "lead"),
    ]
    assert comparison_pairs(["base", "lora"], full_fine_tuning(["base", "lora"], cost)) == [("lora", "base")]
