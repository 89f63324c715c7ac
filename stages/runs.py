"""One name per run: a trained method under one training seed (`lora/seed42`), or a baseline (`base`).

A run's name is the path every stage writes it under (models/<run>, data/predictions/<run>.jsonl,
metrics/evaluate/<run>.json, ...), so the training, generate and evaluate stages of one run, and the
report reading them, agree on it without a table. A baseline (the original model, the lead rule)
does not train, so it has no seed and its name is its variant's.
"""

from __future__ import annotations

import re

_RUN = re.compile(r"^(?P<variant>[a-z0-9_]+)(?:/seed(?P<seed>[0-9]+))?$")


def run_name(variant: str, seed: int | None = None) -> str:
    return variant if seed is None else f"{variant}/seed{seed}"


def parse_run(name: str) -> tuple[str, int | None]:
    """The variant and training seed of a run name (None for a baseline)."""
    match = _RUN.match(name)
    if match is None:
        raise ValueError(f"not a run name: {name!r} (expected <method>/seed<seed> or a baseline such as base)")
    seed = match["seed"]
    return match["variant"], None if seed is None else int(seed)


def stage_args(argv: list[str], stage: str, seeded: bool | None = None) -> tuple[str, int | None]:
    """`<variant> [<seed>]` from a stage's command line, as dvc.yaml passes them. `seeded` True requires
    the seed (training), False forbids it, None takes either (generate, evaluate: a baseline has none)."""
    usage = f"usage: python -m stages.{stage} <method> <seed>" + (
        " (or a baseline: base, lead)" if seeded is None else ""
    )
    if not argv or len(argv) > 2 or (seeded and len(argv) != 2) or (seeded is False and len(argv) != 1):
        raise SystemExit(usage)
    if len(argv) == 2 and not argv[1].isdigit():
        raise SystemExit(f"{usage}: the seed must be a non-negative integer, got {argv[1]!r}")
    return argv[0], int(argv[1]) if len(argv) == 2 else None


def runs(variants: list[str], seeds: list[int], baselines: list[str]) -> list[str]:
    """Every run the report compares: each trained variant under each seed, then each baseline once."""
    return [run_name(v, s) for v in variants for s in seeds] + list(baselines)


def checked_run(variant: str, seed: int | None, variants: list[str], seeds: list[int], baselines: list[str]) -> str:
    """The run name of a generate/evaluate stage's arguments, refused unless params.yaml lists it."""
    if seed is None and variant in baselines:
        return run_name(variant)
    if seed is not None and variant in variants and seed in seeds:
        return run_name(variant, seed)
    if variant in baselines:
        raise ValueError(f"{variant} is a baseline: it has no training seed (python -m stages.<stage> {variant})")
    if variant not in variants:
        named = ", ".join([*variants, *baselines])
        raise ValueError(f"unknown variant {variant!r}; params.yaml variants and baselines are {named}")
    if seed is None:
        raise ValueError(f"{variant} is trained: name its seed, one of seeds {seeds}")
    raise ValueError(f"seed {seed} is not in params.yaml seeds {seeds}")
