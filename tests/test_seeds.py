"""Training seeds as one axis: the params that declare them, the run names the stages share, the
report's per-variant aggregation over seeds and the verdict it opens with, on planted scores whose
answer is known."""

from __future__ import annotations

import re

import numpy as np
import pytest

from stages.aggregate import Variant, comparisons, evaluation_row, mean_row
from stages.report import comparison_pairs
from stages.runs import checked_run, parse_run, run_name, runs, stage_args
from stages.verdict import detectable_lines, protocol_lines, seed_note, verdict_lines
from tests.conftest import problems

LABELS = {"base": "original (zero-shot)", "full": "full fine-tuning", "lora": "LoRA", "lead": "lead baseline"}


def test_seeds_and_baselines_are_checked_with_the_fix(raw):
    raw["seeds"] = [42, 42, -1]
    raw["baselines"] = ["base", "oracle"]
    message = problems(raw)
    assert "seeds: must be >= 0, got -1" in message
    assert "seeds: [42, 42, -1] names a seed twice" in message
    assert "baselines: unknown oracle; each must be one of base, lead" in message
    raw["seeds"] = []
    assert "seeds: must name at least one training seed, e.g. [42]" in problems(raw)


def test_run_names_are_the_paths_every_stage_shares():
    assert run_name("lora", 42) == "lora/seed42" and run_name("base") == "base"
    assert parse_run("lora/seed42") == ("lora", 42) and parse_run("lead") == ("lead", None)
    assert runs(["full", "lora"], [1, 2], ["base"]) == ["full/seed1", "full/seed2", "lora/seed1", "lora/seed2", "base"]
    with pytest.raises(ValueError, match="not a run name: 'lora/42'"):
        parse_run("lora/42")


def test_stage_arguments_are_refused_with_the_usage():
    assert stage_args(["lora", "42"], "train", seeded=True) == ("lora", 42)
    assert stage_args(["base"], "generate") == ("base", None)
    with pytest.raises(SystemExit, match=r"^usage: python -m stages.train <method> <seed>$"):
        stage_args(["lora"], "train", seeded=True)
    with pytest.raises(SystemExit, match="the seed must be a non-negative integer, got 'x'"):
        stage_args(["lora", "x"], "generate")
    variants, seeds, baselines = ["full", "lora"], [42, 43], ["base", "lead"]
    assert checked_run("lora", 43, variants, seeds, baselines) == "lora/seed43"
    assert checked_run("lead", None, variants, seeds, baselines) == "lead"
    for args, message in (
        (("lora", 44), "seed 44 is not in params.yaml seeds [42, 43]"),
        (("lora", None), "lora is trained: name its seed, one of seeds [42, 43]"),
        (("base", 42), "base is a baseline: it has no training seed (python -m stages.<stage> base)"),
        (("ia3", 42), "unknown variant 'ia3'; params.yaml variants and baselines are full, lora, base, lead"),
    ):
        with pytest.raises(ValueError) as info:
            checked_run(*args, variants, seeds, baselines)
        assert str(info.value) == message


def variant(name: str, matrix: np.ndarray, cost: dict | None = None) -> Variant:
    """A variant whose runs scored `matrix` [seeds, dialogues] (0..1), as evaluate@ would have written it."""
    seeds = [None] if name in ("base", "lead") else [42 + i for i in range(len(matrix))]
    scores = [[{"id": f"d{i}", **{t: float(x) for t in ROUGE}} for i, x in enumerate(row)] for row in matrix]
    evaluation = [
        {
            **{t: round(100 * row.mean(), 4) for t in ROUGE},
            **{f"{t}_{k}": 0.0 for t in ROUGE for k in ("ci_low", "ci_high")},
            "dialogues": matrix.shape[1],
            "references": matrix.shape[1],
        }
        for row in matrix
    ]
    runs_ = [run_name(name, s) for s in seeds]
    costs = [cost or {}] * len(seeds)
    return Variant(name, runs_, seeds, evaluation, [{}] * len(seeds), costs, scores, [{}] * len(seeds))


ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def planted(seeds: int = 3, dialogues: int = 300) -> dict[str, Variant]:
    """LoRA 2 points below full fine-tuning, full 10 above the original model, over seed noise."""
    rng = np.random.default_rng(7)
    dialogue = rng.uniform(0.2, 0.5, dialogues)
    base = dialogue + rng.normal(0, 0.05, dialogues)
    full = 0.10 + dialogue + rng.normal(0, 0.003, (seeds, 1)) + rng.normal(0, 0.05, (seeds, dialogues))
    lora = 0.08 + dialogue + rng.normal(0, 0.003, (seeds, 1)) + rng.normal(0, 0.05, (seeds, dialogues))
    full_cost = {"trainable_params": 1000, "train_runtime_s": 100.0, "saved_mb": 100.0, "peak_gpu_memory_mb": 2000.0}
    lora_cost = {"trainable_params": 14, "train_runtime_s": 60.0, "saved_mb": 1.0, "peak_gpu_memory_mb": 900.0}
    return {
        "base": variant("base", base[None, :], {"trainable_params": 0}),
        "full": variant("full", full, full_cost),
        "lora": variant("lora", lora, lora_cost),
    }


