"""The Pareto frontier of quality against cost: every variant's ROUGE-L (mean over seeds, with its
interval over seeds and dialogues, and each seed's own score) against its trainable params."""

from __future__ import annotations

from stages.labels import label

OPTIMAL, DOMINATED = "Pareto-optimal", "dominated"
WITHIN_NOISE = "Pareto-optimal, but its 95% CI overlaps a cheaper variant's"  # frontier.json `status`
ZERO_COST = "zero-cost"


def pareto_optimal(points: dict[str, tuple[float, float]]) -> set[str]:
    """Variants no other variant beats: none has at most their cost and at least their quality,
    with one of the two strictly better. `points` maps variant -> (cost, quality)."""
    return {
        v
        for v, (cost, quality) in points.items()
        if not any(c <= cost and q >= quality and (c, q) != (cost, quality) for c, q in points.values())
    }


def cheaper_overlapping(
    variant: str, variants: list[str], evaluation: dict[str, dict], cost: dict[str, dict]
) -> str | None:
    """The cheapest variant that costs fewer trainable params than `variant` and whose 95% interval
    reaches `variant`'s: its gain over that one is within the noise (interval overlap, not a test)."""
    params, low = cost[variant]["trainable_params"], evaluation[variant]["rougeL_ci_low"]
    overlapping = [
        v for v in variants if cost[v]["trainable_params"] < params and evaluation[v]["rougeL_ci_high"] >= low
    ]
    return min(overlapping, key=lambda v: cost[v]["trainable_params"], default=None)


def frontier_rows(
    variants: list[str], evaluation: dict[str, dict], cost: dict[str, dict], labels: dict[str, str] | None = None
) -> list[dict]:
    """Every variant as a point (trainable params, ROUGE-L). The ones that train nothing (the
    original model, lead) take part at 0 params, so a trained variant at or below the best of
    them is dominated. `status` says how the plot draws it: zero-cost (a reference line),
    Pareto-optimal, Pareto-optimal within the noise of a cheaper variant, or dominated."""
    optimal = pareto_optimal({v: (cost[v]["trainable_params"], evaluation[v]["rougeL"]) for v in variants})
    rows = []
    for v in variants:
        params = cost[v]["trainable_params"]
        overlaps = cheaper_overlapping(v, variants, evaluation, cost) if v in optimal and params > 0 else None
        if params == 0:
            status = ZERO_COST
        else:
            status = DOMINATED if v not in optimal else WITHIN_NOISE if overlaps else OPTIMAL
        rows.append(
            {
                "variant": v,
                "label": label(v, labels),
                "trainable_params": params,
                "zero_cost": params == 0,
                "rougeL": evaluation[v]["rougeL"],
                "rougeL_ci_low": evaluation[v]["rougeL_ci_low"],
                "rougeL_ci_high": evaluation[v]["rougeL_ci_high"],
                "seed_rougeL": evaluation[v].get("seed_rougeL", [evaluation[v]["rougeL"]]),  # each seed's point
                "pareto": OPTIMAL if v in optimal else DOMINATED,
                "overlaps": overlaps,
                "status": status,
            }
        )
    return rows


def pareto_cell(row: dict, labels: dict[str, str] | None = None) -> str:
    if row["pareto"] != OPTIMAL:
        return "no"
    return f"yes, but its 95% CI overlaps {label(row['overlaps'], labels)}'s" if row["overlaps"] else "yes"
