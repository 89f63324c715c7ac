"""Stage `train@<method>-<seed>`: train one method of params.yaml `methods`, from its section, under one
training seed of `seeds`.

`python -m stages.train lora 42` (stages/launch.py starts it, under torchrun when the recipe asks for
several processes). Every method runs this same skeleton (stages/training.py); its type decides only
what trains and how it is saved (stages/methods/), so a new method is a params section, not code.
"""

from __future__ import annotations

import sys

from stages import methods
from stages.errors import run_stage
from stages.params import load_params
from stages.runs import stage_args
from stages.training import finish_run, start_run, train


def main(method: str, seed: int) -> None:
    params = load_params()
    run = start_run(method, seed, params)  # seed, device, the pinned base
    plan = methods.plan(run.section, run.base, seed)  # checked on a meta model, before any weights
    trained = train(run, plan)  # with out-of-memory retries, resume and validation by generation
    finish_run(run, trained, plan)  # model or adapter, metrics, costs, model card


if __name__ == "__main__":
    run_stage(lambda: main(*stage_args(sys.argv[1:], "train", seeded=True)))
