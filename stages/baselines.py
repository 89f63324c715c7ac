"""Stage `baselines`: the two variants that are not trained, as folders like every other variant.

- models/base/pin.json: the original model's name, the revision asked for and the commit it
  resolved to (a Hub commit SHA, or a content hash of a local directory), so every stage loads the
  same base weights and a moved Hub branch shows up as a changed pin (and reruns what it feeds).
- models/lead/lead.json: the lead rule (the dialogue's first `lead.turns` turns): the trivial
  baseline every reader should see.
Each also gets a zero-cost metrics/train/<variant>.json and metrics/timing/train_<variant>.json,
so the cost table has one row per variant.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.errors import run_stage
from stages.jsonio import write_json
from stages.modeling import count_parameters_from_config, resolve_revision
from stages.params import ModelParams, load_params

MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics/train")
TIMING_DIR = Path("metrics/timing")
PIN_METRICS_FILE = Path("metrics/base_model.json")


def base_pin(params: ModelParams) -> dict[str, str | None]:
    return {
        "name": params.name,
        "revision": params.revision,
        "resolved_revision": resolve_revision(params.name, params.revision),
    }


def untrained_metrics(total_params: int) -> dict[str, float]:
    # saved_mb: the weights as FLAN-T5 stores them (fp32, 4 bytes a parameter)
    return {
        "trainable_params": 0,
        "total_params": total_params,
        "trainable_percent": 0.0,
        "saved_mb": round(4 * total_params / 2**20, 3),
    }


def main() -> None:
    params = load_params()
    pin = base_pin(params.model)
    total = count_parameters_from_config(params.model)
    write_json(pin, MODELS_DIR / "base" / "pin.json")
    # the same pin as a metrics file: a moved Hub branch shows up in `dvc metrics diff`
    write_json({f"base_model_{k}": v for k, v in pin.items()}, PIN_METRICS_FILE)
    write_json({"turns": params.lead.turns}, MODELS_DIR / "lead" / "lead.json")
    write_json(untrained_metrics(total), METRICS_DIR / "base.json")
    write_json(untrained_metrics(0), METRICS_DIR / "lead.json")
    for variant in ("base", "lead"):  # nothing trained, nothing spent
        write_json({"train_runtime_s": 0.0}, TIMING_DIR / f"train_{variant}.json")
    print(json.dumps(pin))


if __name__ == "__main__":
    run_stage(main)
