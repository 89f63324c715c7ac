"""A trained variant's model card (models/<method>/README.md), in the Hugging Face Hub's format."""

from __future__ import annotations

from pathlib import Path

import yaml

from stages import family
from stages.jsonio import read_json


def model_card(pin_file: Path, library: str, params: dict, metrics: dict, model_config) -> str:
    """A Hugging Face Hub model card (README.md): YAML metadata, then what was trained and how.

    Only deterministic content: the card sits in the cached model folder, so a run time in it
    would give identical weights a new hash and rerun every evaluation. Where the data came from
    is in metrics/data.json and the report (a renamed copy of the same data must not retrain).
    The base model is named with the exact commit the baselines stage pinned (`pin_file`), its
    family and architecture (`model_config`) as tags.
    """
    pin = read_json(pin_file)
    base_model = pin["name"]
    model_family = family.family(model_config)
    front_matter = {
        "base_model": base_model,
        "library_name": library,
        "pipeline_tag": "summarization",
        "tags": ["dialogue-summarization", "dvc", model_config.model_type, model_family],
    }
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in metrics.items())
    return (
        f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n\n"
        f"# {base_model} fine-tuned for dialogue summarization ({'PEFT adapter' if library == 'peft' else 'full fine-tuning'})\n\n"
        "Trained by this repository's DVC pipeline (`dvc repro`) on its data snapshot (`data/raw`; "
        "source and revision in `metrics/data.json`, whose license applies); ROUGE on the test split is in "
        "`metrics/evaluate/*.json` and `metrics/report.md`.\n\n"
        f"Base model: `{base_model}` at revision `{pin['revision']}`, resolved commit `{pin['resolved_revision']}`; "
        f"family `{model_family}`, architecture `{model_config.model_type}`.\n\n"
        f"## Params\n\n```yaml\n{yaml.safe_dump(params, sort_keys=False)}```\n\n"
        f"## Training metrics\n\n| metric | value |\n|---|---|\n{rows}\n"
    )
