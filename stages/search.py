"""The trials of one method's search space (params.yaml `tune.space`): a centred Latin hypercube, so
`trials` points put one trial in each of `trials` equal strata of every dimension (on a log scale for
{log: ...}), paired across dimensions by a seeded shuffle. With one dimension it is an evenly spaced
grid; with several, each value of a list is tried about equally often, and no range is left with a
gap that random search would leave at 6 trials. A space of lists only draws `trials` distinct settings
of its grid instead (a hypercube over lists alone can repeat one)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from stages.tune_params import Dimension

SIGNIFICANT = 3  # digits kept of a continuous draw: 3.16e-4, not 3.1622776601683794e-4


def rounded(value: float) -> float:
    if value == 0:
        return 0.0
    return round(value, SIGNIFICANT - 1 - math.floor(math.log10(abs(value))))


def point(dim: Dimension, u: float):
    """The value at `u` in [0, 1) along one dimension."""
    if dim.kind == "values":
        return dim.values[min(int(u * len(dim.values)), len(dim.values) - 1)]
    if dim.kind == "log":
        value = math.exp(math.log(dim.low) + u * (math.log(dim.high) - math.log(dim.low)))
    else:
        value = dim.low + u * (dim.high - dim.low)
    return min(max(rounded(value), dim.low), dim.high)


def draw(space: dict[str, Dimension], trials: int, seed: int) -> list[dict]:
    """`trials` settings of one method, the same for the same space, trials and seed (params.yaml `seed`)."""
    rng = np.random.default_rng(seed)
    if space and all(dim.kind == "values" for dim in space.values()):
        grid = list(itertools.product(*(dim.values for dim in space.values())))
        chosen = sorted(rng.choice(len(grid), size=min(trials, len(grid)), replace=False))
        return [dict(zip(space, grid[i])) for i in chosen]
    centres = (np.arange(trials) + 0.5) / trials  # stratum i's centre: one trial per 1/trials of each range
    columns = {key: rng.permutation(centres) for key in space}
    # the first dimension in stratum order, so a one-dimension space reads as a grid from low to high
    first = next(iter(space), None)
    if first is not None:
        columns[first] = centres
    return [{key: point(dim, float(columns[key][i])) for key, dim in space.items()} for i in range(trials)]
