"""Tests for stages.rouge: ROUGE scoring and bootstrap / permutation statistics."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer

from stages.rouge import (
    ROUGE_TYPES,
    bootstrap_ci,
    holm_adjust,
    make_scorer,
    mean_scores,
    paired_test,
    score_corpus,
    score_dialogue,
    split_sentences,
)

MEAN_KEYS = tuple(f"{t}_mean_ref" for t in ROUGE_TYPES)


def reference_scorer() -> rouge_scorer.RougeScorer:
    # Built independently of make_scorer so the comparison is not circular.
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


# --- split_sentences -------------------------------------------------------


def test_split_sentences_puts_each_sentence_on_a_line() -> None:
    text = "Hi there. How are you?  Fine!\nok then\n\nIt costs 3.5 dollars."
    assert split_sentences(text) == ("Hi there.\nHow are you?\nFine!\nok then\nIt costs 3.5 dollars.")


def test_split_sentences_does_not_change_token_based_types() -> None:
    # rouge1/2/L tokenize away newlines, so splitting must not move them.
    scorer = reference_scorer()
    pred = "Amanda baked cookies. She will bring Jerry some tomorrow!"
    ref = "Amanda baked cookies and will bring some to Jerry tomorrow. Jerry is glad."
    raw = scorer.score(ref, pred)
    split = scorer.score(split_sentences(ref), split_sentences(pred))
    for t in ("rouge1", "rouge2", "rougeL"):
        assert split[t] == raw[t]


# --- score_dialogue: hand-checked values -----------------------------------


def test_identical_strings_score_one() -> None:
    scores = score_dialogue("the cat sat on the mat", ["the cat sat on the mat"])
    assert set(scores) == set(ROUGE_TYPES) | set(MEAN_KEYS)
    assert all(v == pytest.approx(1.0) for v in scores.values())


def test_hand_computed_rouge1_and_rouge2() -> None:
    # pred tokens: the cat sat on the mat           (6)
    # ref tokens:  the cat was on the mat today     (7)
    # unigram overlap (clipped counts): the x2, cat, on, mat = 5
    #   P = 5/6, R = 5/7, F = 2PR/(P+R) = (50/42) / (65/42) = 10/13
    # bigram overlap: "the cat", "on the", "the mat" = 3 of 5 pred, 6 ref
    #   P = 3/5, R = 1/2, F = 2 * 0.3 / 1.1 = 6/11
    scores = score_dialogue("the cat sat on the mat", ["the cat was on the mat today"])
    assert scores["rouge1"] == pytest.approx(10 / 13)
    assert scores["rouge2"] == pytest.approx(6 / 11)


def test_rougelsum_uses_sentence_splitting() -> None:
    # Same two sentences in swapped order. Over the flat token stream the LCS
    # is only one sentence (3 of 6 tokens -> F 0.5); summary-level LCS matches
    # each reference sentence against every prediction sentence -> F 1.0.
    pred = "the cat ran. the dog barked."
    ref = "the dog barked. the cat ran."
    scores = score_dialogue(pred, [ref])
    assert scores["rougeL"] == pytest.approx(0.5)
    assert scores["rougeLsum"] == pytest.approx(1.0)
    # Without splitting, rougeLsum would see a single "sentence".
    unsplit = reference_scorer().score(ref, pred)
    assert unsplit["rougeLsum"].fmeasure == pytest.approx(0.5)


# --- score_dialogue: multiple references -----------------------------------

PRED = "the quick brown fox jumps"
# refs[0]: every unigram matches but no bigram does;
# refs[1]: fewer unigrams but two bigrams -> best reference differs by type.
REFS = ["fox brown quick the jumps", "the quick brown cat sleeps"]


def test_best_reference_differs_between_rouge1_and_rouge2() -> None:
    scorer = reference_scorer()
    per_ref = [scorer.score(r, PRED) for r in REFS]
    best1 = int(np.argmax([s["rouge1"].fmeasure for s in per_ref]))
    best2 = int(np.argmax([s["rouge2"].fmeasure for s in per_ref]))
    assert (best1, best2) == (0, 1)

    scores = score_dialogue(PRED, REFS)
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rouge2"] == pytest.approx(0.5)  # 2 of 4 bigrams each side


@pytest.mark.parametrize(
    ("prediction", "references"),
    [
        (PRED, REFS),
        (
            "Bob will pick Ann up at 5. They go to the cinema.",
            [
                "Bob picks Ann up at 5 and they go to the cinema.",
                "Ann and Bob are going to the cinema. Bob drives.",
                "Bob will collect Ann at five. They'll watch a film.",
            ],
        ),
    ],
)
def test_multi_reference_matches_rouge_score(prediction: str, references: list[str]) -> None:
    scorer = reference_scorer()
    pred = split_sentences(prediction)
    refs = [split_sentences(r) for r in references]
    multi = scorer.score_multi(refs, pred)
    per_ref = [scorer.score(r, pred) for r in refs]

    scores = score_dialogue(prediction, references)
    for t in ROUGE_TYPES:
        assert scores[t] == pytest.approx(multi[t].fmeasure)
        expected_mean = np.mean([s[t].fmeasure for s in per_ref])
        assert scores[f"{t}_mean_ref"] == pytest.approx(expected_mean)
    # With disagreeing references, best-of must beat the average somewhere.
    assert any(scores[t] > scores[f"{t}_mean_ref"] for t in ROUGE_TYPES)


def test_single_reference_multi_equals_mean() -> None:
    scores = score_dialogue("Tom is late. He missed the bus.", ["Tom missed the bus and will be late."])
    for t in ROUGE_TYPES:
        assert scores[t] == pytest.approx(scores[f"{t}_mean_ref"])


def test_explicit_scorer_is_used_and_the_shared_one_stems() -> None:
    # "jumps"/"jumped" match only after stemming: the default (shared) scorer stems, and a scorer
    # passed in is the one that scores
    refs = ["the fox jumped"]
    unstemmed = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    assert score_dialogue("the fox jumps", refs, make_scorer()) == score_dialogue("the fox jumps", refs)
    assert score_dialogue("the fox jumps", refs)["rouge1"] == pytest.approx(1.0)
    assert score_dialogue("the fox jumps", refs, unstemmed)["rouge1"] == pytest.approx(2 / 3)


# --- score_corpus / mean_scores --------------------------------------------


def test_score_corpus_scores_each_dialogue() -> None:
    preds = ["the cat sat on the mat", PRED]
    refs = [["the cat sat on the mat"], REFS]
    out = score_corpus(preds, refs)
    assert out == [score_dialogue(p, r) for p, r in zip(preds, refs)]


def test_score_corpus_length_mismatch() -> None:
    with pytest.raises(ValueError, match=r"^got 2 predictions but 1 reference lists$"):
        score_corpus(["a", "b"], [["a"]])


def test_score_corpus_empty_reference_list() -> None:
    with pytest.raises(ValueError, match=r"^dialogue 1 has an empty reference list$"):
        score_corpus(["a", "b"], [["a"], []])


def test_mean_scores_scales_and_rounds() -> None:
    per = [{"rouge1": 1 / 3, "rouge2": 0.0}, {"rouge1": 0.5, "rouge2": 1.0}]
    # rouge1: (1/3 + 1/2) / 2 = 5/12 -> 41.6666... -> 41.6667
    assert mean_scores(per) == {"rouge1": 41.6667, "rouge2": 50.0}


# --- bootstrap_ci -----------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    values = np.random.default_rng(1).uniform(0.2, 0.6, size=100)
    low, high = bootstrap_ci(values, n_resamples=2000, seed=7)
    assert low < values.mean() < high
    assert bootstrap_ci(list(values), n_resamples=2000, seed=7) == (low, high)
    assert bootstrap_ci(values, n_resamples=2000, seed=8) != (low, high)


def test_bootstrap_ci_narrower_with_more_items() -> None:
    rng = np.random.default_rng(2)
    few = rng.normal(0.4, 0.1, size=30)
    many = rng.normal(0.4, 0.1, size=3000)
    few_low, few_high = bootstrap_ci(few, n_resamples=1000, seed=0)
    many_low, many_high = bootstrap_ci(many, n_resamples=1000, seed=0)
    # Standard error shrinks like 1/sqrt(n): 10x narrower expected here.
    assert (many_high - many_low) < (few_high - few_low) / 3


# --- paired_test ------------------------------------------------------------


def test_paired_test_identical_systems() -> None:
    a = np.random.default_rng(3).uniform(size=50)
    result = paired_test(a, a.copy(), n_resamples=1000, seed=0)
    assert result == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}


def _better_pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    b = rng.uniform(0.2, 0.5, size=200)
    a = b + 0.1 + rng.normal(0.0, 0.02, size=200)
    return a, b


def test_paired_test_detects_clearly_better_system() -> None:
    a, b = _better_pair()
    result = paired_test(a, b, n_resamples=2000, seed=0)
    assert result["diff"] == pytest.approx(0.1, abs=0.01)
    assert result["p_value"] < 0.01
    assert 0.0 < result["ci_low"] < result["diff"] < result["ci_high"]


def test_paired_test_noise_only_is_not_significant() -> None:
    rng = np.random.default_rng(5)
    b = rng.uniform(0.2, 0.5, size=200)
    a = b + rng.normal(0.0, 0.05, size=200)
    a -= (a - b).mean()  # no true difference at all
    result = paired_test(a, b, n_resamples=2000, seed=0)
    assert result["p_value"] > 0.5
    assert result["ci_low"] < 0.0 < result["ci_high"]


def test_paired_test_swap_negates_diff_keeps_p_value() -> None:
    a, b = _better_pair()
    ab = paired_test(a, b, n_resamples=2000, seed=0)
    ba = paired_test(b, a, n_resamples=2000, seed=0)
    assert ba["diff"] == pytest.approx(-ab["diff"])
    assert ba["p_value"] == ab["p_value"]
    assert ba["ci_high"] < 0.0


def test_paired_test_is_deterministic() -> None:
    rng = np.random.default_rng(6)
    a = rng.uniform(size=120)
    b = a + rng.normal(0.0, 0.05, size=120)
    assert paired_test(a, b, 3000, seed=11) == paired_test(a, b, 3000, seed=11)
    assert paired_test(a, b, 3000, seed=12) != paired_test(a, b, 3000, seed=11)  # the seed is what fixes it


def test_paired_test_length_mismatch() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([0.1, 0.2], [0.1], n_resamples=10, seed=0)


# --- holm_adjust ------------------------------------------------------------


def test_holm_adjust_hand_computed() -> None:
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> step-down keeps 0.06;
    # back in input order: [0.01, 0.04, 0.03, 0.005] -> [0.03, 0.06, 0.06, 0.02]
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_adjust_is_monotone_capped_and_never_below_raw() -> None:
    raw = list(np.random.default_rng(9).uniform(0.0, 0.6, size=12))
    adjusted = holm_adjust(raw)
    order = np.argsort(raw)
    assert all(np.diff(np.asarray(adjusted)[order]) >= 0.0)  # same ranking as the raw p-values
    assert all(r <= a <= 1.0 for r, a in zip(raw, adjusted))
    assert max(adjusted) == 1.0  # 12 x ~0.1 and more exceed 1: capped, not above


def test_holm_adjust_smallest_is_bonferroni_single_is_unchanged() -> None:
    assert holm_adjust([0.2, 0.01, 0.3])[1] == pytest.approx(0.03)
    assert holm_adjust([0.04]) == [0.04]
    assert holm_adjust([]) == []


def test_holm_adjust_ties_get_equal_values() -> None:
    assert holm_adjust([0.02, 0.02, 0.5]) == pytest.approx([0.06, 0.06, 0.5])


@pytest.mark.parametrize("bad", [[0.1, -0.01], [1.5], [float("nan")]])
def test_holm_adjust_rejects_values_outside_0_1(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        holm_adjust(bad)
