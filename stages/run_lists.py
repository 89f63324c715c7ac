"""The lists that say what runs, checked against each other: `methods` (trained, each a section),
`variants` (the trained methods compared), `baselines` (the zero-cost variants) and `seeds`."""

from __future__ import annotations

from typing import Any

from stages.method_params import METHOD_NAME
from stages.schema import check

UNTRAINED = ("base", "lead")  # the original model and the lead-N rule: written by their own stages


def method_problems(methods: list[str], sections: dict[str, Any], reserved: tuple[str, ...]) -> list[str]:
    """`reserved`: the names of params.yaml's fixed sections, which no method can take."""
    bad = [m for m in methods if not METHOD_NAME.match(m) or m in (*UNTRAINED, *reserved)]
    missing = [m for m in methods if m not in sections and m not in bad]
    return (
        check(
            not bad,
            f"methods: {', '.join(bad)} cannot name a method; use lowercase letters, digits and _ "
            f"(not {', '.join(UNTRAINED)} or a fixed section's name)",
        )
        + check(
            not missing,
            f"methods: {', '.join(missing)} has no section; add one, e.g. {missing[0] if missing else ''}: "
            "{type: loha, learning_rate: 1.0e-3, r: 8}",
        )
        + check(len(set(methods)) == len(methods), f"methods: {methods} names a method twice")
    )


def variant_problems(variants: list[str], methods: list[str], sections: dict[str, Any] | None = None) -> list[str]:
    baselines = [v for v in variants if v in UNTRAINED]
    untrained = [v for v in variants if v not in methods and v in (sections or {})]
    unknown = [v for v in variants if v not in methods and v not in untrained and v not in baselines]
    return (
        check(
            not unknown, f"variants: unknown {', '.join(unknown)}; each must be one of methods ({', '.join(methods)})"
        )
        + check(
            not baselines,
            f"variants: {', '.join(baselines)} is a baseline, not a trained method; list it in baselines "
            f"(baselines: [{', '.join(UNTRAINED)}])",
        )
        + check(
            not untrained,
            f"variants: {', '.join(untrained)} is not trained; add it to methods too "
            f"(-S 'methods=[{', '.join([*methods, *untrained])}]')",
        )
        + check(len(set(variants)) == len(variants), f"variants: {variants} names a variant twice")
        + check(bool(variants), "variants: must name at least one trained method, e.g. [full, lora]")
    )


def baseline_problems(baselines: list[str]) -> list[str]:
    unknown = [b for b in baselines if b not in UNTRAINED]
    return check(
        not unknown, f"baselines: unknown {', '.join(unknown)}; each must be one of {', '.join(UNTRAINED)}"
    ) + check(len(set(baselines)) == len(baselines), f"baselines: {baselines} names a baseline twice")


def seed_problems(seeds: list[int]) -> list[str]:
    negative = [s for s in seeds if s < 0]
    return (
        check(bool(seeds), "seeds: must name at least one training seed, e.g. [42]")
        + check(not negative, f"seeds: must be >= 0, got {', '.join(map(str, negative))}")
        + check(len(set(seeds)) == len(seeds), f"seeds: {seeds} names a seed twice")
    )
