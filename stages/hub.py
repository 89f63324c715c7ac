"""Where a model comes from (a Hub id at a revision, or a local directory), and the one clear error
for a model or tokenizer that would not load. Shared by stages/family.py (configs and weights) and
stages/modeling.py (tokenizers, pins)."""

from __future__ import annotations

from pathlib import Path

from stages.errors import StageError


class ModelLoadError(StageError):
    """A model or tokenizer could not be loaded; the message says how to fix it."""


def load_error(name: str, revision: str, error: Exception) -> ModelLoadError:
    """One clear line for a model or tokenizer that would not load, with what to check."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    return ModelLoadError(
        f"could not load {name!r} (revision {revision!r}): {type(error).__name__}: {first_line}\n"
        "If the Hugging Face Hub is unreachable or the id is wrong, point model.name at a local "
        "directory with config.json, tokenizer files and model.safetensors, e.g. "
        "dvc exp run -S model.name=path/to/model (scripts/make_tiny_model.py writes a tiny one)."
    )


def hub_revision(name: str, revision: str) -> str | None:
    """The revision to pass to from_pretrained: none for a local directory (it has no revisions;
    passing one would be ignored anyway, so be explicit)."""
    return None if Path(name).is_dir() else revision
