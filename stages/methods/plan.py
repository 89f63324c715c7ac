"""What a method type tells the training skeleton: how to make the trained model from the base, how
the base loads, how the result is saved, and what its `auto` settings resolved to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Plan:
    build: Callable[[Any], Any]  # freshly loaded base model -> the model to train (the base itself, or a peft model)
    save: Callable[[Any, Any, Path], None]  # (trained model, tokenizer, models/<method>) -> None
    library: str  # "transformers" (a whole model) or "peft" (an adapter on the pinned base)
    frozen_base: bool  # the base only runs forward: under bf16 training it loads in bf16
    quantization: str = "none"  # the frozen base through bitsandbytes (QLoRA: 4bit)
    # what `auto` and peft's defaults resolved to, for the model card and metrics/train/<method>.json
    resolved: dict = field(default_factory=dict)
