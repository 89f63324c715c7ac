"""Tests for stages.seed_stats: intervals and paired tests over seeds x dialogues.

The simulations plant a known answer (y = mu + seed effect + dialogue effect +
noise) and count how often the intervals cover it. Their rng seeds are fixed,
so the counts are the same on every run; the bounds leave room for the
binomial error of DRAWS draws (sd ~0.009 at 95%).
"""

from __future__ import annotations

import numpy as np
import pytest

from stages.rouge import bootstrap_ci, paired_test
from stages.seed_stats import minimum_detectable_difference, seed_interval, seed_paired_test

DRAWS = 600
RESAMPLES = 400
SEEDS = 3
DIALOGUES = 200
MU = 0.4
DIALOGUE_SD = 0.1  # dialogue difficulty, shared by every seed (and by both methods)
NOISE_SD = 0.1  # seed x dialogue noise
LARGE_SEED_SD = 0.03  # ~2x the dialogue-only SE: ignoring it must show


def planted(rng: np.random.Generator, seed_sd: float, dialogue: np.ndarray | None = None, shift: float = 0.0):
    """One method's [SEEDS, DIALOGUES] scores with true mean MU + shift."""
    if dialogue is None:
        dialogue = rng.normal(0.0, DIALOGUE_SD, (1, DIALOGUES))
    seed_effect = rng.normal(0.0, seed_sd, (SEEDS, 1))
    return MU + shift + seed_effect + dialogue + rng.normal(0.0, NOISE_SD, (SEEDS, DIALOGUES))


def interval_coverage(seed_sd: float) -> tuple[float, float]:
    """Coverage of MU by seed_interval and by a dialogue-only bootstrap of the seed-averaged scores."""
    rng = np.random.default_rng(20260101)
    covered = covered_dialogues_only = 0
    for _ in range(DRAWS):
        y = planted(rng, seed_sd)
        r = seed_interval(y, RESAMPLES, int(rng.integers(2**31)))
        covered += r["ci_low"] <= MU <= r["ci_high"]
        low, high = bootstrap_ci(y.mean(axis=0), RESAMPLES, int(rng.integers(2**31)))
        covered_dialogues_only += low <= MU <= high
    return covered / DRAWS, covered_dialogues_only / DRAWS


def paired_rates(shift: float, with_dialogue_only: bool) -> dict[str, float]:
    """Two methods with their own seed effects on shared dialogues; a's true mean is b's + shift."""
    rng = np.random.default_rng(20260202)
    rejected = covered = rejected_dialogues_only = 0
    for _ in range(DRAWS):
        shared = rng.normal(0.0, DIALOGUE_SD, (1, DIALOGUES))
        # Each method also reacts to each dialogue its own way (method x dialogue interaction).
        a = planted(rng, LARGE_SEED_SD, shared + rng.normal(0.0, 0.05, (1, DIALOGUES)), shift)
        b = planted(rng, LARGE_SEED_SD, shared + rng.normal(0.0, 0.05, (1, DIALOGUES)))
        r = seed_paired_test(a, b, RESAMPLES, int(rng.integers(2**31)))
        rejected += r["p_value"] < 0.05
        covered += r["ci_low"] <= shift <= r["ci_high"]
        if with_dialogue_only:
            old = paired_test(a.mean(axis=0), b.mean(axis=0), RESAMPLES, int(rng.integers(2**31)))
            rejected_dialogues_only += old["p_value"] < 0.05
    return {
        "reject": rejected / DRAWS,
        "cover": covered / DRAWS,
        "reject_dialogues_only": rejected_dialogues_only / DRAWS,
    }


# --- one seed: today's numbers ---------------------------------------------


