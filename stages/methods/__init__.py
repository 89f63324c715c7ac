"""The method axis' code: one small module per method type that needs code of its own (full
fine-tuning, LoRA with its PiSSA/OLoRA conversion and QLoRA, IA3's feed-forward subset, prompt
tuning's init); every other type is a peft config type by name (peft_any.py).

Which methods exist, their types and arguments are data: params.yaml's `methods` and one section
each (schema: stages/method_params.py). `plan` turns a section into what the training skeleton needs
(stages/methods/plan.py), checked against a meta model before any weights load.
"""

from __future__ import annotations

from stages.method_params import MethodParams
from stages.methods import full, ia3, lora, peft_any, prompt
from stages.methods.plan import Plan
from stages.params import ModelParams

MODULES = {"full": full, "lora": lora, "ia3": ia3, "prompt_tuning": prompt}  # every other type: peft_any


def plan(section: MethodParams, base: ModelParams, seed: int) -> Plan:
    """The Plan for a method section on the pinned base model `base`; raises StageError (exit 2) for a
    type or argument peft does not accept, before any weights load."""
    return MODULES.get(section.type, peft_any).plan(section, base, seed)