def test_the_verdict_on_planted_scores_names_the_known_answer():
    loaded = planted()
    order = ["base", "full", "lora"]
    tests = comparisons(loaded, comparison_pairs(order, "full"), 2000, seed=0)
    cost = {v: mean_row(loaded[v].cost) for v in order}
    lines = verdict_lines(["full", "lora"], tests, cost, LABELS, "full")
    lora = next(line for line in lines if line.startswith("- **LoRA**"))
    by_pair = {(t["a"], t["b"]): t for t in tests}
    gap = by_pair[("lora", "full")]
    # the planted gap is -2 points (x100), inside the interval, and beyond noise at 3 seeds x 300 dialogues
    assert gap["ci_low"] < -2.0 < gap["ci_high"] and gap["p_holm"] < 0.05
    assert lora.startswith(f"- **LoRA**: {gap['diff']:+.2f} ROUGE-L vs full fine-tuning (95% CI ")
    assert "3 seeds x 300 dialogues), beyond noise" in lora
    assert "at 1.4% of full fine-tuning's trainable params, 0.45x its peak memory, 0.6x its train time" in lora
    full = next(line for line in lines if line.startswith("- **full fine-tuning**"))
    assert "ROUGE-L vs original (zero-shot)" in full and "beyond noise" in full
    # the smallest detectable difference: from each comparison's standard error, below the planted gap
    (detectable,) = detectable_lines(tests, LABELS, "full")
    assert 0 < float(re.search(r"ROUGE-L points: LoRA (\d+\.\d+)", detectable)[1]) < 2.0


def test_a_gap_inside_seed_noise_is_within_noise():
    rng = np.random.default_rng(3)
    dialogue = rng.uniform(0.2, 0.5, 200)
    # 0.5 points apart, but each seed moves a method by ~2 points
    full = dialogue + rng.normal(0, 0.02, (3, 1)) + rng.normal(0, 0.03, (3, 200))
    lora = -0.005 + dialogue + rng.normal(0, 0.02, (3, 1)) + rng.normal(0, 0.03, (3, 200))
    loaded = {"full": variant("full", full), "lora": variant("lora", lora)}
    (test,) = comparisons(loaded, [("lora", "full")], 2000, seed=0)
    assert test["p_holm"] > 0.05 and test["ci_low"] < 0 < test["ci_high"]
    cost = {"full": {"trainable_params": 10, "train_runtime_s": 1.0, "saved_mb": 1.0}} | {
        "lora": {"trainable_params": 1, "train_runtime_s": 1.0, "saved_mb": 1.0}
    }
    (line,) = verdict_lines(["lora"], [test], cost, LABELS, "full")
    assert "within noise" in line


def test_one_seed_reduces_to_the_run_s_own_numbers_and_says_so():
    one = variant("lora", np.random.default_rng(1).uniform(0, 1, (1, 50)))
    row = evaluation_row(one, 200, seed=0)
    assert row["rougeL"] == one.evaluation[0]["rougeL"] and row["rougeL_seed_sd"] is None and row["seeds"] == 1
    assert "**Seed variance was not measured**" in seed_note([42])
    assert "dvc exp run -S 'seeds=[42,43,44]'" in seed_note([42])
    two = variant("lora", np.random.default_rng(1).uniform(0, 1, (2, 50)))
    row = evaluation_row(two, 200, seed=0)
    assert row["seeds"] == 2 and row["rougeL_seed_sd"] > 0 and len(row["seed_rougeL"]) == 2
    assert row["rougeL_ci_low"] < row["rougeL"] < row["rougeL_ci_high"]
    assert "under 2 training seeds (42, 43)" in seed_note([42, 43])


def test_the_protocol_states_budgets_and_flags_unequal_ones():
    tuned = {
        "test_used": False,
        "trial_seed": 42,
        "methods": {
            "full": {"runs_compared": 4, "settings": {"full.learning_rate": 1.0e-4}, "validation_dialogues": 500},
            "lora": {"runs_compared": 4, "settings": {"lora.r": 16}, "validation_dialogues": 500},
        },
    }
    (line,) = protocol_lines(tuned, ["full", "lora"], [42, 43], LABELS)
    assert "each method had the same budget, 4 trials" in line and "on 500 validation dialogues" in line
    assert "Picks: full fine-tuning full.learning_rate=0.0001; LoRA lora.r=16" in line
    assert "under every seed (42, 43)" in line and line.endswith("The test split chose nothing.")
    tuned["methods"]["lora"]["runs_compared"] = 9
    (line,) = protocol_lines(tuned, ["full", "lora"], [42], LABELS)
    assert "**the tuning budgets differ**: full fine-tuning 4 trials, LoRA 9 trials" in line
