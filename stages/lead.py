"""Stage `lead`: the lead-N rule as a variant folder, the trivial baseline every reader should see.

models/lead/lead.json holds the rule's settings (the dialogue's first `lead.turns` turns; the
generate stage applies it). Its own stage, apart from the base model's pin, so changing
`lead.turns` reruns only the lead variant. Like every variant it gets a zero-cost
metrics/train/lead.json, metrics/timing/train/lead.json and an empty
metrics/validation/lead.json, as every trained method writes them.
"""

from __future__ import annotations

from pathlib import Path

from stages.errors import run_stage
from stages.jsonio import write_json
from stages.params import load_params

RULE_FILE = Path("models/lead/lead.json")
METRICS_FILE = Path("metrics/train/lead.json")
TIMING_FILE = Path("metrics/timing/train/lead.json")
CURVES_FILE = Path("metrics/validation/lead.json")  # no training, no curves: the same files as a method


def main() -> None:
    params = load_params()
    write_json({"turns": params.lead.turns}, RULE_FILE)
    write_json({"trainable_params": 0, "total_params": 0, "trainable_percent": 0.0, "saved_mb": 0.0}, METRICS_FILE)
    write_json({"train_runtime_s": 0.0}, TIMING_FILE)  # nothing trained, nothing spent
    write_json({"history": [], "training": []}, CURVES_FILE)


if __name__ == "__main__":
    run_stage(main)
