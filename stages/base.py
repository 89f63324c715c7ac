"""Stage `base`: the original model as a variant folder, pinned to an exact commit.

models/base/pin.json holds the model's name, the revision asked for and the commit it resolved to
(a Hub commit SHA, or a content hash of a local directory), so every stage (prepare's tokenizer,
each training stage, generation) loads the same base weights, and a moved Hub branch shows up as
a changed pin (and reruns what it feeds) only when this stage reruns: on a `model` change or
`dvc repro -f base`. It has its own stage, apart from the lead rule, so a `lead.turns` change
never re-resolves the pin. It also writes the zero-cost metrics/train/base.json and
metrics/timing/train_base.json, so the cost table has a row for the original model.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages import family
from stages.errors import StageError, run_stage
from stages.jsonio import write_json
from stages.modeling import count_parameters_from_config, resolve_revision
from stages.params import ModelParams, load_params

PIN_FILE = Path("models/base/pin.json")
PIN_METRICS_FILE = Path("metrics/base_model.json")
METRICS_FILE = Path("metrics/train/base.json")
TIMING_FILE = Path("metrics/timing/train_base.json")


def base_pin(params: ModelParams) -> dict[str, str | None]:
    return {
        "name": params.name,
        "revision": params.revision,
        "resolved_revision": resolve_revision(params.name, params.revision),
    }


def family_defaults(params: ModelParams) -> dict[str, str | None]:
    """The model's family and what each per-family default (`auto` in params.yaml) resolves to for
    it, as flat metrics: a changed model shows its new targets in `dvc metrics diff`. None where
    peft has no default for the architecture (then `auto` fails in its training stage, saying so)."""
    config = family.load_config(params.name, params.revision)

    def joined(resolve) -> str | None:
        try:
            return ",".join(resolve())
        except StageError:
            return None

    return {
        "base_model_family": family.family(config),
        "base_model_type": config.model_type,
        "lora_auto_target_modules": joined(lambda: family.default_target_modules(config, "lora")),
        "ia3_auto_target_modules": joined(lambda: family.default_target_modules(config, "ia3")),
        "ia3_auto_feedforward_modules": joined(lambda: family.default_feedforward_modules(config)),
    }


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
    # and the family with its defaults
    write_json({**{f"base_model_{k}": v for k, v in pin.items()}, **family_defaults(params.model)}, PIN_METRICS_FILE)
    write_json(untrained_metrics(count_parameters_from_config(params.model)), METRICS_FILE)
    write_json({"train_runtime_s": 0.0}, TIMING_FILE)  # nothing trained, nothing spent
    print(json.dumps(pin))


if __name__ == "__main__":
    run_stage(main)
