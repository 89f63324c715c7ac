"""The verdict, first in the report: what each trained method buys against full fine-tuning and
against the original model, in quality (with an interval over seeds and dialogues, and whether it
is beyond noise) and in cost (ratios to full fine-tuning), then the protocol that produced it and
the smallest difference this run could have detected.

Pure functions of the report's aggregated rows (stages/aggregate.py) and paired tests.
"""

from __future__ import annotations

from typing import NamedTuple

from stages.seed_stats import minimum_detectable_difference
from stages.tuning_report import mismatch_sentences

SIGNIFICANCE = 0.05  # family-wise error rate over all comparisons together (Holm)
POWER = 0.8  # the usual design power for a minimum detectable difference (Cohen 1988)
MEASURE_SEEDS = "dvc exp run -S 'seeds=[42,43,44]'"  # the command that measures seed variance


def peak_memory(cost: dict) -> float | None:
    key = next((k for k in cost if k.startswith("peak_")), None)
    return cost[key] if key else None


def ratio(value: float | None, reference: float | None) -> str | None:
    if value is None or not reference:
        return None
    return f"{value / reference:.2g}x"


def cost_phrase(cost: dict, full: dict | None, full_label: str) -> str:
    """A method's cost beside full fine-tuning's: params as a share, memory, train time, size as ratios."""
    if full is None or cost is full:
        memory = peak_memory(cost)
        parts = [
            f"{cost['trainable_params']:,} trainable params",
            f"{cost['train_runtime_s'] / 60:.1f} min of training",
        ]
        return ", ".join(parts + ([f"{memory:,.0f} MB peak memory"] if memory is not None else []))
    share = 100 * cost["trainable_params"] / full["trainable_params"] if full["trainable_params"] else None
    parts = [f"{share:.2g}% of {full_label}'s trainable params" if share is not None else None]
    for what, value, reference in (
        ("peak memory", peak_memory(cost), peak_memory(full)),
        ("train time", cost["train_runtime_s"], full["train_runtime_s"]),
        ("saved size", cost["saved_mb"], full["saved_mb"]),
    ):
        if (r := ratio(value, reference)) is not None:
            parts.append(f"{r} its {what}")
    return ", ".join(p for p in parts if p)


def difference_phrase(test: dict, against: str) -> str:
    """`-1.20 ROUGE-L vs X (95% CI -2.00 to -0.40; 3 seeds x 500 dialogues), beyond noise (Holm p 0.003)`."""
    # the method's seeds: a baseline has none, and a method against full fine-tuning has as many as it
    seeds = test["seeds_a"] if test["seeds_b"] in (1, test["seeds_a"]) else f"{test['seeds_a']} and {test['seeds_b']}"
    noun = "seed" if seeds == 1 else "seeds"
    beyond = (
        f"beyond noise (Holm-adjusted p {test['p_holm']:.3g})"
        if test["p_holm"] < SIGNIFICANCE
        else f"within noise (Holm-adjusted p {test['p_holm']:.3g})"
    )
    return (
        f"{test['diff']:+.2f} ROUGE-L vs {against} (95% CI {test['ci_low']:+.2f} to {test['ci_high']:+.2f}; "
        f"{seeds} {noun} x {test['dialogues']} dialogues), {beyond}"
    )


def verdict_lines(
    trained: list[str],
    tests: list[dict],
    cost: dict[str, dict],
    labels: dict[str, str],
    full: str | None,
) -> list[str]:
    """One sentence per trained method: against full fine-tuning, against the original model, its cost."""
    by_pair = {(t["a"], t["b"]): t for t in tests}
    full_cost = cost.get(full) if full else None
    lines = []
    for method in trained:
        against = [
            difference_phrase(by_pair[(method, other)], labels[other])
            for other in (full, "base")
            if other and (method, other) in by_pair
        ]
        quality = "; ".join(against) or "no comparison (neither full fine-tuning nor the original model is reported)"
        costs = cost_phrase(cost[method], full_cost, labels[full] if full else "")
        lines.append(f"- **{labels[method]}**: {quality}; at {costs}.")
    return lines


def seed_note(seeds: list[int]) -> str:
    if len(seeds) > 1:
        return (
            f"Every trained method ran under {len(seeds)} training seeds ({', '.join(map(str, seeds))}): its score is "
            "the mean over seeds, and intervals and tests resample seeds (each method's on their own) and then test "
            "dialogues, so they include training noise."
        )
    return (
        f"**Seed variance was not measured**: every method trained under one seed ({seeds[0]}), so the intervals "
        "and tests resample test dialogues only and leave training noise out; differences of about a ROUGE point "
        f"can be seed noise. Measure it with `{MEASURE_SEEDS}`."
    )