@pytest.mark.parametrize("seed, confidence", [(0, 0.95), (17, 0.9), (12345, 0.99)])
def test_one_seed_interval_is_bootstrap_ci_bit_for_bit(seed: int, confidence: float) -> None:
    row = np.random.default_rng(seed + 1).random(137) * 100.0
    r = seed_interval(row[None, :], 1000, seed, confidence)
    assert (r["ci_low"], r["ci_high"]) == bootstrap_ci(row, 1000, seed, confidence)
    assert r["mean"] == float(row.mean())
    assert r["method"] == "dialogues" and r["df"] is None and r["seed_sd"] is None
    assert r["seeds"] == 1 and r["dialogues"] == 137
    assert 0.0 < r["se"] < r["ci_high"] - r["ci_low"]


@pytest.mark.parametrize("seed, confidence", [(0, 0.95), (17, 0.9), (12345, 0.99)])
def test_one_seed_paired_test_is_paired_test_bit_for_bit(seed: int, confidence: float) -> None:
    rng = np.random.default_rng(seed + 2)
    a, b = rng.random(150), rng.random(150)
    r = seed_paired_test(a[None, :], b[None, :].tolist(), 1000, seed, confidence)
    expected = paired_test(a, b, 1000, seed, confidence)
    assert {k: r[k] for k in expected} == expected
    assert r["method"] == "dialogues" and r["df"] is None and r["se"] > 0.0
    assert r["unmeasured_seed_variance"] == ["a", "b"]


def test_one_seed_identical_systems_is_no_evidence() -> None:
    row = np.linspace(0.0, 1.0, 50)[None, :]
    r = seed_paired_test(row, row, 200, 3)
    assert (r["diff"], r["ci_low"], r["ci_high"], r["p_value"], r["se"]) == (0.0, 0.0, 0.0, 1.0, 0.0)


# --- several seeds: the arithmetic -----------------------------------------


def test_seed_only_variation_gives_the_t_interval_of_the_seed_means() -> None:
    # Every dialogue scores the same within a seed, so only the seed level varies:
    # SE^2 = var(r, ddof=1)/S = 0.01/3 and df = S - 1 = 2, up to bootstrap noise.
    y = np.repeat(np.array([[0.1], [0.2], [0.3]]), 40, axis=1)
    r = seed_interval(y, 20000, 5)
    assert r["mean"] == pytest.approx(0.2) and r["seed_sd"] == pytest.approx(0.1)
    assert r["se"] == pytest.approx(np.sqrt(0.01 / 3), rel=0.03)
    assert r["df"] == pytest.approx(2.0, rel=0.01)
    assert r["ci_high"] - r["mean"] == pytest.approx(4.302653 * r["se"], rel=0.01)
    assert r["method"] == "seeds x dialogues" and (r["seeds"], r["dialogues"]) == (3, 40)


def test_constant_scores_give_a_point_and_no_evidence() -> None:
    y = np.full((3, 20), 0.5)
    r = seed_interval(y, 100, 1)
    assert (r["ci_low"], r["ci_high"], r["se"], r["df"]) == (0.5, 0.5, 0.0, None)
    p = seed_paired_test(y, y[:2], 100, 1)
    assert (p["diff"], p["ci_low"], p["ci_high"], p["p_value"], p["df"]) == (0.0, 0.0, 0.0, 1.0, None)


def test_unequal_seeds_report_the_unmeasured_side() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.random((3, 80)), rng.random((1, 80)) - 0.2
    r = seed_paired_test(a, b, 2000, 4)
    assert r["unmeasured_seed_variance"] == ["b"] and r["method"] == "seeds x dialogues"
    assert (r["seeds_a"], r["seeds_b"], r["dialogues"]) == (3, 1, 80)
    assert r["diff"] == pytest.approx(a.mean() - b.mean())
    assert r["ci_low"] < r["diff"] < r["ci_high"] and r["p_value"] < 1e-6
    assert 2.0 <= r["df"] <= 79.0  # between the seed part's S_a - 1 and the dialogues' N - 1
    assert seed_paired_test(b, a, 2000, 4)["unmeasured_seed_variance"] == ["a"]


