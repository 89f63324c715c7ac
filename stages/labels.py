"""What the report calls each variant: the baselines by role, a trained method by its type."""

from __future__ import annotations

from stages.method_params import method_label

BASELINE_LABELS = {"base": "original (zero-shot)", "lead": "lead baseline"}


def variant_labels(variants: list[str], cost: dict[str, dict]) -> dict[str, str]:
    """What the report calls each variant: the baselines by role, a method by its type (recorded by its
    training stage as method_type in its cost row), with the section's name when it is not the type's own."""
    return {v: BASELINE_LABELS.get(v) or method_label(v, cost[v].get("method_type", v)) for v in variants}


def label(variant: str, labels: dict[str, str] | None = None) -> str:
    """A variant's display name; without `labels`, the name read as its type's usual section (lora: LoRA)."""
    if labels and variant in labels:
        return labels[variant]
    return BASELINE_LABELS.get(variant) or method_label(
        variant, {"prompt": "prompt_tuning", "prefix": "prefix_tuning"}.get(variant, variant)
    )