def pick_text(chosen: dict, label: str) -> str:
    """One method's pick, its validation score and the range its trials scored in."""
    settings = ", ".join(f"{k}={v}" for k, v in chosen["settings"].items()) or "its recipe"
    scores = [t["validation_rougeL"] for t in chosen.get("trials") or []]
    spread = f"; its trials {min(scores):.2f} to {max(scores):.2f}" if len(scores) > 1 else ""
    score = chosen.get("validation_rougeL")
    return f"{label} {settings}" + (f" (validation ROUGE-L {score:.2f}{spread})" if score is not None else "")


def protocol_lines(
    tuning: dict, trained: list[str], seeds: list[int], labels: dict[str, str], mismatched: tuple[str, ...] = ()
) -> list[str]:
    """Trials per method, the picks, the seeds, and that the test split chose nothing. `mismatched`: the
    tuned methods whose reported runs did not all run with their picks (stages/tuning_report.py)."""
    chosen = tuning.get("methods") or {}
    test = "chose nothing" if tuning.get("test_used") is False else "WAS used to choose"
    if not chosen:
        return [
            "Protocol: nothing was tuned; each method ran at its params.yaml recipe, and a recipe taken from a paper "
            f"can favour one method over another (`python scripts/tune.py` runs the equal-budget protocol). The test "
            f"split {test}: checkpoints were kept by validation."
        ]
    counts = {m: chosen[m]["runs_compared"] for m in trained if m in chosen}
    untuned = [labels[m] for m in trained if m not in chosen]
    equal = len(set(counts.values())) == 1 and not untuned
    budget = (
        f"each method had the same budget, {next(iter(counts.values()))} trials"
        if equal
        else "**the tuning budgets differ**: "
        + ", ".join(f"{labels[m]} {n} trials" for m, n in counts.items())
        + (f", {', '.join(untuned)} not tuned" if untuned else "")
    )
    dialogues = {c.get("validation_dialogues") for c in chosen.values()} - {None}
    picks = "; ".join(pick_text(chosen[m], labels[m]) for m in trained if m in chosen)
    return [
        f"Protocol: {budget}, trained under seed {tuning.get('trial_seed', seeds[0])} and compared by validation "
        f"ROUGE-L on {', '.join(map(str, sorted(dialogues))) or 'the'} validation dialogues. Picks: {picks}. "
        + (
            f"The picks then ran under every seed ({', '.join(map(str, seeds))}) through test generation to this report. "
            if not mismatched
            else f"**{', '.join(labels[m] for m in mismatched)} did not run with the picks** (below). "
        )
        + f"The test split {test}."
    ]


def detectable_lines(tests: list[dict], labels: dict[str, str], full: str | None) -> list[str]:
    """The smallest difference each comparison against full fine-tuning could have detected."""
    against_full = [t for t in tests if t["b"] == full and t.get("se")]
    if not against_full:
        return []
    parts = [
        f"{labels[t['a']]} {minimum_detectable_difference(t['se'], t.get('df'), SIGNIFICANCE, POWER):.2f}"
        for t in against_full
    ]
    return [
        f"Smallest difference from {labels[full]} this run could detect ({POWER:.0%} power, two-sided "
        f"{SIGNIFICANCE} before Holm's adjustment, from each comparison's observed variance, seeds and dialogues), "
        f'in ROUGE-L points: {"; ".join(parts)}. A true gap smaller than that can hide in a "within noise".'
    ]


class Verdict(NamedTuple):
    """Everything the verdict section reads."""

    trained: list[str]  # the trained variants, in report order
    seeds: list[int]
    tests: list[dict]  # the paired tests (stages/aggregate.py comparisons), Holm-adjusted
    cost: dict[str, dict]  # per variant, averaged over seeds
    labels: dict[str, str]
    full: str | None  # the full fine-tuning variant, if reported
    tuning: dict  # metrics/tuning.json
    # per tuned method, the picks its reported runs did not run with (stages/tuning_report.py)
    mismatches: dict[str, list] = {}

    def section(self) -> list[str]:
        return [
            "## Verdict",
            "\n".join(verdict_lines(self.trained, self.tests, self.cost, self.labels, self.full))
            or "(no trained method reported)",
            seed_note(self.seeds),
            *protocol_lines(self.tuning, self.trained, self.seeds, self.labels, tuple(self.mismatches)),
            *mismatch_sentences(self.mismatches, self.labels),
            *detectable_lines(self.tests, self.labels, self.full),
        ]
