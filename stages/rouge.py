"""ROUGE scoring and significance statistics for DialogSum summaries.

Pure library module (no I/O); used by the evaluate and report stages.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import numpy as np
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Upper bound on elements in one resampling matrix, so n_resamples x n_items
# never materialises more than ~32 MiB of float64 at once.
_MAX_CHUNK_ELEMENTS = 1 << 22

# Sentence end: . ! or ? followed by whitespace. Existing newlines are kept as
# boundaries too, so already-split text is left as it is.
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> str:
    """Put each sentence of `text` on its own line."""
    # rougeLsum treats newlines as sentence boundaries; nltk punkt (what
    # HF `evaluate` uses) can't be downloaded offline, so a regex stands in.
    parts = (p.strip() for p in _SENTENCE_BOUNDARY.split(text))
    return "\n".join(p for p in parts if p)


@functools.lru_cache(maxsize=1)
def make_scorer() -> rouge_scorer.RougeScorer:
    """Return the shared scorer (built once; RougeScorer holds no per-call state)."""
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def score_dialogue(
    prediction: str,
    references: list[str],
    scorer: rouge_scorer.RougeScorer | None = None,
) -> dict[str, float]:
    """Score one prediction against its references (F-measures in 0..1).

    Keys `rouge*` take, per type, the best reference (as `score_multi`);
    keys `rouge*_mean_ref` average over references.
    """
    if not references:
        raise ValueError("references must contain at least one reference summary")
    if scorer is None:
        scorer = make_scorer()
    # Splitting only changes newlines, which the tokenizer drops for
    # rouge1/2/L, so one split text serves all four types.
    pred = split_sentences(prediction)
    per_ref = [scorer.score(split_sentences(ref), pred) for ref in references]

    result: dict[str, float] = {}
    for rouge_type in ROUGE_TYPES:
        # Max fmeasure equals the fmeasure of the reference score_multi picks.
        result[rouge_type] = max(s[rouge_type].fmeasure for s in per_ref)
    for rouge_type in ROUGE_TYPES:
        result[f"{rouge_type}_mean_ref"] = math.fsum(s[rouge_type].fmeasure for s in per_ref) / len(per_ref)
    return result


def score_corpus(predictions: list[str], references: list[list[str]]) -> list[dict[str, float]]:
    """Score each prediction against its own list of references."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"dialogue {i} has an empty reference list")
    scorer = make_scorer()
    return [score_dialogue(p, r, scorer) for p, r in zip(predictions, references)]


def mean_scores(per_dialogue: list[dict[str, float]]) -> dict[str, float]:
    """Average each key over dialogues, x100, rounded to 4 decimals."""
    if not per_dialogue:
        raise ValueError("per_dialogue is empty")
    # Plain means instead of rouge_score's BootstrapAggregator, which draws
    # from unseeded numpy and so is not reproducible.
    return {
        key: round(100.0 * math.fsum(d[key] for d in per_dialogue) / len(per_dialogue), 4) for key in per_dialogue[0]
    }


def _check_resampling_args(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _chunks(n_resamples: int, n_items: int):
    """Yield row counts that add up to n_resamples, bounded in memory."""
    # Chunk size depends only on the inputs' shape, so the random stream
    # (and hence the result) is the same on every run.
    rows = max(1, _MAX_CHUNK_ELEMENTS // max(1, n_items))
    done = 0
    while done < n_resamples:
        step = min(rows, n_resamples - done)
        yield step
        done += step


def _bootstrap_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    n = values.shape[0]
    out = np.empty(n_resamples, dtype=np.float64)
    start = 0
    for rows in _chunks(n_resamples, n):
        idx = rng.integers(0, n, size=(rows, n))
        out[start : start + rows] = values[idx].mean(axis=1)
        start += rows
    return out


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(samples, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(low), float(high)


def _as_1d(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence")
    return arr


def bootstrap_ci(
    values: Sequence[float],
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling items (dialogues)."""
    _check_resampling_args(n_resamples, confidence)
    arr = _as_1d(values, "values")
    rng = np.random.default_rng(seed)
    return _percentile_interval(_bootstrap_means(arr, n_resamples, rng), confidence)


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int,
    seed: int,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Compare two systems scored on the same dialogues.

    Returns `diff` (mean(a) - mean(b)), `ci_low`/`ci_high` (paired bootstrap
    CI of the mean difference) and `p_value` (two-sided sign-flip
    randomization test, (count + 1) / (n_resamples + 1)).
    """
    _check_resampling_args(n_resamples, confidence)
    arr_a = _as_1d(a, "a")
    arr_b = _as_1d(b, "b")
    if arr_a.shape != arr_b.shape:
        raise ValueError(f"a and b differ in length: {arr_a.size} vs {arr_b.size}")

    d = arr_a - arr_b
    n = d.size
    observed = float(d.mean())
    if not np.any(d):
        # Every resample and sign flip would give exactly 0: no evidence at all.
        return {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}

    # Independent streams, so changing one procedure never shifts the other.
    boot_seq, perm_seq = np.random.SeedSequence(seed).spawn(2)
    ci_low, ci_high = _percentile_interval(
        _bootstrap_means(d, n_resamples, np.random.default_rng(boot_seq)), confidence
    )

    perm_rng = np.random.default_rng(perm_seq)
    # Flipped means are summed in a different order than `observed`; a tiny
    # tolerance keeps ties (e.g. the identity flip) from being missed to rounding.
    threshold = abs(observed) - 1e-12 * float(np.abs(d).max())
    count = 0
    for rows in _chunks(n_resamples, n):
        signs = np.where(perm_rng.random((rows, n)) < 0.5, -1.0, 1.0)
        flipped = (signs * d).mean(axis=1)
        count += int(np.count_nonzero(np.abs(flipped) >= threshold))
    p_value = (count + 1) / (n_resamples + 1)

    return {"diff": observed, "ci_low": ci_low, "ci_high": ci_high, "p_value": p_value}


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in input order.

    Rejecting where adjusted p < alpha keeps the family-wise error rate at
    alpha over all the tests together, without Bonferroni's cost of
    multiplying every p-value by the number of tests.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("p_values must be a 1-D sequence")
    if np.any(np.isnan(p)) or np.any((p < 0.0) | (p > 1.0)):
        raise ValueError(f"p-values must lie in [0, 1], got {list(p_values)}")
    m = p.size
    order = np.argsort(p, kind="stable")
    # The i-th smallest (0-based) is tested against alpha / (m - i): scale it up by (m - i).
    scaled = p[order] * (m - np.arange(m))
    # Step-down: a test is rejected only if every smaller p-value was, so an
    # adjusted p can never fall below the one before it in sorted order.
    stepped = np.minimum(np.maximum.accumulate(scaled), 1.0)
    adjusted = np.empty(m, dtype=np.float64)
    adjusted[order] = stepped
    return [float(x) for x in adjusted]
