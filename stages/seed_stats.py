"""Statistics over several training seeds x the same test dialogues.

Pure library module (numpy + scipy, no I/O). One method's scores form a
matrix y[s, i]: training seed s, test dialogue i. Two sources of chance
move the grand mean: which seeds were run and which dialogues were sampled.

Design:

* Two-level bootstrap. Each resample draws S seeds and N dialogues with
  replacement, independently, and takes the mean of y over the drawn seeds
  x drawn dialogues, so both levels contribute to its spread.
* t x SE, not percentile. With 2-3 seeds a percentile interval badly
  under-covers: a bootstrap of 3 values never reaches past their min/max,
  so its seed level covers ~75%. The bootstrap is used only for the standard
  error; the interval is mean +- t_df x SE with Welch-Satterthwaite df, which
  widens the interval as an honest few-seed interval must (t_2 = 4.30).
* Seeds are resampled independently per method. Methods share dialogues
  (the dialogue draw is shared: a paired comparison) but not seeds: seed 42
  of one method has nothing in common with seed 42 of another.
* One seed reduces to today's numbers: `seed_interval` gives
  `rouge.bootstrap_ci` and `seed_paired_test` gives `rouge.paired_test`,
  bit for bit. A method with one seed has unmeasured seed variance; the
  paired test names it in `unmeasured_seed_variance`.

The SE counts the seed x dialogue noise at both levels (row means and
column means both carry it), so with little dialogue variance it errs
slightly wide, never narrow. Multiple comparisons: `rouge.holm_adjust`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from stages.rouge import (
    _bootstrap_means,
    _check_resampling_args,
    _chunks,
    _percentile_interval,
    paired_test,
)


def _as_2d(scores: Any, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [seeds, dialogues], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return arr


def _two_level_means(
    mats: list[np.ndarray], n_resamples: int, dialogue_rng: np.random.Generator, seed_rngs: list[np.random.Generator]
) -> list[np.ndarray]:
    """Bootstrap means of each matrix over drawn seeds x drawn dialogues.

    One dialogue draw per resample is shared by all matrices (they are scored
    on the same dialogues); each matrix draws its own seeds from its own rng.
    """
    n = mats[0].shape[1]
    outs = [np.empty(n_resamples, dtype=np.float64) for _ in mats]
    start = 0
    for rows in _chunks(n_resamples, n):
        idx = dialogue_rng.integers(0, n, size=(rows, n))
        # Counts of each dialogue per resample: the mean over drawn dialogues
        # of every seed's row is then one matmul, counts @ y.T / n.
        offsets = (np.arange(rows) * n)[:, None]
        counts = np.bincount((idx + offsets).ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)
        for mat, rng, out in zip(mats, seed_rngs, outs):
            per_seed = counts @ mat.T / n  # [rows, S]: each seed's mean on this resample's dialogues
            s = mat.shape[0]
            drawn = rng.integers(0, s, size=(rows, s))
            out[start : start + rows] = np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1)
        start += rows
    return outs


def _seed_correction(mat: np.ndarray) -> float:
    # The bootstrap's seed level has variance pvar(r)/S (ddof=0) where the
    # unbiased one is var(r, ddof=1)/S = pvar(r)/(S-1). The difference is
    # pvar(r)/(S-1) - pvar(r)/S = pvar(r)/(S(S-1)); adding it corrects it.
    s = mat.shape[0]
    return float(np.var(mat.mean(axis=1), ddof=0)) / (s * (s - 1))


def _welch_df(total_var: float, parts: list[tuple[float, int]]) -> float | None:
    """Welch-Satterthwaite df of a variance made of (component, its df) parts.

    df = SE^4 / sum(v_k^2 / df_k). None where nothing varies (normal quantiles
    then apply, and with SE 0 the interval is a point anyway).
    """
    # A part with no degrees of freedom (a single dialogue) has nothing to estimate.
    denom = sum(v * v / dof for v, dof in parts if dof >= 1 and v > 0.0)
    if total_var <= 0.0 or denom <= 0.0:
        return None
    return float(total_var * total_var / denom)


def _quantile(q: float, df: float | None) -> float:
    return float(stats.norm.ppf(q) if df is None else stats.t.ppf(q, df))


def _boot_var(samples: np.ndarray) -> float:
    return float(samples.var(ddof=1)) if samples.size > 1 else 0.0


def seed_interval(scores: Any, n_resamples: int, seed: int, confidence: float = 0.95) -> dict[str, Any]:
    """CI of one method's grand mean over seeds x dialogues.

    `scores` is [n_seeds, n_dialogues]. One seed gives exactly
    `rouge.bootstrap_ci` of its row (method "dialogues", df None); more give
    mean +- t_df x SE from the two-level bootstrap (method "seeds x dialogues").
    """
    _check_resampling_args(n_resamples, confidence)
    y = _as_2d(scores, "scores")
    s, n = y.shape
    row_means = y.mean(axis=1)
    mean = float(y.mean())
    result: dict[str, Any] = {
        "mean": mean,
        "seed_sd": float(row_means.std(ddof=1)) if s > 1 else None,
        "seeds": s,
        "dialogues": n,
    }
    if s == 1:
        # Same rng and helpers as rouge.bootstrap_ci, so the interval is its
        # numbers bit for bit; se is the spread of those same resamples.
        boot = _bootstrap_means(y[0], n_resamples, np.random.default_rng(seed))
        ci_low, ci_high = _percentile_interval(boot, confidence)
        return result | {
            "ci_low": ci_low,
            "ci_high": ci_high,
            "se": float(np.sqrt(_boot_var(boot))),
            "df": None,
            "method": "dialogues",
        }

    dialogue_seq, seed_seq = np.random.SeedSequence(seed).spawn(2)
    (boot,) = _two_level_means([y], n_resamples, np.random.default_rng(dialogue_seq), [np.random.default_rng(seed_seq)])
    # SE^2 = Var*(bootstrap means) + pvar(r)/(S(S-1)): the seed level corrected
    # from pvar(r)/S up to the unbiased var(r, ddof=1)/S.
    se2 = _boot_var(boot) + _seed_correction(y)
    # Welch-Satterthwaite over two parts: seeds a = var(r, ddof=1)/S on S-1 df,
    # dialogues b = SE^2 - a (what the dialogue draw added) on N-1 df.
    seed_part = float(row_means.var(ddof=1)) / s
    df = _welch_df(se2, [(seed_part, s - 1), (max(se2 - seed_part, 0.0), n - 1)])
    se = float(np.sqrt(se2))
    half = _quantile((1.0 + confidence) / 2.0, df) * se
    return result | {
        "ci_low": mean - half,
        "ci_high": mean + half,
        "se": se,
        "df": df,
        "method": "seeds x dialogues",
    }


def seed_paired_test(a: Any, b: Any, n_resamples: int, seed: int, confidence: float = 0.95) -> dict[str, Any]:
    """Compare two methods, each [seeds, dialogues], on the same dialogues.

    Returns `diff` (mean(a) - mean(b)), `ci_low`/`ci_high`, two-sided
    `p_value`, `se`, `df` and which side's seed variance is unmeasured (one
    seed). Both with one seed: exactly `rouge.paired_test` on the two rows.
    """
    _check_resampling_args(n_resamples, confidence)
    ya, yb = _as_2d(a, "a"), _as_2d(b, "b")
    (sa, na), (sb, nb) = ya.shape, yb.shape
    if na != nb:
        raise ValueError(f"a and b are scored on different dialogues: {na} vs {nb}")
    unmeasured = [name for name, s in (("a", sa), ("b", sb)) if s == 1]
    result: dict[str, Any] = {"seeds_a": sa, "seeds_b": sb, "dialogues": na, "unmeasured_seed_variance": unmeasured}

    if sa == sb == 1:
        test = paired_test(ya[0], yb[0], n_resamples, seed, confidence)
        # paired_test's bootstrap stream is the first child of SeedSequence(seed):
        # se is the spread of the very resamples its CI came from.
        boot_seq, _ = np.random.SeedSequence(seed).spawn(2)
        boot = _bootstrap_means(ya[0] - yb[0], n_resamples, np.random.default_rng(boot_seq))
        return result | test | {"se": float(np.sqrt(_boot_var(boot))), "df": None, "method": "dialogues"}

    dialogue_seq, seq_a, seq_b = np.random.SeedSequence(seed).spawn(3)
    boot_a, boot_b = _two_level_means(
        [ya, yb],
        n_resamples,
        np.random.default_rng(dialogue_seq),
        [np.random.default_rng(seq_a), np.random.default_rng(seq_b)],
    )
    diff = float(ya.mean() - yb.mean())
    # Seeds are independent between methods, so each method with >= 2 seeds
    # adds its own seed-level correction; a one-seed method adds nothing
    # (its seed variance is not measured, hence `unmeasured_seed_variance`).
    se2 = _boot_var(boot_a - boot_b) + sum(_seed_correction(y) for y in (ya, yb) if y.shape[0] > 1)
    seed_parts = [(float(y.mean(axis=1).var(ddof=1)) / y.shape[0], y.shape[0] - 1) for y in (ya, yb) if y.shape[0] > 1]
    rest = max(se2 - sum(v for v, _ in seed_parts), 0.0)  # the dialogue part, on N-1 df
    df = _welch_df(se2, seed_parts + [(rest, na - 1)])
    se = float(np.sqrt(se2))
    if se == 0.0:
        # Nothing varies: the difference is exact, so it is either no evidence or certain.
        p_value = 1.0 if diff == 0.0 else 0.0
    else:
        p_value = float(2.0 * (stats.norm.sf(abs(diff) / se) if df is None else stats.t.sf(abs(diff) / se, df)))
    half = _quantile((1.0 + confidence) / 2.0, df) * se
    return result | {
        "diff": diff,
        "ci_low": diff - half,
        "ci_high": diff + half,
        "p_value": p_value,
        "se": se,
        "df": df,
        "method": "seeds x dialogues",
    }


def minimum_detectable_difference(se: float, df: float | None, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at `alpha` detects with the given power, given this SE.

    (t_{1-alpha/2, df} + t_{power, df}) x se; df None uses normal quantiles.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if se < 0.0:
        raise ValueError(f"se must be >= 0, got {se}")
    if df is not None and df <= 0.0:
        raise ValueError(f"df must be > 0 or None, got {df}")
    return (_quantile(1.0 - alpha / 2.0, df) + _quantile(power, df)) * se