def test_same_inputs_and_seed_give_the_same_dict() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.random((4, 60)), rng.random((2, 60))
    assert seed_interval(a, 500, 8) == seed_interval(a.copy(), 500, 8)
    assert seed_paired_test(a, b, 500, 8) == seed_paired_test(a.copy(), b.copy(), 500, 8)
    assert seed_interval(a, 500, 8) != seed_interval(a, 500, 9)


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, message",
    [
        ([0.1, 0.2, 0.3], "scores must be a non-empty 2-D array [seeds, dialogues], got shape (3,)"),
        ([], "scores must be a non-empty 2-D array [seeds, dialogues], got shape (0,)"),
        ([[]], "scores must be a non-empty 2-D array [seeds, dialogues], got shape (1, 0)"),
        ([[0.1, float("nan")]], "scores contains NaN or infinite scores"),
    ],
)
def test_bad_scores_are_rejected(scores: list, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        seed_interval(scores, 100, 0)
    assert str(exc.value) == message


def test_paired_inputs_on_different_dialogues_are_rejected() -> None:
    with pytest.raises(ValueError) as exc:
        seed_paired_test(np.zeros((2, 10)), np.zeros((3, 12)), 100, 0)
    assert str(exc.value) == "a and b are scored on different dialogues: 10 vs 12"
    with pytest.raises(ValueError) as exc:
        seed_paired_test(np.zeros(10), np.zeros((1, 10)), 100, 0)
    assert str(exc.value) == "a must be a non-empty 2-D array [seeds, dialogues], got shape (10,)"


# --- minimum detectable difference -----------------------------------------


def test_minimum_detectable_difference_known_values() -> None:
    assert minimum_detectable_difference(1.0, None) == pytest.approx(1.959964 + 0.841621, abs=1e-6)
    assert minimum_detectable_difference(2.0, None) == pytest.approx(2 * 2.801585, abs=1e-5)
    # t_{0.975, 2} = 4.302653, t_{0.8, 2} = 1.060660
    assert minimum_detectable_difference(1.0, 2.0) == pytest.approx(4.302653 + 1.060660, abs=1e-5)
    mdd = [minimum_detectable_difference(1.0, df) for df in (2.0, 5.0, 30.0, 1000.0)]
    assert mdd == sorted(mdd, reverse=True) and mdd[-1] > minimum_detectable_difference(1.0, None)
    with pytest.raises(ValueError) as exc:
        minimum_detectable_difference(1.0, 0.0)
    assert str(exc.value) == "df must be > 0 or None, got 0.0"


# --- coverage with a known answer ------------------------------------------


def test_large_seed_effect_breaks_the_dialogue_only_interval_but_not_seed_interval() -> None:
    coverage, coverage_dialogues_only = interval_coverage(LARGE_SEED_SD)
    print(f"seed_sd={LARGE_SEED_SD}: seed_interval {coverage:.3f}, dialogues only {coverage_dialogues_only:.3f}")
    assert coverage_dialogues_only < 0.80
    assert 0.91 <= coverage <= 0.985


def test_no_seed_effect_seed_interval_still_covers_about_95() -> None:
    coverage, coverage_dialogues_only = interval_coverage(0.0)
    print(f"seed_sd=0: seed_interval {coverage:.3f}, dialogues only {coverage_dialogues_only:.3f}")
    # It counts the seed x dialogue noise at both levels, so it errs a little wide, not wildly.
    assert 0.91 <= coverage <= 0.995


def test_paired_test_under_the_null_rejects_about_5_percent() -> None:
    rates = paired_rates(0.0, with_dialogue_only=True)
    print(f"null: {rates}")
    assert 0.02 <= rates["reject"] <= 0.09
    assert 0.91 <= rates["cover"] <= 0.98
    # The dialogue-only test on seed-averaged scores mistakes seed luck for a difference.
    assert rates["reject_dialogues_only"] > 0.30


def test_paired_interval_covers_a_planted_difference() -> None:
    rates = paired_rates(0.05, with_dialogue_only=False)
    print(f"shift 0.05: {rates}")
    assert 0.91 <= rates["cover"] <= 0.98
