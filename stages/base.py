"""Stage `base`: the original model as a variant folder, pinned to an exact commit.

models/base/pin.json holds the model's name, the revision asked for and the commit it resolved to
(a Hub commit SHA, or a content hash of a local directory), so every stage (prepare's tokenizer,
each training stage, generation) loads the same base weights, and a moved Hub branch shows up as
a changed pin (and reruns what it feeds) only when this stage reruns: on a `model` change or
`dvc repro -f base`. It has its own stage, apart from the lead rule, so a `lead.turns` change
never re-resolves the pin. It also writes the zero-cost metrics/train/base.json,
metrics/timing/train/base.json and an empty metrics/validation/base.json, the files every trained
method writes, so the cost table has a row for the original model.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import family
from stages.errors import run_stage
from stages.jsonio import write_json
from stages.modeling import count_parameters_from_config, resolve_revision
from stages.params import ModelParams, load_params

PIN_FILE = Path("models/base/pin.json")
PIN_METRICS_FILE = Path("metrics/base_model.json")
METRICS_FILE = Path("metrics/train/base.json")
TIMING_FILE = Path("metrics/timing/train/base.json")
CURVES_FILE = Path("metrics/validation/base.json")  # no training, no curves: the same files as a method


def base_pin(params: ModelParams) -> dict[str, str | None]:
    return {
        "name": params.name,
        "revision": params.revision,
        "resolved_revision": resolve_revision(params.name, params.revision),
    }


def family_metrics(params: ModelParams) -> dict[str, str]:
    """The model's family and architecture, as flat metrics: a changed model shows in `dvc metrics diff`.
    What each method's `auto` settings resolved to for it is in metrics/train/<method>.json (a method's
    own stage resolves them, so adding a method never reruns this stage or re-resolves the pin)."""
    config = family.load_config(params.name, params.revision)
    return {"base_model_family": family.family(config), "base_model_type": config.model_type}


def untrained_metrics(total_params: int) -> dict[str, float]:
    # saved_mb: the weights in fp32 (4 bytes a parameter), as FLAN-T5 stores them
    return {
        "trainable_params": 0,
        "total_params": total_params,
        "trainable_percent": 0.0,
        "saved_mb": round(4 * total_params / 2**20, 3),
    }


def main() -> None:
    params = load_params()
    pin = base_pin(params.model)
    write_json(pin, PIN_FILE)
    # the same pin as a metrics file: a moved Hub branch shows up in `dvc metrics diff`
    # and the family and architecture
    write_json({**{f"base_model_{k}": v for k, v in pin.items()}, **family_metrics(params.model)}, PIN_METRICS_FILE)
    write_json(untrained_metrics(count_parameters_from_config(params.model)), METRICS_FILE)
    write_json({"train_runtime_s": 0.0}, TIMING_FILE)  # nothing trained, nothing spent
    write_json({"history": [], "training": []}, CURVES_FILE)
    print(json.dumps(pin))


if __name__ == "__main__":
    run_stage(main)
